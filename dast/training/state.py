"""Full training state in a safe checkpoint: networks, optimisers, step, RNG states.

Optimiser states become named tensors (``optim.<name>.<index>.<key>``) plus a JSON part
(hyper-parameters, non-tensor values); nothing is pickled.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dast.models.io import Networks, save_networks, split_prefixed


def optimizer_to_flat(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state dict into tensors and JSON."""
    sd = opt.state_dict()
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


def optimizer_from_flat(
    name: str, opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], doc: Mapping[str, Any]
) -> None:
    """Restore an optimiser from :func:`optimizer_to_flat`'s output."""
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
    opt.load_state_dict({"state": state, "param_groups": groups})


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
    optimizers: Mapping[str, torch.optim.Optimizer | None],
    meta: Mapping[str, Any],
) -> None:
    """Write networks + optimisers + RNG + ``meta`` (stage, step, history, ...) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    opt_doc: dict[str, Any] = {}
    for name, opt in optimizers.items():
        if opt is not None:
            t, d = optimizer_to_flat(name, opt)
            tensors.update(t)
            opt_doc[name] = d
    rt, rd = rng_to_flat()
    tensors.update(rt)
    save_networks(
        path, nets, extra_meta={"kind": "training", "optimizers": opt_doc, "rng": rd, **meta}, extra_tensors=tensors
    )


def restore_optimizers(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], optimizers: Mapping[str, torch.optim.Optimizer | None]
) -> None:
    docs = meta.get("optimizers", {})
    for name, opt in optimizers.items():
        if opt is not None and name in docs:
            optimizer_from_flat(name, opt, tensors, docs[name])
