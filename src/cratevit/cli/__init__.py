"""The ``cratevit`` command: one sub-command per module of this package (``cratevit.cli.train`` ...).

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; heavy
imports stay inside ``run`` so that ``cratevit --help`` is instant. The CLI is the only place that shortens
errors: a :class:`~cratevit.errors.UserError` (``CheckpointError``, ``ExportError`` ...) or an expected OS/file
error is printed as one line; anything else is a bug and keeps its traceback, with a line asking to report it.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
import traceback
import warnings

from ..errors import CratevitWarning, UserError

__all__ = ["COMMANDS", "EXPECTED_ERRORS", "UserError", "build_parser", "main"]

# name -> module; the order is the order of ``cratevit --help``.
COMMANDS: dict[str, str] = {
    "train": "cratevit.cli.train",
    "finetune": "cratevit.cli.finetune",
    "pretrain": "cratevit.cli.pretrain",
    "info": "cratevit.cli.info",
    "zoo": "cratevit.cli.zoo",
    "bench": "cratevit.cli.bench",
    "analyze": "cratevit.cli.analyze",
    "attention": "cratevit.cli.attention",
    "pca": "cratevit.cli.pca",
    "segeval": "cratevit.cli.segeval",
    "maskcut": "cratevit.cli.maskcut",
    "detect-eval": "cratevit.cli.detect_eval",
    "ablation": "cratevit.cli.ablation",
    "explore": "cratevit.cli.explore",
    "export": "cratevit.cli.export",
    "predict": "cratevit.cli.predict",
    "probe": "cratevit.cli.probe",
    "reconstruct": "cratevit.cli.reconstruct",
}

# Printed as one line: what the user can fix. (CheckpointError and ExportError are UserErrors.)
EXPECTED_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


# A full or read-only disk while writing outputs: one line too (PermissionError covers EACCES and EPERM).
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """CratevitWarnings as ``cratevit: warning: ...``; other warnings as Python prints them."""
    if issubclass(category, CratevitWarning):
        print(f"cratevit: warning: {message}", file=sys.stderr, flush=True)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = argparse.ArgumentParser(prog="cratevit", description="CRATE white-box vision transformers.")
    parser.add_argument("--version", action="version", version=f"cratevit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name, help=module.HELP, description=module.HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
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
    except EXPECTED_ERRORS as e:
        print(f"cratevit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        print(
            f"cratevit {args.command}: error: cannot write {e.filename or 'the output'}: {e.strerror}; free "
            f"space or choose another output folder",
            file=sys.stderr,
        )
        return 2
    except Exception:
        traceback.print_exc()
        print(
            f"cratevit {args.command}: this is a bug in cratevit, not a mistake in the command; please report it "
            f"with the command line and the traceback above",
            file=sys.stderr,
        )
        return 1
