"""The ``cratevit`` command: one sub-command per module in :mod:`cratevit.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; heavy
imports stay inside ``run`` so that ``cratevit --help`` is instant. Errors a user can fix (bad paths, files,
sizes) are raised as :class:`UserError` (or ``ValueError``/``FileNotFoundError`` from the library) and printed as
one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module; the order is the order of ``cratevit --help``.
COMMANDS: dict[str, str] = {
    "train": "cratevit.commands.train",
    "finetune": "cratevit.commands.finetune",
    "info": "cratevit.commands.info",
    "zoo": "cratevit.commands.zoo",
    "bench": "cratevit.commands.bench",
    "analyze": "cratevit.commands.analyze",
    "attention": "cratevit.commands.attention",
    "pca": "cratevit.commands.pca",
    "segeval": "cratevit.commands.segeval",
    "explore": "cratevit.commands.explore",
    "export": "cratevit.commands.export",
}


class UserError(Exception):
    """An error whose message tells the user what to fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="cratevit", description="CRATE white-box vision transformers.")
    parser.add_argument("--version", action="version", version=f"cratevit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("cratevit: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"cratevit {args.command}: error: {e}", file=sys.stderr)
        return 2
