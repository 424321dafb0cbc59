"""Every ``cratevit ...`` command line in README.md and docs/*.md parses with the real argument parser, and the
offline, small ones run (``info PRESET``, ``zoo``, ``--help``, ``--version``).

Commands are taken from shell code blocks (continuation lines joined, comments dropped, ``&&``/``;``/``|``
chains split; ``torchrun ... -m cratevit`` and ``python -m cratevit`` included) and from inline code spans that
give a sub-command and at least one argument. A trailing ``...`` means "more options" and is dropped; nothing
else is excused: a command a reader copies must parse.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from cratevit.cli import COMMANDS, build_parser, main
from cratevit.presets import list_models
from cratevit.zoo import ZOO

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
CHAIN = {"&&", "||", ";", "|"}


@dataclass(frozen=True)
class DocCommand:
    """One command line as a page shows it, and the arguments after ``cratevit``."""

    where: str  # "docs/quickstart.md:31"
    line: str
    argv: tuple[str, ...]


def _after_cratevit(tokens: list[str]) -> list[str] | None:
    """The arguments of ``cratevit`` in one simple command, or None if it does not run cratevit."""
    i = 0
    while i < len(tokens) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[i]):  # VAR=value prefixes
        i += 1
    rest = tokens[i:]
    if rest[:1] == ["cratevit"]:
        return rest[1:]
    if rest[:1] and rest[0] in ("torchrun", "python", "python3") and "-m" in rest:
        k = rest.index("-m")
        if rest[k + 1 : k + 2] == ["cratevit"]:
            return rest[k + 2 :]
    return None


def _commands_in(text: str) -> list[tuple[str, list[str]]]:
    """(line, argv) for every cratevit command of a shell snippet (one logical line)."""
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as e:  # an unbalanced quote: a broken command line
        return [(text, ["<unparsable shell line>", str(e)])]
    out, simple = [], []
    for token in [*tokens, ";"]:
        if token in CHAIN:
            argv = _after_cratevit(simple)
            if argv is not None:
                if argv and argv[-1] == "...":
                    argv = argv[:-1]
                out.append((text.strip(), argv))
            simple = []
        else:
            simple.append(token)
    return out


def doc_commands() -> list[DocCommand]:
    """Every cratevit command line of the README and the docs pages."""
    found = []
    for page in PAGES:
        rel = page.relative_to(ROOT).as_posix()
        lines = page.read_text().splitlines()
        fence: str | None = None
        i = 0
        while i < len(lines):
            line, start = lines[i], i + 1
            stripped = line.strip()
            if stripped.startswith("```"):
                fence = None if fence is not None else stripped[3:].strip()
            elif fence in SHELL_FENCES:
                while line.endswith("\\") and i + 1 < len(lines):  # continuation lines
                    i += 1
                    line = line[:-1] + " " + lines[i].strip()
                for text, argv in _commands_in(line):
                    found.append(DocCommand(f"{rel}:{start}", text, tuple(argv)))
            elif fence is None:
                for span in re.findall(r"`(cratevit [^`]+)`", line):
                    for text, argv in _commands_in(span):
                        if len(argv) >= 2 and argv[0] in COMMANDS:
                            found.append(DocCommand(f"{rel}:{start}", text, tuple(argv)))
            i += 1
    return found


COMMAND_LINES = doc_commands()


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def parse(parser: argparse.ArgumentParser, argv: tuple[str, ...]) -> tuple[int | None, str]:
    """argparse's exit status (None: parsed) and what it printed."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(list(argv))
        except SystemExit as e:
            return int(e.code or 0), err.getvalue()
    return None, err.getvalue()


def test_the_pages_show_many_commands() -> None:
    """The extraction finds the commands (a broken extractor would pass every test below vacuously)."""
    assert len(COMMAND_LINES) >= 80
    pages = {c.where.split(":")[0] for c in COMMAND_LINES}
    assert {"README.md", "docs/quickstart.md", "docs/training.md", "docs/segmentation.md"} <= pages
    used = {c.argv[0] for c in COMMAND_LINES if c.argv}
    assert {"train", "analyze", "attention", "maskcut", "segeval", "explore", "export", "zoo", "info"} <= used


@pytest.mark.parametrize("cmd", COMMAND_LINES, ids=[c.where for c in COMMAND_LINES])
def test_command_parses(parser: argparse.ArgumentParser, cmd: DocCommand) -> None:
    status, message = parse(parser, cmd.argv)
    assert status in (None, 0), f"{cmd.where}: `{cmd.line}` does not parse: {message.strip().splitlines()[-1:]}"


def test_the_check_fails_on_a_bad_line(parser: argparse.ArgumentParser) -> None:
    """The parse check itself: an unknown option or a stray positional is caught with argparse's message."""
    [(_, argv)] = _commands_in("cratevit analyze runs/x.pt -o out --no-such-option  # comment")
    status, message = parse(parser, tuple(argv))
    assert status == 2 and "unrecognized arguments: --no-such-option" in message
    [(_, argv)] = _commands_in("OMP_NUM_THREADS=1 cratevit info crate_tiny extra-positional")
    assert parse(parser, tuple(argv))[0] == 2
    assert _commands_in("torchrun --nproc_per_node 8 -m cratevit train --data DIR ...")[0][1] == [
        "train",
        "--data",
        "DIR",
    ]
    assert _commands_in("pip install -e . && cratevit train")[0][1] == ["train"]


def _runnable(cmd: DocCommand) -> bool:
    """Offline and small: ``zoo`` (all, or a known entry), ``info`` of a preset (not a file), ``--help``,
    ``--version``."""
    argv = cmd.argv
    if "--help" in argv or "-h" in argv or argv == ("--version",):
        return True
    if argv[:1] == ("zoo",):
        return len(argv) == 1 or argv[1] in {entry.name for entry in ZOO}
    return argv[:1] == ("info",) and len(argv) >= 2 and argv[1] in set(list_models())


RUNNABLE = [c for c in COMMAND_LINES if _runnable(c)]


@pytest.mark.parametrize("cmd", RUNNABLE, ids=[c.where for c in RUNNABLE])
def test_offline_command_runs(cmd: DocCommand, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        status = main(list(cmd.argv))
    except SystemExit as e:  # --help and --version exit through argparse
        status = int(e.code or 0)
    out = capsys.readouterr()
    assert status == 0, f"{cmd.where}: `{cmd.line}` exited {status}: {out.err.strip()[-300:]}"
    assert out.out.strip(), f"{cmd.where}: `{cmd.line}` printed nothing"


def test_offline_commands_are_found() -> None:
    assert {c.argv[0] for c in RUNNABLE} >= {"info", "zoo"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: cratevit {command}" in capsys.readouterr().out
