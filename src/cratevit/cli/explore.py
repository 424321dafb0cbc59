"""``cratevit explore [CKPT|PRESET] [--images DIR] [--sae SAE_CKPT ...]``: a local web page to look inside a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._args import add_arch_heads_arguments, add_threads_argument, apply_threads, port_number

HELP = "look inside a model in the browser: attention, masks, PCA, per-layer curves, dictionary atoms, SAE features (127.0.0.1)"
DEFAULT_MODEL = "crate_nano"


# The page's limits (cratevit.explore.uploads' and .session's constants; a test keeps them equal) and its security model,
# written out so that --help needs no torch import.
EPILOG = (
    "Uploads: PNG, JPEG, GIF, BMP, TIFF, WEBP only, at most 8192 pixels on the long side, 40 megapixels and an "
    "aspect ratio of 10:1, checked in the file's header before anything is decoded; an input's attention maps "
    "(layers x heads x tokens^2) must fit 768 MB. Security: only requests whose Host is 127.0.0.1:PORT or "
    "localhost:PORT are answered, and a POST needs the page's own Origin or its per-run token (403 otherwise), so "
    "other web pages cannot read or drive the page. Layers are numbered from 0 (block indices)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="a checkpoint file, a preset name (random weights) or a timm ViT name")  # fmt: skip
    p.add_argument("--images", type=Path, default=None,
                   help="a folder of images: the image set indexed for the atoms and curves, also offered in the page")  # fmt: skip
    p.add_argument("--sae", type=Path, action="append", default=[], metavar="SAE_CKPT",
                   help="an SAE checkpoint trained on this model (`cratevit sae train`), shown in the page's SAE features panel; repeatable")  # fmt: skip
    p.add_argument("--port", type=port_number, default=8000, help="port on 127.0.0.1 (0: any free port)")
    add_threads_argument(p, help="CPU threads (default 1: the page's work is one image at a time; raise it on quiet cores for large models)")  # fmt: skip
    add_arch_heads_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError, require

    require("flask", "explore", "cratevit explore")
    require("skimage", "explore", "cratevit explore (its sample photos)")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port} is not a port number; use 1024..65535, or 0 for any free port")
    if args.images is not None and not args.images.is_dir():
        raise UserError(f"--images {args.images}: not a folder of images")

    from ..explore import THREADS, load_explorer
    from ..explore.app import serve

    if args.model == DEFAULT_MODEL:
        print(f"no model given: {DEFAULT_MODEL} with random weights (pass a checkpoint file or preset)")
    explorer = load_explorer(args.model, images=args.images, arch=args.arch, heads=args.heads, saes=args.sae)
    apply_threads(args, default=THREADS)
    serve(explorer, args.port)  # a busy port: a UserError naming --port
    return 0
