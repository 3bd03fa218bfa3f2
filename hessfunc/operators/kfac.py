"""``KFACOperator``: Kronecker-factored curvature of a network of Linear and convolution
layers.

A Linear layer ``s_n = W a_n + b`` (sample ``n``, inputs ``a_n``) enters the loss only
through ``s_n``; write ``ã_n = (a_n, 1)`` (without the 1 when there is no bias) and
``[W | b]`` for its ``(d_out, d_in + 1)`` parameters. Its GGN block is, row-major,

    G_W = sum_n  (B_n^T M_n B_n)  ⊗  (ã_n ã_n^T),

with ``B_n = d o_n / d s_n`` and ``M_n`` sample ``n``'s output matrix (the loss's output
Hessian for ``fisher="exact"``; ``alpha sum_k e_kn e_kn^T`` for the Monte-Carlo or the
empirical Fisher, :mod:`hessfunc.operators.ggn`). K-FAC (Martens and Grosse, 2015)
replaces the mean of the Kronecker products by the product of the means:

    G_W ≈ G ⊗ A,   G = sum_b w_b sum_(n in b) B_n^T M_n B_n,   A = (1 / N) sum_n ã_n ã_n^T,

exact for one sample.

Weight sharing (Eschenhagen et al., 2023). A layer that applies the same ``[W | b]`` at
``R`` places of each sample, ``s_nr = W a_nr + b``, has the block
``sum_n sum_(r, r') (B_nr^T M_n B_nr') ⊗ (ã_nr ã_nr'^T)``: a Linear layer on inputs
``(N, ..., d)`` (``R`` the product of the middle dimensions), or a convolution, whose
``ã_nr`` are the unfolded input patches (``C_in k_1 ... k_d`` values, plus the 1) and
``R`` its output positions. Two conventions make it a Kronecker product, with
``g_nrk = B_nr^T u_nk`` for the columns ``M_n = sum_k omega_nk u_nk u_nk^T``:

- ``kfac_approx="expand"`` treats every place as a sample of its own (the cross terms
  ``r != r'`` dropped): ``A = (1 / (N R)) sum_(n, r) ã_nr ã_nr^T`` and
  ``G = sum_(n, r, k) omega_nk g_nrk g_nrk^T``. Exact for one layer under a loss that
  treats the places independently (squared error over all of a convolution's outputs).
- ``kfac_approx="reduce"`` pools the places first: ``ā_n = (1 / R) sum_r ã_nr``,
  ``A = (1 / N) sum_n ā_n ā_n^T`` and ``G = sum_(n, k) omega_nk (sum_r g_nrk)
  (sum_r g_nrk)^T``. Exact for one sample when the layer's outputs are summed over the
  places (a sum- or mean-pooled head).

With ``R = 1`` both are the plain K-FAC above; the scalings are curvlinops' (the same
``A``, ``G`` up to the loss's reduction, which ``M_n`` carries here).

Layers are independent (the operator is block-diagonal over layers), so products cost
two small matrix products a layer, ``(G ⊗ A) vec(V) = vec(G V A)``, and inverse products
are exact through the factors' eigendecompositions ``G = Q_G diag(g) Q_G^T``,
``A = Q_A diag(a) Q_A^T``:

    (G ⊗ A + damping I)^-1 vec(V) = vec(Q_G [(Q_G^T V Q_A) / (g a^T + damping)] Q_A^T).

NOTE [eigenvalue correction] (EKFAC; George et al., 2018). The layer's exact block is
``sum omega vec(Γ) vec(Γ)^T`` over samples and columns, ``Γ = sum_r g_r ã_r^T`` a
sample's gradient for one column (all places summed, whatever the convention). In the
factors' eigenbases its diagonal is ``S = sum omega (Q_G^T Γ Q_A)^2`` (elementwise
squares; with one place ``(Q_G^T g)^2 ((Q_A^T ã)^2)^T``). K-FAC's eigenvalues
``g a^T`` approximate it; EKFAC keeps the eigenbases and takes ``S``, the diagonal
matrix in that basis closest to the block in Frobenius norm: ``K = (Q_G ⊗ Q_A)
diag(vec S) (Q_G ⊗ Q_A)^T``, inverse products dividing by ``S + damping`` (curvlinops'
``EKFACLinearOperator`` computes the same ``S``). ``S`` needs the eigenbases of the
whole data's factors, hence a second pass (with fresh draws for a Monte-Carlo Fisher);
per-sample gradients of layers applied at several places are formed a chunk of samples
at a time. It equals K-FAC, and the exact block, for one Linear layer and one sample.

``g_nrk`` for every sample and place at once is a backward pass from the outputs to a
zero tensor added to the layer's output; the output matrices are factored per sample
(for torch's losses, their blocks from ``C`` batched double backward passes), and the
factor's columns go back together in batched passes within the chunk budget.

Models: every trainable parameter belongs to an ``nn.Linear``, ``nn.Conv1d`` or
``nn.Conv2d`` (weight, and bias when present and trainable; convolutions without
groups, any stride, padding, dilation or padding mode), and the model's outputs are
``(N, C)``. A layer called several times in a forward pass (a weight shared between the
calls) is one layer applied at the places of all its calls; each call's inputs have the
samples first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from .._autodiff import batched_vjp
from .._memory import CHUNK_BUDGET_BYTES, check_dense, itemsize
from .._tree import tree_to_vector, vector_to_tree
from ..errors import ArgumentError
from ..functional import functionalize
from ..ggn import (
    _loss_of,
    fisher_columns,
    likelihood_of,
    output_factor,
    output_hessian_blocks,
    separable,
)
from .base import CurvatureOperator

__all__ = ["KFACOperator"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _places(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """A layer's inputs as ``(N, R, d_in)``: the ``R`` places of each sample its weight
    is applied at (a Linear layer's middle dimensions, a convolution's output positions,
    with the unfolded input patch there)."""
    if isinstance(module, nn.Linear):
        return a.reshape(a.shape[0], -1, a.shape[-1])
    pad = module._reversed_padding_repeated_twice  # what the layer's own forward pads by
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    if any(pad):
        a = F.pad(a, pad, mode=mode)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if isinstance(module, nn.Conv1d):  # as a 2-d convolution of height one
        a, kernel = a.unsqueeze(2), (1, kernel[0])
        stride, dilation = (1, stride[0]), (1, dilation[0])
    return F.unfold(a, kernel, dilation=dilation, stride=stride).transpose(1, 2)


def _output_places(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """The gradient at a layer's output as ``(N, R, d_out)``, places as in
    :func:`_places` (a convolution's ``(N, C_out, *spatial)`` with channels last)."""
    if isinstance(module, nn.Linear):
        return g.reshape(g.shape[0], -1, g.shape[-1])
    return g.flatten(2).transpose(1, 2)


class KFACOperator(CurvatureOperator):
    """The K-FAC approximation of the GGN (or Fisher) of a loss over a data set, as a
    ``(P, P)`` operator with :class:`hessfunc.HessianOperator`'s interface (module
    docstring for the math).

    Args:
        model: a network whose trainable parameters all belong to ``nn.Linear``,
            ``nn.Conv1d`` or ``nn.Conv2d`` layers (convolutions without groups), with
            outputs ``(N, C)``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` of one batch.
        data: one ``(inputs, targets)`` batch or an iterable of them.
        fisher: ``"exact"`` (the loss's output Hessian: K-FAC of the GGN), ``"mc"``
            (``mc_samples`` labels drawn from the model's predictive distribution) or
            ``"empirical"`` (the true labels), as in :func:`hessfunc.fisher_diag`.
        mc_samples: draws per sample (``fisher="mc"``).
        kfac_approx: ``"expand"`` or ``"reduce"``: how a layer applied at several places
            of a sample (a convolution, a Linear layer on ``(N, ..., d)``) is made a
            Kronecker product (module docstring); the same for a layer applied once.
        eigenvalue_correction: EKFAC: keep the factors' eigenbases, replace their
            eigenvalues by the block's diagonal in that basis (NOTE [eigenvalue
            correction]; a second pass over the data).
        generator: the source of the draws.
        seed: or a seed for a fresh generator (not both).
        likelihood: for a loss hessfunc does not recognise (``fisher`` other than exact).
        **kwargs: ``reduction``, ``progress``, ``cache``, ``process_group`` as for
            :class:`hessfunc.HessianOperator`.

    Attributes:
        factors: ``{layer name: (A, G)}``, ``A`` ``(d_in [+1], d_in [+1])`` and ``G``
            ``(d_out, d_out)``; the layer's block is ``G ⊗ A`` on ``[W | b]`` row-major,
            a convolution's weight read as ``(C_out, C_in k_1 ... k_d)``.
        corrections: with ``eigenvalue_correction=True``, ``{layer name: S}``, ``S``
            ``(d_out, d_in [+1])``; else None.

    Example (one Linear layer, one sample, squared error: K-FAC is the exact GGN,
    ``2 (ã ã^T)`` on each output row):
        >>> _ = torch.manual_seed(0)
        >>> layer = torch.nn.Linear(2, 1, bias=False)
        >>> loss = lambda o, y: ((o - y) ** 2).sum()
        >>> K = KFACOperator(layer, loss, (torch.tensor([[1.0, 2.0]]), torch.zeros(1, 1)),
        ...                  reduction="sum")
        >>> K.to_dense()
        tensor([[2., 4.],
                [4., 8.]])
        >>> K.solve(torch.tensor([2.0, 4.0]), damping=10.0)   # (K + 10 I)^-1 b: b is an eigenvector
        tensor([0.1000, 0.2000])
    """

    _what = "KFAC"

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Any], data: Any, *,
                 fisher: Literal["exact", "mc", "empirical"] = "exact", mc_samples: int = 1,
                 kfac_approx: Literal["expand", "reduce"] = "expand",
                 eigenvalue_correction: bool = False,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 likelihood: str | None = None, **kwargs: Any):
        call = type(self).__name__
        if not isinstance(model, nn.Module):
            raise ArgumentError(f"{call}: `model` must be an nn.Module of Linear and "
                                f"convolution layers, got {type(model).__name__}.")
        if kfac_approx not in ("expand", "reduce"):
            raise ArgumentError(f"{call}: `kfac_approx` must be 'expand' or 'reduce', got "
                                f"{kfac_approx!r}.")
        if fisher not in ("exact", "mc", "empirical"):
            raise ArgumentError(f"{call}: `fisher` must be 'exact', 'mc' or 'empirical', got "
                                f"{fisher!r}.")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ArgumentError(f"{call}: `mc_samples` must be an int >= 1, got {mc_samples!r}.")
        if generator is not None and seed is not None:
            raise ArgumentError(f"{call}: pass `generator` or `seed`, not both.")
        if not isinstance(eigenvalue_correction, bool):
            raise ArgumentError(f"{call}: `eigenvalue_correction` must be True or False, got "
                                f"{eigenvalue_correction!r}.")
        g, params = functionalize(model)
        self.g, self.loss_fn, self.fisher, self.mc_samples = g, loss_fn, fisher, mc_samples
        self.kfac_approx = kfac_approx
        if fisher != "exact":
            self._likelihood, red = likelihood_of(loss_fn, likelihood, kwargs.get("reduction"),
                                                  call)
            kwargs.setdefault("reduction", red)
        self._layers = self._find_layers(g.module, params, call)
        super().__init__(lambda p, x, y: loss_fn(g(p, x), y), params, data, **kwargs)
        self._draws = (torch.Generator(device=self.device).manual_seed(seed)
                       if seed is not None else generator)
        self.factors = self._compute_factors()
        self._eigen: dict[str, tuple[torch.Tensor, ...]] = {}
        self.corrections = self._compute_corrections() if eigenvalue_correction else None

    @classmethod
    def from_model(cls, model: nn.Module, loss_fn: Callable[..., Any], data: Any,
                   **kwargs: Any) -> KFACOperator:
        """The same as the constructor (K-FAC needs the model's layers)."""
        return cls(model, loss_fn, data, **kwargs)

    # --------------------------------------------------------------- factors
    @staticmethod
    def _find_layers(module: nn.Module, params: dict[str, torch.Tensor], call: str
                     ) -> dict[str, tuple[str, str | None]]:
        """``{layer name: (weight name, bias name or None)}``; every parameter covered."""
        layers, covered = {}, set()
        for name, mod in module.named_modules():
            if not isinstance(mod, _LAYERS):
                continue
            w = f"{name}.weight" if name else "weight"
            b = f"{name}.bias" if name else "bias"
            if parametrize.is_parametrized(mod, "weight"):
                raise ArgumentError(
                    f"{call}: layer {name!r} computes its weight from other parameters "
                    f"({type(mod.parametrizations.weight[0]).__name__}: weight_norm, "
                    "spectral_norm or another parametrization); K-FAC's factors are of a "
                    "weight the layer holds. Use GGNOperator, or remove the "
                    "parametrization (torch.nn.utils.parametrize.remove_parametrizations).")
            if w not in params:
                if b in params:
                    raise ArgumentError(f"{call}: layer {name!r} has a frozen weight and a "
                                        "trainable bias; freeze both or neither.")
                continue
            if not isinstance(mod, nn.Linear) and mod.groups != 1:
                raise ArgumentError(f"{call}: convolution {name!r} has groups={mod.groups}; "
                                    "K-FAC here covers convolutions without groups (freeze "
                                    "it, or use GGNOperator).")
            layers[name] = (w, b if b in params else None)
            covered |= {w, b}
        stray = [k for k in params if k not in covered]
        if stray:
            raise ArgumentError(f"{call}: the trainable parameters {stray} do not belong to "
                                "nn.Linear, nn.Conv1d or nn.Conv2d layers; K-FAC here covers "
                                "those only (freeze the others, or use GGNOperator).")
        if not layers:
            raise ArgumentError(f"{call}: the model has no trainable nn.Linear, nn.Conv1d or "
                                "nn.Conv2d layer.")
        return layers

    def _output_columns(self, out: torch.Tensor, y: Any
                        ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """``U`` ``(K, N, C)`` and weights ``omega`` ``(K, N)``, or one float where every
        column has the same weight: ``M_n = sum_k omega_kn U_kn U_kn^T``."""
        out = out.detach()
        n = out.shape[0]
        if self.fisher == "exact":
            S = output_factor(self.loss_fn, out, y)                      # (N, C, C)
            if S is not None:
                return S.permute(2, 0, 1), 1.0
            loss = _loss_of(self.loss_fn, y, self._name)
            if separable(self.loss_fn):
                blocks = output_hessian_blocks(loss, out)                # (N, C, C)
            else:  # any loss: the whole output Hessian, then its per-sample blocks
                H = torch.func.jacrev(torch.func.grad(loss))(out)
                H = H.reshape(n, -1, n, H.shape[-1] if out.dim() > 1 else 1)
                blocks = torch.stack([H[i, :, i, :] for i in range(n)])
            lam, Q = torch.linalg.eigh(blocks)                           # (N, C), (N, C, C)
            return Q.permute(2, 0, 1), lam.T
        E, w = fisher_columns(self.loss_fn, self._likelihood, self.reduction, self.fisher, out,
                              y, self.mc_samples, self._draws)
        return E, w

    @staticmethod
    def _columns_back(out: torch.Tensor, probes: list[torch.Tensor], U: torch.Tensor
                      ) -> Iterator[tuple[slice, list[torch.Tensor]]]:
        """``(columns, B^T U[columns] at every probe, each (k, *probe shape))``: batched
        backward passes of as many columns as fit the chunk budget (one pass where torch
        cannot batch)."""
        per_column = sum(p.numel() for p in probes) * itemsize(out.dtype)
        chunk = max(1, min(U.shape[0], CHUNK_BUDGET_BYTES // max(per_column, 1)))
        for lo in range(0, U.shape[0], chunk):
            cols = slice(lo, min(lo + chunk, U.shape[0]))
            yield cols, batched_vjp(out, probes, U[cols])

    def _batch_pass(self, x: Any, y: Any, on_columns: Callable[..., None]
                    ) -> list[torch.Tensor]:
        """One forward and the batched backward passes of the output matrix's columns
        over a batch: ``on_columns(layer index, g, omega, ã)`` for each chunk of ``k``
        columns, ``g`` ``(k, N, R, d_out)`` at the layer's places, ``omega`` ``(k, N)`` (or
        one float) and the layer's ``ã`` ``(N, R, d_in [+1])``; returns every layer's ``ã``.

        A layer called several times in one forward pass (its weight shared between the
        calls) has the places of all its calls, in call order; a layer the pass never
        calls has none (``R = 0``: its factors get nothing from this batch)."""
        module = self.g  # functionalize's private copy, hooked for this pass only
        calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {k: [] for k in self._layers}
        handles = []
        mods = dict(module.module.named_modules())
        forward = [True]  # not a checkpoint's recomputation in the backward pass
        for name in self._layers:
            def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor,
                     name: str = name) -> torch.Tensor | None:
                if not forward[0]:
                    return None
                probe = torch.zeros_like(out, requires_grad=True)
                calls[name].append((args[0].detach(), probe))
                return out + probe

            handles.append(mods[name].register_forward_hook(hook))
        try:
            with torch.enable_grad():
                p = {k: v.detach() for k, v in self.params.items()}
                out = module(p, x)
                forward[0] = False
                if not isinstance(out, torch.Tensor) or out.dim() != 2:
                    raise ArgumentError(f"{self._name}: the model's outputs must be (N, C), got "
                                        f"{getattr(out, 'shape', type(out).__name__)}.")
                out_a = [self._layer_places(name, mods[name], calls[name], out.shape[0])
                         for name in self._layers]
                probes = [probe for name in self._layers for _, probe in calls[name]]
                U, omega = self._output_columns(out, y)
                for cols, grads in self._columns_back(out, probes, U):
                    grads = iter(grads)
                    for i, name in enumerate(self._layers):
                        g = [_output_places(mods[name], next(grads).flatten(0, 1))
                             for _ in calls[name]]                     # each (kN, R_call, d)
                        if g:
                            g = g[0] if len(g) == 1 else torch.cat(g, 1)
                            on_columns(i, g.unflatten(0, (-1, out.shape[0])),
                                       omega if isinstance(omega, float) else omega[cols],
                                       out_a[i])
        finally:
            for h in handles:
                h.remove()
        return out_a

    def _layer_places(self, name: str, mod: nn.Module,
                      calls: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> torch.Tensor:
        """Layer ``name``'s ``ã`` ``(N, R, d_in [+1])`` over all its calls, ``N = n``."""
        w, b = self._layers[name]
        weight = self.params[w]
        places = [_places(mod, a) for a, _ in calls]
        for a in places:
            if a.shape[0] != n:
                raise ArgumentError(f"{self._name}: layer {name!r} was called on inputs of "
                                    f"{a.shape[0]} rows in a batch of {n} samples; K-FAC needs "
                                    "each layer's inputs to have the samples first (freeze the "
                                    "layer, or use GGNOperator).")
        a = (places[0] if len(places) == 1 else torch.cat(places, 1) if places else
             weight.new_zeros(n, 0, weight.numel() // weight.shape[0]))
        return a if b is None else torch.cat([a, torch.ones_like(a[..., :1])], -1)

    def _add_batch_factors(self, x: Any, y: Any, weight: float,
                           into: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add this batch's share to each layer's ``(A, G)`` in ``into`` (module
        docstring): ``sum ã ã^T / (N R)`` (expand) or ``sum ā ā^T / N`` (reduce), and
        ``weight`` times its ``sum omega g g^T``. In place: a wide layer's ``A`` is large,
        and a fresh one per batch costs more in page faults than the product itself."""
        reduce = self.kfac_approx == "reduce"

        def on_columns(i: int, g: torch.Tensor, omega: torch.Tensor | float, _: torch.Tensor
                       ) -> None:
            if reduce:
                g = g.sum(2)                                          # (k, N, d_out)
            rows = g.reshape(-1, g.shape[-1])
            if isinstance(omega, float):
                into[i][1].addmm_(rows.T, rows, alpha=weight * omega)
                return
            # each row with its sample's weight (every place of a sample alike)
            w = omega[..., None] if reduce else omega[..., None, None].expand(*g.shape[:3], 1)
            into[i][1].addmm_((rows * w.reshape(-1, 1)).T, rows, alpha=weight)

        for (A, _), a in zip(into, self._batch_pass(x, y, on_columns), strict=True):
            if a.shape[1] == 0:  # a layer this batch does not reach
                continue
            rows = a.mean(1) if reduce else a.reshape(-1, a.shape[-1])
            A.addmm_(rows.T, rows,
                     alpha=1 / (self.num_samples * (1 if reduce else a.shape[1])))

    def _add_batch_corrections(self, x: Any, y: Any, weight: float,
                               into: list[torch.Tensor]) -> None:
        """Add ``weight sum omega (Q_G^T Γ Q_A)^2`` of this batch to each layer's ``S`` in
        ``into``, ``Γ = sum_r g_r ã_r^T`` a sample's gradient for one column (NOTE
        [eigenvalue correction]); one place: ``(Q_G^T g)^2 ((Q_A^T ã)^2)^T``."""
        names = list(self._layers)

        def on_columns(i: int, g: torch.Tensor, omega: torch.Tensor | float, a: torch.Tensor
                       ) -> None:
            _, QG, _, QA = self._eigh(names[i])
            if isinstance(omega, float):
                omega = g.new_full(g.shape[:2], omega)
            g, a = g @ QG, a @ QA                       # (k, N, R, d_out), (N, R, d_in)
            if g.shape[2] == 1:
                w = torch.einsum("kn,kni->ni", omega, g[:, :, 0] * g[:, :, 0])
                into[i].addmm_(w.T, a[:, 0] * a[:, 0], alpha=weight)
                return
            k, n, _, d_out = g.shape
            per_sample = k * d_out * a.shape[-1] * itemsize(a.dtype)
            step = max(1, CHUNK_BUDGET_BYTES // max(per_sample, 1))
            for lo in range(0, n, step):
                rows = slice(lo, lo + step)
                gamma = torch.einsum("kmri,mrj->kmij", g[:, rows], a[rows])
                into[i].add_(torch.einsum("km,kmij->ij", omega[:, rows], gamma * gamma),
                             alpha=weight)

        self._batch_pass(x, y, on_columns)

    def _summed(self, step: str, passes: str, shapes: list[tuple[int, int]],
                add: Callable[[Any, Any, float, list[torch.Tensor]], None]
                ) -> list[torch.Tensor]:
        """Matrices of ``shapes`` summed over the batches (and the ranks, as one buffer
        they reduce, collective ``step``): ``add(x, y, batch weight, views)`` adds each
        batch's share into the views in place."""

        def views(total: torch.Tensor) -> list[torch.Tensor]:
            out, lo = [], 0
            for rows, cols in shapes:
                out.append(total[lo:lo + rows * cols].view(rows, cols))
                lo += rows * cols
            return out

        def fill(total: torch.Tensor) -> None:
            into = views(total)
            for _, w, (x, y) in self._passes(passes):
                add(x, y, float(w), into)

        size = sum(rows * cols for rows, cols in shapes)
        return views(self._group.sum(step, (size,), self._spec_like(), fill))

    def _compute_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        shapes = []
        for w, b in self._layers.values():
            d_out = self.params[w].shape[0]
            d_in = self.params[w].numel() // d_out + (b is not None)
            shapes += [(d_in, d_in), (d_out, d_out)]  # each layer's A, then its G

        def pairs(views: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return list(zip(views[::2], views[1::2], strict=True))

        factors = self._summed("factors", "factors", shapes, lambda x, y, w, views:
                               self._add_batch_factors(x, y, w, pairs(views)))
        return dict(zip(self._layers, pairs(factors), strict=True))

    def _compute_corrections(self) -> dict[str, torch.Tensor]:
        """Each layer's ``S`` ``(d_out, d_in [+1])``: a second pass over the data in the
        factors' eigenbases (NOTE [eigenvalue correction])."""
        shapes = [(G.shape[0], A.shape[0]) for A, G in self.factors.values()]
        corrections = self._summed("corrections", "eigenvalue corrections", shapes,
                                   self._add_batch_corrections)
        return dict(zip(self._layers, corrections, strict=True))

    # -------------------------------------------------------------- products
    def _apply(self, tree: Any, op: Callable[[str, torch.Tensor], torch.Tensor]) -> Any:
        """``op(layer, V)`` on every layer's ``[W | b]`` block (leading batch dims kept)."""
        out = dict(tree)
        for name, (w, b) in self._layers.items():
            shape = tree[w].shape  # leading batch dims, then the weight's
            lead = shape[:len(shape) - self.params[w].dim()]
            V = tree[w].reshape(*lead, self.params[w].shape[0], -1)
            V = V if b is None else torch.cat([V, tree[b].unsqueeze(-1)], dim=-1)
            R = op(name, V)
            if b is None:
                out[w] = R.reshape(shape)
            else:
                out[w], out[b] = R[..., :-1].reshape(shape), R[..., -1]
        return {k: out[k] for k in tree}

    def _layer_product(self, name: str, V: torch.Tensor) -> torch.Tensor:
        """One layer's block times ``V`` (``(..., d_out, d_in [+1])``): ``G V A``, or with
        the eigenvalue correction ``Q_G (S * (Q_G^T V Q_A)) Q_A^T``."""
        if self.corrections is None:
            return self.factors[name][1] @ V @ self.factors[name][0]
        _, QG, _, QA = self._eigh(name)
        return QG @ (self.corrections[name] * (QG.T @ V @ QA)) @ QA.T

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        tree = vector_to_tree(v, self._spec)
        return tree_to_vector(self._apply(tree, self._layer_product))

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``K V`` for ``V`` of shape ``(P, k)``."""
        V = self._check_vector(V, "V", ndim=(2,))
        out = self._apply(vector_to_tree(V.T, self._spec), self._layer_product)
        return torch.cat([t.reshape(V.shape[1], -1) for t in pytree.tree_leaves(out)], 1).T

    def to_dense(self, *, chunk_size: int | None = None, max_memory: int | None = None
                 ) -> torch.Tensor:
        """The dense ``(P, P)`` block-diagonal K-FAC matrix (memory-guarded)."""
        P = self._spec.numel
        check_dense(P * P, self.dtype, self.device, what=f"the dense {P} x {P} KFAC matrix",
                    call=f"{self._name}.to_dense", max_memory=max_memory,
                    hint="use the operator's products or `factors` instead")
        return self.matmat(torch.eye(P, dtype=self.dtype, device=self.device))

    def diagonal(self, method: str = "exact", **kwargs: Any) -> torch.Tensor:
        """The diagonal ``(P,)``: ``diag(G) diag(A)^T`` per layer (``method="exact"``;
        with the eigenvalue correction ``(Q_G * Q_G) S (Q_A * Q_A)^T``)."""
        if method != "exact":
            return super().diagonal(method, **kwargs)  # type: ignore[arg-type]

        def layer(name: str, _: torch.Tensor) -> torch.Tensor:
            if self.corrections is None:
                A, G = self.factors[name]
                return torch.outer(torch.diagonal(G), torch.diagonal(A))
            _, QG, _, QA = self._eigh(name)
            return (QG * QG) @ self.corrections[name] @ (QA * QA).T

        ones = vector_to_tree(torch.ones(self._spec.numel, dtype=self.dtype,
                                         device=self.device), self._spec)
        return tree_to_vector(self._apply(ones, layer))

    def _eigh(self, name: str) -> tuple[torch.Tensor, ...]:
        if name not in self._eigen:
            A, G = self.factors[name]
            a, QA = torch.linalg.eigh(A)
            g, QG = torch.linalg.eigh(G)
            self._eigen[name] = (g, QG, a, QA)
        return self._eigen[name]

    def solve(self, b: Any, damping: float = 0.0,
              method: Literal["exact", "cg", "minres"] = "exact", **kwargs: Any) -> Any:
        """``(K + damping I)^-1 b``; ``method="exact"`` (default) through the factors'
        eigendecompositions (module docstring), ``"cg"`` / ``"minres"`` as for every
        operator (:meth:`hessfunc.HessianOperator.solve`)."""
        if method != "exact":
            return super().solve(b, damping, method, **kwargs)  # type: ignore[arg-type]
        call = f"{self._name}.solve"
        flat = self._solve_rhs(b, call)
        if isinstance(damping, bool) or not isinstance(damping, (int, float)):
            raise ArgumentError(f"{call}: `damping` must be a number, got {damping!r}.")

        def inverse(name: str, V: torch.Tensor) -> torch.Tensor:
            g, QG, a, QA = self._eigh(name)
            scale = torch.outer(g, a) if self.corrections is None else self.corrections[name]
            denom = scale + damping
            if bool((denom.abs() <= torch.finfo(denom.dtype).eps * denom.abs().max()).any()):
                raise ArgumentError(f"{call}: K + damping I is singular for layer {name!r} "
                                    f"(damping={damping}); pass damping > 0.")
            return QG @ ((QG.T @ V @ QA) / denom) @ QA.T

        x = tree_to_vector(self._apply(vector_to_tree(flat, self._spec), inverse))
        return x if isinstance(b, torch.Tensor) else vector_to_tree(x, self._spec)
