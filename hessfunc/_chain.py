"""Exact Hessian diagonals and blocks by per-sample Hessian backpropagation.

NOTE [structured route]: when ``f`` was made by :func:`hessfunc.functionalize`
and the model's forward pass is a chain ``a_0 = x -> m_1 -> ... -> m_K -> o`` of
``nn.Linear`` layers on ``(N, features)`` inputs and elementwise activations,
and the loss is a sum of per-sample terms (``mean`` and ``sum`` reductions of
MSE, cross-entropy, ...), the Hessian of the loss with respect to every
per-sample activation ``a_k[n]`` can be propagated backward exactly, one small
``(d_k, d_k)`` matrix per sample (Dangel, Harmeling, Hennig 2020, "Modular
block-diagonal curvature approximations for feedforward architectures"):

* at the output, ``H_K[n] = d^2 L / d o_n^2`` (``C`` batched double-backward
  columns of the loss alone; samples do not interact);
* through ``a' = a W^T + b``: ``H[n] = W^T H'[n] W`` and ``g[n] = g'[n] W``;
* through an elementwise ``a' = phi(a)``:
  ``H[n] = diag(phi'(a_n)) H'[n] diag(phi'(a_n)) + diag(phi''(a_n) * g'[n])``.

For the Linear layer with input ``a`` and output Hessians ``H'``:
``d^2 L / dW_ij^2 = sum_n a_nj^2 H'[n]_ii`` and ``d^2 L / db_i^2 = sum_n H'[n]_ii``;
its own block is ``d^2 L / dW_ij dW_kl = sum_n H'[n]_ik a_nj a_nl``.
This costs a few small per-sample matrix products instead of one Hessian-vector
product per weight.

NOTE [full Hessian]: the cross block of a Linear layer ``l`` with the parameters
``theta_m`` of a lower Linear layer ``m`` is, per sample,
``(d a_l/d theta_l)^T H_l W_l Q + [d^2 a_l / d W_l d theta_m] g_l`` with
``Q = d a_{l-1} / d theta_m`` pushed forward from layer ``m`` (``Q <- W Q`` through a
Linear layer, ``Q <- phi'(z) Q`` through an activation) and the bilinear term
``d^2 (W a)_i / dW_ij d theta = d a_j / d theta``: for ``W_l[i, j]`` and a column ``p``
of ``theta_m``, ``sum_n a_{l-1}[n, j] (H_l W_l Q)[n, i, p] + g_l[n, i] Q[n, j, p]``.
Curvature above layer ``l`` is all in ``H_l``; activations between ``m`` and ``l``
do not depend on ``theta_l``, so there is no other term.

Both are exact, not approximations: the tests compare them with the loop oracle
to 1e-10 in float64.

The route is taken only when it is provably exact for the call; every condition
is checked, and anything else (other layers, branching, residuals, tied weights,
in-place edits, inputs that are not one 2-D tensor, a loss that couples samples,
a call inside a torch.func transform) falls back to the generic one-hot route.
(Hessian-vector products, NOTE [structured products], also take convolutions and
``Flatten``, and so inputs with more dimensions, but not a Linear layer on them.)
The coupling of samples is detected with one random probe: the loss's output
Hessian applied to a Gaussian ``R`` must equal the per-sample blocks applied to
``R``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.func
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from ._autodiff import missing_derivative, use_autograd
from ._memory import CHUNK_BUDGET_BYTES, itemsize
from .functional import FunctionalModel, _report_non_finite

__all__ = ["plan", "analyze", "ChainPlan"]

#: Modules applied elementwise (exact types: a subclass may override ``forward``).
ELEMENTWISE = (
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.GELU, nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.ReLU,
    nn.LeakyReLU, nn.Mish, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.ReLU6,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
)
#: Modules that are the identity in eval mode.
IDENTITY_IN_EVAL = (nn.Dropout, nn.AlphaDropout)
#: Modules with rules for Hessian-vector products only (NOTE [structured products]).
PRODUCTS_ONLY = (nn.Conv1d, nn.Conv2d, nn.Flatten)


@dataclass
class _Linear:
    weight: torch.Tensor
    bias: torch.Tensor | None
    inputs: torch.Tensor          # (N, in)
    weight_name: str | None       # name in params when trainable
    bias_name: str | None


@dataclass
class _Conv:
    """``nn.Conv1d``/``nn.Conv2d`` (``groups=1``, zero padding): affine in its parameters
    like a Linear layer; only Hessian-vector products have rules for it."""
    weight: torch.Tensor
    bias: torch.Tensor | None
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


class ChainPlan:
    """A verified chain and its output Hessians, ready for the backward propagation."""

    def __init__(self, steps: list[Any], out_hessian: torch.Tensor | None,
                 out_grad: torch.Tensor, params: dict[str, torch.Tensor],
                 per_sample: bool = False, output: torch.Tensor | None = None,
                 loss_graph: tuple[torch.Tensor, torch.Tensor] | None = None,
                 value: torch.Tensor | None = None):
        self.per_sample = per_sample
        self.value = value                # the loss at the point, where already known
        self.output = output              # (N, C) model output, detached
        self.loss_graph = loss_graph      # (o, dL/do with its graph), when out_hessian is None
        self.steps = steps
        self.out_hessian = out_hessian    # (N, C, C), or None with a loss graph
        self.out_grad = out_grad          # (N, C)
        self.params = params
        trainable = [i for i, s in enumerate(steps)
                     if isinstance(s, (_Linear, _Conv)) and (s.weight_name or s.bias_name)]
        self.first = trainable[0]

    def _propagate(self, on_linear: Callable[[_Linear, torch.Tensor, torch.Tensor, slice], None],
                   chunk_size: int | None, per_sample_bytes: int) -> None:
        """Backward over sample chunks; ``on_linear(step, H, g, rows)`` at every Linear, top
        down, with ``H`` the per-sample Hessians and ``g`` the gradients at its output."""
        N = self.out_hessian.shape[0]
        chunk = chunk_size or max(1, CHUNK_BUDGET_BYTES // max(1, per_sample_bytes))
        for lo in range(0, N, chunk):
            rows = slice(lo, min(lo + chunk, N))
            H, g = self.out_hessian[rows].clone(), self.out_grad[rows]  # H is updated in place
            for i in range(len(self.steps) - 1, self.first - 1, -1):
                step = self.steps[i]
                if isinstance(step, _Linear):
                    on_linear(step, H, g, rows)
                    if i == self.first:
                        break
                    H = step.weight.T @ H @ step.weight
                    g = g @ step.weight
                else:
                    p1, p2 = step.phi1[rows], step.phi2[rows]
                    H.mul_(p1[:, :, None]).mul_(p1[:, None, :])
                    H.diagonal(dim1=1, dim2=2).add_(p2 * g)
                    g = p1 * g

    def per_sample_blocks(self) -> bool:
        """Whether the plan serves the per-sample backward propagation (diagonal, blocks,
        full Hessian): Linear layers and activations only, per-sample output Hessians."""
        return self.out_hessian is not None and all(
            isinstance(s, (_Linear, _Elementwise)) for s in self.steps)

    def _widest(self) -> int:
        return max([self.out_hessian.shape[-1]]
                   + [s.weight.shape[1] for s in self.steps if isinstance(s, _Linear)])

    def diagonal(self, chunk_size: int | None = None) -> dict[str, torch.Tensor]:
        """The exact Hessian diagonal, structured like ``params`` (per sample: a leading
        ``N`` axis, sample ``n`` holding the diagonal of its own loss's Hessian)."""
        N = self.out_hessian.shape[0]
        if self.per_sample:
            out = {k: v.new_zeros((N, *v.shape)) for k, v in self.params.items()}
        else:
            out = {k: torch.zeros_like(v) for k, v in self.params.items()}

        def on_linear(step: _Linear, H: torch.Tensor, g: torch.Tensor, rows: slice) -> None:
            hd = H.diagonal(dim1=1, dim2=2)                      # (n, out)
            a = step.inputs[rows]
            if self.per_sample:
                if step.weight_name:
                    out[step.weight_name][rows] = hd[:, :, None] * (a * a)[:, None, :]
                if step.bias_name:
                    out[step.bias_name][rows] = hd
                return
            if step.weight_name:
                out[step.weight_name] += hd.T @ (a * a)
            if step.bias_name:
                out[step.bias_name] += hd.sum(0)

        d = self._widest()
        self._propagate(on_linear, chunk_size, 4 * d * d * itemsize(self.out_hessian.dtype))
        return out

    def blocks(self, chunk_size: int | None = None) -> dict[str, torch.Tensor]:
        """Each parameter's own ``(numel, numel)`` Hessian block."""
        out = {k: torch.zeros(v.numel(), v.numel(), dtype=v.dtype, device=v.device)
               for k, v in self.params.items()}

        def on_linear(step: _Linear, H: torch.Tensor, g: torch.Tensor, rows: slice) -> None:
            n, o = H.shape[0], H.shape[1]
            if step.weight_name:
                a = step.inputs[rows]
                i = a.shape[1]
                aa = (a[:, :, None] * a[:, None, :]).reshape(n, i * i)
                M = H.reshape(n, o * o).T @ aa                 # (o*o, i*i): [(i,k),(j,l)]
                M = M.reshape(o, o, i, i).permute(0, 2, 1, 3).reshape(o * i, o * i)
                out[step.weight_name] += M
            if step.bias_name:
                out[step.bias_name] += H.sum(0)

        d = self._widest()
        self._propagate(on_linear, chunk_size, 6 * d * d * itemsize(self.out_hessian.dtype))
        return out


    def full(self, chunk_size: int | None = None) -> torch.Tensor:
        """The full ``(P, P)`` Hessian, parameters in ``params`` order (NOTE [full Hessian])."""
        names = list(self.params)
        sizes = [self.params[k].numel() for k in names]
        starts = dict(zip(names, itertools.accumulate([0] + sizes[:-1]), strict=True))
        span = {k: slice(starts[k], starts[k] + self.params[k].numel()) for k in names}
        P = sum(sizes)
        ref = self.out_hessian
        chunk_store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        index = {id(s): i for i, s in enumerate(self.steps)}
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

        def on_linear(step: _Linear, H: torch.Tensor, g: torch.Tensor, rows: slice) -> None:
            chunk_store[index[id(step)]] = (H, g)
            if index[id(step)] == self.first:  # the last callback of this chunk
                self._full_chunk(chunk_store, rows, put)
                chunk_store.clear()

        d = self._widest()
        self._propagate(on_linear, chunk_size, 3 * d * d * d * itemsize(ref.dtype))
        M = torch.zeros(P, P, dtype=ref.dtype, device=ref.device)
        for (a, b, _), (raw, finish) in acc.items():
            block = raw if finish is None else finish(raw)
            M[span[a], span[b]] += block
            if a != b:
                M[span[b], span[a]] += block.T
        return M

    def _full_chunk(self, store: dict[int, tuple[torch.Tensor, torch.Tensor]], rows: slice,
                    put: Callable[..., None]) -> None:
        """Add one sample chunk's contribution to every block of the full Hessian."""
        for m, low in enumerate(self.steps):
            if not (isinstance(low, _Linear) and (low.weight_name or low.bias_name)):
                continue
            H, _ = store[m]
            a = low.inputs[rows]
            n, o, i = H.shape[0], H.shape[1], a.shape[1]
            # own block: Q^T H Q with Q = d a_m / d theta_m (structured, never formed)
            if low.weight_name:
                ww = (H.reshape(n, o * o).T @ (a[:, :, None] * a[:, None, :]).reshape(n, i * i))
                put(low.weight_name, low.weight_name, ww,
                    lambda t, o=o, i=i: t.reshape(o, o, i, i).permute(0, 2, 1, 3).reshape(
                        o * i, o * i))
            if low.bias_name:
                put(low.bias_name, low.bias_name, H.sum(0))
            if low.weight_name and low.bias_name:
                put(low.weight_name, low.bias_name,
                    torch.einsum("nik,nj->ijk", H, a).reshape(o * i, o))
            # cross blocks with every Linear above: forward-propagate the per-sample
            # Jacobian J = d a_k / d z_m (z_m = a_m, this layer's output); then
            # d a_{l-1} / d W_m[i', k] = J[:, i'] a_{m-1}[k] and d / d b_m[i'] = J[:, i']
            J = torch.eye(o, dtype=a.dtype, device=a.device).expand(n, o, o)
            for k in range(m + 1, len(self.steps)):
                step = self.steps[k]
                if isinstance(step, _Elementwise):
                    J = step.phi1[rows][:, :, None] * J
                    continue
                if step.weight_name or step.bias_name:
                    Hk, gk = store[k]
                    self._cross_blocks(step, Hk, gk, step.inputs[rows], low, J, a, put)
                J = step.weight @ J

    @staticmethod
    def _cross_blocks(high: _Linear, H: torch.Tensor, g: torch.Tensor, a_high: torch.Tensor,
                      low: _Linear, J: torch.Tensor, a_low: torch.Tensor,
                      put: Callable[..., None]) -> None:
        """Blocks of ``high``'s parameters against ``low``'s (NOTE [full Hessian]).

        ``H``, ``g``: per-sample Hessian and gradient at ``high``'s output ``(n, o)``;
        ``a_high``: its input ``(n, i)``; ``J = d a_high / d z_low`` ``(n, i, p)``;
        ``a_low``: ``low``'s input ``(n, k)``. Every sum over samples is one matmul.
        """
        n, o = g.shape
        i, p, kk = a_high.shape[1], J.shape[2], a_low.shape[1]
        HWJ = H @ (high.weight @ J)                                   # (n, o, p)
        if high.weight_name:
            # sum_n a_high[n, j] HWJ[n, r, s] (x)[n, k] + g[n, r] J[n, j, s] (x)[n, k]
            if low.weight_name:
                t1 = ((a_high[:, :, None] * a_low[:, None, :]).reshape(n, i * kk).T
                      @ HWJ.reshape(n, o * p))                        # (j k, r s)
                put(high.weight_name, low.weight_name, t1,
                    lambda t: t.reshape(i, kk, o, p).permute(2, 0, 3, 1).reshape(o * i, p * kk),
                    tag="H")
                t2 = g.T @ (J[:, :, :, None] * a_low[:, None, None, :]).reshape(n, i * p * kk)
                put(high.weight_name, low.weight_name, t2,          # (r, j s k)
                    lambda t: t.reshape(o * i, p * kk), tag="g")
            if low.bias_name:
                t1 = a_high.T @ HWJ.reshape(n, o * p)                 # (j, r s)
                put(high.weight_name, low.bias_name, t1,
                    lambda t: t.reshape(i, o, p).permute(1, 0, 2).reshape(o * i, p), tag="H")
                t2 = g.T @ J.reshape(n, i * p)                        # (r, j s)
                put(high.weight_name, low.bias_name, t2, lambda t: t.reshape(o * i, p),
                    tag="g")
        if high.bias_name:
            if low.weight_name:
                put(high.bias_name, low.weight_name,
                    (HWJ.reshape(n, o * p).T @ a_low).reshape(o, p * kk))
            if low.bias_name:
                put(high.bias_name, low.bias_name, HWJ.sum(0))


def _tied(module: nn.Module) -> bool:
    seen: set[int] = set()
    for _, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            return True
        seen.add(id(p))
    return False


def _param_names(module: nn.Module) -> dict[nn.Module, dict[str, str]]:
    names: dict[nn.Module, dict[str, str]] = {}
    for mname, m in module.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            names.setdefault(m, {})[pname] = f"{mname}.{pname}" if mname else pname
    return names


def _trace(fm: FunctionalModel, params: dict[str, torch.Tensor], inputs: torch.Tensor
           ) -> tuple[list[tuple[nn.Module, Any, torch.Tensor, int]], torch.Tensor]:
    """Run the forward pass, recording every leaf module call of the private copy."""
    owned = {m for m in fm.module.modules() if next(m.children(), None) is None}
    calls: list[tuple[nn.Module, Any, torch.Tensor, int]] = []

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        if module in owned:
            calls.append((module, args, out, getattr(out, "_version", -1)))

    handle = register_module_forward_hook(hook)
    try:
        with torch.no_grad():
            out = fm.output(params, inputs)
    finally:
        handle.remove()
    return calls, out


def _derivatives(module: nn.Module, z: torch.Tensor, out: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor] | str:
    """``phi'(z)`` and ``phi''(z)`` of an elementwise module with output ``out = phi(z)``.

    Closed forms from the output for tanh (``1 - t^2``, ``-2 t (1 - t^2)``), the
    logistic sigmoid (``s (1 - s)``, ``s (1 - s)(1 - 2 s)``), ReLU (a step and 0,
    as autograd has it) and Hardsigmoid (``1/6`` on the open interval ``(-3, 3)`` and 0
    outside, where autograd has it, and 0: torch has no derivative of its backward, NOTE
    [ops differentiable once] in ``hessfunc/_autodiff.py``; torch 2.13's
    ``hardsigmoid_backward`` multiplies by the float32 rounding of 1/6 even in float64,
    3e-8 off, while this is 1/6 in the working precision); otherwise two backward
    passes: elementwise means a diagonal Jacobian, so the gradient of ``sum(phi(z))`` is
    ``phi'(z)`` and the gradient of ``sum(phi'(z))`` is ``phi''(z)``. (Plain autograd
    rather than ``torch.func.jvp``: forward mode's first use in a process costs about a
    second of one-time set-up.) The name of the op when torch has no derivative of
    ``phi'`` (the structured route then does not apply, and the generic one says why).
    """
    kind = type(module)
    if kind is nn.Tanh:
        phi1 = 1 - out * out
        return phi1, -2 * out * phi1
    if kind is nn.Sigmoid:
        phi1 = out * (1 - out)
        return phi1, phi1 * (1 - 2 * out)
    if kind is nn.ReLU:
        return (z > 0).to(z.dtype), torch.zeros_like(z)
    if kind is nn.Hardsigmoid:
        return ((z > -3) & (z < 3)).to(z.dtype) / 6, torch.zeros_like(z)
    return elementwise_derivatives(module, z)


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


def _loss_graph(loss_fn: Callable[..., Any], out: torch.Tensor, targets: Any
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | str:
    """``(o, dL/do with its graph, dL/do)``: products with the output Hessian by one more
    backward pass, exact for any loss (samples may interact)."""
    o = out.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(o, targets)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            return "the loss is not a scalar"
        if not loss.requires_grad:
            return "the loss does not depend on the model output"
        (g,) = torch.autograd.grad(loss, o, create_graph=True)
    return o, g, g.detach()


#: Output widths up to which the columns of the output Hessian are plain backward passes
#: (measured on CPU: a batched pass costs about as much as three or four plain ones).
_PLAIN_COLUMNS = 2


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
        if C <= _PLAIN_COLUMNS:  # a few plain backward passes beat one batched (vmap) pass
            cols = torch.stack([torch.autograd.grad(g, o, grad_outputs=b, retain_graph=True)[0]
                                for b in basis])
        else:
            (cols,) = torch.autograd.grad(g, o, grad_outputs=basis, retain_graph=True,
                                          is_grads_batched=True)
    return cols.permute(1, 2, 0).contiguous().detach()    # H[n, i, c]


def _output_hessian(loss_fn: Callable[..., Any], out: torch.Tensor, targets: Any
                    ) -> tuple[torch.Tensor, torch.Tensor] | str:
    """Per-sample output Hessians ``(N, C, C)`` and gradients ``(N, C)``, or why not (a
    loss that couples samples, seen by one random probe)."""
    N, C = out.shape
    graph = _loss_graph(loss_fn, out, targets)
    if isinstance(graph, str):
        return graph
    o, g, _ = graph
    H = output_blocks(o, g)
    if not g.requires_grad:
        return H, g.detach()
    with torch.enable_grad():
        gen = torch.Generator(device=o.device).manual_seed(0)
        probe = torch.randn(N, C, generator=gen, dtype=o.dtype, device=o.device)
        (full,) = torch.autograd.grad(g, o, grad_outputs=probe)
    blockwise = torch.einsum("nic,nc->ni", H, probe)
    tol = 1e3 * torch.finfo(o.dtype).eps
    if (full - blockwise).norm() > tol * (full.norm() + blockwise.norm()):
        return "the loss couples samples (its output Hessian is not block diagonal)"
    return H.detach(), g.detach()


def _per_sample_output_hessian(loss_fn: Callable[..., Any], out: torch.Tensor, targets: Any
                               ) -> tuple[torch.Tensor, torch.Tensor] | str:
    """Each sample's own loss ``loss_fn(o_n[None], y_n[None])``: Hessians and gradients."""
    if not isinstance(targets, torch.Tensor) or targets.shape[:1] != out.shape[:1]:
        return "the targets are not one tensor with a row per sample"

    def single(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return loss_fn(o[None], t[None])

    try:
        g = torch.func.vmap(torch.func.grad(single))(out.detach(), targets)
        H = torch.func.vmap(torch.func.jacrev(torch.func.grad(single)))(out.detach(), targets)
    except RuntimeError as exc:
        return f"the loss of one sample could not be differentiated ({str(exc)[:80]})"
    return H.detach(), g.detach()


def _affine(module: nn.Module, names: dict[nn.Module, dict[str, str]],
            params: dict[str, torch.Tensor], covered: set[str]
            ) -> tuple[torch.Tensor, torch.Tensor | None, str | None, str | None]:
    """``(weight, bias, weight name, bias name)`` of a Linear layer or convolution: the
    trainable ones from ``params`` (their names added to ``covered``), the frozen ones
    from the module."""
    own = names.get(module, {})
    wname = own.get("weight") if own.get("weight") in params else None
    bname = own.get("bias") if own.get("bias") in params else None
    covered.update(n for n in (wname, bname) if n)
    W = params[wname] if wname else module.weight.detach()
    b = None if module.bias is None else (params[bname] if bname else module.bias.detach())
    return W, b, wname, bname


def _static_structure(f: FunctionalModel, products: bool
                      ) -> tuple[str | None, dict[nn.Module, dict[str, str]]]:
    """Why the private model cannot be a chain (or None), and its parameter names.

    Computed once per ``f``: the private copy's modules and parameters do not change.
    """
    cached = f.__dict__.get("_chain_structure")
    if cached is None:
        reason = reason_products = None
        if _tied(f.module):
            reason = reason_products = "the model ties weights"
        else:
            for m in f.module.modules():
                kind = type(m)
                if next(m.children(), None) is not None or kind is nn.Linear \
                        or kind in ELEMENTWISE or kind in IDENTITY_IN_EVAL:
                    continue
                reason = reason or f"layer {kind.__name__} has no per-sample rule"
                if kind not in PRODUCTS_ONLY:
                    reason_products = f"layer {kind.__name__} has no rule"
                    break
        cached = f.__dict__["_chain_structure"] = (reason, reason_products,
                                                   _param_names(f.module))
    return cached[1 if products else 0], cached[2]


def analyze(f: Any, args: tuple[Any, ...], argnums: int, *, per_sample: bool = False,
            output: str = "hessian", products_only: bool = False
            ) -> tuple[ChainPlan | None, str]:
    """A :class:`ChainPlan` for this call, or ``(None, reason)`` when the route does not apply.

    With ``per_sample`` the plan gives each sample's own loss Hessian diagonal, the loss of
    a one-sample batch ``loss_fn(model(x[n:n+1]), y[n:n+1])``. With ``output="graph"`` the
    plan holds the loss's gradient graph instead of per-sample output Hessians (enough
    for Hessian-vector products, and exact for a loss that couples samples too). With
    ``products_only`` (implied by ``output="graph"``) the chain may also hold layers that
    only :class:`hessfunc._chain_products.ChainProducts` has rules for (convolutions,
    flattening); the plan is then for products only.
    """
    if not isinstance(f, FunctionalModel) or f.loss_fn is None:
        return None, "f was not made by hessfunc.functionalize(model, loss_fn)"
    if argnums != 0 or len(args) != 3:
        return None, "argnums is not 0 or f is not called as f(params, inputs, targets)"
    if not use_autograd(args):
        return None, "called inside a torch.func transform or with inputs that carry a graph"
    params, inputs, targets = args
    products = output == "graph" or products_only
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 or (
            inputs.dim() != 2 and not products):
        return None, "the inputs are not one (N, features) tensor"
    static_reason, names = _static_structure(f, products)
    if static_reason is not None:
        return None, static_reason
    calls, out = _trace(f, params, inputs)
    if not calls or calls[0][1] is None:
        return None, "no module calls recorded"
    steps: list[Any] = []
    prev: torch.Tensor = inputs
    seen: set[int] = set()
    covered: set[str] = set()
    for module, margs, mout, version in calls:
        if id(module) in seen:
            return None, f"module {type(module).__name__} is called twice"
        seen.add(id(module))
        if not (isinstance(margs, tuple) and len(margs) == 1 and margs[0] is prev):
            return None, (f"{type(module).__name__} does not take the previous layer's output "
                          "(not a chain: a skip connection, a branch or a function between "
                          "modules)")
        if not isinstance(mout, torch.Tensor) or mout._version != version:
            return None, f"{type(module).__name__}'s output is not a tensor or was edited in place"
        if module._forward_hooks or module._forward_pre_hooks:
            return None, f"{type(module).__name__} has forward hooks"
        if getattr(module, "inplace", False):
            return None, f"{type(module).__name__} works in place"
        kind = type(module)
        if kind is nn.Linear:
            if prev.dim() != 2:
                return None, "a Linear layer acts on inputs with more than two dimensions"
            W, b, wname, bname = _affine(module, names, params, covered)
            steps.append(_Linear(W, b, prev.detach(), wname, bname))
        elif products and kind in (nn.Conv1d, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(
                    module.padding, str):
                return None, (f"{kind.__name__} with groups > 1, padding given as a string or "
                              "a padding mode other than zeros")
            W, b, wname, bname = _affine(module, names, params, covered)
            steps.append(_Conv(W, b, prev.detach(), wname, bname, tuple(module.stride),
                               tuple(module.padding), tuple(module.dilation)))
        elif products and kind is nn.Flatten:
            if module.start_dim != 1 or module.end_dim != -1:
                return None, "Flatten does not flatten every dimension after the batch"
            steps.append(_Flatten(tuple(prev.shape[1:])))
        elif kind in ELEMENTWISE or (kind in IDENTITY_IN_EVAL and not module.training):
            if names.get(module):
                return None, f"{type(module).__name__} has parameters"
            if kind in IDENTITY_IN_EVAL:
                prev = mout
                continue
            derivatives = _derivatives(module, prev.detach(), mout.detach())
            if isinstance(derivatives, str):
                return None, (f"{type(module).__name__} has no second derivative in torch "
                              f"(no derivative for {derivatives})")
            steps.append(_Elementwise(*derivatives))
        else:
            return None, f"layer {type(module).__name__} has no per-sample rule"
        prev = mout
    if prev is not out or out.dim() != 2 or out.shape[0] != inputs.shape[0]:
        return None, "the model output is not the last layer's (N, C) output"
    if covered != set(params):
        return None, f"parameters {sorted(set(params) - covered)} are outside the Linear chain"
    if f.check_finite:  # as f itself would: the output was checked in f.output
        with torch.no_grad():
            _report_non_finite(params, inputs, f.loss_fn(out, targets), "loss")
    if products_only and out.numel() * out.shape[1] * itemsize(out.dtype) > CHUNK_BUDGET_BYTES:
        output = "graph"  # per-sample output Hessians too large to keep: products via the loss
    if output == "graph":
        graph = _loss_graph(f.loss_fn, out, targets)
        if isinstance(graph, str):
            return None, graph
        return ChainPlan(steps, None, graph[2], params, False, out.detach(), graph[:2]), "ok"
    if per_sample:
        hg = _per_sample_output_hessian(f.loss_fn, out, targets)
    else:
        hg = _output_hessian(f.loss_fn, out, targets)
    if isinstance(hg, str):
        return None, hg
    return ChainPlan(steps, hg[0], hg[1], params, per_sample, out.detach()), "ok"


def plan(f: Any, args: tuple[Any, ...], argnums: int) -> ChainPlan | None:
    """The plan when the structured route applies, else None."""
    return analyze(f, args, argnums)[0]


