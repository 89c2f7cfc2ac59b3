"""Mixed precision for training: which lower-precision type a device computes fastest in, if any.

bfloat16 keeps float32's range, so it needs no loss scaling; float16 (older GPUs) does. On a CPU, bfloat16
can only pay where the instructions exist (AVX512-BF16 or AMX); elsewhere it is emulated and slower than float32. Even
with them it does not always pay (an Intel Xeon with AVX512-BF16 and no AMX ran the bundled model's training step 1.5
times slower in bfloat16 than in float32), so on a CPU the two are timed on the model itself and the faster is used.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # None: float32 throughout
    loss_scaling: bool  # float16 gradients underflow without it

    @property
    def name(self) -> str:
        return {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.dtype]


PRECISIONS = {p.name: p for p in (Precision(None, False), Precision(torch.bfloat16, False), Precision(torch.float16, True))}


def precision_named(name: str) -> Precision:
    """The Precision whose ``name`` this is ("float32", "bfloat16" or "float16")."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


@cache
def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (x86 AVX512-BF16 or AMX; read from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


BFLOAT16_MIN_SPEEDUP = 1.1  # on a CPU, bfloat16 must be this much faster than float32 to be chosen
PROBE_REPEATS = 3


def faster_on_cpu(step: Callable[[torch.dtype | None], None]) -> bool:
    """Whether ``step(torch.bfloat16)`` runs at least BFLOAT16_MIN_SPEEDUP times faster than ``step(None)`` (float32).

    ``step`` is one training step's forward and backward in that type; each is run once to warm up, then the best of
    PROBE_REPEATS (interleaved, so that a busy moment of the machine hits both) is compared.
    """
    best = {None: float("inf"), torch.bfloat16: float("inf")}
    for repeat in range(PROBE_REPEATS + 1):
        for dtype in best:
            start = time.perf_counter()
            step(dtype)
            if repeat:
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[None] >= BFLOAT16_MIN_SPEEDUP * best[torch.bfloat16]


def training_precision(device: torch.device, mixed: bool = True, probe: Callable[[torch.dtype | None], None] | None = None) -> Precision:
    """bfloat16 on GPUs that have it, float16 with loss scaling on older GPUs; on a CPU with bfloat16 instructions,
    bfloat16 if ``probe`` (a training step in a given type, see ``faster_on_cpu``) runs faster in it, or without a
    probe; else float32."""
    if not mixed:
        return Precision(None, False)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, False)
        return Precision(torch.float16, True)
    if device.type == "cpu" and cpu_has_native_bfloat16() and (probe is None or faster_on_cpu(probe)):
        return Precision(torch.bfloat16, False)
    return Precision(None, False)
