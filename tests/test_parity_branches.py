"""benchmarks/parity/msakit_parity.py: float32 gradients compared on the branch of the float64 pass."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "parity" / "msakit_parity.py"
_SPEC = importlib.util.spec_from_file_location("msakit_parity", _PATH)
parity = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(parity)

# (1 + 2^-25) - 1 - 2^-26 is 2^-26 > 0 exactly, but -2^-26 < 0 in float32 (1 + 2^-25 rounds to 1)
KINK = [1.0, 2.0**-25, -1.0, -(2.0**-26)]


def kink_input(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.tensor(KINK, dtype=torch.float32).to(dtype).requires_grad_()
    return p, ((p[0] + p[1]) + p[2]) + p[3]


def test_relu_imposed_on_float32_takes_the_float64_side():
    branches = parity.Branches()
    grads = {}
    for dtype, mode in ((torch.float64, "record"), (torch.float32, "free"), (torch.float32, "impose")):
        p, h = kink_input(dtype)
        if mode == "impose":
            branches.impose()
        if mode == "free":
            (3.0 * F.relu(h)).backward()
        else:
            with parity.relus_through(branches, torch.nn.Module()):
                (3.0 * F.relu(h)).backward()
        grads[mode] = p.grad.tolist()
    assert grads["record"] == [3.0] * 4
    assert grads["free"] == [0.0] * 4  # float32 on its own falls on the other side of the kink
    assert grads["impose"] == [3.0] * 4
    assert branches.departures == {"ReLU": 1, "max-pool": 0}
    assert F.relu is parity._RELU  # restored


def test_activation_attributes_are_routed_and_restored():
    layer = torch.nn.TransformerEncoderLayer(4, 1, 8, dropout=0.0)
    branches = parity.Branches()
    with parity.relus_through(branches, layer):
        assert layer.activation == branches.relu
        layer(torch.randn(2, 3, 4))
    assert layer.activation is parity._RELU
    assert len(branches._relu) == 1


def test_max_imposed_on_float32_takes_the_float64_step():
    branches = parity.Branches()
    grads = {}
    for dtype, mode in ((torch.float64, "record"), (torch.float32, "impose")):
        p, h = kink_input(dtype)
        other = torch.zeros((), dtype=dtype, requires_grad=True)
        steps = torch.stack([h, other]).view(1, 2)
        if mode == "impose":
            branches.impose()
            assert steps[0, 0] < steps[0, 1]  # float32 alone would take step 1
        branches.max(steps, 1, lambda steps=steps: steps.amax(dim=1)).sum().backward()
        grads[mode] = (p.grad.tolist(), other.grad.item())
    assert grads["record"] == ([1.0] * 4, 0.0)
    assert grads["impose"] == ([1.0] * 4, 0.0)
    assert branches.departures == {"ReLU": 0, "max-pool": 1}


def test_exact_float64_ties_are_not_departures():
    branches = parity.Branches()
    tied = torch.ones(2, 5, dtype=torch.float64)
    branches.max(tied, 1, lambda: tied.amax(dim=1))
    branches.impose()
    nearly = torch.ones(2, 5)
    nearly[:, 3] += 1e-7
    branches.max(nearly, 1, lambda: nearly.amax(dim=1))
    assert branches.departures["max-pool"] == 0


def test_float64_pass_draws_the_float32_noise():
    torch.manual_seed(5)
    expected = torch.randn(3, 7)
    expected_normal = torch.empty(4, 6).normal_()
    with parity.float32_draws():
        torch.manual_seed(5)
        drawn = torch.randn_like(torch.zeros(3, 7, dtype=torch.float64))
        normal = torch.empty(4, 6, dtype=torch.float64).normal_()
    assert drawn.dtype == normal.dtype == torch.float64
    assert torch.equal(drawn, expected.double())
    assert torch.equal(normal, expected_normal.double())
    assert torch.Tensor.normal_ is parity._NORMAL and torch.randn_like is parity._RANDN_LIKE
