"""Sums over a ``torch.distributed`` process group, and how one rank's failure reaches all.

Each rank holds a shard of the data. A curvature quantity of the whole data set is a
weighted sum over batches, so it is the sum over ranks of every rank's local sum: one
``all_reduce`` per product, diagonal, gradient or dense matrix (:meth:`Group.sum`), one
``all_gather_object`` for a set-up step whose answer every rank needs
(:meth:`Group.exchange`). ``Group(None, call)`` is one process: every sum is local.

NOTE [failures reach every rank]: a rank that raises before a collective would leave the
others waiting in it. So every step runs its local part guarded, and the collective carries
a failure flag: :meth:`Group.sum` appends a few numbers to the reduced buffer (the flag, a
code of the step and three codes of a sample of the input vectors, each with its square),
so the check costs no extra round trip. If any rank failed, all ranks exchange the
messages; the failed rank re-raises its own exception, the others raise one that names it
(an :class:`~hessfunc.ArgumentError` when it refused its input). ``W sum c^2 = (sum c)^2``
holds exactly (small integers, any float dtype) iff every rank sent the same code ``c``:
that catches ranks at different steps or with different vectors. A collective that fails
(another rank crashed, or the group's timeout passed) is re-raised as a
:class:`DistributedError` naming this rank and the step, with torch's message.
"""

from __future__ import annotations

import os
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, TypeVar

import torch
from torch.utils import _pytree as pytree

from .errors import ArgumentError, DistributedError

__all__ = ["DistributedError", "Group", "fingerprint", "vector_codes", "point_tensors",
           "data_signature", "shard_summary", "check_shards"]

T = TypeVar("T")

#: Elements per piece of the exact fingerprint (bounds its temporary memory).
_PIECE = 1 << 22
#: Codes compared across ranks are integers in [1, _MODULUS]; their squares summed over up
#: to 4096 ranks stay below 2**24, so float32 sums of them are exact.
_MODULUS = 61
#: Entries of an input vector whose bits the ranks compare (:func:`vector_codes`).
SAMPLED = 256


def fingerprint(tensors: Iterable[torch.Tensor]) -> tuple[int, int, int, int]:
    """An exact integer fingerprint of the tensors' bits, equal on every device.

    The bits of each element are cut into four 16-bit pieces ``b_j``, weighted by the
    element's position ``w = (i mod 65521) + 1``; ``s_j = sum_i w_i b_j(i)`` is integer
    arithmetic, hence independent of the order of summation (and of the device).

    Example:
        >>> a = fingerprint([torch.tensor([1.0, 2.0])])
        >>> a == fingerprint([torch.tensor([1.0, 2.0])])
        True
        >>> a == fingerprint([torch.tensor([2.0, 1.0])])
        False
    """
    sums: torch.Tensor | None = None
    offset = 0
    for t in tensors:
        flat = t.detach().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        bits = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[
            flat.element_size()]
        for lo in range(0, flat.numel(), _PIECE):
            piece = flat[lo:lo + _PIECE].contiguous().view(bits).to(torch.int64)
            weights = torch.arange(offset + lo, offset + lo + piece.numel(),
                                   device=piece.device) % 65521 + 1
            part = torch.stack([(((piece >> (16 * j)) & 0xFFFF) * weights).sum()
                                for j in range(4)])
            sums = part if sums is None else sums + part
        offset += flat.numel()
    if sums is None:
        return (0, 0, 0, 0)
    s = [int(v) for v in sums.tolist()]
    return (s[0], s[1], s[2], s[3])


def vector_codes(tensor: torch.Tensor) -> list[int]:
    """Three codes in ``[1, 61]`` of the bits of ``SAMPLED`` evenly spaced entries of a
    tensor (CRC-32 and Adler-32 of their bytes): equal tensors give equal codes; tensors
    that differ throughout (different random probes) differ in them but for a chance of
    about ``61^-3``. The sample keeps the check at microseconds whatever the size."""
    flat = tensor.detach().reshape(-1)
    sample = flat[::max(1, flat.numel() // SAMPLED)].contiguous()
    data = sample.view(torch.uint8).cpu().numpy().tobytes()
    crc, adler = zlib.crc32(data), zlib.adler32(data)
    return [crc % _MODULUS + 1, (crc >> 16) % _MODULUS + 1, adler % _MODULUS + 1]


def _step_code(step: str) -> int:
    return zlib.crc32(step.encode()) % _MODULUS + 1


def _failure_info(exc: BaseException) -> tuple[str, str, bool]:
    return type(exc).__name__, str(exc), isinstance(exc, ArgumentError)


class Group:
    """The ranks whose shards make up the data set; ``None``: this process alone.

    Attributes:
        process_group: the ``torch.distributed`` group, or None.
        rank, size: this process's rank in it and the number of ranks (0 and 1 alone).
        backend: the group's backend (``"gloo"``, ``"nccl"``...), or None alone.
    """

    def __init__(self, process_group: Any, call: str):
        self.call = call
        self.process_group = process_group
        self.rank, self.size, self.backend = 0, 1, None
        dist = torch.distributed
        if process_group is None:
            launched = os.environ.get("WORLD_SIZE", "1") not in ("", "1")
            if launched and not (dist.is_available() and dist.is_initialized()):
                warnings.warn(
                    f"{call}: launched as one of {os.environ['WORLD_SIZE']} processes "
                    "(WORLD_SIZE is set) but torch.distributed is not initialised, so this "
                    "process sees its own data only; call torch.distributed."
                    "init_process_group() and pass process_group=torch.distributed.group.WORLD "
                    "(which is None before init) for the whole data set.",
                    RuntimeWarning, stacklevel=3)
            return
        if not (dist.is_available() and dist.is_initialized()):
            raise ArgumentError(
                f"{call}: `process_group` was given ({type(process_group).__name__}) but "
                "torch.distributed is not initialised in this process; call "
                "torch.distributed.init_process_group('gloo' on CPU or 'nccl' on GPUs, "
                "timeout=...) first (torchrun sets the environment it reads), or pass "
                "process_group=None for one process."
            )
        if not isinstance(process_group, dist.ProcessGroup):
            raise ArgumentError(
                f"{call}: `process_group` must be a torch.distributed.ProcessGroup (e.g. "
                f"torch.distributed.group.WORLD) or None, got {type(process_group).__name__}."
            )
        rank = dist.get_rank(process_group)
        if rank < 0:
            raise ArgumentError(f"{call}: this process (global rank {dist.get_rank()}) is not "
                                "a member of `process_group`; build the operator only on "
                                "the group's ranks.")
        self.rank, self.size = rank, dist.get_world_size(process_group)
        self.backend = str(dist.get_backend(process_group))

    @property
    def distributed(self) -> bool:
        """More than one rank: sums need collectives."""
        return self.size > 1

    def where(self, step: str) -> str:
        return f"{self.call}, step '{step}', rank {self.rank} of {self.size}"

    def check_device(self, device: torch.device) -> None:
        """NCCL reduces CUDA tensors only."""
        if self.distributed and self.backend == "nccl" and device.type != "cuda":
            raise ArgumentError(
                f"{self.call}: the process group's backend is nccl, which reduces CUDA tensors "
                f"only, but the parameters are on {device}; move the model to "
                "cuda:LOCAL_RANK, or build the group with backend='gloo' for CPU tensors."
            )

    # ----------------------------------------------------------- collectives
    def _collective(self, step: str, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RuntimeError as exc:  # torch's DistBackendError is a RuntimeError
            raise DistributedError(
                f"{self.where(step)}: the {what} over the process group failed: {exc} -- "
                "another rank stopped (crashed, raised outside hessfunc, or took another "
                "branch) or is slower than the group's timeout; every rank must make the same "
                "calls, and torch.distributed.init_process_group(timeout=...) sets the wait."
            ) from exc

    def _raise_failures(self, step: str, own: BaseException | None) -> NoReturn:
        """Some rank failed in ``step`` (seen in a reduced flag): exchange the messages."""
        infos: list[Any] = [None] * self.size
        mine = None if own is None else _failure_info(own)
        self._collective(step, "exchange of failure messages",
                         lambda: torch.distributed.all_gather_object(
                             infos, mine, group=self.process_group))
        self._fail(step, infos, own)

    def _fail(self, step: str, infos: list[Any], own: BaseException | None) -> NoReturn:
        """Raise on every rank: the failed rank its own exception, the others one naming it."""
        if own is not None:
            raise own
        failed = [(r, info) for r, info in enumerate(infos) if info is not None]
        ranks = ", ".join(str(r) for r, _ in failed)
        detail = "; ".join(f"rank {r}: {name}: {msg}" for r, (name, msg, _) in failed)
        if all(is_arg for _, (_, _, is_arg) in failed):
            raise ArgumentError(f"{self.where(step)}: rank(s) {ranks} refused their input, so "
                                f"every rank stops here. {detail}")
        raise DistributedError(f"{self.where(step)}: rank(s) {ranks} failed, so every rank "
                               f"stops here. {detail}")

    def exchange(self, step: str, local: Callable[[], T]) -> list[T]:
        """``local()`` on every rank, guarded; the list of every rank's answer, by rank."""
        if not self.distributed:
            return [local()]
        own: BaseException | None = None
        value: Any = None
        try:
            value = local()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            own = exc
        payload: list[Any] = [None] * self.size
        mine = (own is None, value if own is None else _failure_info(own))
        self._collective(step, "all_gather_object", lambda: torch.distributed.all_gather_object(
            payload, mine, group=self.process_group))
        if not all(ok for ok, _ in payload):
            self._fail(step, [None if ok else v for ok, v in payload], own)
        return [v for _, v in payload]

    def sum(self, step: str, shape: Sequence[int], like: torch.Tensor,
            fill: Callable[[torch.Tensor], None], inputs: torch.Tensor | None = None
            ) -> torch.Tensor:
        """The sum over ranks of ``fill``'s local share, a tensor of ``shape`` (dtype and
        device of ``like``) that ``fill`` adds into, starting from zeros.

        ``inputs``: the vectors the share was computed from, which must be the same on every
        rank (checked by codes, NOTE [failures reach every rank]).
        """
        numel = 1
        for s in shape:
            numel *= int(s)
        if not self.distributed:
            out = torch.zeros(tuple(shape), dtype=like.dtype, device=like.device)
            fill(out)
            return out
        codes = [_step_code(step)] + ([] if inputs is None else vector_codes(inputs))
        buffer = torch.zeros(numel + 1 + 2 * len(codes), dtype=like.dtype, device=like.device)
        out = buffer[:numel].view(*shape)
        own: BaseException | None = None
        try:
            fill(out)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            own = exc
        tail = [0.0 if own is None else 1.0]
        for c in codes:
            tail += [float(c), float(c * c)]
        buffer[numel:] = torch.tensor(tail, dtype=like.dtype)
        self._collective(step, "all_reduce", lambda: torch.distributed.all_reduce(
            buffer, group=self.process_group))
        totals = [round(v) for v in buffer[numel:].tolist()]
        if totals[0] > 0:
            self._raise_failures(step, own)
        sums = list(zip(totals[1::2], totals[2::2], strict=True))
        if self.size * sums[0][1] != sums[0][0] ** 2:
            raise DistributedError(
                f"{self.where(step)}: the ranks reached different steps at this all_reduce; "
                "every rank must make the same calls on the operator in the same order (look "
                "for a branch on the rank around it)."
            )
        if any(self.size * s2 != s1 ** 2 for s1, s2 in sums[1:]):
            raise ArgumentError(
                f"{self.where(step)}: the ranks passed different vectors; a product over a "
                "process group needs the same vector on every rank: draw it with the same "
                "seed everywhere (the estimators' `seed=`, or a generator seeded alike on "
                "every rank), or torch.distributed.broadcast it from rank 0."
            )
        return out

    def gather_rows(self, step: str, rows: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Every rank's ``(counts[rank], d)`` rows stacked in rank order: ``(sum counts, d)``."""
        if not self.distributed:
            return rows
        most = max(counts)
        padded = rows.new_zeros(most, rows.shape[1])
        padded[:rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        self._collective(step, "all_gather", lambda: torch.distributed.all_gather(
            parts, padded, group=self.process_group))
        return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])


# ------------------------------------------------------------- shard set-up
def point_tensors(f: Any, params: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors that fix the point: the parameters, and the floating buffers a
    :class:`hessfunc.FunctionalModel` evaluates with."""
    named = [(pytree.keystr(path), t) for path, t in pytree.tree_flatten_with_path(params)[0]]
    module = getattr(f, "module", None)
    if isinstance(module, torch.nn.Module):
        named += [(f"buffer {name}", b) for name, b in module.named_buffers()
                  if b.is_floating_point()]
    return named


def data_signature(batch: Any) -> str:
    """Structure, dtype and number of dimensions of every tensor of an ``(inputs,
    targets)`` batch: what every shard of one data set shares."""
    parts = []
    for path, t in pytree.tree_flatten_with_path(tuple(batch))[0]:
        where = pytree.keystr(path).replace("[0]", "inputs", 1).replace("[1]", "targets", 1)
        parts.append(f"{where}: {t.dim()}-d {str(t.dtype).replace('torch.', '')}"
                     if isinstance(t, torch.Tensor) else f"{where}: {type(t).__name__}")
    return ", ".join(parts)


def shard_summary(f: Any, params: Any, reduction: str, samples: int, batches: int,
                  first_batch: Any) -> dict[str, Any]:
    """What a rank tells the others at set-up (compared by :func:`check_shards`)."""
    named = point_tensors(f, params)
    return {
        "samples": samples,
        "batches": batches,
        "layout": [(name, tuple(t.shape), str(t.dtype)) for name, t in named],
        "prints": [fingerprint([t]) for _, t in named],
        "reduction": reduction,
        "data": None if first_batch is None else data_signature(first_batch),
    }


def _ranks(indices: Iterable[int]) -> str:
    return ", ".join(str(r) for r in indices)


def check_shards(call: str, summaries: list[dict[str, Any]]) -> None:
    """Refuse, on every rank alike, shards that do not make one data set at one point."""
    first = summaries[0]
    odd = [r for r, s in enumerate(summaries) if s["layout"] != first["layout"]]
    if odd:
        got = summaries[odd[0]]["layout"]
        ours, theirs = next(((a, b) for a, b in zip(first["layout"], got, strict=False)
                             if a != b), (len(first["layout"]), len(got)))
        raise ArgumentError(
            f"{call}: the parameters of rank(s) {_ranks(odd)} are laid out differently from "
            f"rank 0's: expected {ours} (name, shape, dtype; or the number of tensors) as on "
            f"rank 0, got {theirs} on rank {odd[0]}; every rank must build the same model."
        )
    odd = [r for r, s in enumerate(summaries) if s["reduction"] != first["reduction"]]
    if odd:
        raise ArgumentError(
            f"{call}: `reduction` is {summaries[odd[0]]['reduction']!r} on rank(s) "
            f"{_ranks(odd)} and {first['reduction']!r} on rank 0; pass the same on every rank."
        )
    odd = [r for r, s in enumerate(summaries) if s["prints"] != first["prints"]]
    if odd:
        names = [name for (name, _, _), a, b in zip(first["layout"], first["prints"],
                                                     summaries[odd[0]]["prints"], strict=True)
                 if a != b]
        raise ArgumentError(
            f"{call}: the ranks hold different parameter values: rank(s) {_ranks(odd)} differ "
            f"from rank 0 in {', '.join(names[:5])}{'...' if len(names) > 5 else ''} "
            "(exact fingerprints of the bits); every rank must be at the same point: load the "
            "same state dict everywhere, or torch.distributed.broadcast the parameters (and "
            "buffers) from rank 0 before building the operator."
        )
    empty = [r for r, s in enumerate(summaries) if s["samples"] == 0]
    if empty:
        counts = [s["samples"] for s in summaries]
        raise ArgumentError(
            f"{call}: the shard of `data` on rank(s) {_ranks(empty)} is empty (samples per "
            f"rank: {counts}); every rank needs at least one sample: shard the data set "
            "into as many non-empty parts as ranks, or launch fewer processes."
        )
    odd = [r for r, s in enumerate(summaries) if s["data"] != first["data"]]
    if odd:
        raise ArgumentError(
            f"{call}: the samples of rank(s) {_ranks(odd)} have another structure than rank "
            f"0's ({summaries[odd[0]]['data']}; rank 0: {first['data']}); every rank must pass "
            "a shard of the same data set."
        )
