"""Mixed precision for the training loop: the settings `training.precision` and `training.tf32`.

bf16 and fp16 run every forward pass (training and evaluation) under `torch.autocast` on the run's
device: matrix products and convolutions in half precision, reductions, norms and losses in fp32,
as autocast's own per-operation lists decide. The weights, the optimizer's moments and therefore
every checkpoint stay fp32. fp16's narrow exponent range needs loss scaling, so fp16 brings a
`GradScaler` (its scale is part of the training state); bf16 has fp32's range and needs none.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from msakit.errors import MsakitError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: no autocast at all


def use_tf32(device: torch.device, enabled: bool) -> None:
    """Let fp32 matrix products and convolutions on a CUDA GPU use TF32 tensor cores (Ampere and
    later; older GPUs ignore it): about 10 bits of mantissa in the products, fp32 accumulation."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


class MixedPrecision:
    """Autocast for the forward passes and, for fp16, loss scaling for the backward pass."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.precision = precision
        self.device = device
        self.dtype = AUTOCAST_DTYPES.get(precision)
        if self.dtype is not None:
            _check_autocast(precision, self.dtype, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context a forward pass runs in (none for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of `loss` added to the parameters' (fp16: of the loss times the scale)."""
        self.scaler.scale(loss).backward()

    def clip_values(self, parameters: Iterable[nn.Parameter], value: float) -> None:
        """Every gradient element clipped to [-value, value], as the true, unscaled gradients. fp16
        clamps the scaled ones at value x scale: the scale is a power of two, so this is the same
        clamp exactly, and it needs no unscaling (which fp16 allows once per step, while an
        accumulating loop clips after every backward). Non-finite fp16 gradients are left as they
        are, for the step to see the overflow and skip."""
        with_grads = [p for p in parameters if p.grad is not None]
        if not with_grads:
            return
        bound = value
        if self.scaler.is_enabled():
            if not torch.stack([torch.isfinite(p.grad).all() for p in with_grads]).all():
                return
            bound = value * self.scaler.get_scale()
        nn.utils.clip_grad_value_(with_grads, bound)

    def step(
        self, optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter], grad_clip: float | None,
    ) -> None:
        """The optimizer's step on the gradients, their norm first clipped to `grad_clip` (the norm
        of the true, unscaled gradients); with fp16, a step whose scaled gradients overflowed is
        skipped and the scale lowered."""
        if grad_clip is not None:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(parameters, grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()


def _check_autocast(precision: str, dtype: torch.dtype, device: torch.device) -> None:
    """A one-line error unless autocast runs in `dtype` on `device` (torch only warns, and then
    silently computes in fp32)."""
    supported = torch.amp.is_autocast_available(device.type)
    if supported:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device.type, dtype=dtype):
                supported = torch.is_autocast_enabled(device.type)
    if not supported:
        raise MsakitError(f"training.precision={precision} is not supported by autocast on device "
                          f"{device} (torch {torch.__version__}); use fp32")
