"""Tests of README.md, docs/, mkdocs.yml, scripts/mkdocs_api.py and examples/: every documented command, the site, the notebook."""
