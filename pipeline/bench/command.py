"""``metalstm bench NAME [key=value ...] --json``: each benchmark prints one JSON object on stdout.

Benchmarks measure; tests assert behaviour (docs/benchmarks.md has the numbers). Each name maps to a module
exposing ``bench(options: dict[str, str]) -> dict``, and only the chosen one is imported (Ray and MLflow take
seconds): ``maml`` is the core's (metalstm/bench.py, plain PyTorch), the others sit next to this dispatcher in
pipeline/bench/ (``ingest``, ``train``, ``serve``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

BENCHMARKS = {
    "maml": ("metalstm.bench", "core meta-step vs the naive per-task nn.LSTM loop"),
    "ingest": ("pipeline.bench.ingest", "task store -> Ray Data -> collated tensors"),
    "train": ("pipeline.bench.train", "Ray Train meta-steps/s and all-reduce share"),
    "serve": ("pipeline.bench.serve", "HTTP load against the Serve endpoint"),
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
    options = parse_options(args.options)
    # stdout carries only the JSON: anything the benchmark or Ray prints meanwhile goes to stderr (at the
    # file-descriptor level, so background threads and child output are caught too)
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        result = module.bench(options)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    print(json.dumps(result, indent=None if args.json else 2), flush=True)
    return 0
