"""``python -m cratevit ...`` (also what ``torchrun -m cratevit train ...`` runs)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
