"""The data of a curvature operator: its batches, read the same way on every pass, and
their weights in the data set's loss.

For batches ``B_1..B_m`` of sizes ``N_1..N_m`` (``N = sum N_b``; over a process group,
of every rank's shard) and ``f_b`` the loss of batch ``b``, the data set's loss is
``L = sum_b w_b f_b`` with ``w_b = N_b / N`` for ``reduction="mean"`` (``f`` averages
over its batch: exactly the full-batch mean, also for unequal sizes, when ``f`` is a
plain mean over its samples) and ``w_b = 1`` for ``"sum"``.

Every pass after the first checks each batch against the first pass's fingerprint: a
shuffling loader or a random transform would make the operator a different matrix on
every product, and is refused instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .._checks import describe
from .._distributed import Group, check_shards
from ..errors import ArgumentError

__all__ = ["Batch", "Batches"]

Batch = tuple[Any, Any]


def _is_single_batch(data: Any) -> bool:
    """``(inputs, targets)`` with tensor targets (a list of two batches has tuple items);
    the inputs may be a tensor, a tuple or a dict of tensors."""
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[1], torch.Tensor)
            and bool(pytree.tree_leaves(data[0]))
            and all(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(data[0])))


def _batch_size(inputs: Any) -> int:
    first = pytree.tree_leaves(inputs)[0]
    return int(first.shape[0]) if first.dim() > 0 else 1


def _fingerprint(batch: Batch) -> tuple[Any, ...]:
    prints = []
    for t in pytree.tree_leaves(batch):
        if isinstance(t, torch.Tensor):
            v = torch.nan_to_num(t.detach().reshape(-1).double())  # NaN != NaN
            w = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
            prints.append((tuple(t.shape), float(v.sum()), float((v * w).sum())))
    return tuple(prints)


class Batches:
    """``data`` (one ``(inputs, targets)`` batch or an iterable of them) scanned once at
    set-up, on every rank of ``group`` (NOTE [sharded data] in
    :mod:`hessfunc.operators.base`): this rank's batch sizes and ``weights``, the data
    set's ``num_samples`` and ``num_batches``. ``summarise(samples, batches, first
    batch)`` says what a rank tells the others at set-up (only under a process group).

    Example:
        >>> from hessfunc._distributed import Group
        >>> data = [(torch.zeros(3, 2), torch.zeros(3)), (torch.zeros(1, 2), torch.zeros(1))]
        >>> batches = Batches(data, reduction="mean", group=Group(None, "op"), call="op",
        ...                   what="matrix", summarise=None)
        >>> batches.weights, batches.num_samples
        ([0.75, 0.25], 4)
        >>> [i for i, w, (x, y) in batches.passes("pass")]
        [0, 1]
    """

    def __init__(self, data: Any, *, reduction: str, group: Group, call: str, what: str,
                 summarise: Callable[[int, int, Batch | None], dict[str, Any]] | None,
                 progress: bool = False) -> None:
        self.data, self.single = data, _is_single_batch(data)
        self.group, self.call, self.what, self.progress = group, call, what, progress
        self._prints: list[tuple[Any, ...]] = []
        summaries = group.exchange("set-up", lambda: self._scan(summarise))
        if group.distributed:
            check_shards(call, summaries)
        self.num_samples = sum(s["samples"] for s in summaries)
        self.num_batches = sum(s["batches"] for s in summaries)
        self.weights = [1.0] * len(self._sizes) if reduction == "sum" else \
            [n / self.num_samples for n in self._sizes]

    @property
    def in_memory(self) -> bool:
        """One batch, or a list or tuple of them (not re-read from a loader)."""
        return self.single or isinstance(self.data, (list, tuple))

    def __iter__(self) -> Iterator[Batch]:
        if self.single:
            yield tuple(self.data)  # type: ignore[misc]
            return
        for i, batch in enumerate(self.data):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ArgumentError(
                    f"{self.call}: batch {i} of `data` must be an (inputs, targets) pair, "
                    f"got {describe(batch)}."
                )
            yield tuple(batch)  # type: ignore[misc]

    def _check(self) -> None:
        if self.single:
            return
        if isinstance(getattr(self.data, "sampler", None), torch.utils.data.RandomSampler):
            raise ArgumentError(
                f"{self.call}: `data` is a DataLoader with shuffle=True; the {self.what} must "
                "see the same batches on every pass. Build it with shuffle=False."
            )
        if isinstance(self.data, (torch.Tensor, str, bytes)) or not isinstance(self.data,
                                                                               Iterable):
            raise ArgumentError(f"{self.call}: `data` must be one (inputs, targets) batch or "
                                f"an iterable of them, got {describe(self.data)}.")

    def _scan(self, summarise: Callable[[int, int, Batch | None], dict[str, Any]] | None
              ) -> dict[str, Any]:
        """This rank's first pass: batch sizes and fingerprints (later passes must match);
        with a process group also what the ranks compare."""
        self._check()
        sizes, first = [], None
        for i, batch in enumerate(self):
            sizes.append(_batch_size(batch[0]))
            if sizes[-1] == 0:
                raise ArgumentError(f"{self.call}: batch {i} of `data` has no samples; "
                                    "drop empty batches.")
            if not self.single:  # one batch is never re-read
                self._prints.append(_fingerprint(batch))
            first = batch if first is None else first
        if not sizes and not self.group.distributed:
            raise ArgumentError(f"{self.call}: `data` is empty; pass at least one "
                                "(inputs, targets) batch.")
        self._sizes = sizes
        if not self.group.distributed or summarise is None:
            return {"samples": sum(sizes), "batches": len(sizes)}
        return summarise(sum(sizes), len(sizes), first)

    def passes(self, desc: str) -> Iterator[tuple[int, float, Batch]]:
        """One deterministic pass over this rank's batches: ``(index, weight, batch)``,
        each checked against the first pass (a tqdm bar named ``desc`` with ``progress``)."""
        batches: Iterable[Batch] = iter(self)
        local = len(self.weights)
        if self.progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=local, desc=desc, leave=False)
        count = 0
        for i, batch in enumerate(batches):
            if i >= local or (not self.single and _fingerprint(batch) != self._prints[i]):
                raise ArgumentError(
                    f"{self.call}: `data` gave different batches on a later pass (a "
                    "shuffling loader or a random transform?); iteration must be deterministic: "
                    "use shuffle=False and fixed data."
                )
            count += 1
            yield i, self.weights[i], batch
        if count != local:
            raise ArgumentError(f"{self.call}: `data` gave {count} batches on a later pass, "
                                f"{local} on the first; iteration must be deterministic.")
