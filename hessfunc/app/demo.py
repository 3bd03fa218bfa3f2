"""``hessfunc demo``: the seed's example, trained the functional way, then its curvature.

The network 1-10-10-1 with tanh fits ``y = 2x + 3 + 3 sin(x) sqrt|x| + cos(x + 3)`` on
1000 points of [-10, 10] by plain gradient descent on a pure function
(``params <- params - lr * grad(f)(params, x, y)``); at the trained parameters the
report gives the gradient norm, the exact Hessian diagonal (fast transform vs the
loop oracle), per-parameter blocks, top eigenvalues, trace and spectral density.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import HessfuncError
from ..functional import functionalize
from ..gradient import grad
from . import plots
from .report import curvature_report


def target_function(x: torch.Tensor) -> torch.Tensor:
    """The seed's target: ``2x + 3 + 3 sin(x) sqrt|x| + cos(x + 3)``."""
    return 2 * x + 3 + torch.sin(x) * 3 * torch.sqrt(x.abs()) + torch.cos(x + 3)


class SimpleNet(nn.Module):
    """The seed's network: 1-10-10-1 with tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(),
                                    nn.Linear(10, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def run_demo(out: Path, *, epochs: int = 1000, lr: float = 0.01, seed: int = 0,
             dtype: torch.dtype = torch.float32, device: str = "cpu", log: Any = print
             ) -> dict[str, Any]:
    """Train, analyse, write the figures and ``report.json``; return the report numbers."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = SimpleNet().to(dtype=dtype, device=device)
    x = torch.linspace(-10, 10, 1000, dtype=dtype, device=device).view(-1, 1)
    y = target_function(x)
    f, params = functionalize(model, nn.MSELoss())
    grad_f = grad(f)
    log(f"Training SimpleNet 1-10-10-1 (tanh) on 1000 points, lr={lr}, {epochs} epochs, "
        f"seed={seed}, {str(dtype).replace('torch.', '')} on {device}")
    t0 = time.perf_counter()
    history = []
    for epoch in range(epochs):
        if epoch % 200 == 0:
            loss = float(f(params, x, y))
            history.append({"epoch": epoch, "loss": loss})
            log(f"  epoch {epoch:5d}  loss {loss:.6g}")
        g = grad_f(params, x, y)
        params = {k: p - lr * g[k] for k, p in params.items()}
    train_time = time.perf_counter() - t0
    final_loss = float(f(params, x, y))
    history.append({"epoch": epochs, "loss": final_loss})
    if not math.isfinite(final_loss):
        raise HessfuncError(f"training diverged (loss {final_loss}); try a smaller --lr")
    log(f"  epoch {epochs:5d}  loss {final_loss:.6g}  (after the last step; {train_time:.2f} s)")
    log("Computing the curvature report at the trained parameters ...")
    rep = curvature_report(f, params, (x, y), seed=seed)
    rep.numbers.update(problem="SimpleNet 1-10-10-1 tanh, 1000 points of [-10, 10]",
                       epochs=epochs, lr=lr, seed=seed, device=device, training=history,
                       final_loss=final_loss, train_time_s=train_time)
    plots.write_outputs(out, rep, log, (x, y, f.output(params, x)))
    return rep.numbers
