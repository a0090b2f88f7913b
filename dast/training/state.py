"""Full training state in a safe checkpoint: networks, the engine, the hooks, RNG states.

* Optimiser states become named tensors (``optim.<name>.<index>.<key>``) plus a JSON part
  (hyper-parameters, non-tensor values).
* The rest of the engine's state (learning-rate scale, update policy) is JSON (``engine``).
* Each hook's state (:meth:`dast.training.hooks.Hook.state_dict`) may mix tensors and
  JSON values: tensors are stored as ``hooks/<hook>/<path>`` and referenced from the JSON
  part (``hooks``), so a hook can keep, say, a teacher network's weights.

Nothing is pickled.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dast.checkpoint import load_checkpoint
from dast.models.io import Networks, save_networks, split_prefixed


def optimizer_to_flat(name: str, sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state dict into tensors and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{name}.{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(name: str, tensors: Mapping[str, torch.Tensor], doc: Mapping[str, Any]) -> dict[str, Any]:
    """The optimiser state dict that :func:`optimizer_to_flat` split."""
    state: dict[int, dict[str, Any]] = {}
    for k, v in split_prefixed(tensors, f"optim.{name}").items():
        idx, key = k.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    for idx, vals in doc.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(vals)
    groups = []
    for g in doc["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


_TENSOR_REF = "$tensor"


def split_state(prefix: str, state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``state`` with every tensor moved into ``tensors`` (under ``prefix/<path>``) and
    replaced by a reference; dicts and lists are walked."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().clone().contiguous()
        return {_TENSOR_REF: prefix}
    if isinstance(state, Mapping):
        return {str(k): split_state(f"{prefix}/{k}", v, tensors) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [split_state(f"{prefix}/{i}", v, tensors) for i, v in enumerate(state)]
    return state


def join_state(doc: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of :func:`split_state`."""
    if isinstance(doc, Mapping):
        if set(doc) == {_TENSOR_REF}:
            return tensors[doc[_TENSOR_REF]]
        return {k: join_state(v, tensors) for k, v in doc.items()}
    if isinstance(doc, list):
        return [join_state(v, tensors) for v in doc]
    return doc


def rng_to_flat() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy form (legacy=True is the default)
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py = random.getstate()
    doc = {
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
    }
    return tensors, doc


def rng_from_flat(tensors: Mapping[str, torch.Tensor], doc: Mapping[str, Any]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"].to(torch.uint8).cpu())
    if "rng.numpy" in tensors and "numpy" in doc:
        name, pos, has_gauss, gauss = doc["numpy"]
        np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "python" in doc:
        v, internal, gauss = doc["python"]
        random.setstate((v, tuple(internal), gauss))


def save_training_state(
    path: str | Path,
    nets: Networks,
    engine: Mapping[str, Any],
    hooks: Mapping[str, Mapping[str, Any]],
    meta: Mapping[str, Any],
) -> None:
    """Write networks + the engine's state (:meth:`Engine.state_dict`) + the hooks' states
    + RNG + ``meta`` (stage, step, history, ...) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    opt_doc: dict[str, Any] = {}
    for name, sd in engine.get("optimizers", {}).items():
        if sd is not None:
            t, d = optimizer_to_flat(name, sd)
            tensors.update(t)
            opt_doc[name] = d
    rest = {k: v for k, v in engine.items() if k != "optimizers"}
    hook_doc = {name: split_state(f"hooks/{name}", st, tensors) for name, st in hooks.items() if st}
    rt, rd = rng_to_flat()
    tensors.update(rt)
    extra = {"kind": "training", "optimizers": opt_doc, "engine": rest, "hooks": hook_doc, "rng": rd, **meta}
    save_networks(path, nets, extra_meta=extra, extra_tensors=tensors)


@dataclass
class TrainingState:
    """A training checkpoint, read back: every tensor (weights included), the JSON document,
    and the engine's and hooks' states in the form their ``load_state_dict`` takes."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    engine: dict[str, Any]
    hooks: dict[str, Any]


def load_training_state(path: str | Path) -> TrainingState:
    """Read a checkpoint written by :func:`save_training_state` (or by dast 0.1's earlier
    layout, whose learning-rate scale and loss-scaler state sat in ``stage_state``)."""
    tensors, meta = load_checkpoint(path)
    optimizers = {name: optimizer_from_flat(name, tensors, doc) for name, doc in meta.get("optimizers", {}).items()}
    engine = dict(meta.get("engine") or {})
    if not engine:  # the earlier layout
        st = meta.get("stage_state", {})
        engine = {"lr_scale": st.get("lr_scale", 1.0), "update": {"grad_scaler": st.get("grad_scaler")}}
    engine["optimizers"] = optimizers
    hooks = {name: join_state(doc, tensors) for name, doc in (meta.get("hooks") or {}).items()}
    return TrainingState(tensors, meta, engine, hooks)
