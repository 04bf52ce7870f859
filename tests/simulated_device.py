"""A stand-in accelerator for machines without one: tensors that say they live on device "meta" but hold CPU data,
so that code written for a GPU takes its device branches here, and every transfer between host and device is seen.

    with SimulatedDevice() as sim:
        images = sim.put(batch)              # on the device, not counted
        out = augment(images)                # runs as it would on a GPU, on the CPU's kernels
    sim.copies                               # host -> device transfers: (what, non_blocking, where in the code)
    sim.syncs                                # what read device data back or waited on it

What a CUDA device does that counts here: a tensor made from host data on the device, or a host tensor copied to it,
is a transfer (a blocking one unless non_blocking: from pageable memory cudaMemcpy waits for all queued work);
reading a value back (item, tolist, bool, a copy to the host), an op whose output size depends on device data
(nonzero, boolean masks, bincount, unique, repeat_interleave without output_size) and indexing a device tensor with
a host tensor wait for the device. A host tensor that is not 0-dim in an op on device tensors, and a host
generator for a device op, raise as CUDA does. Device generators (torch.Generator("meta") inside the block) are CPU
generators underneath.
"""
from __future__ import annotations

import threading
import traceback
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = torch.device("meta")
aten = torch.ops.aten
_SIZE_FROM_DATA = {aten.nonzero.default, aten.masked_select.default, aten.bincount.default, aten._unique2.default,
                   aten.unique_dim.default, aten.unique_consecutive.default, aten.equal.default,
                   aten.is_nonzero.default, aten._local_scalar_dense.default}
_active = threading.local()


def _where() -> str:
    """The innermost frame of the project's own code (not torch's, not this file's) that led here."""
    ours = [f for f in traceback.extract_stack()[:-2] if "site-packages" not in f.filename
            and not f.filename.endswith(("simulated_device.py", "python_dispatch.py"))]
    return f"{ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno}" if ours else "?"


def _on_device(device) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


class OnDevice(torch.Tensor):
    """A tensor on the simulated device; `inner` holds its CPU data."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype,
                                                   device=DEVICE, requires_grad=inner.requires_grad,
                                                   storage_offset=inner.storage_offset())

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def __repr__(self) -> str:
        return f"OnDevice({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # autograd's own threads: no mode there
        return _active.sim.dispatch(func, args, kwargs or {})


class _Generator(torch.Generator):
    """torch.Generator inside the block: one for the simulated device is a CPU generator marked as on it."""

    def __new__(cls, device="cpu"):
        simulated = _on_device(device)
        generator = super().__new__(cls, "cpu" if simulated else device)
        generator.simulated = simulated
        return generator


def _simulated_generator(generator) -> bool:
    return generator is None or getattr(generator, "simulated", False)


class _Constructors(TorchFunctionMode):
    """What the dispatcher does not see: torch.tensor(data, device=...) copies below it, tolist reads the data
    directly, and a generator reaches it as a new object."""

    def __init__(self, sim: "SimulatedDevice"):
        super().__init__()
        self.sim = sim

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and _on_device(kwargs.get("device")):
            self.sim.copies.append((f"torch.{func.__name__}", False, _where()))
            return OnDevice(func(*args, **{**kwargs, "device": "cpu"}))
        if func in (torch.Tensor.tolist, torch.Tensor.numpy) and isinstance(args[0], OnDevice):
            self.sim.syncs.append((f"Tensor.{func.__name__}", _where()))
            return func(args[0].inner, *args[1:], **kwargs)
        if not _simulated_generator(kwargs.get("generator")) and (  # the dispatcher sees a copy of the generator
                _on_device(kwargs.get("device")) or any(isinstance(a, OnDevice) for a in _leaves(args))):
            raise RuntimeError(f"{func.__name__}: Expected a 'meta' device type for generator but found 'cpu'")
        return func(*args, **kwargs)


class SimulatedDevice(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies: list[tuple[str, bool, str]] = []
        self.syncs: list[tuple[str, str]] = []
        self._constructors = _Constructors(self)
        self._generator: Optional[type] = None

    def __enter__(self):
        _active.sim = self
        self._generator, torch.Generator = torch.Generator, _Generator
        self._constructors.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._constructors.__exit__(*exc)
        torch.Generator = self._generator
        _active.sim = None

    def put(self, tensor: torch.Tensor) -> OnDevice:
        """`tensor` on the device without counting a transfer (a model's weights, a batch already there)."""
        return OnDevice(tensor.detach().clone())

    def clear(self) -> None:
        self.copies.clear()
        self.syncs.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.dispatch(func, args, kwargs or {})

    def dispatch(self, func, args, kwargs):
        leaves = _leaves((args, kwargs))
        device_in = any(isinstance(a, OnDevice) for a in leaves)
        to_device = _on_device(kwargs.get("device"))
        if func in (aten._to_copy.default, aten.copy_.default):
            return self._copy(func, args, kwargs, device_in, to_device)
        if device_in:
            self._check_mixed(func, args, kwargs, leaves)
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        return tree_map(_wrap, out) if device_in or to_device else out

    def _copy(self, func, args, kwargs, device_in: bool, to_device: bool):
        source = args[1] if func is aten.copy_.default else args[0]
        non_blocking = bool(kwargs.get("non_blocking", args[2] if len(args) > 2 else False))
        target_on_device = isinstance(args[0], OnDevice) if func is aten.copy_.default else (
            to_device or (isinstance(source, OnDevice) and kwargs.get("device") is None))
        if target_on_device and not isinstance(source, OnDevice):
            self.copies.append((str(func), non_blocking, _where()))
        elif isinstance(source, OnDevice) and not target_on_device:
            self.syncs.append((f"{func} to the host", _where()))
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is aten.copy_.default:
            return args[0]
        return OnDevice(out) if target_on_device else out

    def _check_mixed(self, func, args, kwargs, leaves) -> None:
        host = [a for a in leaves if isinstance(a, torch.Tensor) and not isinstance(a, OnDevice) and a.dim() > 0]
        if func in _SIZE_FROM_DATA or (func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None):
            self.syncs.append((str(func), _where()))
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            indices = [a for a in args[1] if isinstance(a, torch.Tensor)]
            if any(a.dtype == torch.bool for a in indices):
                self.syncs.append((f"{func} with a boolean mask", _where()))
            elif any(not isinstance(a, OnDevice) for a in indices):
                self.syncs.append((f"{func} with a host index", _where()))
            host = [a for a in host if not any(a is i for i in indices)]
        if host:
            raise RuntimeError(f"{func}: a host tensor of shape {tuple(host[0].shape)} among device tensors")


def _leaves(value) -> list:
    """The values inside an op's (nested) arguments; torch's pytree does this for any container, slowly."""
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, dict):
        return _leaves(list(value.values()))
    return [value]


def tree_map(fn, value):
    if isinstance(value, (list, tuple)):
        return type(value)(tree_map(fn, item) for item in value) if not hasattr(value, "_fields") else \
            type(value)(*(tree_map(fn, item) for item in value))
    if isinstance(value, dict):
        return {key: tree_map(fn, item) for key, item in value.items()}
    return fn(value)


def _unwrap(value):
    if isinstance(value, OnDevice):
        return value.inner
    if isinstance(value, torch.device) and value.type == DEVICE.type:
        return torch.device("cpu")
    if isinstance(value, str) and value == DEVICE.type:
        return "cpu"
    return value


def _wrap(value):
    return OnDevice(value) if isinstance(value, torch.Tensor) and not isinstance(value, OnDevice) else value
