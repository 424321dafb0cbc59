"""Tests of src/cratevit/checkpoint/: reading, key tables, shape inference, loading and writing checkpoint files."""
