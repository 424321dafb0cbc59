"""Tests of the whole package: its layering, the bad-input matrix, the first-day frictions, ToST through every room."""
