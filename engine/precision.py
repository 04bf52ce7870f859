"""Precision: which autocast dtype a run uses, whether the device computes it natively, and how fast a matmul runs.

On x86 CPUs without AVX512-BF16 or AMX (AMD before Zen 4, most Intel before Sapphire Rapids) bf16 is emulated: a
large bf16 matmul there runs hundreds of times slower than in fp32. So bf16 is called native only where the CPU
flags say so *and* a small bf16 matmul is measured at least half as fast as fp32 (the flags alone miss builds or
settings such as ONEDNN_MAX_CPU_ISA=AVX2 that keep the kernels off those instructions).
"""
from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable

import torch

import distributed_utils as du

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PROBE_SIZE = 256  # the matmul whose bf16/fp32 speed ratio tells native from emulated bf16: milliseconds either way


def autocast(device: torch.device, amp: str):
    """Autocast in the run's precision; no context at all in fp32 (any device, also one autocast does not know)."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def cpu_bf16_flags() -> bool:
    """The CPU reports AVX512-BF16 or AMX (torch.cpu's private probes: absent from other builds, then no)."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def seconds(fn: Callable[[], object], tries: int = 3) -> float:
    """The best wall time of `tries` calls (after one untimed call)."""
    fn()
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster a PROBE_SIZE^3 matmul runs in bf16 than in fp32 on one core of this CPU: ~2-8 where
    bf16 is native, ~0.01-0.1 where it is emulated. Measured once per process, best of 5 each."""
    a32 = torch.randn(PROBE_SIZE, PROBE_SIZE)
    a16 = a32.bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on one thread: a thread pool on a busy machine waits for its slowest thread
    try:
        return seconds(lambda: a32 @ a32, tries=5) / seconds(lambda: a16 @ a16, tries=5)
    finally:
        torch.set_num_threads(threads)


def native_bf16(device: torch.device) -> bool:
    """Whether the device has bf16 arithmetic of its own (CUDA since Ampere; x86 CPUs with AVX512-BF16 or AMX
    whose kernels use them); elsewhere bf16 is emulated through fp32 conversions."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_bf16_flags() and cpu_bf16_speedup() >= 0.5
    return False


def resolve_amp(amp: str, device: torch.device, warn: Callable[[str], None] = du.print0) -> str:
    """train.amp=auto: bf16 autocast where the device computes bf16 natively, else none (fp32). An explicit bf16
    where it is emulated is kept, with a one-line warning: it trains, many times slower than fp32."""
    if amp == "auto":
        return "bf16" if native_bf16(device) else "none"
    if amp == "bf16" and not native_bf16(device):
        how = (f"a {PROBE_SIZE}^3 matmul runs {1 / cpu_bf16_speedup():.0f}x slower in bf16 than in fp32 here"
               if device.type == "cpu" else "it runs through fp32 conversions")
        warn(f"warning: train.amp=bf16 on a {device.type} without native bf16, where bf16 is emulated ({how}); "
             f"train.amp=none or auto trains in fp32" + (", fp16 with the gradient scaler" if device.type == "cuda"
                                                          else ""))
    return amp


def cpu_matmul_tflops(dtype: torch.dtype, max_size: int = 2048, min_seconds: float = 0.05,
                      tries: int = 3) -> tuple[float, int]:
    """(TFLOP/s, n) of the best n^3 matmul in `dtype` on this CPU: n doubles from PROBE_SIZE until one product
    takes min_seconds or n reaches max_size, so an emulated dtype is measured in well under a second instead of
    a minute at 2048."""
    n = PROBE_SIZE
    while True:
        a = torch.randn(n, n, dtype=dtype)
        best = seconds(lambda: a @ a, tries)
        if best >= min_seconds or n >= max_size:
            return 2 * n**3 / best / 1e12, n
        n *= 2
