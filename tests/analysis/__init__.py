"""Tests of src/cratevit/analysis/: measures, traces, hooks, segmentation, MaskCut, probes, codes, SAEs, figures."""
