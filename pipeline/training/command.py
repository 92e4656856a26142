"""``metalstm train [--config FILE] [key=value ...]``: meta-train on Ray Train (``pipeline/training/train.py``).

The config is parsed and validated here, so a bad key fails before Ray is imported. A run that stops on a
divergence raises ``TrainingDiverged`` (a ``UserError``): one line on stderr, no traceback, exit 2.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import load_config, printable_yaml


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--config", help="an OmegaConf YAML file (configs/*.yaml); defaults are embedded")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. scaling.num_workers=4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(printable_yaml(cfg), end="")
        return 0
    from pipeline.training.reporting import SCORE
    from pipeline.training.state import CHECKPOINT_FILE
    from pipeline.training.train import train

    result = train(cfg)
    checkpoint = result.checkpoint
    metrics = dict(result.metrics or {})
    warnings = metrics.pop("warnings", [])
    metrics.pop(SCORE, None)
    print(f"finished {cfg.name}: {metrics}")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if checkpoint is not None:
        print(f"last checkpoint: {checkpoint.path}/{CHECKPOINT_FILE}")
    return 0
