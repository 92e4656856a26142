"""Fused CPU kernels for the LSTM node's per-step elementwise work, built on first use.

Per step, the unfused node runs a dozen elementwise ops forward and four backward; on CPU they wait on
memory, behind the recurrent matmul that streams every task's weights through the cache. The kernels in
``csrc/lstm_step.cpp`` do each step's work in one pass, with ATen's vectorised ``exp``/``tanh``
(``ATen/cpu/vec``, as PyTorch's own CPU kernels do), so results match the unfused ops to rounding.

They are compiled with PyTorch's C++ extension loader the first time a process needs them (≈ 30 s, a C++
compiler and ninja) and cached; later processes only load the cached library. The cache is
``TORCH_EXTENSIONS_DIR`` when set, else a folder per Python environment under PyTorch's default root
(``~/.cache/torch_extensions/metalstm-<key>``, the key a hash of ``sys.prefix`` and the torch version): a build
file records one environment's include and library paths, so two virtual environments sharing one folder would
rebuild each other's kernels on every switch. Where they cannot be built, or with
``METALSTM_FUSED_KERNELS=0``, the node runs the same maths as PyTorch ops: a fallback, not a different result.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

log = logging.getLogger(__name__)

ENV = "METALSTM_FUSED_KERNELS"
_SOURCE = Path(__file__).with_name("csrc") / "lstm_step.cpp"
# compiler flags of the vector width ATen itself dispatches to on this CPU (as its own kernels are built)
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
               "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}


def enabled() -> bool:
    """Whether the fused kernels may be used (``METALSTM_FUSED_KERNELS=0`` turns them off)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def build_directory(name: str) -> Path | None:
    """Where the kernels named ``name`` are built and cached: None lets PyTorch use ``TORCH_EXTENSIONS_DIR``
    (the user chose it); otherwise a folder keyed by this Python environment, so that venvs never share one."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return None
    from torch.utils.cpp_extension import get_default_build_root

    key = hashlib.sha256(f"{os.path.realpath(sys.prefix)}\0{torch.__version__}".encode()).hexdigest()[:12]
    return Path(get_default_build_root()) / f"metalstm-{key}" / name


@functools.cache
def _build() -> ModuleType | None:
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _CAPABILITY_FLAGS.get(capability, ["-DCPU_CAPABILITY_DEFAULT", "-DCPU_CAPABILITY=DEFAULT"])
    # -fopenmp: at::parallel_for is inline OpenMP; without it a step's rows would run on one thread
    cflags, ldflags = ["-O3", "-fopenmp", *flags], ["-fopenmp"]
    # the name pins the source, the flags and the torch version: a cached build never outlives any of them
    key = " ".join([*cflags, *ldflags, torch.__version__]).encode()
    digest = hashlib.sha256(_SOURCE.read_bytes() + key).hexdigest()[:12]
    name = f"metalstm_lstm_step_{capability.lower()}_{digest}"
    try:
        from torch.utils.cpp_extension import load

        directory = build_directory(name)
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)  # PyTorch creates only the directories it chose itself
        log.info("loading the fused LSTM kernels (%s; the first build takes about 30 s)", name)
        return load(name, [str(_SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags, verbose=False,
                    build_directory=None if directory is None else str(directory))
    except Exception as e:  # no compiler, no ninja, no Python headers: the ops path does the same maths
        log.warning("fused LSTM kernels unavailable, using PyTorch ops instead (%s: %s)", type(e).__name__,
                    str(e).strip().splitlines()[-1] if str(e).strip() else "")
        return None


def lstm_step(x: Tensor) -> ModuleType | None:
    """The kernels for a layer whose input is ``x``, or None where they do not apply (CUDA, half precision,
    switched off, or not buildable here)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or not enabled():
        return None
    return _build()


def warm_up() -> bool:
    """Build (or load) the kernels now, so that no timed or latency-bound work pays for the first build
    (the meta-training driver calls it before starting workers). Returns whether they are available."""
    return enabled() and _build() is not None
