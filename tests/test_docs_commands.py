"""Every ``hippo ...`` command that README.md and docs/*.md show parses (argparse only; nothing runs).

Commands are read from fenced code blocks (a line starting with ``hippo``, after an optional ``$``
prompt or ``VAR=value`` assignments, joined over ``\\`` continuations) and parsed whole. Inline code
spans in prose (``hippo eval --output``) name a command and some of its flags: the command must
exist and have those flags.
Synopsis notation is read as a reader would: ``[...]`` groups are optional and left out, ``...`` is
elided text, and ``hippo cpt RECIPE | hippo sft RECIPE`` or ``hippo annotate|eval|report`` are
several commands. Lines that show an error message (``hippo eval: error: ...``) are output, not
commands.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from hippocrates.cli import COMMANDS, build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
INLINE = re.compile(r"`(hippo [^`]+)`")


def _commands_in(path: Path, inline: bool = False) -> list[tuple[str, str]]:
    """(file:line, command text) of every hippo command in a Markdown file's code blocks (or, with
    ``inline``, in its inline code spans)."""
    found: list[tuple[str, str]] = []
    fenced = False
    pending: tuple[int, str] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            text = line.strip().removeprefix("$ ")
            if pending is not None:
                start, so_far = pending
                text = f"{so_far} {text}"
                number = start
            words = text.split()
            while words and ASSIGNMENT.match(words[0]):
                words = words[1:]
            text = " ".join(words)
            if pending is None and not text.startswith("hippo "):
                continue
            if text.endswith("\\"):
                pending = (number, text[:-1].rstrip())
                continue
            pending = None
            if not inline:
                found.append((f"{path.name}:{number}", text))
        elif inline:
            found += [(f"{path.name}:{number}", m.group(1)) for m in INLINE.finditer(line)]
    return found


def _expand(text: str) -> list[list[str]]:
    """The argv lists a documented command stands for (see the module docstring)."""
    text = text.split(" #", 1)[0].strip()  # a shell comment
    text = text.split("&&", 1)[0].strip()
    out = []
    for part in re.split(r"\s+\|\s+", text):
        part = re.sub(r"\[[^\[\]]*\]", " ", part)  # optional groups
        words = [w for w in shlex.split(part) if w != "..."]
        if len(words) < 2 or words[0] != "hippo":
            continue
        if words[1].endswith(":"):  # "hippo eval: error: ...": a message, not a command
            continue
        for name in words[1].split("|"):
            out.append([name, *words[2:]])
    return out


CASES = [(where, argv) for doc in DOCS for where, text in _commands_in(doc) for argv in _expand(text)]
MENTIONS = [
    (where, argv) for doc in DOCS for where, text in _commands_in(doc, inline=True) for argv in _expand(text)
]


def test_docs_show_commands():
    """The extraction finds the commands (a change in the Markdown cannot silently empty this test)."""
    names = {argv[0] for _, argv in CASES if not argv[0].startswith("-")}
    assert len(CASES) > 40 and len(MENTIONS) > 40
    assert {"pipeline", "eval", "compare", "serve", "export", "annotate", "report", "data"} <= names


@pytest.mark.parametrize(("where", "argv"), CASES, ids=[f"{w} {' '.join(a)[:60]}" for w, a in CASES])
def test_documented_command_parses(where, argv, capsys):
    name = argv[0]
    assert name.startswith("-") or name in COMMANDS, f"{where}: unknown command 'hippo {name}'"
    parser = build_parser(only=None if name.startswith("-") else name)
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):  # --help and --version exit 0
            pytest.fail(
                f"{where}: 'hippo {' '.join(argv)}' does not parse: {capsys.readouterr().err.strip()}"
            )


def _help(argv: list[str], capsys) -> str | None:
    """The --help text of ``hippo ARGV``, or None when that is not a command."""
    try:
        build_parser(only=argv[0]).parse_args([*argv, "--help"])
    except SystemExit as exc:
        text = capsys.readouterr().out
        return text if exc.code == 0 else None
    return None


@pytest.mark.parametrize(("where", "argv"), MENTIONS, ids=[f"{w} {' '.join(a)[:60]}" for w, a in MENTIONS])
def test_command_mentioned_in_prose_exists_with_its_flags(where, argv, capsys):
    name = argv[0]
    assert name in COMMANDS, f"{where}: unknown command 'hippo {name}'"
    text = _help([name], capsys)
    if len(argv) > 1 and not argv[1].startswith("-"):  # a sub-subcommand (hippo data check)
        text = _help(argv[:2], capsys) or text
    assert text is not None
    for flag in (w.split("=", 1)[0] for w in argv[1:] if w.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", text), f"{where}: 'hippo {name}' has no flag {flag}"
