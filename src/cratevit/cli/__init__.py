"""The ``cratevit`` command: one sub-command per module of this package (``cratevit.cli.train`` ...).

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; heavy
imports stay inside ``run`` so that ``cratevit --help`` is instant. Options shared by several commands and the
checks of every kind of number are declared once, in :mod:`cratevit.cli._args`. Options and positional arguments
may come in any order (``cratevit maskcut CKPT --arch crate_base_demo photo.jpg more/ -o OUT``): each command is
parsed with argparse's ``parse_intermixed_args``. The CLI is the only place that shortens
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

__all__ = ["COMMANDS", "EXPECTED_ERRORS", "UserError", "build_parser", "main", "torchvision_mismatch"]

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
    "explore": "cratevit.cli.explore",
    "export": "cratevit.cli.export",
    "predict": "cratevit.cli.predict",
    "probe": "cratevit.cli.probe",
    "reconstruct": "cratevit.cli.reconstruct",
    "sae": "cratevit.cli.sae",
}
"""Sub-command name -> its module; the order of ``cratevit --help``."""

# Printed as one line: what the user can fix. (CheckpointError and ExportError are UserErrors.)
EXPECTED_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
"""Errors printed as one line (what the user can fix); anything else is a bug and keeps its traceback."""


# A full or read-only disk while writing outputs: one line too (PermissionError covers EACCES and EPERM).
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """CratevitWarnings as ``cratevit: warning: ...``; other warnings as Python prints them."""
    if issubclass(category, CratevitWarning):
        print(f"cratevit: warning: {message}", file=sys.stderr, flush=True)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: a bad option is one line on stderr (what is wrong, where the options are listed),
    exit status 2, instead of argparse's usage block followed by the error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


class _Parser(argparse.ArgumentParser):
    """The ``cratevit`` parser: ``cratevit COMMAND ...`` is handed to the command's parser whole and parsed there
    intermixed, so options may stand between positional arguments (plain argparse stops a ``nargs="+"``
    positional at the first option and calls the rest "unrecognized arguments")."""

    commands: dict[str, argparse.ArgumentParser]

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        command = self.commands.get(args[0]) if args else None
        if command is None:  # --help, --version, a mistyped command: argparse's own messages
            return super().parse_known_args(args, namespace)
        ns, extras = command.parse_known_intermixed_args(args[1:], namespace)
        if extras:
            command.error(f"unrecognized arguments: {' '.join(extras)}")
        ns.command = args[0]
        return ns, extras


def build_parser() -> argparse.ArgumentParser:
    """The ``cratevit`` argument parser with every sub-command (imports each command module, not torch)."""
    from ..version import __version__

    parser = _Parser(prog="cratevit", description="CRATE white-box vision transformers.")
    parser.add_argument("--version", action="version", version=f"cratevit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_CommandParser)
    parser.commands = sub.choices
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name, help=module.HELP, description=module.HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``cratevit`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("cratevit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cratevit ... | head`: the reader left; nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
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
    except Exception as e:
        mismatch = torchvision_mismatch(e)
        if mismatch:
            print(f"cratevit {args.command}: error: {mismatch}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(
            f"cratevit {args.command}: this is a bug in cratevit, not a mistake in the command; please report it "
            f"with the command line and the traceback above",
            file=sys.stderr,
        )
        return 1


def torchvision_mismatch(error: BaseException) -> str | None:
    """One line naming both versions when ``error`` is torchvision failing against the installed torch (its C++
    operators not loading: ``operator torchvision::nms does not exist``), with the fix; else None."""
    text = f"{type(error).__name__}: {error}"
    if "torchvision::" not in text and "partially initialized module 'torchvision'" not in text:
        return None
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    torch_v, vision_v = installed("torch"), installed("torchvision")
    return (
        f"torchvision {vision_v} does not match torch {torch_v} (its compiled operators fail to load: "
        f"{str(error).splitlines()[0][:120]}); install a matching pair from one index, e.g. "
        f"`pip install --force-reinstall torch torchvision --index-url https://download.pytorch.org/whl/cpu` "
        f"(CPU) or the CUDA index your torch came from"
    )
