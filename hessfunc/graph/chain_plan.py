"""A chain of affine layers and elementwise maps at a point, and its exact full Hessian.

NOTE [structured route]: on a chain ``a_0 = x -> layer_1 -> ... -> layer_K -> o``
of Linear layers on ``(N, features)`` inputs and elementwise maps, read off the
captured graph (NOTE [chains from the graph] in ``hessfunc/graph/chain.py``), with a
loss proved a sum of per-sample terms (NOTE [per-sample structure]), the Hessian of
the loss with respect to every per-sample activation ``a_k[n]`` can be propagated
backward exactly, one small ``(d_k, d_k)`` matrix per sample (Dangel, Harmeling,
Hennig 2020, "Modular block-diagonal curvature approximations for feedforward
architectures"):

* at the output, ``H_K[n] = d^2 L / d o_n^2`` (``C`` backward passes of unit columns
  through the loss's gradient, every sample at once);
* through ``a' = a W^T + b``: ``H[n] = W^T H'[n] W`` and ``g[n] = g'[n] W``;
* through an elementwise ``a' = phi(a)``:
  ``H[n] = diag(phi'(a_n)) H'[n] diag(phi'(a_n)) + diag(phi''(a_n) * g'[n])``.

For the Linear layer with input ``a`` and output Hessians ``H'``, its own block is
``d^2 L / dW_ij dW_kl = sum_n H'[n]_ik a_nj a_nl`` and ``d^2 L / db_i db_k = sum_n H'[n]_ik``.

NOTE [full Hessian]: the cross block of a Linear layer ``l`` with the parameters
``theta_m`` of a lower Linear layer ``m`` is, per sample,
``(d a_l/d theta_l)^T H_l W_l Q + [d^2 a_l / d W_l d theta_m] g_l`` with
``Q = d a_{l-1} / d theta_m`` pushed forward from layer ``m`` (``Q <- W Q`` through a
Linear layer, ``Q <- phi'(z) Q`` through an activation) and the bilinear term
``d^2 (W a)_i / dW_ij d theta = d a_j / d theta``: for ``W_l[i, j]`` and a column ``p``
of ``theta_m``, ``sum_n a_{l-1}[n, j] (H_l W_l Q)[n, i, p] + g_l[n, i] Q[n, j, p]``.
Curvature above layer ``l`` is all in ``H_l``; activations between ``m`` and ``l``
do not depend on ``theta_l``, so there is no other term.

The other steps of such a chain, on ``(N, d)`` values, take the same two rules with
their own per-sample Jacobians ``A = d z / d a`` and second-order terms
``M = d(A^T g') / d a``: ``H = A^T H' A + M``, ``g = A^T g'``, and ``Q <- A Q``.

* a per-feature scale ``z = a w + b``, ``a = s x`` after constant shifts and factors
  (LayerNorm's affine part, BatchNorm in eval mode): ``A = diag(s w)``, ``M = 0``; its
  own blocks are ``sum_n diag(a_n) H'[n] diag(a_n)``, ``sum_n H'[n]`` and
  ``sum_n diag(a_n) H'[n]``, and ``d^2 z_r / d w_r d x_r = s_r`` gives a cross block's
  bilinear term (:func:`_cross_blocks`);
* a softmax or a normalisation over the features (LayerNorm, RMSNorm): ``A`` and ``M``
  in closed form, ``(d, d)`` per sample (:func:`map_blocks`).

The cost per sample is ``O(d^3)`` for the widest value, as for a Linear layer. All of
these are exact, not approximations: the tests compare them with the loop oracle to
1e-10 in float64.

Hessian-vector products (NOTE [structured products]) also take convolutions,
scales, linear maps, skip connections (a DAG of these steps) and a loss that couples
samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .. import _thresholds
from .._autodiff import missing_derivative
from .._memory import CHUNK_BUDGET_BYTES, itemsize

__all__ = ["ChainPlan", "ParameterTerms", "elementwise_derivatives", "map_blocks",
           "output_blocks", "standardised", "trainable"]


@dataclass
class _Linear:
    weight: torch.Tensor
    inputs: torch.Tensor          # (N, in)
    weight_name: str | None       # name in params when trainable
    bias_name: str | None


@dataclass
class _Embedding:
    """``z = W[i]``: rows of the weight ``W`` ``(V, d)`` looked up by the model's integer
    inputs ``i`` ``(N, ...)`` (``nn.Embedding`` without ``padding_idx``): the first
    step, linear in ``W``, with nothing below it to differentiate."""
    weight: torch.Tensor
    indices: torch.Tensor
    weight_name: str | None


@dataclass
class _Conv:
    """``nn.Conv1d``/``nn.Conv2d`` (``groups=1``, zero padding): affine in its parameters
    like a Linear layer; only Hessian-vector products have rules for it."""
    weight: torch.Tensor
    inputs: torch.Tensor          # (N, C_in, *spatial)
    weight_name: str | None
    bias_name: str | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]


@dataclass
class _Flatten:
    """``nn.Flatten()`` from dim 1: ``(N, *shape) -> (N, prod(shape))``."""
    shape: tuple[int, ...]


@dataclass
class _Elementwise:
    phi1: torch.Tensor            # (N, d) first derivative at the input
    phi2: torch.Tensor            # (N, d) second derivative


@dataclass
class _Add:
    """The sum of two values of one shape: where a skip connection joins its branch."""


@dataclass
class _Scale:
    """``z = a * w + b`` with ``w`` and ``b`` parameters or constants (either may be
    absent) broadcast over the batch and other axes, after constant shifts and factors
    ``a = (x - m) * s``: BatchNorm in eval mode, LayerNorm's affine part, a learned
    per-channel gain. Linear in ``x`` and affine in its parameters, like a Linear layer
    with a diagonal weight."""
    weight: torch.Tensor | None   # w viewed to broadcast against one sample: (C, 1, 1)
    bias: torch.Tensor | None     # b likewise
    inputs: torch.Tensor          # a (N, *shape), after the shifts and factors
    weight_name: str | None
    bias_name: str | None
    pre: torch.Tensor | None = None   # s, the product of the factors (broadcast), or None
    gain: torch.Tensor | None = None  # d z / d x = s * w (broadcast), None for 1


@dataclass
class _LinearMap:
    """A linear map of one value that keeps samples apart, without parameters: a mean or
    sum over axes other than the batch, or average pooling. ``apply`` runs it on ``(M,
    *shape)`` for any number of rows ``M`` (``k`` tangents fold into the batch axis);
    ``shape``: its input per sample."""
    apply: Callable[[torch.Tensor], torch.Tensor]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _ShapeOp:
    """``op(a, *args)``, ``a`` of shape ``in_shape``: an op that only moves or repeats
    the entries of its one input (a view, a transpose or permutation, ``expand``,
    ``select``, ``slice``)."""
    op: Callable[..., torch.Tensor]
    args: tuple
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass
class _ShapeMap:
    """A run of :class:`_ShapeOp` s, each reading the one before, also where they move
    the batch axis (attention's heads and positions); those that change nothing (a view
    or ``expand`` to the same shape, ``clone``) are left out. Its products apply the ops
    to the tangents and their transposes, in reverse, to the adjoints."""
    ops: tuple[_ShapeOp, ...]


@dataclass(frozen=True)
class _Softmax:
    """``z = softmax(a)`` over the axes ``dims`` (non-negative; usually the last)."""
    dims: tuple[int, ...]


@dataclass(frozen=True)
class _Standardise:
    """``z = (a - mean(a)) / sqrt(var(a) + eps)`` over ``dims`` (``centred``: LayerNorm,
    BatchNorm in training mode) or ``z = a / sqrt(mean(a^2) + eps)`` (RMSNorm); ``dims``
    non-negative, the batch axis 0 among them where the batch's statistics are used."""
    dims: tuple[int, ...]
    eps: float
    centred: bool


@dataclass(frozen=True)
class _Product:
    """``z = a b`` of two values: ``bmm`` (``matmul``), or ``mul`` of values of one rank,
    broadcasting (a gate, attention's scores and mixing)."""
    batched_matmul: bool


@dataclass
class _Map:
    """A map of one or more values without parameters that no other step's rule covers
    (the normalisations of BatchNorm in training mode and of LayerNorm, a softmax): its
    ops replayed by ``apply(*inputs)``, ``inputs`` the values it reads at the point.
    Its products differentiate those ops (NOTE [maps without a rule] in
    ``hessfunc/graph/chain_products.py``), or take the closed form of the map ``form``
    where the walk recognised one (NOTE [softmax and standardisation])."""
    apply: Callable[..., torch.Tensor]
    inputs: list[torch.Tensor]
    linear: bool   # every op linear (or piecewise linear) in the values it reads
    form: _Softmax | _Standardise | _Product | None = None


def trainable(step: object) -> bool:
    """Whether a step holds a parameter being differentiated (a weight or a bias)."""
    return bool(getattr(step, "weight_name", None) or getattr(step, "bias_name", None))


class ParameterTerms:
    """The loss's terms of the parameters alone, ``L = l(o) + R(p)`` (weight decay, a
    norm penalty; NOTE [parameter terms] in ``hessfunc/graph/chain.py``): ``R``'s
    gradient at the point, with its graph on the parameter ``leaves`` that ``R`` reads,
    so that ``H_R V`` is one backward pass through ``R``'s ops alone."""

    def __init__(self, leaves: dict[str, torch.Tensor], grad: dict[str, torch.Tensor],
                 diagonal: dict[str, torch.Tensor] | None = None):
        self.leaves, self.grad = leaves, grad
        #: ``H_R``'s diagonal where ``R`` is separable (``H_R`` is then diagonal), else None
        self.diagonal = diagonal

    def products(self, tangents: dict[str, torch.Tensor], k: int | None
                 ) -> dict[str, torch.Tensor]:
        """``(H_R V)`` for ``R``'s parameters (``k``: tangents with a leading axis of
        ``k``, or None); a parameter missing from ``tangents`` has a zero tangent."""
        if self.diagonal is not None:
            return {n: h * tangents[n] for n, h in self.diagonal.items() if n in tangents}
        names = [n for n in self.grad if self.grad[n].requires_grad]
        if not names:  # R is linear in the parameters
            return {}
        lead = () if k is None else (k,)
        columns = [tangents[n] if n in tangents else
                   self.grad[n].new_zeros((*lead, *self.grad[n].shape)) for n in names]
        leaves = list(self.leaves.values())
        with torch.enable_grad():
            found = torch.autograd.grad([self.grad[n] for n in names], leaves, columns,
                                        retain_graph=True, allow_unused=True,
                                        is_grads_batched=k is not None)
        # a leaf R's curvature does not reach (R linear in it) has zero rows; torch's own
        # materialized zeros would lack the batch axis
        return {n: leaf.new_zeros((*lead, *leaf.shape)) if r is None else r
                for (n, leaf), r in zip(self.leaves.items(), found, strict=True)}

    def add_dense(self, M: torch.Tensor, span: dict[str, slice]) -> None:
        """Add ``H_R`` into the full ``(P, P)`` Hessian ``M`` (each parameter's rows and
        columns at ``span``): its columns a chunk of unit tangents at a time."""
        if self.diagonal is not None:
            for name, h in self.diagonal.items():
                M[span[name], span[name]].diagonal().add_(h.reshape(-1))
            return
        total = sum(t.numel() for t in self.leaves.values())
        for name, g in self.grad.items():
            if not g.requires_grad:
                continue
            m = g.numel()
            step = max(1, CHUNK_BUDGET_BYTES // max(1, 2 * total * itemsize(g.dtype)))
            for lo in range(0, m, step):
                k = min(step, m - lo)
                cols = g.new_zeros(k, m)
                cols[torch.arange(k), torch.arange(lo, lo + k)] = 1  # unit tangents
                rows = self.products({name: cols.reshape(k, *g.shape)}, k)
                start = span[name].start + lo
                for other, block in rows.items():  # block[i] = H_R e_(lo + i), at other
                    M[span[other], start:start + k] += block.reshape(k, -1).T


class ChainPlan:
    """A verified chain at a point: its steps, and the loss's Hessian in the model output
    as per-sample blocks ``out_hessian`` ``(N, C, C)`` or as ``loss_graph``, ``(o, dL/do)``
    with the graph of ``dL/do`` (exact when samples are coupled); ``out_grad`` ``(N, C)``
    is ``dL/do``, ``value`` the loss, ``terms`` its terms of the parameters alone
    (:class:`ParameterTerms`, or None) and ``output`` the model output ``o`` ``(N, C)``.

    ``sources[i]``: the values step ``i`` reads, value ``0`` being the inputs and value
    ``j + 1`` step ``j``'s output (NOTE [skip connections] in ``chain.py``); None for a
    chain, where step ``i`` reads value ``i``."""

    def __init__(self, steps: list[Any], out_hessian: torch.Tensor | None,
                 out_grad: torch.Tensor, params: dict[str, torch.Tensor],
                 loss_graph: tuple[torch.Tensor, torch.Tensor] | None, value: torch.Tensor,
                 terms: ParameterTerms | None = None, output: torch.Tensor | None = None,
                 sources: list[tuple[int, ...]] | None = None):
        self.value = value
        self.sources = sources or [(i,) for i in range(len(steps))]
        self.chain = all(s == (i,) for i, s in enumerate(self.sources))
        self.output = output
        self.terms = terms
        self.loss_graph = loss_graph
        self.steps = steps
        self.out_hessian = out_hessian
        self.out_grad = out_grad
        self.params = params
        self.first = next(i for i, s in enumerate(steps) if trainable(s))
        #: maps without a rule that are not linear and have no closed form (a product of
        #: branches, a normalisation other than NOTE [softmax and standardisation]'s)
        self.curved_maps = sum(isinstance(s, _Map) and not s.linear and s.form is None
                               for s in steps)

    def _propagate(self, chunk_size: int | None, per_sample_bytes: int
                   ) -> Iterator[tuple[slice, dict[int, tuple[torch.Tensor, torch.Tensor]],
                                       dict[int, torch.Tensor]]]:
        """Backward over sample chunks (NOTE [structured route]): for each chunk
        ``(rows, at, jacobians)``, with ``at[i] = (H, g)`` the per-sample Hessians ``(n, o,
        o)`` and gradients ``(n, o)`` at trainable step ``i``'s output and ``jacobians[i]``
        the per-sample Jacobian ``(n, o, o)`` of map ``i``."""
        N = self.out_hessian.shape[0]
        chunk = chunk_size or max(1, CHUNK_BUDGET_BYTES // max(1, per_sample_bytes))
        for lo in range(0, N, chunk):
            rows = slice(lo, min(lo + chunk, N))
            H, g = self.out_hessian[rows], self.out_grad[rows]
            owned = False  # whether H is a temporary of this loop, free to update in place
            at: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            jacobians: dict[int, torch.Tensor] = {}
            for i in range(len(self.steps) - 1, self.first - 1, -1):
                step = self.steps[i]
                if trainable(step):
                    at[i], owned = (H, g), False
                if i == self.first:
                    break
                if isinstance(step, _Linear):
                    H, g, owned = step.weight.T @ H @ step.weight, g @ step.weight, True
                elif isinstance(step, _Scale):
                    if step.gain is not None:
                        H, g, owned = H * step.gain[:, None] * step.gain, g * step.gain, True
                elif isinstance(step, _Map):
                    A, M = map_blocks(step.form, step.inputs[0][rows], g)
                    jacobians[i] = A
                    H, g, owned = A.mT @ H @ A + M, (A.mT @ g[:, :, None])[:, :, 0], True
                else:
                    p1, p2 = step.phi1[rows], step.phi2[rows]
                    if owned:
                        H.mul_(p1[:, :, None]).mul_(p1[:, None, :])
                    else:
                        H, owned = H * p1[:, :, None] * p1[:, None, :], True
                    H.diagonal(dim1=1, dim2=2).add_(p2 * g)
                    g = p1 * g
            yield rows, at, jacobians

    def per_sample_blocks(self) -> bool:
        """Whether the plan serves the per-sample backward propagation of the full
        Hessian (:meth:`why_not_per_sample`)."""
        return self.why_not_per_sample() is None

    def why_not_per_sample(self) -> str | None:
        """Why :meth:`per_sample_blocks` is False, or None: it takes a chain of Linear
        layers, elementwise maps, per-feature scales (LayerNorm's affine part, BatchNorm
        in eval mode) and softmaxes or normalisations over the features of each sample,
        on ``(N, features)`` values, with per-sample output Hessians."""
        if not self.chain:
            return ("layers with skip connections, which the full Hessian's "
                    "backpropagation has no rule for")
        if self.out_hessian is None:
            return ("a chain, but its loss's Hessian is not kept per sample (not proved a "
                    "sum over samples, or over the memory budget)")
        if not all(self._per_sample_step(s) for s in self.steps):
            return ("a chain with steps other than Linear layers, elementwise maps, "
                    "per-feature scales and softmaxes or normalisations over features "
                    "(convolutions, views, pooling, statistics over the batch), which the "
                    "full Hessian's backpropagation has no rule for")
        return None

    def _per_sample_step(self, step: Any) -> bool:
        if isinstance(step, (_Linear, _Elementwise)):
            return True
        if isinstance(step, _Scale):  # one weight and bias entry per feature
            width = step.inputs.shape[-1]
            return step.inputs.dim() == 2 and all(
                name is None or self.params[name].numel() == width
                for name in (step.weight_name, step.bias_name))
        return isinstance(step, _Map) and isinstance(step.form, (_Softmax, _Standardise)) \
            and len(step.inputs) == 1 and step.inputs[0].dim() == 2 and step.form.dims == (1,)

    def _widest(self) -> int:
        return max([self.out_hessian.shape[-1]]
                   + [s.weight.shape[1] if isinstance(s, _Linear) else
                      s.inputs[0].shape[1] if isinstance(s, _Map) else
                      s.inputs.shape[1] if isinstance(s, _Scale) else s.phi1.shape[1]
                      for s in self.steps])

    def full(self, chunk_size: int | None = None) -> torch.Tensor:
        """The full ``(P, P)`` Hessian, parameters in ``params`` order (NOTE [full Hessian])."""
        names = list(self.params)
        sizes = [self.params[k].numel() for k in names]
        starts = dict(zip(names, itertools.accumulate([0] + sizes[:-1]), strict=True))
        span = {k: slice(starts[k], starts[k] + self.params[k].numel()) for k in names}
        P = sum(sizes)
        ref = self.out_hessian
        # sums over sample chunks, kept in the layout they are computed in; each is
        # rearranged into its (rows, cols) block once, at the end
        acc: dict[tuple[str, str, str], list[Any]] = {}

        def put(a: str, b: str, raw: torch.Tensor,
                finish: Callable[[torch.Tensor], torch.Tensor] | None = None,
                tag: str = "") -> None:
            if (a, b, tag) in acc:
                acc[(a, b, tag)][0] += raw
            else:
                acc[(a, b, tag)] = [raw, finish]

        d = self._widest()
        for rows, at, jacobians in self._propagate(chunk_size,
                                                   3 * d * d * d * itemsize(ref.dtype)):
            self._full_chunk(at, jacobians, rows, put)
        M = torch.zeros(P, P, dtype=ref.dtype, device=ref.device)
        for (a, b, _), (raw, finish) in acc.items():
            block = raw if finish is None else finish(raw)
            M[span[a], span[b]] += block
            if a != b:
                M[span[b], span[a]] += block.T
        if self.terms is not None:  # NOTE [parameter terms]
            self.terms.add_dense(M, span)
        return M

    def _full_chunk(self, at: dict[int, tuple[torch.Tensor, torch.Tensor]],
                    jacobians: dict[int, torch.Tensor], rows: slice,
                    put: Callable[..., None]) -> None:
        """Add one sample chunk's contribution to every block of the full Hessian."""
        for m, low in enumerate(self.steps):
            if m not in at:
                continue
            H, _ = at[m]
            _own_blocks(low, H, low.inputs[rows], put)
            # cross blocks with every trainable step above: forward-propagate the
            # per-sample Jacobian J = d a_k / d z_m (z_m this step's output)
            n, o = H.shape[0], H.shape[1]
            J = torch.eye(o, dtype=H.dtype, device=H.device).expand(n, o, o)
            for k in range(m + 1, len(self.steps)):
                step = self.steps[k]
                if k in at:
                    columns = _parameter_columns(low, J, low.inputs[rows])
                    _cross_blocks(step, *at[k], step.inputs[rows], columns, put)
                if isinstance(step, _Elementwise):
                    J = step.phi1[rows][:, :, None] * J
                elif isinstance(step, _Linear):
                    J = step.weight @ J
                elif isinstance(step, _Scale):
                    J = J if step.gain is None else step.gain[:, None] * J
                else:
                    J = jacobians[k] @ J


def _own_blocks(step: _Linear | _Scale, H: torch.Tensor, a: torch.Tensor,
                put: Callable[..., None]) -> None:
    """A trainable step's own blocks from one chunk: ``Q^T H Q`` summed over samples, with
    ``Q = d z / d theta`` (structured, never formed); ``H`` ``(n, o, o)`` at its output,
    ``a`` ``(n, i)`` its input (for a scale, after the shifts and factors)."""
    n, o, i = H.shape[0], H.shape[1], a.shape[1]
    if isinstance(step, _Scale):  # Q = diag(a) for the weight, the identity for the bias
        if step.weight_name:
            put(step.weight_name, step.weight_name, torch.einsum("ni,nij,nj->ij", a, H, a))
        if step.bias_name:
            put(step.bias_name, step.bias_name, H.sum(0))
        if step.weight_name and step.bias_name:
            put(step.weight_name, step.bias_name, torch.einsum("ni,nij->ij", a, H))
        return
    if step.weight_name:
        ww = (H.reshape(n, o * o).T @ (a[:, :, None] * a[:, None, :]).reshape(n, i * i))
        put(step.weight_name, step.weight_name, ww,
            lambda t: t.reshape(o, o, i, i).permute(0, 2, 1, 3).reshape(o * i, o * i))
    if step.bias_name:
        put(step.bias_name, step.bias_name, H.sum(0))
    if step.weight_name and step.bias_name:
        put(step.weight_name, step.bias_name,
            torch.einsum("nik,nj->ijk", H, a).reshape(o * i, o))


def _parameter_columns(low: _Linear | _Scale, J: torch.Tensor, a: torch.Tensor
                       ) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """``d a_high / d theta`` for each parameter ``theta`` of the lower step ``low`` as
    ``(name, Q, outer)``: the Jacobian is ``Q`` ``(n, i, p)`` where ``outer`` is None,
    else ``Q[:, :, s] outer[:, k]`` at ``theta``'s entry ``(s, k)`` (a Linear weight, kept
    as the two factors); ``J = d a_high / d z_low``, ``a`` ``low``'s input."""
    found = []
    if low.weight_name:
        found.append((low.weight_name, J, a) if isinstance(low, _Linear) else
                     (low.weight_name, J * a[:, None, :], None))
    if low.bias_name:
        found.append((low.bias_name, J, None))
    return found


def _cross_blocks(high: _Linear | _Scale, H: torch.Tensor, g: torch.Tensor, a: torch.Tensor,
                  columns: list[tuple[str, torch.Tensor, torch.Tensor | None]],
                  put: Callable[..., None]) -> None:
    """Blocks of ``high``'s parameters against a lower step's (NOTE [full Hessian]):
    ``sum_n (d z/d theta_high)^T H d z/d theta_low + g . d^2 z / d theta_high d theta_low``.

    ``H``, ``g``: per-sample Hessian and gradient at ``high``'s output ``(n, o)``; ``a``:
    its input ``(n, i)``; ``columns``: :func:`_parameter_columns`. Every sum over samples
    is one matmul.
    """
    n, o = g.shape
    i = a.shape[1]
    for name, Q, outer in columns:
        p = Q.shape[2]
        if isinstance(high, _Scale):  # z = a w + b, a = s x: d^2 z_r / d w_r d x_r = s_r
            HGQ = H @ (Q if high.gain is None else high.gain[:, None] * Q)     # (n, o, p)
            rows = []
            if high.weight_name:
                rows.append((high.weight_name, a[:, :, None] * HGQ + (
                    g if high.pre is None else g * high.pre)[:, :, None] * Q))
            if high.bias_name:
                rows.append((high.bias_name, HGQ))
            for row_name, X in rows:
                if outer is None:
                    put(row_name, name, X.sum(0))
                else:
                    put(row_name, name, X.reshape(n, o * p).T @ outer,
                        lambda t, o=o: t.reshape(o, -1))
            continue
        HWQ = H @ (high.weight @ Q)                                    # (n, o, p)
        if high.weight_name:
            # sum_n a[n, j] HWQ[n, r, s] (x)[n, k] + g[n, r] Q[n, j, s] (x)[n, k]
            if outer is not None:
                kk = outer.shape[1]
                t1 = (a[:, :, None] * outer[:, None, :]).reshape(n, i * kk).T \
                    @ HWQ.reshape(n, o * p)                            # (j k, r s)
                put(high.weight_name, name, t1,
                    lambda t, kk=kk, p=p: t.reshape(i, kk, o, p).permute(2, 0, 3, 1).reshape(
                        o * i, p * kk), tag="H")
                t2 = g.T @ (Q[:, :, :, None] * outer[:, None, None, :]).reshape(n, i * p * kk)
                put(high.weight_name, name, t2,                        # (r, j s k)
                    lambda t, kk=kk, p=p: t.reshape(o * i, p * kk), tag="g")
            else:
                put(high.weight_name, name, a.T @ HWQ.reshape(n, o * p),  # (j, r s)
                    lambda t, p=p: t.reshape(i, o, p).permute(1, 0, 2).reshape(o * i, p),
                    tag="H")
                put(high.weight_name, name, g.T @ Q.reshape(n, i * p),    # (r, j s)
                    lambda t, p=p: t.reshape(o * i, p), tag="g")
        if high.bias_name:
            put(high.bias_name, name, HWQ.sum(0) if outer is None else
                (HWQ.reshape(n, o * p).T @ outer).reshape(o, -1))


def map_blocks(form: _Softmax | _Standardise, a: torch.Tensor, g: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A softmax's or a standardisation's per-sample Jacobian ``A`` ``(n, d, d)`` over the
    features of ``a`` ``(n, d)`` and the second-order term ``M = d(A^T g)/da`` ``(n, d,
    d)`` of its backward rule at the gradient ``g`` ``(n, d)`` at its output, as matrices
    (NOTE [softmax and standardisation] in ``chain_products.py``; ``A`` is symmetric).
    ``<.>`` a mean over the features (a sum for the softmax), ``m = <y g>``:

    * softmax: ``A = diag(y) - y y^T``, ``M = (diag(g - m) - y g^T) A``;
    * standardisation: ``A = r (I - 1 1^T / d - y y^T / d)`` (no ``1 1^T`` term for an
      RMS normalisation), ``M = -r (A g y^T / d + m A + y g^T A / d)``.
    """
    d = a.shape[1]
    eye = torch.eye(d, dtype=a.dtype, device=a.device)
    if isinstance(form, _Softmax):
        y = torch.softmax(a, dim=1)
        A = torch.diag_embed(y) - y[:, :, None] * y[:, None, :]
        m = (y * g).sum(1, keepdim=True)
        return A, (torch.diag_embed(g - m) - y[:, :, None] * g[:, None, :]) @ A
    y, r = standardised(form, a)  # form.dims == (1,): r is (n, 1)
    r = r[:, :, None]
    A = r * (eye - y[:, :, None] * y[:, None, :] / d - (1.0 / d if form.centred else 0.0))
    w = (A @ g[:, :, None])[:, :, 0]  # A g = A^T g
    m = (y * g).mean(1)[:, None, None]
    M = -r * (w[:, :, None] * y[:, None, :] / d + m * A + y[:, :, None] * w[:, None, :] / d)
    return A, M


def standardised(form: _Standardise, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, r)`` of a standardisation of ``a`` over ``form.dims``: ``r = (var + eps)^(-1/2)``
    (``(<a^2> + eps)^(-1/2)`` for an RMS normalisation), kept on those axes, and
    ``y = (a - <a>) r`` (``a r``)."""
    if form.centred:
        var, mean = torch.var_mean(a, dim=form.dims, correction=0, keepdim=True)
        centred = a - mean
    else:
        var, centred = (a * a).mean(dim=form.dims, keepdim=True), a
    r = (var + form.eps).rsqrt()
    return centred * r, r


def elementwise_derivatives(phi: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor] | str:
    """``phi'(z)`` and ``phi''(z)`` of an elementwise ``phi`` by two backward passes (a
    diagonal Jacobian: the gradient of ``sum(phi(z))`` is ``phi'(z)``, that of
    ``sum(phi'(z))`` is ``phi''(z)``), or the name of the op torch has no derivative of
    ``phi'`` for."""
    t = z.detach().requires_grad_(True)
    with torch.enable_grad():
        out = phi(t)
        if not out.requires_grad:  # constant
            return torch.zeros_like(t), torch.zeros_like(t)
        (phi1,) = torch.autograd.grad(out.sum(), t, create_graph=True)
        phi2 = None
        if phi1.requires_grad:
            try:
                (phi2,) = torch.autograd.grad(phi1.sum(), t, allow_unused=True)
            except (RuntimeError, NotImplementedError) as exc:
                op = missing_derivative(exc)
                if op is None:
                    raise
                return op
    return phi1.detach(), (torch.zeros_like(t) if phi2 is None else phi2.detach())


def output_blocks(o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``H[n] = d g_n / d o_n`` ``(N, C, C)`` from the loss's gradient ``g`` ``(N, C)``
    with its graph: the per-sample blocks of the output Hessian, which is all of it when
    the loss is a sum over samples (the caller knows; ``C`` backward passes of unit
    columns at every sample at once). Keeps ``g``'s graph."""
    N, C = o.shape
    if not g.requires_grad:  # loss linear in the output
        return torch.zeros(N, C, C, dtype=o.dtype, device=o.device)
    with torch.enable_grad():
        eye = torch.eye(C, dtype=o.dtype, device=o.device)
        basis = eye[:, None, :].expand(C, N, C)
        if C <= _thresholds.PLAIN_COLUMNS:  # a few plain passes beat one batched (vmap) pass
            cols = torch.stack([torch.autograd.grad(g, o, grad_outputs=b, retain_graph=True)[0]
                                for b in basis])
        else:
            (cols,) = torch.autograd.grad(g, o, grad_outputs=basis, retain_graph=True,
                                          is_grads_batched=True)
    return cols.permute(1, 2, 0).contiguous().detach()    # H[n, i, c]
