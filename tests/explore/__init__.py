"""Tests of src/cratevit/explore/: the explore page's server and the page in a real browser."""
