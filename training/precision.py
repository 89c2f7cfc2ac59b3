"""Mixed precision for training: which lower-precision type a device computes fastest in, if any.

bfloat16 keeps float32's range, so it needs no loss scaling; float16 (older GPUs) does. On a CPU, bfloat16
only pays where the instructions exist (AVX512-BF16 or AMX); elsewhere it is emulated and slower than float32.
"""

from __future__ import annotations

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


@cache
def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (x86 AVX512-BF16 or AMX; read from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_precision(device: torch.device, mixed: bool = True) -> Precision:
    """bfloat16 on GPUs and CPUs that have it, float16 with loss scaling on older GPUs, else float32."""
    if not mixed:
        return Precision(None, False)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, False)
        return Precision(torch.float16, True)
    if device.type == "cpu" and cpu_has_native_bfloat16():
        return Precision(torch.bfloat16, False)
    return Precision(None, False)
