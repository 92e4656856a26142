"""``metalstm bench NAME [key=value ...] --json``: each benchmark prints one JSON object on stdout.

Benchmarks measure; tests assert behaviour. Each name maps to a module exposing
``bench(options: dict[str, str]) -> dict``; only the chosen module is imported.
"""

from __future__ import annotations

import argparse
import importlib
import json

BENCHMARKS = {
    "maml": ("metalstm.bench", "core meta-step vs the naive per-task nn.LSTM loop"),
    "ingest": ("pipeline.ingest_bench", "task store -> Ray Data -> collated tensors"),
    "train": ("pipeline.train_bench", "Ray Train meta-steps/s and all-reduce share"),
    "serve": ("pipeline.serve_bench", "HTTP load against the Serve endpoint"),
}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), help="; ".join(
        f"{k}: {v[1]}" for k, v in BENCHMARKS.items()))
    parser.add_argument("options", nargs="*", metavar="key=value", help="benchmark options")
    parser.add_argument("--json", action="store_true", help="compact one-line JSON")


def parse_options(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"bench option {item!r}: expected key=value")
        out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHMARKS[args.benchmark][0])
    result = module.bench(parse_options(args.options))
    print(json.dumps(result, indent=None if args.json else 2))
    return 0
