"""``metalstm tasks build FAMILY --out URI [--source PATH] [options]`` and ``metalstm tasks inspect URI``.

A family's own options come after its name and are parsed by its builder (``metalstm tasks build FAMILY
--help`` lists them), so only the chosen builder module is imported.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import fields
from typing import NoReturn

import numpy as np

from pipeline.errors import UserError
from pipeline.tasks.builders import BUILDERS, builder_module
from pipeline.tasks.store import SEQUENCE_COLUMNS, SPLITS, read_manifest, read_tasks, verify_store

log = logging.getLogger(__name__)

WRITE_OPTIONS = ("overwrite", "rows_per_group")  # how --out is written: arguments of build, not builder options


class _Parser(argparse.ArgumentParser):
    """A parser whose errors are ``UserError`` (exit 2 with the message) instead of ``sys.exit``."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = sub.add_parser("build", help="build a task store from raw data",
                           description="Build a task store. Options after FAMILY belong to that family's builder; "
                                       "see `metalstm tasks build FAMILY --help`.")
    build.add_argument("family", metavar="FAMILY", help=f"one of: {', '.join(BUILDERS)}")
    build.add_argument("options", nargs=argparse.REMAINDER,
                       help="--out URI [--source PATH] [--overwrite] and the family's options")
    inspect = sub.add_parser("inspect", help="summarise a task store")
    inspect.add_argument("uri", help="task store path or URL")
    inspect.add_argument("--verify", action="store_true", help="also check the part files against the manifest")
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON instead")


def family_parser(family: str) -> argparse.ArgumentParser:
    """The parser of ``metalstm tasks build FAMILY``'s options: the common ones and the builder's own.

    Its defaults are suppressed, so the namespace holds only the options given and the builder's options
    dataclass supplies every other default (one place for them).
    """
    module = builder_module(family)
    parser = _Parser(prog=f"metalstm tasks build {family}", conflict_handler="resolve",  # builders may redefine
                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--out", required=True, metavar="URI", help="where to write the store (path, s3://, ...)")
    parser.add_argument("--source", metavar="PATH", help="raw data (not needed for synthetic)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    parser.add_argument("--rows-per-group", type=int, metavar="N", help="tasks per Parquet row group (default 256)")
    module.add_options(parser)
    return parser


def run_build(family: str, argv: list[str]) -> tuple[str, dict]:
    """Parse ``metalstm tasks build FAMILY``'s options into the builder's options dataclass, build the store;
    return its URI and manifest."""
    module = builder_module(family)
    given = vars(family_parser(family).parse_args(argv))
    out = given.pop("out")
    write = {k: given.pop(k) for k in WRITE_OPTIONS if k in given}
    if "source" in given and "source" not in {f.name for f in fields(module.OPTIONS)}:
        log.warning("%s: --source %s ignored (%s tasks need no data)", family, given.pop("source"), family)
    return out, module.build(module.OPTIONS(**given), out, **write)


def _histogram(hist: dict[str, int], width: int = 30) -> list[str]:
    top = max(hist.values(), default=1)
    return [f"    {k:>11} {'#' * max(1, round(width * v / top)):<{width}} {v}" for k, v in hist.items()]


def describe(uri: str, manifest: dict) -> str:
    """A human summary: counts, features, vocabulary sizes, length histograms and one sample task."""
    kind = f"  model_kind: {manifest['model_kind']}" if manifest.get("model_kind") else ""
    lines = [f"task store {uri}", f"  family: {manifest['family']}{kind}  format_version: "
             f"{manifest['format_version']}  created_at: {manifest.get('created_at', '?')}",
             "  tasks: " + ", ".join(f"{s} {manifest['counts'].get(s, 0)}" for s in SPLITS),
             f"  content_hash: {manifest['content_hash']}",
             f"  features: {json.dumps(manifest['features'])}"]
    vocab = manifest.get("vocab") or {}
    sizes = {k: len(v) for k, v in vocab.items() if isinstance(v, list)}
    lines.append("  vocabulary: " + (", ".join(f"{k} {n} symbols" for k, n in sizes.items()) or "none"))
    if manifest.get("normalisation"):
        lines.append(f"  normalisation: {json.dumps(manifest['normalisation'])[:200]}")
    seqs = manifest["schema"]["sequences"]
    lines.append("  columns: " + ", ".join(
        f"{c} {s['dtype']}[{'L' if s['ndim'] == 1 else 'L, ' + str(s['width'])}]" for c, s in seqs.items()))
    if manifest["schema"]["extras"]:
        lines.append("  extras: " + ", ".join(f"{k} {v}" for k, v in manifest["schema"]["extras"].items()))
    for name, st in manifest.get("stats", {}).items():
        lines.append(f"  {name}: min {st['min']} max {st['max']} mean {st['mean']}")
        lines += _histogram(st["hist"])
    sample = next((t for s in SPLITS for t in read_tasks(uri, s, limit=1)), None)
    if sample is not None:
        lines.append(f"  sample task {sample['task_id']!r} (split {sample['split']}, entity {sample['entity']!r}):")
        for c in SEQUENCE_COLUMNS:
            shapes = sorted({tuple(a.shape) for a in sample[c]})
            first = np.asarray(sample[c][0]).reshape(-1)[:8]
            lines.append(f"    {c}: {len(sample[c])} x {sample[c][0].dtype} shapes {shapes[:3]}"
                         f"{' ...' if len(shapes) > 3 else ''}  first values {np.round(first, 3).tolist()}")
        extras = {k: v for k, v in sample.items() if k in manifest["schema"]["extras"]}
        if extras:
            lines.append(f"    extras: {extras}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        uri, manifest = run_build(args.family, args.options)
        counts = ", ".join(f"{s} {manifest['counts'][s]}" for s in SPLITS)
        print(f"built {manifest['family']} store {uri}: {counts} tasks, {manifest['content_hash']}")
        return 0
    manifest = read_manifest(args.uri)
    if args.verify:
        verify_store(args.uri)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(describe(args.uri, manifest))
        if args.verify:
            print("  verified: files match the manifest")
    return 0
