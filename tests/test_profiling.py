"""engine.profiling: where a traced step's time goes, from the profiler's events (CUDA's shaped as torch makes them)
and from a real trace on the CPU."""
import torch
from torch import nn
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from engine.profiling import PHASES, StepProfiler, phase, summarize_events

MAIN, AUTOGRAD = 1, 2  # thread ids: the training loop's, autograd's device thread


def event(name, start, end, thread=MAIN, device=DeviceType.CPU, kernels=(), annotation=False):
    """A profiler event as torch.autograd.profiler._parse_kineto_results makes it (times in microseconds)."""
    e = FunctionEvent(id=0, name=name, thread=thread, start_us=start, end_us=end, device_type=device,
                      use_device="cuda", is_user_annotation=annotation)
    for us in kernels:
        e.append_kernel("kernel", 0, us)
    return e


def cuda_step(offset):
    """One CUDA step of 1000 us on the host: data 100, forward 300, backward 400, optimizer 100; each range also
    as the GPU-side annotation Kineto adds, of the same name and no host time. Backward's ops and kernels run on
    autograd's thread, outside the main thread's train/backward range."""
    t = offset
    host = [event("ProfilerStep*", t, t + 1000), event("train/data", t, t + 100),
            event("aten::copy_", t + 10, t + 20, kernels=[30]),  # the batch's copy to the device
            event("train/forward", t + 100, t + 400), event("aten::conv2d", t + 110, t + 150, kernels=[200, 40]),
            event("train/backward", t + 400, t + 800),
            event("aten::convolution_backward", t + 450, t + 500, thread=AUTOGRAD, kernels=[500]),
            event("train/optimizer", t + 800, t + 900), event("aten::_fused_adamw_", t + 810, t + 830, kernels=[60])]
    device = [event(e.name, e.time_range.start + 5, e.time_range.end + 500, thread=7, device=DeviceType.CUDA,
                    annotation=True) for e in host if e.name.startswith(("ProfilerStep", "train/"))]
    return host + device


def test_cuda_summary_takes_host_times_from_the_host_and_device_times_from_each_phases_launches():
    summary = summarize_events(cuda_step(0) + cuda_step(10_000), cuda=True)
    assert summary["steps"] == 2 and summary["step_ms"] == 1.0
    host = {name: v["host_ms"] for name, v in summary["phases"].items()}
    assert host == {"data": 0.1, "forward": 0.3, "backward": 0.4, "optimizer": 0.1}
    device = {name: v["device_ms"] for name, v in summary["phases"].items()}
    # backward: the kernel launched from autograd's thread inside the backward window
    assert device == {"data": 0.03, "forward": 0.24, "backward": 0.5, "optimizer": 0.06}


def test_cpu_summary_has_host_times_only():
    summary = summarize_events([e for e in cuda_step(0) if e.device_type == DeviceType.CPU], cuda=False)
    assert summary["steps"] == 1 and summary["step_ms"] == 1.0
    assert summary["phases"]["forward"] == {"host_ms": 0.3}


def test_a_cpu_trace_of_the_loops_phases(tmp_path):
    model, data = nn.Linear(8, 2), torch.randn(4, 8)
    profiler = StepProfiler(steps=2, out_dir=str(tmp_path), device=torch.device("cpu"), wait=0)
    for _ in range(3):  # the warm-up step, then the 2 traced ones
        with phase("data"):
            x = data + 0
        with phase("forward"):
            loss = model(x).square().sum()
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            with torch.no_grad():
                model.weight -= 0.1 * model.weight.grad
        profiler.step()
    summary = profiler.close()
    assert summary["steps"] == 2 and summary["step_ms"] > 0 and summary["device"] == "cpu"
    assert set(summary["phases"]) == set(PHASES)
    assert all(v["host_ms"] > 0 and "device_ms" not in v for v in summary["phases"].values())
    assert summary["step_ms"] + 0.01 >= sum(v["host_ms"] for v in summary["phases"].values())  # ms rounding
    assert (tmp_path / "summary.json").is_file()
