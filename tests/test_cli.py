"""``metalstm --help`` and every command's ``--help`` explain every flag."""

from __future__ import annotations

import argparse

from pipeline.cli import build_parser, parse_args
from pipeline.tasks.builders import BUILDERS
from pipeline.tasks.command import family_parser

# flags of pipeline/tasks/builders/synthetic.py that still lack help text (that file is being edited elsewhere);
# remove them here once they have it: the test below fails if one gets help text and stays listed

def _without_help(parser: argparse.ArgumentParser, path: str) -> set[tuple[str, str]]:
    missing = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing |= _without_help(sub, f"{path} {name}".strip())
        elif not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
            missing.add((path, action.option_strings[-1] if action.option_strings else action.dest))
    return missing


def test_every_flag_of_every_command_has_help_text():
    missing = _without_help(build_parser(every_command=True), "")
    for family in BUILDERS:
        missing |= _without_help(family_parser(family), f"tasks build {family}")
    assert missing == set(), sorted(missing)


def test_the_demo_takes_verbose_after_its_name_and_the_global_flag_before_it():
    args = parse_args(["demo", "--verbose", "--port", "8123"])
    assert args.show_internals and not args.verbose and args.port == 8123
    args = parse_args(["-v", "demo"])
    assert args.verbose and not args.show_internals
