"""The task-batched LSTM/GRU layers: torch.nn compatibility, padding, double backward, one pass over tasks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from metalstm import kernels
from metalstm import rnn as rnn_module
from metalstm.models import RNN, batched
from metalstm.rnn import _LSTMLayer, _step_masks, gru_layer, lstm_layer, rnn_stack

F64 = torch.float64
TORCH_RNN = {"lstm": nn.LSTM, "gru": nn.GRU}
LAYER = {"lstm": lstm_layer, "gru": gru_layer}
GATES = {"lstm": 4, "gru": 3}
# The LSTM node does each step's elementwise work in the fused kernels (metalstm.kernels) where they can be built,
# else as PyTorch ops, which compute the local derivatives all steps at once (small gates) or step by step
# (large): the exactness tests run all three
LOCAL_DERIVATIVES = {"all_steps_at_once": 1 << 40, "step_by_step": 0}
LSTM_PATHS = ["fused_kernels", "ops_all_steps_at_once", "ops_step_by_step"]


def use_lstm_path(path: str, monkeypatch) -> None:
    if path == "fused_kernels":
        if not kernels.warm_up():
            pytest.skip("the fused LSTM kernels cannot be built here (needs a C++ compiler and ninja)")
        return
    monkeypatch.setenv(kernels.ENV, "0")
    monkeypatch.setattr(rnn_module, "_WHOLE_SEQUENCE_LOCAL_BYTES", LOCAL_DERIVATIVES[path.removeprefix("ops_")])


def per_task_weights(rnn: RNN, tasks: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """θ broadcast to ``tasks`` tasks plus a different perturbation per task (so tasks can't be mixed up)."""
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype)
            for n, p in batched(rnn, tasks).items()}


def torch_rnn_for_task(cell: str, params: dict[str, torch.Tensor], t: int, input_size: int, hidden: int,
                       layers: int) -> nn.Module:
    ref = TORCH_RNN[cell](input_size, hidden, layers, batch_first=True).to(F64)
    ref.load_state_dict({n: p[t] for n, p in params.items()}, strict=True)
    return ref


@pytest.mark.parametrize("d", [5, 1])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_state_dict_loads_into_torch_rnn_and_gives_the_same_outputs(cell, d):
    torch.manual_seed(0)
    tasks, batch, length, hidden, layers = 3, 4, 7, 6, 2
    rnn = RNN(cell, d, hidden, layers).to(F64)
    ref = TORCH_RNN[cell](d, hidden, layers, batch_first=True).to(F64)
    ref.load_state_dict(rnn.state_dict(), strict=True)  # same names and shapes
    assert {n: p.shape for n, p in rnn.named_parameters()} == {n: p.shape for n, p in ref.named_parameters()}

    params = per_task_weights(rnn, tasks)
    x = torch.randn(tasks, batch, length, d, dtype=F64)
    out, finals = rnn(params, x)
    assert out.shape == (tasks, batch, length, hidden)
    for t in range(tasks):
        ref = torch_rnn_for_task(cell, params, t, d, hidden, layers)
        ref_out, ref_state = ref(x[t])
        torch.testing.assert_close(out[t], ref_out, rtol=1e-12, atol=1e-12)
        ref_h = ref_state[0] if cell == "lstm" else ref_state
        for k in range(layers):
            torch.testing.assert_close(finals[k][0][t], ref_h[k], rtol=1e-12, atol=1e-12)
            if cell == "lstm":
                torch.testing.assert_close(finals[k][1][t], ref_state[1][k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_initial_state_is_used_like_torch(cell):
    torch.manual_seed(1)
    tasks, batch, length, d, hidden = 2, 3, 5, 2, 4
    rnn = RNN(cell, d, hidden, 1).to(F64)
    params = per_task_weights(rnn, tasks)
    x = torch.randn(tasks, batch, length, d, dtype=F64)
    h0 = torch.randn(tasks, batch, hidden, dtype=F64)
    c0 = torch.randn(tasks, batch, hidden, dtype=F64)
    state = (h0, c0) if cell == "lstm" else (h0,)
    out, _ = rnn(params, x, states=[state])
    for t in range(tasks):
        ref = torch_rnn_for_task(cell, params, t, d, hidden, 1)
        ref_state = (h0[t][None], c0[t][None]) if cell == "lstm" else h0[t][None]
        torch.testing.assert_close(out[t], ref(x[t], ref_state)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_right_padding_keeps_outputs_and_carries_the_final_state(cell):
    torch.manual_seed(2)
    tasks, batch, length, d, hidden, layers = 2, 3, 6, 2, 4, 2
    lengths = torch.tensor([[6, 3, 1], [2, 5, 4]])
    mask = (torch.arange(length) < lengths.unsqueeze(-1)).to(F64)
    rnn = RNN(cell, d, hidden, layers).to(F64)
    params = per_task_weights(rnn, tasks)
    x = torch.randn(tasks, batch, length, d, dtype=F64)
    x = torch.where(mask.unsqueeze(-1) > 0, x, torch.full_like(x, 1e3))  # garbage in the padding
    out, finals = rnn(params, x, mask)
    for t in range(tasks):
        ref = torch_rnn_for_task(cell, params, t, d, hidden, layers)
        for n in range(batch):
            real = int(lengths[t, n])
            ref_out, ref_state = ref(x[t, n, :real].unsqueeze(0))
            torch.testing.assert_close(out[t, n, :real], ref_out[0], rtol=1e-12, atol=1e-12)
            ref_h = ref_state[0] if cell == "lstm" else ref_state
            torch.testing.assert_close(finals[-1][0][t, n], ref_h[-1, 0], rtol=1e-12, atol=1e-12)
            # padded steps repeat the last real output: the state never moves on padding
            torch.testing.assert_close(out[t, n, real:], out[t, n, real - 1].expand(length - real, hidden))


@pytest.mark.parametrize("cell,path", [*(("lstm", p) for p in LSTM_PATHS), ("gru", None)])
def test_gradgradcheck_with_masks_and_initial_state(cell, path, monkeypatch):
    """Second-order gradients (what MAML needs) are exact, padding and carried state included."""
    if path:
        use_lstm_path(path, monkeypatch)
    torch.manual_seed(3)
    tasks, batch, length, d, hidden = 2, 3, 4, 2, 2
    gates = GATES[cell] * hidden
    inputs = [torch.randn(tasks, batch, length, d, dtype=F64), torch.randn(tasks, gates, d, dtype=F64),
              torch.randn(tasks, gates, hidden, dtype=F64), torch.randn(tasks, gates, dtype=F64),
              torch.randn(tasks, gates, dtype=F64), torch.randn(tasks, batch, hidden, dtype=F64),
              torch.randn(tasks, batch, hidden, dtype=F64)]
    inputs = [t.requires_grad_(True) for t in inputs]
    mask = torch.ones(tasks, batch, length, dtype=F64)
    mask[0, 1, 2:] = 0
    mask[1, 2, 1:] = 0
    mask[1, 0, :] = 0  # a sequence that is all padding

    def f(x, w_ih, w_hh, b_ih, b_hh, h0, c0):
        state = (h0, c0) if cell == "lstm" else (h0,)
        out, final = LAYER[cell](x, w_ih, w_hh, b_ih, b_hh, mask=mask, state=state)
        return (out.sin(), *[s * (k + 1) for k, s in enumerate(final)])  # every output gets its own gradient

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("d", [1, 2], ids=["one_input_feature", "two_input_features"])
@pytest.mark.parametrize("path", LSTM_PATHS)
@pytest.mark.parametrize("shared", [False, True], ids=["per_task_weights", "broadcast_weights"])
def test_lstm_node_gradients_on_every_output(shared, path, d, monkeypatch):
    """The LSTM node's hand-written backward on all seven outputs (gates and local derivatives included: the
    second backward of MAML sends gradients there), and its hand-written second-order node on the four
    outputs a caller can use, with padding and the one-matmul path taken when every task holds the same
    (broadcast) weights; the backward folds the steps into the weight gradients in several blocks. One input
    feature takes its own input projection (an outer product) when the weights are per task."""
    torch.manual_seed(6)
    tasks, batch, length, hidden = 2, 2, 5, 2
    monkeypatch.setattr(rnn_module, "_BLOCK_BYTES", 2 * (tasks * batch * 4 * hidden * 8))  # 2 steps
    use_lstm_path(path, monkeypatch)

    # the weights' leaves: one per task, or one shared by all tasks and broadcast inside f
    lead = () if shared else (tasks,)
    leaves = [torch.randn(*lead, *shape, dtype=F64, requires_grad=True)
              for shape in ((4 * hidden, d), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,))]
    x = torch.randn(tasks, batch, length, d, dtype=F64, requires_grad=True)
    h0 = torch.randn(tasks, batch, hidden, dtype=F64, requires_grad=True)
    c0 = torch.randn(tasks, batch, hidden, dtype=F64, requires_grad=True)
    mask = torch.ones(tasks, batch, length, dtype=F64)
    mask[0, 1, 3:] = 0
    mask[1, 1, 1:] = 0
    keep, real = _step_masks(mask, length)
    assert keep is not None and not all(real)

    def f(x, h0, c0, *weights):
        if shared:
            weights = [w.unsqueeze(0).expand(tasks, *w.shape) for w in weights]
        return _LSTMLayer.apply(x, *weights, h0, c0, keep, real)

    def state_outputs(*inputs):
        hs, cs, _, _, _, h, c = f(*inputs)
        return hs, cs, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *leaves))
    assert torch.autograd.gradgradcheck(state_outputs, (x, h0, c0, *leaves))


@pytest.mark.parametrize("hidden", [20, 64], ids=["vector_tail", "whole_vectors"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_task_weights", "broadcast_weights"])
def test_fused_kernels_give_what_the_ops_give_in_float32(shared, hidden, monkeypatch):
    """The training dtype: every output of the forward and every gradient of the backward (first order, as
    the inner loop takes it) agree with the PyTorch-ops path to float32 rounding, padding included; a hidden
    size that is not a whole number of vectors exercises the kernels' tails."""
    if not kernels.warm_up():
        pytest.skip("the fused LSTM kernels cannot be built here (needs a C++ compiler and ninja)")
    torch.manual_seed(8)
    tasks, batch, length, d = 3, 4, 9, 2
    lead = 1 if shared else tasks
    shapes = ((4 * hidden, d), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,))
    weights = [torch.randn(lead, *shape) * 0.5 for shape in shapes]
    x = torch.randn(tasks, batch, length, d)
    h0, c0 = torch.randn(tasks, batch, hidden), torch.randn(tasks, batch, hidden)
    mask = torch.ones(tasks, batch, length)
    mask[0, 1, 7:] = 0  # steps 0-6 take the fused path both ways, 7-8 the padded one
    mask[2, 3, 8:] = 0
    keep, real = _step_masks(mask, length)

    def run() -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        leaves = [w.clone().requires_grad_(True) for w in weights]
        per_task = [w.expand(tasks, *w.shape[1:]) for w in leaves]
        out = _LSTMLayer.apply(x, *per_task, h0, c0, keep, real)
        loss = out[0].sin().sum() + (out[5] * out[6]).sum()  # every step's h, and the final state
        return [o.detach() for o in out], torch.autograd.grad(loss, leaves)

    fused_out, fused_grads = run()
    monkeypatch.setenv(kernels.ENV, "0")
    ops_out, ops_grads = run()
    for name, got, want in zip(["hs", "cs", "acts", "coef", "q", "h", "c"], fused_out, ops_out):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for got, want in zip(fused_grads, ops_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fused_kernels_apply_only_to_cpu_floating_point_and_can_be_switched_off(monkeypatch):
    x = torch.zeros(1, 1, 1, 1)
    assert kernels.lstm_step(x.to(torch.bfloat16)) is None
    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.enabled() and kernels.lstm_step(x) is None and not kernels.warm_up()


def test_third_order_gradients_are_refused_clearly():
    x = torch.randn(1, 2, 3, 2, dtype=F64)
    w = [torch.randn(1, 8, 2, dtype=F64, requires_grad=True), torch.randn(1, 8, 2, dtype=F64, requires_grad=True),
         torch.randn(1, 8, dtype=F64, requires_grad=True), torch.randn(1, 8, dtype=F64, requires_grad=True)]
    out, (h, _) = lstm_layer(x, *w)
    (g,) = torch.autograd.grad(h.pow(2).sum(), [w[1]], create_graph=True)
    torch.autograd.grad(g.pow(2).sum(), [w[1]], retain_graph=True)  # second order: fine
    with pytest.raises(RuntimeError, match="second order, not third"):
        torch.autograd.grad(g.pow(2).sum(), [w[1]], create_graph=True)


def test_broadcast_weights_give_the_same_gradients_as_materialised_copies():
    """θ broadcast to all tasks (stride 0) takes a different code path: same first- and second-order results."""
    torch.manual_seed(7)
    tasks, batch, length, d, hidden = 3, 4, 5, 2, 6
    rnn = RNN("lstm", d, hidden, 2).to(F64)
    x = torch.randn(tasks, batch, length, d, dtype=F64)
    results = []
    for materialise in (False, True):
        fast = batched(rnn, tasks)
        if materialise:
            fast = {n: p.contiguous() for n, p in fast.items()}
            assert all(p.stride(0) != 0 for p in fast.values())
        out, _ = rnn_stack("lstm", fast, x, 2)
        inner = torch.autograd.grad(out.pow(2).sum(), list(fast.values()), create_graph=True)
        meta = torch.autograd.grad(sum(g.pow(2).sum() for g in inner), list(rnn.parameters()))
        results.append([g.detach() for g in (*inner, *meta)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class CountOps(TorchDispatchMode):
    """Records every aten op with its output size (a real dispatch-level trace, no mocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        name = func.overloadpacket.__name__.rstrip("_")  # in-place variants count as their op
        self.ops.append((name, first.numel() if isinstance(first, torch.Tensor) else 0))
        return out


def _trace_meta_gradient(cell: str, tasks: int, length: int) -> tuple[CountOps, CountOps, int]:
    torch.manual_seed(4)
    batch, d, hidden = 3, 2, 4
    rnn = RNN(cell, d, hidden, 1).to(F64)
    x = torch.randn(tasks, batch, length, d, dtype=F64)
    fast = {n: p.clone().requires_grad_(True) for n, p in batched(rnn, tasks).items()}
    with CountOps() as fwd:
        out, _ = rnn_stack(cell, fast, x, 1)
        loss = out.pow(2).sum()
    with CountOps() as bwd:  # second-order: the inner gradient with create_graph, then its gradient
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        sum(g.pow(2).sum() for g in grads).backward()
    return fwd, bwd, tasks * batch * length * GATES[cell] * hidden


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_tasks_run_in_one_pass_and_the_input_projection_is_one_matmul(cell):
    matmuls = {"bmm", "baddbmm", "mm", "addmm", "matmul"}
    counts = {}
    for tasks in (2, 5):
        fwd, bwd, _ = _trace_meta_gradient(cell, tasks, length=6)
        counts[tasks] = ([op for op, _ in fwd.ops], [op for op, _ in bwd.ops])
        # one matmul projects the inputs of all steps, then one recurrent matmul per step
        assert sum(op in matmuls for op, _ in fwd.ops) == 1 + 6
    assert counts[2] == counts[5], "the op sequence must not depend on the number of tasks (no loop over tasks)"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_backward_allocates_no_full_size_tensor_per_step(cell):
    """Per-step slicing with indexing would give each step's backward a zero tensor as large as all steps."""
    full = {}
    for length in (4, 8):
        _, bwd, full_numel = _trace_meta_gradient(cell, tasks=2, length=length)
        full[length] = sum(numel >= full_numel for _, numel in bwd.ops)
    assert full[4] == full[8], f"full-size allocations grow with the sequence length: {full}"


@pytest.mark.parametrize("shared", [False, True], ids=["per_task_weights", "broadcast_weights"])
def test_weights_in_any_layout_are_left_unchanged(shared):
    """The forward doubles the g rows of its own copy of the recurrent weights, never the caller's tensor,
    whatever its layout (here ``[T, H, 4H]`` in memory, which a plain ``.contiguous()`` would return as is)."""
    torch.manual_seed(7)
    tasks, batch, length, d, hidden = 2, 3, 4, 2, 3
    w_hh = torch.randn(1 if shared else tasks, hidden, 4 * hidden, dtype=F64).transpose(1, 2)
    if shared:
        w_hh = w_hh.expand(tasks, -1, -1)
    before = w_hh.clone()
    x = torch.randn(tasks, batch, length, d, dtype=F64)
    w_ih, b_ih, b_hh = (torch.randn(tasks, *shape, dtype=F64) for shape in ((4 * hidden, d), (4 * hidden,),
                                                                               (4 * hidden,)))
    out, _ = lstm_layer(x, w_ih, w_hh, b_ih, b_hh)
    assert torch.equal(w_hh, before)
    for t in range(tasks):
        ref = nn.LSTM(d, hidden, batch_first=True).to(F64)
        ref.load_state_dict({"weight_ih_l0": w_ih[t], "weight_hh_l0": before[t], "bias_ih_l0": b_ih[t],
                             "bias_hh_l0": b_hh[t]})
        torch.testing.assert_close(out[t], ref(x[t])[0], rtol=1e-12, atol=1e-12)


def test_bias_gradients_are_two_tensors_so_clipping_scales_each_once():
    """Both biases get the same gradient; stored as one tensor, an in-place clip would scale it twice."""
    torch.manual_seed(0)
    model = RNN("lstm", 2, 3)
    x = torch.randn(1, 4, 5, 2)
    out, _ = model(batched(model, 1), x)
    out.pow(2).sum().backward()
    b_ih, b_hh = model.bias_ih_l0.grad, model.bias_hh_l0.grad
    torch.testing.assert_close(b_ih, b_hh)
    assert b_ih.data_ptr() != b_hh.data_ptr()
    before = b_ih.clone()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    torch.testing.assert_close(model.bias_ih_l0.grad, before * (1e-3 / (total + 1e-6)))
    torch.testing.assert_close(model.bias_hh_l0.grad, model.bias_ih_l0.grad)


def test_bad_cell_name():
    with pytest.raises(ValueError, match="cell"):
        RNN("rnn", 2, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_second_order_on_cuda_matches_cpu(cell):
    """No cuDNN RNN kernel in the differentiated path: double backward works on CUDA and equals the CPU."""
    torch.manual_seed(5)
    tasks, batch, length, d, hidden = 3, 4, 5, 2, 8
    rnn = RNN(cell, d, hidden, 2).to(F64)
    x = torch.randn(tasks, batch, length, d, dtype=F64)
    mask = torch.ones(tasks, batch, length, dtype=F64)
    mask[0, 0, 3:] = 0
    results = []
    for device in ("cpu", "cuda"):
        theta = {n: p.detach().to(device).requires_grad_(True) for n, p in rnn.named_parameters()}
        fast = {n: p.unsqueeze(0).expand(tasks, *p.shape) for n, p in theta.items()}
        out, _ = rnn_stack(cell, fast, x.to(device), 2, mask=mask.to(device))
        grads = torch.autograd.grad(out.pow(2).sum(), list(fast.values()), create_graph=True)
        meta = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), list(theta.values()))
        results.append([g.cpu() for g in meta])
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda, cpu, rtol=1e-9, atol=1e-12)
