"""Tests of src/cratevit/models/: the blocks, the backbone, each family's model file and record, the literal reference formulations."""
