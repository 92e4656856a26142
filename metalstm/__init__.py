"""MetaLSTM's meta-learning core: task-batched recurrent networks and MAML, in plain PyTorch."""

from metalstm.checkpoint import learner_from_checkpoint, load_checkpoint, save_checkpoint
from metalstm.config import MAMLConfig, ModelConfig
from metalstm.data import BOS, EOS, PAD, UNK, Split, TaskBatch, collate
from metalstm.maml import InnerRates, MetaLearner, MetaLoss, NonFiniteLossError, inner_loop, multi_step_weights
from metalstm.models import (
    MLP,
    MODEL_KINDS,
    RNN,
    CharLM,
    Forecaster,
    MetaModel,
    Seq2Seq,
    batched,
    build_model,
    model_class,
)
from metalstm.rnn import gru_layer, lstm_layer, rnn_stack

__version__ = "0.1.0"

__all__ = [
    "BOS", "EOS", "PAD", "UNK", "MLP", "MODEL_KINDS", "RNN", "CharLM", "Forecaster", "InnerRates", "MAMLConfig",
    "MetaLearner", "MetaLoss", "MetaModel", "ModelConfig", "NonFiniteLossError", "Seq2Seq", "Split",
    "TaskBatch", "batched", "build_model", "collate", "gru_layer", "inner_loop", "learner_from_checkpoint",
    "load_checkpoint", "lstm_layer", "model_class", "multi_step_weights", "rnn_stack", "save_checkpoint",
]
