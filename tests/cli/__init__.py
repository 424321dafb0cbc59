"""Tests of src/cratevit/cli/: the command line (entry points, shared options, info) and every command on CRATE-alpha."""
