"""Hypothesis strategies: small smooth models, losses and float64 batches.

Smooth activations only: a ReLU net has zero curvature inside its pieces, so a
Hessian test on it would prove nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn


class Sin(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)


ACTIVATIONS = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "sin": Sin,
}


class TwoInputNet(nn.Module):
    """A model with two inputs: ``mlp(cat(a, b * b))``."""

    def __init__(self, da: int, db: int, width: int, out: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(da + db, width), nn.Tanh(), nn.Linear(width, out))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([a, b * b], dim=-1))


class TiedNet(nn.Module):
    """An autoencoder-like net whose decoder reuses the encoder's weight (tied)."""

    def __init__(self, d: int, width: int):
        super().__init__()
        self.enc = nn.Linear(d, width)
        self.dec_bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(x))
        return F.linear(h, self.enc.weight.t(), self.dec_bias)


class Residual(nn.Module):
    """Linear layers and tanh, but with a skip connection: not a chain."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x + torch.tanh(self.a(x)))


def custom_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A smooth non-standard scalar loss."""
    return (torch.log1p((out - target) ** 2) + 0.1 * out.sin() * target).mean()


@dataclass
class Problem:
    model: nn.Module
    loss_fn: Any
    inputs: Any  # a tensor or a tuple of tensors
    targets: torch.Tensor
    name: str

    @property
    def batch(self) -> tuple[Any, torch.Tensor]:
        return self.inputs, self.targets


def build_mlp(sizes: list[int], activation: str, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers).double()


@st.composite
def mlps(draw: st.DrawFn, max_depth: int = 3, max_width: int = 8, max_in: int = 4,
         min_out: int = 1, max_out: int = 3) -> tuple[nn.Sequential, str]:
    depth = draw(st.integers(1, max_depth))
    sizes = [draw(st.integers(1, max_in))]
    sizes += [draw(st.integers(1, max_width)) for _ in range(depth - 1)]
    sizes.append(draw(st.integers(min_out, max_out)))
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    seed = draw(st.integers(0, 2**16))
    return build_mlp(sizes, act, seed), f"mlp{sizes}-{act}"


@st.composite
def problems(draw: st.DrawFn, kinds: tuple[str, ...] = ("mlp", "two-input", "tied"),
             max_batch: int = 6) -> Problem:
    """A model, a loss and a float64 batch drawn together."""
    kind = draw(st.sampled_from(kinds))
    n = draw(st.integers(1, max_batch))
    seed = draw(st.integers(0, 2**16))
    loss_name = draw(st.sampled_from(["mse", "cross-entropy", "custom"]))
    if kind == "mlp":
        model, name = draw(mlps(min_out=2 if loss_name == "cross-entropy" else 1))
        d_in, d_out = model[0].in_features, model[-1].out_features
        g = torch.Generator().manual_seed(seed)
        inputs: Any = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    elif kind == "two-input":
        da, db = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        d_out = draw(st.integers(2, 3))
        torch.manual_seed(seed)
        model = TwoInputNet(da, db, draw(st.integers(1, 6)), d_out).double()
        name = "two-input"
        g = torch.Generator().manual_seed(seed)
        inputs = (torch.randn(n, da, generator=g, dtype=torch.float64),
                  torch.randn(n, db, generator=g, dtype=torch.float64))
    else:
        d = draw(st.integers(2, 4))
        torch.manual_seed(seed)
        model = TiedNet(d, draw(st.integers(1, 5))).double()
        d_out, name = d, "tied"
        g = torch.Generator().manual_seed(seed)
        inputs = torch.randn(n, d, generator=g, dtype=torch.float64)
    if loss_name == "cross-entropy":
        targets = torch.randint(0, d_out, (n,), generator=g)
        loss_fn: Any = F.cross_entropy
    else:
        targets = torch.randn(n, d_out, generator=g, dtype=torch.float64)
        loss_fn = nn.MSELoss() if loss_name == "mse" else custom_loss
    return Problem(model, loss_fn, inputs, targets, f"{name}/{loss_name}/n={n}")


def random_like(tree: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in tree.items()}
