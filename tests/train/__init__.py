"""Tests of src/cratevit/train/: the training loop, run state and resume, run directory, faults, torchrun, objectives."""
