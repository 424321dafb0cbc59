"""The version of cratevit (read by pyproject.toml and ``cratevit --version``)."""

__version__ = "0.1.0"
