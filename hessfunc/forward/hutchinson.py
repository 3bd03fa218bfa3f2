"""Hutchinson's stochastic Laplacian on the forward engine.

``Delta u = tr H = E[v^T H v]`` for Rademacher ``v`` (entries +-1), so with S
samples ``(1/S) sum_s v_s^T H v_s`` is unbiased with variance
``2 (||H||_F^2 - sum_i H_ii^2) / S``. The S directions go through the forward
engine as one collapsed order-2 jet (Hutchinson 1989; Dangel et al. 2025,
"Collapsing Taylor mode", for the randomised forward Laplacian).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError
from ._directions import check_chunk_size, chunks
from ._propagate import ForwardEngine
from ._series import JetSpec
from .laplacian import collapsed_second

__all__ = ["hutchinson_laplacian"]


class _HutchinsonLaplacian:
    def __init__(
        self,
        u: Callable[..., Tensor],
        argnums: int,
        num_samples: int,
        generator: torch.Generator | None,
        chunk_size: int | None,
    ) -> None:
        caller = "hutchinson_laplacian"
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ArgumentError(
                f"{caller}: num_samples must be a positive int, got {num_samples!r}."
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ArgumentError(
                f"{caller}: generator must be a torch.Generator or None, "
                f"got {type(generator).__name__}; use torch.Generator().manual_seed(0)."
            )
        self.engine = ForwardEngine(u, argnums, caller)
        self.num_samples = num_samples
        self.generator = generator
        self.chunk_size = check_chunk_size(chunk_size, caller)

    @property
    def _guard_targets(self) -> tuple:
        return (self.engine,)

    def _signs(self, x: Tensor) -> Tensor:
        device = self.generator.device if self.generator is not None else x.device
        try:
            bits = torch.randint(
                0, 2, (self.num_samples, x.numel()), generator=self.generator, device=device
            )
        except RuntimeError as e:
            if "randomness" not in str(e):
                raise
            raise ArgumentError(
                "hutchinson_laplacian: called under torch.func.vmap, which refuses random "
                "draws by default; call vmap(..., randomness='different') for independent "
                "directions per point or randomness='same' to share them."
            ) from None
        signs = bits.to(device=x.device, dtype=x.dtype) * 2 - 1
        return signs.reshape((self.num_samples, *x.shape))

    def __call__(self, *args: Any) -> Tensor:
        x = self.engine.point(args)
        directions = self._signs(x)
        total: Tensor | None = None
        for lo, hi in chunks(self.num_samples, self.chunk_size):
            spec = JetSpec(2, hi - lo, collapsed=True)
            part = collapsed_second(self.engine.jet(args, directions[lo:hi], spec))
            total = part if total is None else total + part
        assert total is not None
        return total / self.num_samples


def hutchinson_laplacian(
    u: Callable[..., Tensor],
    argnums: int = 0,
    *,
    num_samples: int,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> Callable[..., Tensor]:
    """Unbiased estimate of the Laplacian of ``u`` from Rademacher directions.

    Args:
        u: maps one point ``x`` (floating, shape ``s``) to a scalar (0-d tensor).
        argnums: position of ``x`` among ``u``'s arguments.
        num_samples: number S of random directions per call.
        generator: source of the directions; the same generator state gives the
            same numbers. ``None`` uses torch's global generator.
        chunk_size: at most this many directions per pass.

    Returns:
        A function with ``u``'s signature returning ``(1/S) sum_s v_s^T H v_s``,
        a 0-d tensor; every call draws fresh directions. Under
        ``torch.func.vmap`` pass ``randomness="different"`` (independent
        directions per point) or ``"same"``.

    Example:
        >>> import torch
        >>> from hessfunc.forward import hutchinson_laplacian
        >>> g = torch.Generator().manual_seed(0)
        >>> est = hutchinson_laplacian(lambda x: (x**2).sum(), num_samples=3, generator=g)
        >>> est(torch.ones(4, dtype=torch.float64))  # v^T (2 I) v = 2 d exactly
        tensor(8., dtype=torch.float64)
    """
    return _HutchinsonLaplacian(u, argnums, num_samples, generator, chunk_size)
