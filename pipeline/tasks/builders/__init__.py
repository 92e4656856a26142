"""Task-store builders, one module per store family. Each module exposes:

- ``OPTIONS``: the dataclass of its options (``SyntheticOptions``, ``ElectricityOptions``, ...), the one place
  their defaults live;
- ``add_options(parser)``: its ``metalstm tasks build FAMILY`` flags, names and help only: every dest is a field
  of ``OPTIONS`` (as is the common ``--source``, except for synthetic, which needs no data), and a flag not given
  takes the dataclass default because the parser's defaults are suppressed;
- ``build(options, out, *, overwrite=False, rows_per_group=None) -> manifest``: writes the store to ``out`` with
  :func:`pipeline.tasks.store.write_store`, naming the model kind its tasks are for (``model_kind``).

The destination is not an option: the same options build the same store anywhere (the experiment caches
stores by a hash of the options). Modules are imported only when their family is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import UserError

BUILDERS = {
    "synthetic": "pipeline.tasks.builders.synthetic",
    "electricity": "pipeline.tasks.builders.electricity",
    "ptb-char": "pipeline.tasks.builders.ptb",
    "mt-en-de": "pipeline.tasks.builders.mt",
}


def builder_module(family: str) -> ModuleType:
    """The builder module of ``family``; a ``UserError`` listing the families when it is unknown."""
    if family not in BUILDERS:
        raise UserError(f"unknown family {family!r}; expected one of: {', '.join(BUILDERS)}")
    name = BUILDERS[family]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise UserError(f"family {family!r}: its builder {name} is not installed in this version") from e


def options_from_mapping(family: str, values: Mapping[str, Any], key: str = "options") -> Any:
    """``family``'s options dataclass from a mapping (a YAML section), type-checked and converted by OmegaConf;
    a missing, unknown or mistyped option is a ``ValueError`` naming ``key.option``."""
    schema = builder_module(family).OPTIONS
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), dict(values)))
    except OmegaConfBaseException as e:
        name = getattr(e, "full_key", None) or ""
        reason = str(e).splitlines()[0]
        raise ValueError(f"config key {key}.{name}: {reason} ({family} builder)" if name else
                         f"config key {key}: {reason} ({family} builder)") from None
