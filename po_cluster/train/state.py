"""Resumable training state (last iterate, AdamW moments, BMA sums, step) as
safetensors + JSON: a checkpoint that a crashed worker resumes from, with
nothing pickled."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from po_cluster.train.bma import BetaMovingAverage
from po_cluster.train.precision import Precision

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {f"opt.{index}.{key}": value.detach().cpu().contiguous()
               for index, entries in state["state"].items() for key, value in entries.items()}
    return tensors, {"param_groups": state["param_groups"]}


def save_train_state(folder: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     bma: BetaMovingAverage | None, precision: Precision | None = None) -> None:
    params = {f"param.{n}": p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    tensors = {**params, **opt_tensors}
    meta = {"step": step, "optimizer": opt_meta, "bma": None,
            "grad_scaler": precision.state_dict() if precision is not None else None}
    if bma is not None:
        bma_tensors, meta["bma"] = bma.state_dict()
        tensors.update({f"bma.{n}": t.cpu().contiguous() for n, t in bma_tensors.items()})
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def load_train_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     bma: BetaMovingAverage | None, precision: Precision | None = None) -> int:
    """Restore everything `save_train_state` wrote; returns the step to continue after."""
    tensors = load_file(str(folder / STATE_TENSORS))
    meta = json.loads((folder / STATE_JSON).read_text())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(tensors[f"param.{name}"].to(p.device))
    _restore_optimizer(optimizer, tensors, meta["optimizer"])
    if bma is not None and meta["bma"] is not None:
        bma.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("bma.")}, meta["bma"])
    if precision is not None:
        precision.load_state_dict(meta.get("grad_scaler"))
    return int(meta["step"])
