"""Tests of src/cratevit/data/: the dataset factory and the built-in data (digits, shapes, multishapes, folders, transfer sets)."""
