"""Export the deployable target model (segmentor + discoverer attention) to ONNX.

The graph takes ``image`` (N x 3 x H x W, float32, already normalised as the
checkpoint's ``norm`` says, at any size) and returns ``logits`` (N x C x h x w, output
stride 8, or the checkpoint's ``output_stride``) and ``attention`` (N x 1 x h x w, values
in [0, 1)). Batch, height and width are dynamic. The model's preprocessing convention is
stored in the ONNX metadata.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dast.atomic import write_bytes
from dast.errors import UserError
from dast.models.io import Networks

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "attention")
DEFAULT_OPSET = 17
# The traced example; any size works because height and width are exported as dynamic.
SAMPLE_SIZE = (96, 64)  # (width, height); deliberately not square
PARITY_ATOL = 1e-4
MIN_OPSET = 10  # ceil-mode max pooling with dynamic input sizes needs opset 10


def max_opset() -> int:
    """The newest opset the installed torch's TorchScript exporter writes."""
    try:
        from torch.onnx import _constants  # noqa: PLC0415 - optional: private torch module
    except ImportError:
        return DEFAULT_OPSET
    for name in ("ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", "ONNX_MAX_OPSET"):
        value = getattr(_constants, name, None)
        if isinstance(value, int):
            return value
    return DEFAULT_OPSET


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise UserError(
            f"ONNX export needs the '{module}' package: pip install onnx onnxruntime "
            "(or, from this checkout, pip install -e '.[export]')"
        ) from exc


def dynamic_axes() -> dict[str, dict[int, str]]:
    """Dynamic batch, height and width for the input and both outputs."""
    return {
        INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
        OUTPUT_NAMES[0]: {0: "batch", 2: "out_height", 3: "out_width"},
        OUTPUT_NAMES[1]: {0: "batch", 2: "out_height", 3: "out_width"},
    }


def _metadata(nets: Networks) -> dict[str, str]:
    spec = nets.spec
    return {
        "dast.arch": spec.arch,
        "dast.variant": spec.variant,
        "dast.num_classes": str(spec.num_classes),
        "dast.norm": spec.norm,
        "dast.input_size": json.dumps(list(spec.input_size) if spec.input_size else None),
        "dast.attention": json.dumps(bool(spec.attention and nets.discoverer is not None)),
        "dast.class_names": json.dumps(list(spec.class_names)),
    }


def onnx_bytes(nets: Networks, opset: int = DEFAULT_OPSET) -> bytes:
    """Trace the target model with the TorchScript exporter and return the checked ONNX bytes."""
    onnx = _require("onnx")
    top = max_opset()
    if not MIN_OPSET <= int(opset) <= top:
        raise UserError(f"opset {opset} is not supported: choose {MIN_OPSET}..{top}")
    model = copy.deepcopy(nets.target_model()).to("cpu").eval()
    w, h = SAMPLE_SIZE
    sample = torch.zeros(1, 3, h, w)
    kwargs: dict[str, Any] = {
        "input_names": [INPUT_NAME],
        "output_names": list(OUTPUT_NAMES),
        "dynamic_axes": dynamic_axes(),
        "opset_version": int(opset),
        "do_constant_folding": True,
    }
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter: dynamic_axes, no extra dependencies
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with torch.no_grad():
            torch.onnx.export(model, (sample,), buf, **kwargs)  # type: ignore[arg-type]  # torch stub: f may be a file object
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in _metadata(nets).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_onnx(nets: Networks, path: str | os.PathLike[str], opset: int = DEFAULT_OPSET) -> Path:
    """Export the deployable target model to ``path`` (written atomically) and return it."""
    data = onnx_bytes(nets, opset)
    out = Path(path)
    write_bytes(out, data)
    return out


def onnx_parity(
    nets: Networks,
    path: str | os.PathLike[str],
    sizes: Sequence[tuple[int, int]] = ((96, 64), (71, 45)),
    batch: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Run the exported file with onnxruntime at each (width, height) and compare with PyTorch.

    Returns the largest absolute difference of each output over all sizes.
    """
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = copy.deepcopy(nets.target_model()).to("cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    worst = dict.fromkeys(OUTPUT_NAMES, 0.0)
    for w, h in sizes:
        x = torch.randn(batch, 3, h, w, generator=gen)
        with torch.no_grad():
            ref = model(x)
        got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
        for name, r, g in zip(OUTPUT_NAMES, ref, got):
            if tuple(r.shape) != tuple(g.shape):
                raise RuntimeError(
                    f"{path}: ONNX output '{name}' has shape {tuple(g.shape)}, PyTorch gives {tuple(r.shape)}"
                )
            worst[name] = max(worst[name], float(np.abs(r.numpy() - g).max()))
    return worst
