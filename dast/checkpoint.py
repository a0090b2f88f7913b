"""Checkpoint files that cannot execute code when loaded.

A dast checkpoint is a single ``.safetensors`` file: named tensors plus a JSON document
stored in the safetensors metadata under the key ``"dast"``. Loading it parses a JSON
header and raw tensor bytes, nothing else. Files are written atomically.

Foreign ``.pth`` files (the authors' released weights, torchvision weights) are read
with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
containers.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from dast.atomic import write_bytes
from dast.errors import CheckpointError

FORMAT = "dast-checkpoint"
VERSION = 1
META_KEY = "dast"


def save_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write ``tensors`` and the JSON-serialisable ``meta`` to ``path`` atomically."""
    doc = {"format": FORMAT, "version": VERSION, **meta}
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # safetensors refuses tensors that share storage; clone such views
    seen: dict[int, str] = {}
    for k, v in list(flat.items()):
        ptr = v.untyped_storage().data_ptr() if v.numel() else 0
        if ptr and ptr in seen:
            flat[k] = v.clone()
        elif ptr:
            seen[ptr] = k
    text = json.dumps(doc)
    # serialised in memory and written by Python, so that a full disk is an OSError (ENOSPC)
    # that dast.atomic reports as one line, not an opaque error of the safetensors writer
    write_bytes(path, save(flat, metadata={META_KEY: text}))


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read only the JSON document of a dast checkpoint."""
    p = _existing(path)
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        if _has_dast_header(p):
            raise CheckpointError(f"checkpoint {p} is damaged (truncated or overwritten): {exc}") from exc
        raise CheckpointError(_not_dast(p)) from exc
    return _parse_meta(p, meta)


def _has_dast_header(p: Path) -> bool:
    """Whether ``p`` starts like a dast checkpoint: a safetensors header whose metadata (the
    header's first entry) names the dast format, even if the file is cut short."""
    try:
        with open(p, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= 100_000_000:
                return False
            head = fh.read(min(size, 4096))
    except OSError:
        return False
    return head.startswith(b'{"__metadata__":') and FORMAT.encode() in head


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a dast checkpoint: (tensors, JSON document). Never unpickles anything."""
    p = _existing(path)
    meta = read_meta(p)
    try:
        tensors = load_file(str(p), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {p} is damaged: {exc}") from exc
    return tensors, meta


def load_torch_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a foreign ``.pth`` state dict with ``weights_only=True``.

    Returns a flat mapping from key to tensor. A file whose unpickling would need
    anything but tensors and containers is refused without running it.
    """
    p = _existing(path)
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{p} is not a readable safetensors file") from exc
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refusing to load {p}: it is not a plain tensor file (weights_only load failed: {first[:160]})"
        ) from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {p}: {exc.strerror or exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p} does not hold a state dict (found {type(obj).__name__})")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[str(k)] = v
    if not out:
        raise CheckpointError(f"{p} holds no tensors")
    return out


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"checkpoint path is a directory: {p}")
    return p


def _not_dast(p: Path) -> str:
    return (
        f"{p} is not a dast checkpoint (expected a .safetensors file written by dast; "
        "use `dast convert` for other weights)"
    )


def _parse_meta(p: Path, meta: Mapping[str, str]) -> dict[str, Any]:
    if META_KEY not in meta:
        raise CheckpointError(_not_dast(p))
    try:
        doc = json.loads(meta[META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {p} has a damaged header") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(_not_dast(p))
    if int(doc.get("version", 0)) > VERSION:
        raise CheckpointError(f"checkpoint {p} was written by a newer dast (format version {doc.get('version')})")
    return doc
