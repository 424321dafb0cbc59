"""The ``cratevit`` command: one sub-command per module in :mod:`cratevit.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; heavy
imports stay inside ``run`` so that ``cratevit --help`` is instant. Errors a user can fix (bad paths, files,
sizes) are raised as :class:`UserError` (or ``ValueError``/``FileNotFoundError`` from the library) and printed as
one line, without a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
import warnings

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
    "export": "cratevit.commands.export",
}


class UserError(Exception):
    """An error whose message tells the user what to fix; printed without a traceback."""


class CratevitWarning(UserWarning):
    """A warning for the user (non-finite weights, a skipped file); the command prints it as one line."""


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}  # plus PermissionError (EACCES, EPERM)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, CratevitWarning):
        print(f"cratevit: warning: {message}", file=sys.stderr, flush=True)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


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
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("cratevit: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"cratevit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk while writing outputs
        if e.errno not in WRITE_ERRNOS:
            raise
        print(f"cratevit {args.command}: error: cannot write {e.filename or 'the output'}: {e.strerror}; free "
              f"space or choose another output folder", file=sys.stderr)  # fmt: skip
        return 2
