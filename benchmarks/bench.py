"""The benchmark behind ``cratevit bench``, runnable from a checkout.

    python benchmarks/bench.py --preset crate_tiny              # the README's CPU table (~10 minutes on 2 cores)
    python benchmarks/bench.py --preset crate_tiny --compile    # plus a torch.compile row
    python benchmarks/bench.py --gpu --out runs/bench-gpu       # CRATE-B bf16 batch 256 vs reference and ViT-B/16
    python benchmarks/bench.py --quick                          # seconds-long smoke run

All flags are those of ``cratevit bench --help``; the measurements live in ``benchmarks/cratebench.py``.
"""

import sys

from cratevit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
