"""The one checkpoint format: a dict of tensors and plain values, loadable with ``weights_only=True``.

Keys: ``format``, ``version``, ``model`` and ``maml`` (config dicts), ``state_dict`` (θ and any learned
inner rates), and ``extra`` (whatever the caller needs to resume or serve: optimiser state, step, RNG
states, resolved config, vocabulary, normalisation — tensors, numbers, strings, lists and dicts only).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from metalstm.config import MAMLConfig, ModelConfig
from metalstm.maml import MetaLearner
from metalstm.models import build_model

FORMAT = "metalstm.checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, learner: MetaLearner, model_cfg: ModelConfig,
                    extra: dict[str, Any] | None = None, *, overwrite: bool = False) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: checkpoint exists; pass overwrite=True to replace it")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": asdict(model_cfg),
        "maml": asdict(learner.cfg),
        "state_dict": {k: v.detach().cpu() for k, v in learner.state_dict().items()},
        "extra": extra or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike | Any, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (never unpickles code: ``weights_only=True``) and check its format version."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a MetaLSTM checkpoint (missing format={FORMAT!r})")
    if int(ckpt.get("version", 0)) > VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt['version']} is newer than this MetaLSTM "
                         f"reads ({VERSION}); upgrade metalstm")
    return ckpt


def learner_from_checkpoint(ckpt: dict[str, Any]) -> tuple[MetaLearner, ModelConfig]:
    """Rebuild the model and MAML settings a checkpoint was written with, and load its weights."""
    model_cfg = ModelConfig(**ckpt["model"])
    learner = MetaLearner(build_model(model_cfg), MAMLConfig(**ckpt["maml"]))
    dtype = next(iter(ckpt["state_dict"].values())).dtype
    learner.to(dtype)
    learner.load_state_dict(ckpt["state_dict"])
    return learner, model_cfg
