"""Tests of benchmarks/ and src/cratevit/cli/bench.py: the benchmark harnesses and their command."""
