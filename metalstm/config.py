"""Model and MAML settings: plain dataclasses, used as OmegaConf structured configs by the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    kind: str = "forecaster"  # mlp | forecaster | char_lm | seq2seq
    cell: str = "lstm"  # lstm | gru
    hidden_size: int = 128
    num_layers: int = 1
    input_size: int = 1  # forecaster: value + covariates per step; mlp: input features
    output_size: int = 1  # mlp only
    horizon: int = 24  # forecaster: values predicted per window
    base_season: int = 0  # forecaster: > 0 predicts a correction to the seasonal-naive forecast of this period
    loss: str = "mse"  # forecaster training loss: mse | l1 (mean absolute error, ND-like on scaled values)
    mlp_hidden: list[int] = field(default_factory=lambda: [40, 40])
    vocab_size: int = 52  # char_lm vocabulary; seq2seq source vocabulary
    tgt_vocab_size: int = 0  # seq2seq target vocabulary
    embedding_size: int = 32


@dataclass
class MAMLConfig:
    inner_steps: int = 5  # K adaptation steps during meta-training
    inner_lr: float = 0.01  # α (initial value when learned)
    first_order: bool = False  # drop second-order terms (FOMAML)
    learn_inner_lr: bool = False  # per-parameter-tensor, per-step learned rates (MAML++ LSLR / Meta-SGD)
    multi_step_loss: bool = False  # MAML++: weight the query loss after every inner step
    multi_step_anneal: int = 1000  # meta-steps over which the multi-step weights anneal to the last step
    eval_inner_steps: int = 0  # steps used at evaluation and serving; 0 means inner_steps

    def validate(self) -> None:
        if self.inner_steps < 0:
            raise ValueError(f"maml.inner_steps: must be >= 0, got {self.inner_steps}")
        if not self.inner_lr > 0:
            raise ValueError(f"maml.inner_lr: must be > 0, got {self.inner_lr}")
        if self.eval_inner_steps < 0:
            raise ValueError(f"maml.eval_inner_steps: must be >= 0, got {self.eval_inner_steps}")

    @property
    def adapt_steps(self) -> int:
        return self.eval_inner_steps or self.inner_steps
