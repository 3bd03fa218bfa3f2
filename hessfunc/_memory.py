"""Memory guard: estimate a dense result before allocating it, refuse if too large.

NOTE [memory limit]: the default limit is ``DEFAULT_FRACTION`` of the memory
available on the result's device when the call is made (``MemAvailable`` from
``/proc/meminfo`` on CPU, ``torch.cuda.mem_get_info`` on CUDA). Every call that
materialises a P x P or P x chunk result takes ``max_memory`` (bytes) to
override it; there is no global setting.
"""

from __future__ import annotations

import os

import torch

from .errors import ArgumentError, DenseMemoryError

__all__ = ["DEFAULT_FRACTION", "available_bytes", "memory_limit", "check_dense", "format_bytes",
           "auto_chunk_size"]

#: Fraction of the available memory one dense result may take by default.
DEFAULT_FRACTION = 0.5
#: Working budget for automatically sized chunks of tangents.
CHUNK_BUDGET_BYTES = 256 * 2**20


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def available_bytes(device: torch.device | str | None = None) -> int:
    """Memory available for new tensors on ``device`` (best effort)."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def memory_limit(max_memory: int | None, device: torch.device | str | None, call: str) -> int:
    if max_memory is None:
        return int(DEFAULT_FRACTION * available_bytes(device))
    if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory <= 0:
        raise ArgumentError(f"{call}: `max_memory` must be a positive int (bytes) or None, "
                            f"got {max_memory!r}.")
    return max_memory


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def check_dense(numel: int, dtype: torch.dtype, device: torch.device | str | None, *, what: str,
                call: str, max_memory: int | None = None, hint: str | None = None,
                copies: int = 1) -> None:
    """Raise :class:`DenseMemoryError` if ``copies`` x ``numel`` entries of ``dtype`` (the
    result and the working copies its assembly holds at once) exceed the limit."""
    need = copies * numel * itemsize(dtype)
    limit = memory_limit(max_memory, device, call)
    if need > limit:
        hint = hint or ("use `chunk_size`, `hessian_blocks`, `hessian_diag` or "
                        "`hessfunc.HessianOperator` (matrix-free) instead")
        held = f", {copies} copies while assembling" if copies > 1 else ""
        raise DenseMemoryError(
            f"{call}: {what} needs {format_bytes(need)} ({numel:,} x {dtype}{held}), over the "
            f"limit of {format_bytes(limit)}; {hint}, or raise the limit with `max_memory=`."
        )


#: Largest automatic chunk of tangents.
#: NOTE [chunk cap]: a batched backward pass (``is_grads_batched``, i.e. ``vmap``
#: over the backward graph) materialises every intermediate once per tangent, so
#: beyond a few dozen tangents it only adds memory traffic. Measured side by side
#: on CPU (``python -m benchmarks``, docs/benchmarks.md): against one plain backward
#: pass per tangent, chunks of 32 are 3x faster for the CNN's exact diagonal and
#: blocks (213 ms against 661 ms) and 1.3x for its full Hessian, tie on the
#: 784-128-10 MLP and lose 1.2-1.3x on the 20-64-64-1 MLP (whose diagonal,
#: blocks and full Hessian take the structured route anyway). Larger chunks are
#: slower (SimpleNet generic diagonal: 33 ms at 8, 54 ms at 128).
MAX_AUTO_CHUNK = 32


def auto_chunk_size(total: int, bytes_per_item: int, *, budget: int = CHUNK_BUDGET_BYTES,
                    cap: int = MAX_AUTO_CHUNK) -> int:
    """How many items of ``bytes_per_item`` to batch: within ``budget``, at least 1, at most
    ``total`` and ``cap``."""
    return max(1, min(total, cap, budget // max(1, bytes_per_item)))
