"""The ``metalstm`` command. Each subcommand lives in its own module, imported only when it runs.

A command module exposes ``add_arguments(parser, command)`` and ``run(args) -> int`` (the exit code);
``args.command`` names the subcommand, so one module can serve several (evaluate, promote, rollback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline.errors import UserError

COMMANDS = {
    "demo": ("pipeline.demo.command", "the whole system end to end on this machine: train, register, serve, adapt"),
    "tasks": ("pipeline.tasks.command", "build and inspect Parquet task stores"),
    "train": ("pipeline.training.command", "meta-train on Ray Train, log and register the model in MLflow"),
    "evaluate": ("pipeline.tracking.registry", "evaluate a registered model on held-out tasks"),
    "promote": ("pipeline.tracking.registry", "move a registry alias (@champion) to a version that evaluates better"),
    "rollback": ("pipeline.tracking.registry", "move an alias back to its previous holder"),
    "register": ("pipeline.tracking.register", "log and register a checkpoint a run kept because MLflow was down"),
    "serve": ("pipeline.serving.command", "serve adaptation over HTTP with Ray Serve"),
    "ui": ("pipeline.tracking.ui", "open the MLflow UI on the store this project's runs went to"),
    "experiment": ("pipeline.experiment", "few-shot comparison against conventional LSTMs and classical baselines"),
    "bench": ("pipeline.bench.command", "benchmarks that print JSON"),
}


KEY_VALUE_LISTS = ("options", "overrides")  # the names commands give their ``key=value`` positional


def build_parser(chosen: str | None = None, *, every_command: bool = False) -> argparse.ArgumentParser:
    """The ``metalstm`` parser. Only ``chosen``'s module adds its arguments, because importing Ray and MLflow
    takes seconds; ``every_command`` adds them all (tests that check every flag and the README's commands)."""
    parser = argparse.ArgumentParser(prog="metalstm", description="Meta-LSTM: MAML for sequence models. "
                                     "Start with `metalstm demo`; `metalstm COMMAND --help` for a command's flags.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if every_command or name == chosen:
            importlib.import_module(module).add_arguments(sub, name)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` as ``metalstm`` reads it; a usage error exits 2 with the message, as argparse does."""
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args, extra = parser.parse_known_args(argv)
    # ``key=value`` items after a flag (``bench maml --json steps=1``): argparse stops filling a ``nargs="*"``
    # positional at the first flag, so they arrive here and join the command's list of overrides
    target = next((a for a in KEY_VALUE_LISTS if isinstance(getattr(args, a, None), list)), None)
    if extra and (target is None or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        getattr(args, target).extend(extra)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except (UserError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"metalstm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
