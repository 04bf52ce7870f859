"""FLOP utilisation for scripts/benchmark.py: the model's FLOPs per image, and the peak it is measured against (a
known GPU's data sheet, --peak-tflops, or on a CPU the best large matrix product in the training dtype)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

import distributed_utils as du
from engine.precision import cpu_matmul_tflops

MATMUL_SIZE = 2048  # the largest square matmul whose best rate is a CPU's yardstick for FLOP utilisation
# Dense bf16/fp16 tensor-core peaks (vendor data sheets), for model FLOP utilisation; --peak-tflops overrides.
PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 NVL": 835.5, "H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4,
               "A100": 312.0, "L40S": 362.1, "A10": 125.0, "RTX 3090": 71.0, "RTX 4090": 165.2}


def forward_flops(model, images: torch.Tensor) -> float:
    """FLOPs (2 per multiply-add) of one image's forward pass, counted by torch."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images[:1])
    return float(counter.get_total_flops())


def known_peak_tflops(device: torch.device, amp: str, override: float) -> tuple[float, str]:
    """One device's yardstick for FLOP utilisation and where it came from: --peak-tflops, or a known GPU's
    data-sheet peak (bf16/fp16); (0, "") otherwise: on a CPU the peak is measured (matmul_tflops) between the
    repeats."""
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda" or amp == "none":
        return 0.0, ""
    name = torch.cuda.get_device_name(device)
    sheet = next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
    return sheet, "data sheet" if sheet else ""


def matmul_tflops(dtype: torch.dtype) -> tuple[float, int]:
    """What this CPU reaches on a large matrix product in the training dtype, run on every rank at once (they share
    the cores as training does) and summed over the ranks; and the matrix size (smaller where the dtype is
    emulated, so that the yardstick takes seconds, not minutes)."""
    du.barrier()
    tflops, n = cpu_matmul_tflops(dtype, max_size=MATMUL_SIZE)
    return du.all_reduce_sum(torch.tensor(tflops, dtype=torch.float64)).item(), n


def gpus_used(device: torch.device) -> int:
    """The GPUs the ranks run on (distinct UUIDs): one each, or fewer where ranks share one."""
    if device.type != "cuda":
        return 1
    return len(set(du.all_gather_object(str(torch.cuda.get_device_properties(device).uuid))))
