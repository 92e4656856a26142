"""The README's code blocks, as the tests that run them see them: fenced blocks and the shell commands in them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def code_blocks(language: str, text: str | None = None) -> list[str]:
    """The bodies of the README's fenced blocks tagged ``language``."""
    text = README.read_text() if text is None else text
    return [body for lang, body in FENCE.findall(text) if lang == language]


def shell_commands(text: str | None = None) -> list[str]:
    """Every command of the ``bash`` blocks, one string each: continuation lines joined, ``&&`` chains split."""
    commands = []
    for block in code_blocks("bash", text):
        pending = ""
        for line in block.splitlines():
            pending = f"{pending}\n{line}" if pending else line
            if pending.rstrip().endswith("\\"):
                continue
            try:
                shlex.split(pending, comments=True)  # an open quote: the command goes on on the next line
            except ValueError:
                continue
            if pending.strip():
                commands += [part.strip() for part in pending.split(" && ")]
            pending = ""
        assert not pending, f"unterminated command in a README block: {pending!r}"
    return commands


def words(command: str) -> list[str]:
    """A command's words, without its trailing comment."""
    return shlex.split(command, comments=True)
