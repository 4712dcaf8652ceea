"""Mixed precision for the training step: autocast for the forward pass, a gradient
scaler for fp16, and an optimizer step that goes through it.

fp32 is the default and changes nothing (autocast disabled, no scaler), so a run at
fp32 is bit for bit what it was before precision existed. bf16 has fp32's exponent
range and needs no scaler; it runs on CUDA and, slowly but correctly, on CPU (which is
how the tests exercise it). fp16 needs a scaler and CUDA: on CPU it is refused by name
rather than run in a mode nobody would deploy.

The losses are always computed in fp32: the step casts the log-probabilities up
before the objective, because DPO/IPO margins of a few nats lose their low bits in
bf16's 8-bit mantissa.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from po_cluster.config import PrecisionName

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    """A precision the device cannot run; the message names the setting."""


@dataclass
class Precision:
    """How one run's steps compute: `autocast()` around the forward, `step()` for backward + update."""

    name: PrecisionName
    device: torch.device
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def for_device(cls, name: PrecisionName, device: torch.device) -> Precision:
        if name == "fp16" and device.type != "cuda":
            raise PrecisionError(f"training.precision: fp16 needs a CUDA device (this run is on {device.type}); "
                                 "use bf16 or fp32")
        scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        return cls(name, device, scaler)

    @property
    def enabled(self) -> bool:
        return self.name != "fp32"

    def autocast(self) -> AbstractContextManager:
        """The forward's autocast region (a no-op context at fp32)."""
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES.get(self.name, torch.float32),
                              enabled=self.enabled)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """zero_grad, backward and the optimizer step; with fp16 the scaler scales the loss, unscales
        the gradients and skips the update when they overflowed (then lowers the scale)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict | None:
        """The scaler's state (scale, growth tracker: numbers only), for an exact resume at fp16."""
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
