"""The one config schema: OmegaConf structured dataclasses, loaded from YAML and ``key=value`` overrides.

Everything is validated here, before any Ray work starts, so a typo fails in a second with the key named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metalstm.config import MAMLConfig, ModelConfig
from metalstm.models import MODEL_KINDS


@dataclass
class SyntheticDataConfig:
    """The built-in data: a sinusoid task store built on first use when ``data.store`` is empty."""

    layout: str = "sequence"  # sequence (LSTM forecaster) | points (canonical MLP regression)
    train_tasks: int = 256
    val_tasks: int = 32
    test_tasks: int = 32
    seed: int = 0


@dataclass
class DataConfig:
    store: str = ""  # task-store URI (path, s3://, memory://); empty = the built-in synthetic store
    train_split: str = "train"
    val_split: str = "val"
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # β, the meta learning rate (Adam)
    weight_decay: float = 0.0
    grad_clip: float = 10.0  # global-norm clip of the meta-gradient; 0 disables


@dataclass
class ScheduleConfig:
    meta_steps: int = 300
    meta_batch_size: int = 16  # B: tasks per meta-step, summed over all workers
    val_every: int = 50  # meta-steps between validations (and checkpoints); 0 = only at the end
    val_tasks: int = 32  # held-out tasks evaluated at each validation
    log_every: int = 10
    seed: int = 0


@dataclass
class PretrainConfig:
    """Conventional pre-training of θ before meta-training (same network, pooled support + query sequences of the
    training tasks, Adam); it counts inside Meta-LSTM's compute."""

    steps: int = 0  # Adam steps; 0 = no pre-training stage
    batch_size: int = 64  # sequences per step, summed over all workers
    lr: float = 3e-3
    val_every: int = 0  # steps between validations (and checkpoints); 0 = schedule.val_every


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # leave CPUs for Ray Data on small machines
    max_failures: int = 2  # worker failures recovered from the last checkpoint
    bucket_mb: float = 64.0  # all-reduce bucket size for the flattened meta-gradient


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty: MLFLOW_TRACKING_URI, else a local sqlite store in the working directory
    experiment: str = "metalstm"
    registered_model: str = ""  # empty: do not register
    run_name: str = ""  # empty: the run's name


@dataclass
class CheckpointConfig:
    storage_path: str = ""  # where Ray Train persists runs; empty: ./.metalstm/runs
    num_to_keep: int = 3  # the best checkpoints by val_loss (the newest when nothing is validated) + the newest
    warm_start: str = ""  # a checkpoint file to initialise θ from (not resumed: step and optimiser start fresh)


@dataclass
class DivergenceConfig:
    """What a non-finite loss or gradient does (docs/training.md, "Divergence"): never an optimiser step."""

    on_nonfinite: str = "skip"  # skip: skip the step on every worker | stop: stop the run (exit non-zero)
    max_skipped_steps: int = 10  # consecutive skipped steps after which the run stops anyway
    val_explode_factor: float = 1e6  # warn when val_loss > this x the reference (docs/training.md); 0 = never


@dataclass
class TrainConfig:
    name: str = "metalstm-synthetic"  # the run name: the same name resumes the run
    dtype: str = "float32"  # float32 | float64
    model: ModelConfig = field(default_factory=ModelConfig)
    maml: MAMLConfig = field(default_factory=MAMLConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)


def check(cond: bool, key: str, message: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"config key {key}: {message}, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Value checks OmegaConf's types cannot express."""
    check(cfg.dtype in ("float32", "float64"), "dtype", "expected float32 or float64", cfg.dtype)
    check(cfg.model.kind in MODEL_KINDS, "model.kind", f"expected one of {', '.join(MODEL_KINDS)}", cfg.model.kind)
    check(cfg.model.cell in ("lstm", "gru"), "model.cell", "expected lstm or gru", cfg.model.cell)
    check(cfg.model.loss in ("mse", "l1"), "model.loss", "expected mse or l1", cfg.model.loss)
    check(cfg.model.base_season >= 0, "model.base_season", "must be >= 0 (0 = no seasonal-naive base)",
          cfg.model.base_season)
    for key in ("model.hidden_size", "model.num_layers", "schedule.meta_steps", "schedule.meta_batch_size",
                "scaling.num_workers", "checkpoint.num_to_keep", "schedule.log_every", "pretrain.batch_size"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        check(value >= 1, key, "must be >= 1", value)
    for key in ("schedule.val_every", "schedule.val_tasks", "scaling.max_failures", "optim.weight_decay",
                "optim.grad_clip", "pretrain.steps", "pretrain.val_every"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        check(value >= 0, key, "must be >= 0", value)
    check(cfg.optim.lr > 0, "optim.lr", "must be > 0", cfg.optim.lr)
    check(cfg.pretrain.lr > 0, "pretrain.lr", "must be > 0", cfg.pretrain.lr)
    check(cfg.scaling.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be > 0", cfg.scaling.cpus_per_worker)
    check(cfg.maml.inner_steps >= 0, "maml.inner_steps", "must be >= 0", cfg.maml.inner_steps)
    check(cfg.maml.inner_lr > 0, "maml.inner_lr", "must be > 0", cfg.maml.inner_lr)
    check(cfg.divergence.on_nonfinite in ("skip", "stop"), "divergence.on_nonfinite", "expected skip or stop",
          cfg.divergence.on_nonfinite)
    check(cfg.divergence.max_skipped_steps >= 1, "divergence.max_skipped_steps", "must be >= 1",
          cfg.divergence.max_skipped_steps)
    check(cfg.divergence.val_explode_factor == 0 or cfg.divergence.val_explode_factor > 1,
          "divergence.val_explode_factor", "must be > 1 (0 = no warning)", cfg.divergence.val_explode_factor)
    check(cfg.data.synthetic.layout in ("sequence", "points"), "data.synthetic.layout",
           "expected sequence or points", cfg.data.synthetic.layout)
    check(bool(cfg.name) and "/" not in cfg.name, "name", "must be a non-empty name without '/'", cfg.name)
    return cfg


def load_structured(schema: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Defaults ← YAML file ← ``key=value`` overrides for any structured schema; type errors name the key."""
    try:
        layers = [OmegaConf.structured(schema)]
        if path:
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"config file {p} does not exist")
            layers.append(OmegaConf.load(p))
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"override {item!r}: expected key=value")
        layers.append(OmegaConf.from_dotlist(list(overrides or [])))
        return OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        reason = str(e).splitlines()[0]
        raise ValueError(f"config key {key}: {reason}" if key else f"config: {reason}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The training config: defaults ← YAML ← overrides, type-checked and validated; errors name the key."""
    return validate(load_structured(TrainConfig, path, overrides))


def apply_manifest(cfg: TrainConfig, manifest: dict[str, Any], prefix: str = "") -> None:
    """The task store decides the model kind (its manifest's ``model_kind``) and the data dimensions; the config
    the rest."""
    from pipeline.tasks.store import store_model_kind  # pyarrow and fsspec: only when a manifest is applied

    kind = store_model_kind(manifest)
    check(kind in MODEL_KINDS, f"{prefix}model.kind", f"the {manifest['family']!r} store's model_kind is not one of "
          f"{', '.join(MODEL_KINDS)}", kind)
    cfg.model.kind = kind
    features = manifest.get("features", {})
    for key in STORE_DIMENSIONS:
        if key in features:
            setattr(cfg.model, key, int(features[key]))
    if "src_vocab_size" in features:
        cfg.model.vocab_size = int(features["src_vocab_size"])


STORE_DIMENSIONS = ("input_size", "output_size", "horizon", "vocab_size", "tgt_vocab_size")  # set by the store


def printable_yaml(cfg: TrainConfig) -> str:
    """The resolved config as ``--print-config`` shows it: without the data dimensions the task store sets at run
    time (a placeholder there would read as if it were used), which a trailing comment names instead."""
    data = to_dict(cfg)
    for key in STORE_DIMENSIONS:
        data["model"].pop(key, None)
    return (OmegaConf.to_yaml(OmegaConf.create(data)) + f"# model.{', model.'.join(STORE_DIMENSIONS)}: set from "
            "the task store's manifest when the run starts\n")


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), data))


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
