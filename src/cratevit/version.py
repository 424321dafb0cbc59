"""The version of cratevit (read by pyproject.toml and ``cratevit --version``)."""

__version__ = "0.1.0"
"""The installed version (PEP 440), as ``cratevit --version`` prints it."""
