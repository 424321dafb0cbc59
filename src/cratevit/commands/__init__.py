"""Sub-commands of the ``cratevit`` program (see :mod:`cratevit.cli`)."""
