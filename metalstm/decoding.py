"""Predictions from fast weights: each family's query prediction, next-token distributions and sampling.

All run task-batched (``params`` are ``[T, ...]`` fast weights, prompts ``[T, N, L]``), so a serving
batch of adapted tasks decodes in one pass. Right-padded prompts are fine: padded steps carry the state,
so the last column of the outputs is each prompt's state after its last real token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metalstm.data import EOS
from metalstm.models import CharLM, MetaModel, Params


@torch.no_grad()
def predict(model: MetaModel, params: Params, x: Tensor, x_mask: Tensor, *, max_len: int = 0,
            beam: int = 1) -> Tensor:
    """What the model's family predicts for query inputs ``x [T, N, ...]``, without building a graph.

    regression, forecast: values ``[T, N, O]``; lm: next-token logits at every position ``[T, N, L, V]``;
    mt: translations ``[T, N, ≤max_len]`` (greedy, or beam search with ``beam > 1``; ``max_len`` 0 means
    twice the source length + 10). Each model class says how (:meth:`MetaModel.predict`).
    """
    return model.predict(params, x, x_mask, max_len=max_len, beam=beam)


@torch.no_grad()
def next_token_logits(model: CharLM, params: Params, prompt: Tensor, mask: Tensor) -> tuple[Tensor, list]:
    """Logits ``[T, N, V]`` for the token after each prompt, and the recurrent states there."""
    logits, states = model(params, prompt, mask)
    return logits[:, :, -1], states


@torch.no_grad()
def sample_continuation(model: CharLM, params: Params, prompt: Tensor, mask: Tensor, max_new_tokens: int, *,
                        temperature: float = 1.0, top_k: int | None = None,
                        generator: torch.Generator | None = None) -> Tensor:
    """Sample ``[T, N, ≤max_new_tokens]`` tokens after each prompt; a sequence stops at EOS (EOS kept)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    logits, states = next_token_logits(model, params, prompt, mask)
    t, n, v = logits.shape
    done = torch.zeros(t, n, dtype=torch.bool, device=prompt.device)
    out = []
    for _ in range(max_new_tokens):
        scaled = logits.float() / temperature
        if top_k is not None and top_k < v:
            kth = scaled.topk(top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, -1).view(t * n, v)
        token = torch.multinomial(probs, 1, generator=generator).view(t, n)
        token = torch.where(done, torch.full_like(token, EOS), token)
        out.append(token)
        done = done | (token == EOS)
        if bool(done.all()):
            break
        step, states = model(params, token.unsqueeze(-1), None, states)
        logits = step[:, :, -1]
    return torch.stack(out, -1)
