"""The README works as written: its size limits, its links, its Python block runs, every ``metalstm`` command in
it parses, the request bodies it sends are valid, and CI runs its one test command.

The curl examples themselves run against the demo's served model in tests/test_demo.py.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest
from readme import README, code_blocks, shell_commands, words

from pipeline.cli import COMMANDS, parse_args

ROOT = README.parent


def test_readme_is_short_and_its_tables_are_readable():
    text = README.read_text()
    assert len(text.splitlines()) <= 180
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            assert max(map(len, cells)) <= 300, f"README.md:{number}: a table cell over 300 characters"


def test_local_links_and_files_exist():
    text = README.read_text()
    links = [t for t in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in t]
    assert "docs/benchmarks.md" in links and "docs/results.md" in links
    for target in links:
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
    for command in shell_commands():
        for word in words(command):
            if word.startswith("@"):  # curl -d @FILE
                assert (ROOT / word[1:]).is_file(), f"{command!r}: no file {word[1:]}"


def test_quick_start_says_how_to_get_the_cpu_build_of_torch():
    first = code_blocks("bash")[0]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in first
    assert first.index("download.pytorch.org/whl/cpu") < first.index("pip install -e .")


def test_ci_runs_the_readmes_one_test_command():
    tests = [c for c in shell_commands() if "pytest" in c]
    assert tests == ["python3 -m pytest"], tests
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == tests[0]


def test_python_blocks_run():
    blocks = code_blocks("python")
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_block"})


def _metalstm_argv(command: str) -> list[str] | None:
    argv = words(command)
    if argv and argv[0].endswith("submit.sh"):  # deploy/submit.sh [ray job options --] COMMAND ...
        return argv[argv.index("--") + 1:] if "--" in argv else argv[1:]
    return argv[1:] if argv and argv[0] == "metalstm" else None


def test_every_metalstm_command_in_the_readme_parses(capsys):
    from pipeline.tasks.command import family_parser

    seen = set()
    for command in shell_commands():
        argv = _metalstm_argv(command)
        if argv is None or argv == ["--help"]:
            continue
        try:
            args = parse_args(argv)
            if args.command == "tasks" and args.action == "build":
                family_parser(args.family).parse_args(args.options)
        except SystemExit:
            pytest.fail(f"README command does not parse: {command}\n{capsys.readouterr().err}")
        seen.add(args.command)
    assert {"demo", "train", "promote", "evaluate", "serve", "ui", "tasks"} <= seen, seen


def test_request_bodies_are_valid_adapt_requests():
    from pipeline.serving.schema import AdaptRequest

    bodies = [w[1:] for c in shell_commands() if words(c)[:1] == ["curl"] for w in words(c) if w.startswith("@")]
    assert bodies
    for path in bodies:
        request = AdaptRequest.model_validate(json.loads((ROOT / path).read_text()))
        horizon = {len(ex.y) for ex in request.support}
        assert horizon == {24}, f"{path}: y must be the synthetic store's horizon (24 values), got {horizon}"


def test_help_lists_every_command_with_its_purpose(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name, (_, purpose) in COMMANDS.items():
        assert f"{name} {' '.join(purpose.split())}" in out, name
    assert "ui" in COMMANDS


def test_readme_quotes_are_shell_safe():
    for command in shell_commands():
        shlex.split(command, comments=True)  # raises on an unbalanced quote
