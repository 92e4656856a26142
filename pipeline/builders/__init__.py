"""Task-store builders, one module per family, each exposing ``add_options(parser)`` and ``build(args) -> dict``.

``build`` writes the store to ``args.out`` with ``pipeline.taskstore.write_store`` (honouring
``args.overwrite``; ``args.source`` is the raw data, where the family has any) and returns its manifest.
Modules are imported only when their family is built.
"""

from __future__ import annotations

BUILDERS = {
    "synthetic": "pipeline.builders.synthetic",
    "electricity": "pipeline.builders.electricity",
    "ptb-char": "pipeline.builders.ptb",
    "mt-en-de": "pipeline.builders.mt",
}
