"""Shared plumbing of the estimators: argument checks, probe drawing, operator calls.

Every estimator sees a symmetric linear operator ``A`` of shape ``(size, size)``
only through ``matmat``, a callable that maps a ``(size, k)`` tensor of columns
``V`` to ``A @ V``. :class:`Operator` bundles that callable with its size, dtype
and device, checks every output, and draws the random probe vectors:

- Rademacher: entries ``+1`` or ``-1`` with probability 1/2 each;
- Gaussian: entries standard normal.

Both have ``E[v v^T] = I``, which is all the trace and diagonal estimators need.
Probes are drawn with ``torch.randint`` / ``torch.randn`` on the given
``generator``, so the same generator state gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hessfunc.errors import ArgumentError

Matmat = Callable[[torch.Tensor], torch.Tensor]

DISTRIBUTIONS = ("rademacher", "gaussian")


def check_int(
    value: object, name: str, caller: str, *, minimum: int = 1, maximum: int | None = None
) -> int:
    """``value`` as an int in ``[minimum, maximum]``, or an :class:`ArgumentError`."""
    in_range = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if in_range and maximum is not None:
        in_range = value <= maximum
    if not in_range:
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ArgumentError(
            f"{caller}(): expected {name} to be an int {bounds}, got {value!r}. "
            f"Pass {name} as a Python int within that range."
        )
    return value


def check_batch_size(value: object, caller: str) -> int | None:
    """``batch_size``: ``None`` (everything at once) or an int >= 1."""
    return None if value is None else check_int(value, "batch_size", caller)


def check_positive_float(value: object, name: str, caller: str) -> float:
    """``value`` as a finite float > 0, or an :class:`ArgumentError`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0.0 < float(value) < float("inf")):
        raise ArgumentError(
            f"{caller}(): expected {name} to be a finite number > 0, got {value!r}. "
            f"Pass a positive float, e.g. {name}=1e-8."
        )
    return float(value)


def check_choice(value: object, name: str, choices: Sequence[str], caller: str) -> str:
    """``value`` if it is one of ``choices``, else an :class:`ArgumentError`."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ArgumentError(
            f"{caller}(): expected {name} to be one of {options}, got {value!r}. "
            f"Pick one of those spellings."
        )
    return str(value)


def _same_device(device: torch.device | str | None, like: torch.Tensor) -> bool:
    """Whether ``device`` (``None``: any) names the device ``like`` lives on."""
    if device is None:
        return True
    device = torch.device(device)
    return device.type == like.device.type and device.index in (None, like.device.index)


def split_columns(total: int, batch_size: int | None) -> list[int]:
    """Block widths that cover ``total`` columns, each at most ``batch_size``."""
    width = total if batch_size is None else batch_size
    return [min(width, total - start) for start in range(0, total, width)]


@dataclass(frozen=True)
class Operator:
    """A checked view of ``matmat``: call it on a ``(size, k)`` block of columns."""

    matmat: Matmat
    size: int
    dtype: torch.dtype
    device: torch.device
    caller: str

    @classmethod
    def from_args(
        cls,
        caller: str,
        matmat: object,
        size: object,
        *,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
        generator: torch.Generator | None,
        like: object = None,
        like_name: str = "",
        like_shape: str = "",
    ) -> Operator:
        """Check the arguments every estimator shares and resolve dtype and device.

        ``dtype`` and ``device`` default to those of ``like`` (the caller's
        argument ``like_name``, an example vector of shape ``like_shape``, checked to
        be a tensor or None), else to torch's default dtype and the generator's device
        (or torch's default device).
        """
        if like is not None and not isinstance(like, torch.Tensor):
            raise ArgumentError(
                f"{caller}(): expected {like_name} to be a {like_shape} tensor or None, got "
                f"{type(like).__name__}. Pass a torch.Tensor or leave {like_name}=None."
            )
        if not callable(matmat):
            raise ArgumentError(
                f"{caller}(): expected matmat to be a callable mapping a (size, k) tensor to "
                f"(size, k), got {type(matmat).__name__}. Pass e.g. matmat=lambda V: A @ V."
            )
        size = check_int(size, "size", caller)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ArgumentError(
                f"{caller}(): expected generator to be a torch.Generator or None, got "
                f"{type(generator).__name__}. Pass e.g. torch.Generator().manual_seed(0)."
            )
        if like is not None:
            if (dtype is not None and dtype != like.dtype) or not _same_device(device, like):
                raise ArgumentError(
                    f"{caller}(): dtype={dtype} and device={device} disagree with "
                    f"{like_name}, a {like.dtype} tensor on {like.device}. Drop dtype and "
                    f"device, or convert {like_name} with .to()."
                )
            dtype, device = like.dtype, like.device
        if dtype is None:
            dtype = torch.get_default_dtype()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ArgumentError(
                f"{caller}(): expected dtype to be a real floating torch.dtype, got {dtype!r}. "
                f"Pass e.g. dtype=torch.float64."
            )
        if device is None:
            device = generator.device if generator is not None else torch.get_default_device()
        device = torch.device(device)
        if generator is not None and generator.device.type != device.type:
            raise ArgumentError(
                f"{caller}(): generator lives on {generator.device} but the probes are "
                f"drawn on {device}. Pass torch.Generator(device={str(device)!r})."
            )
        return cls(matmat, size, dtype, device, caller)

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        """``A @ block`` for a ``(size, k)`` block, with the output checked."""
        out = self.matmat(block)
        if not isinstance(out, torch.Tensor) or out.shape != block.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ArgumentError(
                f"{self.caller}(): matmat must map a {tuple(block.shape)} tensor to a "
                f"{tuple(block.shape)} tensor (the operator applied to each column), got "
                f"{got}. Check that size={self.size} matches the operator and that matmat "
                f"acts on columns, e.g. matmat=lambda V: A @ V."
            )
        if out.dtype != block.dtype or out.device != block.device:
            raise ArgumentError(
                f"{self.caller}(): matmat returned {out.dtype} on {out.device} for a "
                f"{block.dtype} input on {block.device}. Pass the operator's dtype and device "
                f"(dtype=..., device=...) or make matmat preserve them."
            )
        return out

    def apply_blocked(self, block: torch.Tensor, batch_size: int | None) -> torch.Tensor:
        """``A @ block``, calling ``matmat`` on at most ``batch_size`` columns at a time."""
        if batch_size is None or block.shape[1] <= batch_size:
            return self(block)
        return torch.cat([self(part) for part in block.split(batch_size, dim=1)], dim=1)

    def probes(
        self, num: int, distribution: str, generator: torch.Generator | None
    ) -> torch.Tensor:
        """``num`` random probe vectors as the columns of a ``(size, num)`` tensor, each
        column contiguous (drawn as rows, then transposed): the operators split columns
        into parameter-shaped tangents, and strided ones slow a backward pass."""
        shape = (num, self.size)
        if distribution == "rademacher":
            signs = torch.randint(
                0, 2, shape, generator=generator, dtype=self.dtype, device=self.device
            )
            return signs.mul_(2).sub_(1).T
        return torch.randn(shape, generator=generator, dtype=self.dtype, device=self.device).T
