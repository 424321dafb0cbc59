"""Tests of src/cratevit/registry.py, presets.py and zoo.py: family registration, presets, the model zoo."""
