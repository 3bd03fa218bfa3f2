"""Losses for tests, each knowing what targets it takes.

A :class:`Loss` is a plain callable ``loss(outputs, targets) -> scalar`` (pass it to
:func:`hessfunc.functionalize` as it is) with the kind of targets it expects, so that
data can be drawn for it. Usable without hypothesis.

Example:
    >>> loss = LOSSES["cross-entropy"]
    >>> loss.targets, loss.min_outputs
    ('class', 2)
    >>> loss(torch.zeros(4, 2), torch.tensor([0, 1, 1, 0]))  # log 2
    tensor(0.6931)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Loss", "LOSSES", "custom_loss"]


def custom_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A smooth non-standard scalar loss: ``mean(log1p((o - t)^2) + 0.1 sin(o) t)``."""
    return (torch.log1p((out - target) ** 2) + 0.1 * out.sin() * target).mean()


def _nll_of_log_softmax(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.nll_loss(F.log_softmax(out, dim=-1), target)


def _smoothed_cross_entropy(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target, label_smoothing=0.1)


@dataclass(frozen=True)
class Loss:
    """A scalar loss and the targets it takes.

    Attributes:
        name: its key in :data:`LOSSES`.
        fn: ``fn(outputs (N, C), targets) -> scalar``.
        targets: ``"real"`` (float, shaped like the outputs), ``"class"`` (int64 class
            indices of shape ``(N,)``) or ``"binary"`` (floats in {0, 1} like the outputs).
        min_outputs: the fewest outputs ``C`` it makes sense for (2 for softmax losses).
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    targets: str
    min_outputs: int = 1

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.fn(outputs, targets)


#: The losses drawn by :func:`hessfunc.testing.strategies.losses`, by name.
LOSSES: dict[str, Loss] = {loss.name: loss for loss in [
    Loss("mse", nn.MSELoss(), "real"),
    Loss("sum-mse", nn.MSELoss(reduction="sum"), "real"),
    Loss("cross-entropy", F.cross_entropy, "class", 2),
    Loss("cross-entropy-smoothed", _smoothed_cross_entropy, "class", 2),
    Loss("nll", _nll_of_log_softmax, "class", 2),
    Loss("bce-with-logits", F.binary_cross_entropy_with_logits, "binary"),
    Loss("huber", nn.HuberLoss(delta=0.5), "real"),
    Loss("custom", custom_loss, "real"),
]}
