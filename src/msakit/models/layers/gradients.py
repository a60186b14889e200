"""Clipping each gradient element to [-value, value] as backward computes it: MMSA's
`clip_grad_value_`, for the ports that train with it (MISA, TFR-Net).

The clamp is a hook on every trainable parameter, so it acts on the gradients backward computes,
which are MMSA's only in one process without loss scaling: fp16's scaler multiplies them and DDP
averages them after the clamp. `check_clamping` refuses those two in one line.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from msakit.errors import MsakitError


def clamp_gradients(module: nn.Module, value: float) -> None:
    """Every trainable parameter's gradient clamped to [-value, value] as backward computes it."""
    clamp = functools.partial(torch.clamp, min=-value, max=value)  # picklable, unlike a lambda
    for param in module.parameters():
        if param.requires_grad:
            param.register_hook(clamp)


def check_clamping(model: str, device: torch.device) -> None:
    """A one-line error when the clamped gradients would not be the ones MMSA clips."""
    if torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16:
        cause = "training.precision=fp16 scales them (use bf16 or fp32)"
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        cause = "several processes average them after the clamp (train in one process)"
    else:
        return
    raise MsakitError(f"{model}: model.grad_clip_value clamps gradients as backward computes them, "
                      f"but {cause}; or set model.grad_clip_value=null")
