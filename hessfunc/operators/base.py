"""``CurvatureOperator``: the base of the curvature matrices of a loss over a data set
as linear operators (:class:`hessfunc.HessianOperator`, :class:`hessfunc.GGNOperator`,
:class:`hessfunc.FisherOperator`, :class:`hessfunc.KFACOperator`).

A matrix ``A = sum_b w_b A_b`` over batches ``b`` with the weights of
:mod:`hessfunc.operators.data` acts on flat vectors of length ``P`` laid out in
``named_parameters`` order (``flat_to_params`` / ``params_to_flat`` convert).

NOTE [cached linearisation]: for data held in memory (one batch, or a list or
tuple of batches), every batch's :class:`hessfunc.HVPFunction` is built once, on
first use: structured products for chains of known layers (0.8-1.3x a gradient per
product, NOTE [structured products]), else the gradient graph, one backward pass
through it per product (1.1-2.1x). Iterables that are re-read on every pass (a
``DataLoader``) are not cached unless ``cache=True``: each product then costs a
fresh set-up per batch. ``cache=False`` frees that memory.

NOTE [sharded data]: with ``process_group=``, each of the ``W`` ranks passes its shard
and every data-dependent step sums its local share over the group
(``hessfunc._distributed``): batch counts and sizes once at set-up (so weights use the
global ``N``), then each product, diagonal, gradient and dense matrix in one
``all_reduce``. The data-span basis is decided from every rank's answer and built from
all ranks' first-layer inputs, gathered in rank order: every rank holds the same ``U``.
At set-up the ranks also compare the parameters' exact fingerprints, the layout, the
reduction and the samples' structure, and evaluate ``f`` on their first batch, so that
a bad shard is refused there on every rank. Rank ``r``'s shard is the ``r``-th part of
the data set: the operator equals the one-process operator over the shards concatenated
in rank order.

NOTE [replicated estimators]: the estimators run whole on every rank, on the reduced
products, which are bitwise equal on all ranks; with the same seed the probes are equal
too, so every rank follows the same path and no step but the products communicates.
Scattering the Krylov basis (``P / W`` rows a rank) sends the same ``~2 b P`` bytes a
product (all_reduce = reduce_scatter + all_gather, and the HVP needs all of ``v`` on every
rank), plus one latency-bound all_reduce of ``m`` coefficients per Lanczos step. It saves
the replicated reorthogonalisation, ``~4 m P`` flops a step against the product's
``~12 s P N / W`` (``s``: uses of a weight per sample), and the ``m P`` numbers of the
basis on each rank. Flops favour replication while ``m < 3 s N / W``; memory ends it when
the basis no longer fits beside the model: ``P > ~10^8`` for ``m = 100`` float32 vectors
on an 80 GB device (figures in docs/distributed.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch.utils import _pytree as pytree

from .._checks import check_positive_int, describe
from .._distributed import Group, shard_summary
from .._memory import auto_chunk_size, check_dense
from .._tree import FlatSpec, flat_spec, tree_to_vector, vector_to_tree
from ..errors import ArgumentError
from ..estimators import (
    EigenResult,
    SpectralDensity,
    TraceEstimate,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_eigenvalues,
    spectral_density,
)
from ..estimators.krylov import conjugate_gradient, minres
from ..gradient import grad
from .data import Batch, Batches

__all__ = ["CurvatureOperator"]

#: Default cap on the Krylov dimension of eigenvalues(); the basis takes (P, steps) memory.
DEFAULT_MAX_LANCZOS_STEPS = 500


class CurvatureOperator:
    """A curvature matrix ``A = sum_b w_b A_b`` of a loss over a data set, as a ``(P, P)``
    linear operator: the base of :class:`hessfunc.HessianOperator`,
    :class:`hessfunc.GGNOperator`, :class:`hessfunc.FisherOperator` and
    :class:`hessfunc.KFACOperator`.

    It holds what they share: the data (one batch or an iterable, checked to be the same
    on every pass: :class:`hessfunc.operators.data.Batches`), the batch weights ``w_b``
    (``N_b / N`` for ``reduction="mean"``, 1 for ``"sum"``), the optional process group
    (NOTE [sharded data]), and everything built on products (``@``, ``matmat``,
    ``diagonal``, ``trace``, ``eigenvalues``, ``spectral_density``, ``to_dense``,
    ``to_scipy``, ``solve``). A subclass says how one
    batch's product is made (``_build_product``: an object with ``_product(tree)`` and
    ``batched(trees)``), its dense matrix (``_dense_function``) and exact diagonal
    (``_diagonal_function``).
    """

    #: what the matrix is called in messages
    _what = "matrix"

    @property
    def _name(self) -> str:
        return type(self).__name__

    def __init__(self, f: Callable[..., Any], params: Any, data: Any, *,
                 reduction: Literal["mean", "sum"] = "mean", progress: bool = False,
                 cache: bool | None = None, process_group: Any = None):
        call = self._name
        if not callable(f):
            raise ArgumentError(f"{call}: `f` must be callable f(params, inputs, targets), "
                                f"got {describe(f)}.")
        if reduction not in ("mean", "sum"):
            raise ArgumentError(f"{call}: `reduction` must be 'mean' or 'sum', got {reduction!r}.")
        try:
            self._spec: FlatSpec = flat_spec(params)
        except (ValueError, TypeError) as exc:
            raise ArgumentError(f"{call}: `params` must be a dict or tree of tensors ({exc}).") \
                from None
        for t in pytree.tree_leaves(params):
            if not t.is_floating_point():
                raise ArgumentError(f"{call}: `params` holds a tensor of dtype {t.dtype}; "
                                    "expected floating point.")
        self._group = Group(process_group, call)
        self._group.check_device(self.device)
        self.f = f
        self.params = params
        self.reduction = reduction
        self.progress = progress and self._group.rank == 0
        self._batches = Batches(data, reduction=reduction, group=self._group, call=call,
                                what=self._what, summarise=self._shard_summary,
                                progress=self.progress)
        self.num_samples = self._batches.num_samples
        self.num_batches = self._batches.num_batches
        self._cache_enabled = self._batches.in_memory if cache is None else bool(cache)
        self._cached: list[tuple[float, Any]] | None = None
        self._span: Any = False  # False: not looked for yet

    # ------------------------------------------------------------------ data
    @property
    def world_size(self) -> int:
        """The number of ranks whose shards make up the data (1 without a process group)."""
        return self._group.size

    @property
    def process_group(self) -> Any:
        """The ``torch.distributed`` process group, or None."""
        return self._group.process_group

    def _check_fit(self, batch: Batch) -> None:
        """``f`` evaluates on the batch (a shard that does not fit is refused at set-up)."""
        try:  # not under no_grad: f may take derivatives of its own (a PDE residual)
            self.f(self.params, *batch)
        except Exception as exc:  # noqa: BLE001 - any failure of the user's f
            first = (str(exc).splitlines() or [""])[0]
            raise ArgumentError(
                f"{self._group.where('set-up')}: the samples of this rank's shard of `data` do "
                f"not fit `f`: f(params, inputs, targets) on its first batch (inputs "
                f"{describe(batch[0])}, targets {describe(batch[1])}) raised "
                f"{type(exc).__name__}: {first}; every rank must pass a shard of the same "
                "data set, shaped as the model expects."
            ) from exc

    def _shard_summary(self, samples: int, batches: int, first: Batch | None
                       ) -> dict[str, Any]:
        """What this rank tells the others at set-up (NOTE [sharded data])."""
        if first is not None:
            self._check_fit(first)
        return shard_summary(self.f, self.params, self.reduction, samples, batches, first)

    def _passes(self, desc: str) -> Iterator[tuple[int, float, Batch]]:
        """One deterministic pass over this rank's batches: ``(index, weight, batch)``."""
        return self._batches.passes(desc)

    def _batch_products(self, desc: str) -> Iterator[tuple[float, Any]]:
        """``(w_b, A_b)`` for this rank's batches, ``A_b`` from ``_build_product`` (built
        once and kept when caching, NOTE [cached linearisation])."""
        if self._cached is not None:
            yield from self._cached
            return
        built = []
        for i, w, (x, y) in self._passes(desc):
            A = self._build_product(i, x, y)
            if self._cache_enabled:
                built.append((w, A))
            yield w, A
        if self._cache_enabled:
            self._cached = built

    # ------------------------------------------------------ what subclasses say
    def _build_product(self, index: int, x: Any, y: Any) -> Any:
        """Batch ``index``'s product: an object with ``_product(tree)`` and
        ``batched(trees)`` (leading dimension ``k``), both in ``params``' structure."""
        raise NotImplementedError

    def _dense_function(self, chunk_size: int | None, max_memory: int | None
                        ) -> Callable[[Any, Any, Any, int], torch.Tensor]:
        """``(params, x, y, index) -> (P, P)`` matrix of one batch."""
        raise NotImplementedError

    def _diagonal_function(self, chunk_size: int | None) -> Callable[[Any, Any, Any, int], Any]:
        """``(params, x, y, index) -> diagonal`` of one batch, structured like ``params``."""
        raise NotImplementedError

    def _data_span(self) -> Any:
        """A restricted operator where one is exact and cheaper (NOTE [data span]); None."""
        return None

    # ------------------------------------------------------------ structure
    @property
    def shape(self) -> tuple[int, int]:
        return (self._spec.numel, self._spec.numel)

    @property
    def dtype(self) -> torch.dtype:
        return self._spec.dtype

    @property
    def device(self) -> torch.device:
        return self._spec.device

    def flat_to_params(self, vector: torch.Tensor) -> Any:
        """A flat ``(P,)`` (or ``(..., P)``) vector as a tree structured like ``params``."""
        return vector_to_tree(self._check_vector(vector, "vector", ndim=(1, 2)), self._spec)

    def params_to_flat(self, tree: Any) -> torch.Tensor:
        """A tree structured like ``params`` as one flat ``(P,)`` vector."""
        return tree_to_vector(tree)

    def _check_vector(self, v: Any, name: str, ndim: tuple[int, ...]) -> torch.Tensor:
        P = self._spec.numel
        if not isinstance(v, torch.Tensor):
            raise ArgumentError(f"{self._name}: `{name}` must be a tensor, got {describe(v)}.")
        if v.dim() not in ndim or v.shape[-1 if name == "vector" else 0] != P:
            want = "(P,)" if ndim == (1,) else "(P, k)"
            raise ArgumentError(f"{self._name}: `{name}` must have shape {want} with P={P}, "
                                f"got {tuple(v.shape)}.")
        if v.dtype != self.dtype or v.device != self.device:
            raise ArgumentError(
                f"{self._name}: `{name}` has dtype {v.dtype} on {v.device}, expected "
                f"{self.dtype} on {self.device}; convert it with `.to(dtype, device)`."
            )
        return v

    # ------------------------------------------------------------- products
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` of shape ``(P,)`` (the same on every rank)."""
        return self._product(self._check_vector(v, "v", ndim=(1,)))

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        tree = vector_to_tree(v, self._spec)

        def fill(total: torch.Tensor) -> None:
            for w, H in self._batch_products("H @ v"):
                out = tree_to_vector(H._product(tree))
                total.add_(out if w == 1.0 else out.mul_(w))

        return self._group.sum("H @ v", v.shape, v, fill, inputs=v)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for ``V`` of shape ``(P, k)``: batched backward passes of up to
        ``MAX_AUTO_CHUNK`` columns (NOTE [chunk cap] in ``hessfunc._memory``)."""
        V = self._check_vector(V, "V", ndim=(2,))
        if V.shape[1] == 1:  # one column (Lanczos): the unbatched product is cheaper
            return self._product(V[:, 0]).unsqueeze(1)
        step = auto_chunk_size(V.shape[1], 0)
        # each column's leaves contiguous: a backward pass through the gradient graph
        # is slower with strided cotangents (docs/benchmarks.md). The estimators' probes
        # already are; a row-major V is copied once (P k more numbers at the peak)
        chunks = [(lo, vector_to_tree(V[:, lo:lo + step].T.contiguous(), self._spec))
                  for lo in range(0, V.shape[1], step)]

        def fill(total: torch.Tensor) -> None:
            for w, H in self._batch_products("H @ V"):
                for lo, trees in chunks:
                    out = pytree.tree_leaves(H.batched(trees))
                    cols = torch.cat([t.reshape(t.shape[0], -1) for t in out], dim=1).T
                    total[:, lo:lo + cols.shape[1]].add_(cols, alpha=w)

        return self._group.sum("H @ V", V.shape, V, fill, inputs=V)

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        if isinstance(other, torch.Tensor) and other.dim() == 2:
            return self.matmat(other)
        return self.matvec(other)

    def grad_and_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient ``(P,)`` and the value ``()`` of the data-set loss
        ``L = sum_b w_b f_b`` (weights as for ``H``), in one pass over the data.

        Example:
            >>> f = lambda p, x, y: ((p["w"] * x - y) ** 2).mean()
            >>> x, y = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
            >>> hf.HessianOperator(f, {"w": torch.tensor(1.0)}, [(x[:1], y[:1]), (x[1:], y[1:])]
            ...                 ).grad_and_value()                  # mean of w^2 x^2
            (tensor([5.]), tensor(2.5000))
        """
        P = self._spec.numel

        def value_and_loss(p: Any, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
            value = self.f(p, x, y)
            return value, value.detach()

        grad_and_loss = grad(value_and_loss, has_aux=True)  # one forward pass for both

        def fill(total: torch.Tensor) -> None:
            for _, w, (x, y) in self._passes("gradient"):
                g, value = grad_and_loss(self.params, x, y)
                total[:P] += w * tree_to_vector(g)
                total[P] += w * value

        total = self._group.sum("gradient", (P + 1,), self._spec_like(), fill)
        return total[:P], total[P]

    def _spec_like(self) -> torch.Tensor:
        return torch.empty(0, dtype=self.dtype, device=self.device)

    def to_dense(self, *, chunk_size: int | None = None, max_memory: int | None = None
                 ) -> torch.Tensor:
        """The dense ``(P, P)`` Hessian (refused before allocating if over the memory limit),
        batch by batch through :func:`hessfunc.hessian` (structured when it applies)."""
        P = self._spec.numel
        check_dense(P * P, self.dtype, self.device, what=f"the dense {P} x {P} {self._what}",
                    call=f"{self._name}.to_dense", max_memory=max_memory,
                    hint="use the operator's matvec, diagonal or eigenvalues instead")
        if chunk_size is not None:
            check_positive_int(chunk_size, "chunk_size", f"{self._name}.to_dense")
        dense_fn = self._dense_function(chunk_size, max_memory)

        def fill(total: torch.Tensor) -> None:
            for i, w, (x, y) in self._passes("to_dense"):
                total += w * dense_fn(self.params, x, y, i)

        return self._group.sum("to_dense", (P, P), self._spec_like(), fill)

    def diagonal(self, method: Literal["exact", "hutchinson"] = "exact", *,
                 chunk_size: int | None = None, num_samples: int = 100,
                 generator: torch.Generator | None = None, seed: int | None = None
                 ) -> torch.Tensor:
        """The diagonal ``(P,)``: exact (batch by batch through :func:`hessfunc.hessian_diag`,
        per-sample propagation where it applies) or Hutchinson's estimate from
        ``num_samples`` Rademacher products."""
        if method == "hutchinson":
            check_positive_int(num_samples, "num_samples", f"{self._name}.diagonal")
            return hutchinson_diagonal(self.matmat, self._spec.numel, num_samples=num_samples,
                                       generator=self._generator(generator, seed),
                                       dtype=self.dtype, device=self.device)
        if method != "exact":
            raise ArgumentError(f"{self._name}.diagonal: `method` must be 'exact' or "
                                f"'hutchinson', got {method!r}.")
        diag_fn = self._diagonal_function(chunk_size)

        def fill(total: torch.Tensor) -> None:
            for i, w, (x, y) in self._passes("diagonal"):
                total += w * tree_to_vector(diag_fn(self.params, x, y, i))

        return self._group.sum("diagonal", (self._spec.numel,), self._spec_like(), fill)

    # ----------------------------------------------------------- estimators
    def _generator(self, generator: torch.Generator | None, seed: int | None
                   ) -> torch.Generator | None:
        if generator is not None and seed is not None:
            raise ArgumentError(f"{self._name}: pass `generator` or `seed`, not both.")
        if seed is not None:
            return torch.Generator(device=self.device).manual_seed(seed)
        return generator

    def trace(self, method: Literal["exact", "hutchinson", "hutch++"] = "exact", *,
              num_samples: int = 100, distribution: str = "rademacher",
              generator: torch.Generator | None = None, seed: int | None = None
              ) -> torch.Tensor | TraceEstimate:
        """``tr(H)``: exact (sum of the exact diagonal) or a stochastic estimate.

        ``"hutchinson"`` and ``"hutch++"`` return a :class:`TraceEstimate` with the
        standard error; ``num_samples`` is their number of matvecs.
        """
        if method == "exact":
            return self.diagonal().sum()
        check_positive_int(num_samples, "num_samples", f"{self._name}.trace")
        gen = self._generator(generator, seed)
        kw = dict(size=self._spec.numel, distribution=distribution, generator=gen,
                  dtype=self.dtype, device=self.device)
        if method == "hutchinson":
            return hutchinson_trace(self.matmat, num_samples=num_samples, **kw)
        if method == "hutch++":
            return hutchpp_trace(self.matmat, num_matvecs=num_samples, **kw)
        raise ArgumentError(f"{self._name}.trace: `method` must be 'exact', 'hutchinson' or "
                            f"'hutch++', got {method!r}.")

    def eigenvalues(self, k: int = 1, *, which: str = "largest", tol: float = 1e-8,
                    max_steps: int | None = None, return_vectors: bool = False,
                    generator: torch.Generator | None = None, seed: int | None = None,
                    data_span: bool = True
                    ) -> torch.Tensor | tuple[torch.Tensor, list[Any]]:
        """The ``k`` extreme eigenvalues by Lanczos with reorthogonalisation (NOTE
        [semi-orthogonality] in ``hessfunc/estimators/lanczos.py``).

        ``tol`` bounds each eigenvalue's residual relative to it, and so its relative
        error (NOTE [convergence test] in :func:`hessfunc.estimators.lanczos_eigenvalues`).
        With ``return_vectors=True``
        also the eigenvectors, each as a tree like ``params``. ``data_span``: work in the
        span of the data where that is exact and cheaper (NOTE [data span]).
        """
        res = self.eigen(k, which=which, tol=tol, max_steps=max_steps,
                         return_vectors=return_vectors, generator=generator, seed=seed,
                         data_span=data_span)
        if not return_vectors:
            return res.eigenvalues
        vecs = [vector_to_tree(res.eigenvectors[:, i], self._spec) for i in range(k)]
        return res.eigenvalues, vecs

    def eigenvectors(self, k: int = 1, **kwargs: Any) -> list[Any]:
        """The eigenvectors of the ``k`` extreme eigenvalues, each a tree like ``params``."""
        return self.eigenvalues(k, return_vectors=True, **kwargs)[1]  # type: ignore[index]

    def eigen(self, k: int = 1, *, which: str = "largest", tol: float = 1e-8,
              max_steps: int | None = None, return_vectors: bool = False,
              generator: torch.Generator | None = None, seed: int | None = None,
              data_span: bool = True) -> EigenResult:
        """The full Lanczos result (eigenvalues, vectors, matvecs spent, convergence)."""
        P = self._spec.numel
        if isinstance(k, int) and not isinstance(k, bool) and k >= P:
            raise ArgumentError(f"{self._name}.eigenvalues: `k`={k} must be < P={P}; for all "
                                "eigenvalues use torch.linalg.eigvalsh(H.to_dense()).")
        gen = self._generator(generator, seed)
        kw = dict(k=k, which=which, tol=tol, return_vectors=return_vectors, generator=gen,
                  dtype=self.dtype, device=self.device)
        span = self._data_span() if data_span else None
        spent = 0
        if span is not None and isinstance(k, int) and k < span.size:
            steps = min(span.size, DEFAULT_MAX_LANCZOS_STEPS) if max_steps is None else max_steps
            res = lanczos_eigenvalues(span.matmat, span.size, max_steps=steps, **kw)
            kth = float(res.eigenvalues[-1])
            if {"largest": kth > 0, "smallest": kth < 0, "magnitude": kth != 0}.get(which):
                if return_vectors:
                    res = res._replace(eigenvectors=span.lift(res.eigenvectors))
                return self._warn_unconverged(res, tol, steps)
            spent = res.num_matvecs  # the zeros could be wanted: H itself, products counted
        steps = min(P, DEFAULT_MAX_LANCZOS_STEPS) if max_steps is None else max_steps
        res = lanczos_eigenvalues(self.matmat, P, max_steps=steps, **kw)
        return self._warn_unconverged(res._replace(num_matvecs=res.num_matvecs + spent), tol,
                                      steps)

    def _warn_unconverged(self, res: EigenResult, tol: float, steps: int) -> EigenResult:
        if not res.converged:
            warnings.warn(f"{self._name}.eigenvalues: Lanczos did not reach tol={tol} in "
                          f"{steps} steps; raise `max_steps` or loosen `tol`.", RuntimeWarning,
                          stacklevel=4)
        return res

    def spectral_density(self, *, num_probes: int | None = None, num_steps: int = 64,
                         generator: torch.Generator | None = None, seed: int | None = None,
                         data_span: bool = True, **kwargs: Any) -> SpectralDensity:
        """Eigenvalue density by stochastic Lanczos quadrature (grid, density, nodes, weights).

        ``num_probes`` defaults to 10 random probes; ``kwargs`` go to
        :func:`hessfunc.estimators.spectral_density` (``sigma``, ``num_points``, ``probes``...).
        ``data_span``: where NOTE [data span] applies (and no ``probes`` are given), run the
        quadrature on ``H_r`` and add the ``P - P_r`` known zero eigenvalues exactly.
        """
        gen = self._generator(generator, seed)
        span = self._data_span() if data_span and "probes" not in kwargs else None
        if span is not None:
            return spectral_density(span.matmat, span.size, num_probes=num_probes,
                                    num_steps=num_steps, generator=gen, dtype=self.dtype,
                                    device=self.device, num_zeros=self._spec.numel - span.size,
                                    **kwargs)
        return spectral_density(self.matmat, self._spec.numel, num_probes=num_probes,
                                num_steps=num_steps, generator=gen, dtype=self.dtype,
                                device=self.device, **kwargs)

    # ------------------------------------------------------- inverse products
    def solve(self, b: Any, damping: float = 0.0, method: Literal["cg", "minres"] = "cg", *,
              tol: float | None = None, max_steps: int | None = None,
              return_info: bool = False) -> Any:
        """``x = (A + damping I)^-1 b``: an inverse product with this operator ``A``.

        Krylov methods on the operator's products (:mod:`hessfunc.estimators.krylov`):
        ``"cg"`` (conjugate gradients) for a positive definite ``A + damping I`` (a GGN or
        Fisher with damping, a Hessian at a strict minimum), ``"minres"`` for any symmetric
        one (a Hessian anywhere). CG refuses ``damping < 0`` and stops with an
        :class:`~hessfunc.ArgumentError` on a direction of curvature ``<= 0``. Under a
        process group every rank runs the same iteration on the reduced products.

        Args:
            b: a flat ``(P,)`` vector, or a tree structured like ``params``.
            damping: added to the diagonal.
            method: ``"cg"`` or ``"minres"``.
            tol: the relative residual ``||b - (A + damping I) x|| / ||b||`` to reach
                (default ``1e-10`` in float64, ``1e-5`` otherwise).
            max_steps: cap on products (default ``10 P + 10``); a warning if reached.
            return_info: also return the :class:`hessfunc.estimators.SolveResult`
                (true residual, products spent, convergence).

        Returns:
            ``x`` in ``b``'s form (flat, or a tree like ``params``); with
            ``return_info=True`` the pair ``(x, info)``.

        Example (``H = diag(1, 2, 3)``, so ``(H + I)^-1 1 = (1/2, 1/3, 1/4)``):
            >>> a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
            >>> f = lambda p, x, y: 0.5 * (a * p["w"] ** 2).sum() + 0 * x.sum()
            >>> H = hf.HessianOperator(f, {"w": torch.ones(3, dtype=torch.float64)},
            ...                     (torch.zeros(1), torch.zeros(1)))
            >>> x, info = H.solve({"w": torch.ones(3, dtype=torch.float64)}, damping=1.0,
            ...                   return_info=True)
            >>> torch.allclose(x["w"], 1 / (a + 1)), info.converged
            (True, True)
        """
        call = f"{type(self).__name__}.solve"
        flat = self._solve_rhs(b, call)
        if method not in ("cg", "minres"):
            raise ArgumentError(f"{call}: `method` must be 'cg' (positive definite) or 'minres' "
                                f"(any symmetric operator), got {method!r}.")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)):
            raise ArgumentError(f"{call}: `damping` must be a number, got {describe(damping)}.")
        if method == "cg" and damping < 0:
            raise ArgumentError(f"{call}: `damping` must be >= 0 with method='cg', got {damping};"
                                " a negative shift can make the operator indefinite: use "
                                "method='minres'.")
        solver = conjugate_gradient if method == "cg" else minres
        try:
            info = solver(self._product, flat, damping=damping, tol=tol, max_steps=max_steps)
        except ArgumentError as exc:
            raise ArgumentError(f"{call}: {exc}") from None
        if not info.converged:
            warnings.warn(f"{call}: {method} reached a relative residual of "
                          f"{float(info.relative_residual):.2e}, not tol, in {info.num_matvecs} "
                          "products; raise `max_steps`, add damping or loosen `tol`.",
                          RuntimeWarning, stacklevel=2)
        x = info.solution if isinstance(b, torch.Tensor) else vector_to_tree(info.solution,
                                                                             self._spec)
        return (x, info) if return_info else x

    def _solve_rhs(self, b: Any, call: str) -> torch.Tensor:
        """``b`` as a flat ``(P,)`` vector of the operator's dtype and device."""
        P = self._spec.numel
        if isinstance(b, torch.Tensor):
            if b.shape != (P,):
                raise ArgumentError(f"{call}: `b` must be a flat ({P},) vector or a tree like "
                                    f"`params`, got a tensor of shape {tuple(b.shape)}; flatten "
                                    "a tree with `params_to_flat`.")
            leaves = [b]
        else:
            try:
                spec = flat_spec(b)
            except (ValueError, TypeError):
                spec = None
            if spec is None or spec.treespec != self._spec.treespec \
                    or spec.shapes != self._spec.shapes:
                want = ", ".join(f"{n}: {tuple(s)}" for n, s in zip(
                    self._spec.names, self._spec.shapes, strict=True))
                raise ArgumentError(f"{call}: `b` must be a flat ({P},) vector or a tree "
                                    f"structured like `params` ({{{want}}}), got "
                                    f"{describe(b)}.")
            leaves = pytree.tree_leaves(b)
        for t in leaves:
            if t.dtype != self.dtype or t.device != self.device:
                raise ArgumentError(f"{call}: `b` has dtype {t.dtype} on {t.device}, expected "
                                    f"{self.dtype} on {self.device}; convert it with "
                                    "`.to(dtype, device)`.")
        return b if isinstance(b, torch.Tensor) else tree_to_vector(b)

    # ---------------------------------------------------------------- scipy
    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out) for ``eigsh``."""
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ArgumentError(f"{self._name}.to_scipy needs scipy: pip install scipy") \
                from exc
        import numpy as np

        def mv(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(v).detach().cpu().double().numpy()

        def mm(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
            return self.matmat(V).detach().cpu().double().numpy()

        P = self._spec.numel
        return LinearOperator((P, P), matvec=mv, matmat=mm, rmatvec=mv, dtype=np.float64)

    def __repr__(self) -> str:
        ranks = f", world_size={self.world_size}" if self._group.distributed else ""
        return (f"{self._name}(P={self._spec.numel}, batches={self.num_batches}, "
                f"samples={self.num_samples}, reduction={self.reduction!r}, dtype={self.dtype}"
                f"{ranks})")
