"""The network as a graph for serving: an ONNX file (run with ONNX Runtime) or a torch.export program (.pt2, run with
`torch.export.load(path).module()`), both with a dynamic batch dimension, input float NCHW at the eval view's size,
output the logits. Each is serialised in memory, loaded back from those bytes and checked (check.py) before it is
written under its name in one rename: a failed check leaves nothing there.

Both go through torch.export: the ONNX file is made by torch.onnx's exporter from that same program (dynamo=True,
the exporter torch maintains; the TorchScript one is deprecated), so the two formats hold one capture of the model.
"""
from __future__ import annotations

import importlib
import io
import json
from typing import Callable

import torch

from core.errors import UserError
from core.files import atomic_write

from .check import ExportCheckError, Inputs, compare
from .source import CLASS_NAMES, Source

SERVE_EXTRA = "pip install -e '.[serve]'"
# The opset the dynamo exporter builds its graph in: no version conversion step, and ONNX Runtime runs it since 1.14.
# The exporter converts upward only, and quietly keeps 18 where it cannot, so the opset written is checked.
DEFAULT_OPSET = MIN_OPSET = 18
EXAMPLE_BATCH = 2  # torch.export specialises a dimension traced at 1; the check runs another size
INPUT, OUTPUT, VIEW = "images", "logits", "eval_view"


def program(source: Source) -> torch.export.ExportedProgram:
    """The model captured by torch.export, its batch dimension dynamic."""
    example = torch.zeros(EXAMPLE_BATCH, *source.view["input_size"])
    with torch.no_grad():
        return torch.export.export(source.model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))


def metadata(source: Source) -> dict[str, str]:
    """What travels with a graph: the class names, the eval view (timm's pretrained_cfg fields), the architecture."""
    return {CLASS_NAMES: source.names_json(), VIEW: json.dumps(source.view), "architecture": source.name}


def write_pt2(source: Source, path: str, inputs: Inputs) -> str:
    """The .pt2 file at `path`, its metadata as extra files (`<key>.json`); the check's line."""
    buffer = io.BytesIO()
    torch.export.save(program(source), buffer, extra_files={f"{k}.json": v for k, v in metadata(source).items()})
    data = buffer.getvalue()
    module = torch.export.load(io.BytesIO(data)).module()
    line = compare(source.model, module, inputs, "the loaded .pt2 program")
    atomic_write(path, lambda f: f.write(data))
    return line


def write_onnx(source: Source, path: str, inputs: Inputs, opset: int = DEFAULT_OPSET) -> str:
    """The ONNX file at `path`, its metadata in metadata_props; the check's line."""
    data = onnx_bytes(source, opset)
    line = compare(source.model, onnx_runner(data), inputs, "ONNX Runtime")
    atomic_write(path, lambda f: f.write(data))
    return line


def onnx_bytes(source: Source, opset: int) -> bytes:
    onnx = serve_packages()[0]
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise UserError(f"--opset {opset}: the installed exporter writes opsets {MIN_OPSET}-{newest} (onnx "
                        f"{onnx.__version__}); choose one of those")
    exported = torch.onnx.export(program(source), dynamo=True, opset_version=opset, input_names=[INPUT],
                                 output_names=[OUTPUT], optimize=True, verbose=False)
    model = exported.model_proto
    written = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        raise UserError(f"--opset {opset}: the installed exporter cannot convert this model to it (it wrote opset "
                        f"{written}); choose --opset {written} or one between")
    onnx.helper.set_model_props(model, metadata(source))
    return model.SerializeToString()


def onnx_runner(data: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ONNX Runtime session (CPU, this process's threads) on the file's bytes, as tensor in, logits out."""
    ort = serve_packages()[1]
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for an invalid graph
        raise ExportCheckError(f"ONNX Runtime cannot load the exported graph ({str(e).splitlines()[0]}); nothing "
                               f"was written. Try another --opset") from None
    return lambda x: torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])


def serve_packages():
    """(onnx, onnxruntime), imported only when an ONNX export asks for them; onnxscript is what the exporter uses."""
    try:
        import onnx
        import onnxruntime
        importlib.import_module("onnxscript")  # torch.onnx imports it on export: missing, say so here
    except ImportError as e:
        raise UserError(f"--format onnx needs the '{e.name}' package, not installed: {SERVE_EXTRA}") from None
    return onnx, onnxruntime
