"""``metalstm bench maml``: the project's task-batched meta-step against the naive per-task loop.

The naive loop is what learn2learn and higher do: for each task, ``torch.func.functional_call`` on a
``torch.nn.LSTM`` + ``nn.Linear`` loaded with the same θ, ``autograd.grad(create_graph=True)`` per inner
step, and the task's query loss backpropagated before the next task. Both run in one process on the same
model, tasks and device; their meta-gradients are checked to agree before anything is timed.

Measurements (all reported in the JSON, with the method strings):

- time: median wall time of ``repeats`` meta-steps (forward, inner loop, meta-gradient) after ``warmup``,
  the two implementations interleaved so that load on a shared machine hits both alike;
  ``torch.cuda.synchronize`` brackets every timed step on CUDA.
- FLOPs: the matmul FLOPs of one meta-step, counted once with ``torch.utils.flop_counter.FlopCounterMode``
  on the project's implementation (forward, backward and double backward; elementwise ops not counted).
  Both implementations do the same maths, so GFLOP/s = that count / each one's median time.
- peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during one meta-step minus what was allocated
  before it; on CPU, the same quantity from the PyTorch profiler's allocator events (``profile_memory``):
  the high-water mark of live tensor bytes allocated during the step (untimed run). The naive loop frees
  each task's graph before the next task, so its peak is one task's; the project holds all tasks at once.

On CPU the project's implementation allocates tens of MB per layer call; with glibc's default settings
those blocks often go back to the OS when freed and page-fault in again on the next step. By default
(``malloc=retain``) the benchmark runs as the training workers and Serve replicas do, with glibc told to
reuse freed memory (``metalstm.runtime.retain_freed_memory``), which applies to both implementations;
``malloc=system`` leaves the allocator alone.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from metalstm import kernels
from metalstm.config import MAMLConfig
from metalstm.data import Split, TaskBatch
from metalstm.maml import MetaLearner
from metalstm.models import Forecaster
from metalstm.runtime import retain_freed_memory

log = logging.getLogger(__name__)

DEFAULTS = {
    "device": "cpu", "dtype": "float32", "cell": "lstm", "tasks": "32", "hidden": "128", "layers": "1",
    "support": "10", "query": "10", "length": "48", "input": "1", "horizon": "24", "steps": "1,5",
    "orders": "second,first", "inner_lr": "0.01", "repeats": "3", "warmup": "1", "threads": "0", "memory": "1",
    "seed": "0", "malloc": "retain",
}
# The targets (speed-up over the naive loop); on CUDA the 10x target is the second-order one.
TARGETS = {"cpu": {"second": 5.0, "first": 1.5}, "cuda": {"second": 10.0, "first": 1.5}}
GRAD_RTOL = {torch.float32: 1e-3, torch.float64: 1e-8}


def _addmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _baddbmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


# FlopCounterMode knows addmm and baddbmm but not their in-place forms, which the LSTM node's forward uses
IN_PLACE_MATMUL_FLOPS = {torch.ops.aten.addmm_: _addmm_flops, torch.ops.aten.baddbmm_: _baddbmm_flops}


class NaiveForecaster(nn.Module):
    """The reference network: ``torch.nn.LSTM``/``GRU`` + a linear head (same parameter names as Forecaster)."""

    def __init__(self, cell: str, input_size: int, hidden: int, layers: int, horizon: int) -> None:
        super().__init__()
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(input_size, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, horizon)

    def forward(self, x: Tensor) -> Tensor:
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h[-1])


def _int(opts: dict[str, str], key: str, low: int, high: int) -> int:
    try:
        value = int(opts[key])
    except ValueError:
        raise ValueError(f"bench maml {key}: expected an integer, got {opts[key]!r}") from None
    if not low <= value <= high:
        raise ValueError(f"bench maml {key}: must be in [{low}, {high}], got {value}")
    return value


def _choices(opts: dict[str, str], key: str, allowed: tuple[str, ...]) -> list[str]:
    values = [v.strip() for v in opts[key].split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise ValueError(f"bench maml {key}: expected a comma-separated subset of {list(allowed)}, got {opts[key]!r}")
    return values


def _one_of(opts: dict[str, str], key: str, allowed: tuple[str, ...]) -> str:
    if opts[key] not in allowed:
        raise ValueError(f"bench maml {key}: expected one of {list(allowed)}, got {opts[key]!r}")
    return opts[key]


def parse_options(options: dict[str, str]) -> dict:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"bench maml: unknown option(s) {unknown}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    device = opts["device"]
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"bench maml device: expected cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("bench maml device: CUDA was asked for but torch.cuda.is_available() is False")
    _one_of(opts, "dtype", ("float32", "float64"))
    try:
        inner_lr = float(opts["inner_lr"])
    except ValueError:
        raise ValueError(f"bench maml inner_lr: expected a number, got {opts['inner_lr']!r}") from None
    if not inner_lr > 0:
        raise ValueError(f"bench maml inner_lr: must be > 0, got {inner_lr}")
    steps = []
    for s in opts["steps"].split(","):
        if not s.strip().isdigit() or not 1 <= int(s) <= 20:
            raise ValueError(f"bench maml steps: expected comma-separated integers in [1, 20], got {opts['steps']!r}")
        steps.append(int(s))
    return {
        "device": device, "dtype": getattr(torch, opts["dtype"]), "cell": _one_of(opts, "cell", ("lstm", "gru")),
        "tasks": _int(opts, "tasks", 1, 4096), "hidden": _int(opts, "hidden", 1, 4096),
        "layers": _int(opts, "layers", 1, 8), "support": _int(opts, "support", 1, 4096),
        "query": _int(opts, "query", 1, 4096), "length": _int(opts, "length", 1, 10_000),
        "input": _int(opts, "input", 1, 1024), "horizon": _int(opts, "horizon", 1, 1024), "steps": steps,
        "orders": _choices(opts, "orders", ("second", "first")), "inner_lr": inner_lr,
        "repeats": _int(opts, "repeats", 1, 1000), "warmup": _int(opts, "warmup", 0, 100),
        "threads": _int(opts, "threads", 0, 1024), "memory": bool(_int(opts, "memory", 0, 1)),
        "seed": _int(opts, "seed", 0, 2**31 - 1), "malloc": _one_of(opts, "malloc", ("system", "retain")),
    }


def make_batch(cfg: dict) -> TaskBatch:
    """Forecasting tasks: each task a noisy sinusoid with its own amplitude, period and phase."""
    g = torch.Generator().manual_seed(cfg["seed"])
    t = cfg["tasks"]

    def split(n: int) -> Split:
        amp = 0.5 + 2 * torch.rand(t, 1, 1, generator=g)
        period = 12 + 36 * torch.rand(t, 1, 1, generator=g)
        start = 1000 * torch.rand(t, n, 1, generator=g)
        steps = start + torch.arange(cfg["length"] + cfg["horizon"])
        series = amp * torch.sin(2 * torch.pi * steps / period) + 0.1 * torch.randn(steps.shape, generator=g)
        x = series[..., : cfg["length"], None].expand(-1, -1, -1, cfg["input"]).contiguous()
        y = series[..., cfg["length"] :]
        return Split(x, y, torch.ones(t, n, cfg["length"]), torch.ones(t, n, cfg["horizon"]))

    return TaskBatch(split(cfg["support"]), split(cfg["query"])).to(cfg["device"], cfg["dtype"])


def project_step(learner: MetaLearner, batch: TaskBatch) -> Callable[[], list[Tensor]]:
    params = list(learner.model.parameters())

    def step() -> list[Tensor]:
        out = learner.meta_loss(batch)
        return list(torch.autograd.grad(out.query.sum(), params))

    return step


def naive_step(ref: nn.Module, batch: TaskBatch, steps: int, lr: float,
               first_order: bool) -> Callable[[], list[Tensor]]:
    """One task at a time, as learn2learn/higher do; each task's graph is freed before the next task."""
    theta = dict(ref.named_parameters())
    cuda = next(ref.parameters()).is_cuda

    def loss(params: dict[str, Tensor], split: Split, t: int) -> Tensor:
        return (functional_call(ref, params, (split.x[t],)) - split.y[t]).pow(2).mean()

    def step() -> list[Tensor]:
        total = [torch.zeros_like(p) for p in theta.values()]
        # cuDNN's RNN has no double backward: the naive second-order loop must run PyTorch's own kernels on CUDA.
        # First-order may use cuDNN (its fastest option), in full fp32 like the project (no TF32)
        with torch.backends.cudnn.flags(enabled=not (cuda and not first_order), allow_tf32=False):
            for t in range(batch.num_tasks):
                fast = dict(theta)
                for _ in range(steps):
                    grads = torch.autograd.grad(loss(fast, batch.support, t), list(fast.values()),
                                                create_graph=not first_order)
                    fast = {n: p - lr * (g.detach() if first_order else g) for (n, p), g in zip(fast.items(), grads)}
                meta = torch.autograd.grad(loss(fast, batch.query, t), list(theta.values()))
                for acc, g in zip(total, meta):
                    acc.add_(g)
        return total

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], list[Tensor]], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def peak_memory_bytes(fn: Callable[[], list[Tensor]], device: str) -> int:
    """Extra bytes live at the high-water mark of one call (model and batch, allocated before, excluded)."""
    if device.startswith("cuda"):
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def _max_rel_err(got: list[Tensor], want: list[Tensor]) -> float:
    return max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(got, want))


def bench(options: dict[str, str]) -> dict:
    cfg = parse_options(options)
    load_before = os.getloadavg()
    if cfg["malloc"] == "retain" and not retain_freed_memory():
        raise ValueError("bench maml malloc=retain: needs glibc's mallopt (Linux); use malloc=system")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device, dtype = cfg["device"], cfg["dtype"]
    kind = "cuda" if device.startswith("cuda") else "cpu"
    fused = kind == "cpu" and kernels.warm_up()  # built before anything is timed
    torch.manual_seed(cfg["seed"])
    model = Forecaster(cfg["input"], cfg["hidden"], cfg["layers"], cfg["horizon"], cfg["cell"]).to(device, dtype)
    ref = NaiveForecaster(cfg["cell"], cfg["input"], cfg["hidden"], cfg["layers"], cfg["horizon"]).to(device, dtype)
    ref.load_state_dict(model.state_dict(), strict=True)
    batch = make_batch(cfg)
    cases = []
    for steps in cfg["steps"]:
        for order in cfg["orders"]:
            first_order = order == "first"
            learner = MetaLearner(model, MAMLConfig(inner_steps=steps, inner_lr=cfg["inner_lr"],
                                                    first_order=first_order))
            impls = {"project": project_step(learner, batch),
                     "naive": naive_step(ref, batch, steps, cfg["inner_lr"], first_order)}
            log.info("maml bench: %s-order, %d inner step(s)", order, steps)
            err = _max_rel_err(impls["project"](), impls["naive"]())
            with FlopCounterMode(display=False, custom_mapping=IN_PLACE_MATMUL_FLOPS) as counter:
                impls["project"]()
            flops = counter.get_total_flops()
            for _ in range(cfg["warmup"]):
                for fn in impls.values():
                    fn()
            times = {name: [] for name in impls}
            for _ in range(cfg["repeats"]):
                for name, fn in impls.items():
                    times[name].append(_timed(fn, device))
            case = {"order": order, "inner_steps": steps, "flop_per_meta_step": flops,
                    "gflop_per_meta_step": round(flops / 1e9, 3),
                    "grad_max_rel_err": err, "grads_agree": err <= GRAD_RTOL[dtype]}
            for name, fn in impls.items():
                median = statistics.median(times[name])
                case[name] = {"time_s": round(median, 5), "min_time_s": round(min(times[name]), 5),
                              "tasks_per_s": round(cfg["tasks"] / median, 2),
                              "gflop_per_s": round(flops / median / 1e9, 2)}
                if cfg["memory"]:
                    case[name]["peak_mem_mb"] = round(peak_memory_bytes(fn, device) / 2**20, 2)
            case["speedup"] = round(case["naive"]["time_s"] / case["project"]["time_s"], 2)
            if cfg["memory"]:
                case["memory_ratio_project_over_naive"] = round(
                    case["project"]["peak_mem_mb"] / max(case["naive"]["peak_mem_mb"], 1e-9), 2)
            case["target_speedup"] = TARGETS[kind][order]
            case["meets_target"] = case["grads_agree"] and case["speedup"] >= case["target_speedup"]
            cases.append(case)
    return {
        "benchmark": "maml",
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if kind == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "fused_kernels": fused,
        "cpu_count": os.cpu_count(),
        "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "config": {k: (str(v).removeprefix("torch.") if k == "dtype" else v) for k, v in cfg.items()},
        "model": "forecaster",
        "timing": f"median of {cfg['repeats']} meta-steps after {cfg['warmup']} warm-up, implementations interleaved",
        "flops": "matmul FLOPs of one meta-step, FlopCounterMode (+ in-place addmm_/baddbmm_) on the project's "
                 "implementation; the same count divides both times",
        "memory": ("torch.cuda.max_memory_allocated above the start" if kind == "cuda"
                   else "PyTorch profiler allocator events: high-water mark of bytes allocated during one step"),
        "cases": cases,
        "all_targets_met": all(c["meets_target"] for c in cases),
    }
