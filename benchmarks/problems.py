"""Benchmark problems, built deterministically (fixed seeds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Problem:
    name: str
    model: nn.Module
    loss_fn: Any
    x: torch.Tensor
    y: torch.Tensor

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def target_function(x: np.ndarray) -> np.ndarray:
    """The seed's target: 2x + 3 + 3 sin(x) sqrt|x| + cos(x + 3)."""
    return 2 * x + 3 + np.sin(x) * 3 * np.sqrt(np.abs(x)) + np.cos(x + 3)


def mlp(sizes: list[int], act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


def simplenet(dtype: torch.dtype = torch.float32, device: str = "cpu") -> Problem:
    torch.manual_seed(0)
    model = mlp([1, 10, 10, 1]).to(dtype=dtype, device=device)
    x = torch.linspace(-10, 10, 1000, dtype=dtype, device=device).view(-1, 1)
    y = torch.as_tensor(target_function(x.cpu().double().numpy()), dtype=dtype, device=device)
    return Problem("SimpleNet 1-10-10-1 (1000 pts)", model, mse, x, y)


def mlp_5k(dtype: torch.dtype = torch.float32, device: str = "cpu") -> Problem:
    torch.manual_seed(1)
    model = mlp([20, 64, 64, 1]).to(dtype=dtype, device=device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 20, generator=g).to(dtype=dtype, device=device)
    y = torch.randn(512, 1, generator=g).to(dtype=dtype, device=device)
    return Problem("MLP 20-64-64-1 (512 pts)", model, mse, x, y)


def mlp_100k(dtype: torch.dtype = torch.float32, device: str = "cpu") -> Problem:
    torch.manual_seed(2)
    model = mlp([784, 128, 10]).to(dtype=dtype, device=device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 784, generator=g).to(dtype=dtype, device=device)
    y = torch.randint(0, 10, (256,), generator=g).to(device=device)
    return Problem("MLP 784-128-10 CE (256 pts)", model, F.cross_entropy, x, y)


def cnn(dtype: torch.dtype = torch.float32, device: str = "cpu") -> Problem:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.Tanh(), nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    ).to(dtype=dtype, device=device)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 1, 12, 12, generator=g).to(dtype=dtype, device=device)
    y = torch.randint(0, 10, (64,), generator=g).to(device=device)
    return Problem("CNN 2conv-tanh-linear CE (64 imgs)", model, F.cross_entropy, x, y)


def loss_module(problem: Problem) -> nn.Module:
    """The problem's loss as the torch module a user passes (and curvlinops and BackPACK
    need): ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()``."""
    return nn.CrossEntropyLoss() if problem.loss_fn is F.cross_entropy else nn.MSELoss()


PROBLEMS = {"simplenet": simplenet, "mlp5k": mlp_5k, "mlp100k": mlp_100k, "cnn": cnn}


def wide_cnn(dtype: torch.dtype = torch.float32, device: str = "cpu") -> Problem:
    """Curvature of wider convolutions: 3-16-16 channels on 16x16 images, 32 of them
    (not in ``PROBLEMS``: its exact Hessian diagonal takes BackPACK two minutes)."""
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 16, 3, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(16 * 16 * 16, 10),
    ).to(dtype=dtype, device=device)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(32, 3, 16, 16, generator=g).to(dtype=dtype, device=device)
    y = torch.randint(0, 10, (32,), generator=g).to(device=device)
    return Problem("CNN 3-16-16 channels, 16x16 CE (32 imgs)", model, F.cross_entropy, x, y)


def layernorm_mlp(dtype: torch.dtype = torch.float32, device: str = "cpu") -> Problem:
    """20-64-64-1 tanh with LayerNorm before each activation (5.8k parameters), MSE, 512
    points (not in ``PROBLEMS``: BackPACK has no Hessian rules for LayerNorm)."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(20, 64), nn.LayerNorm(64), nn.Tanh(), nn.Linear(64, 64),
                          nn.LayerNorm(64), nn.Tanh(), nn.Linear(64, 1)).to(dtype=dtype,
                                                                            device=device)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(512, 20, generator=g).to(dtype=dtype, device=device)
    y = torch.randn(512, 1, generator=g).to(dtype=dtype, device=device)
    return Problem("MLP 20-64-64-1 with LayerNorm (512 pts)", model, F.mse_loss, x, y)


def input_mlp(dtype: torch.dtype = torch.float32, device: str = "cpu") -> Problem:
    """Input derivatives: a 16-128-128-128-1 tanh MLP ``u`` and 1024 points ``x`` (``y`` unused)."""
    torch.manual_seed(4)
    model = mlp([16, 128, 128, 128, 1]).to(dtype=dtype, device=device)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1024, 16, generator=g).to(dtype=dtype, device=device)
    y = torch.zeros(1024, 1, dtype=dtype, device=device)
    return Problem("input MLP 16-128-128-128-1 (1024 pts)", model, mse, x, y)


#: Problems for input derivatives (Laplacian, input-Hessian diagonal) of ``u = model``.
INPUT_PROBLEMS = {"input_mlp": input_mlp}
