"""Hessian-vector products on a verified chain, by Pearlmutter's R-operator.

NOTE [structured products]: on a chain found by :func:`hessfunc._chain.analyze`
(NOTE [structured route]) the product ``H v`` needs no autograd graph at all.
Write ``R{.}`` for the directional derivative along ``v = (dW_l, db_l)_l``. With
the activations ``a``, the derivatives ``phi'``/``phi''`` of every activation, the
gradients ``g`` at every layer output and the per-sample output Hessians
``H_o[n]`` cached once at the point, one product is

* forward, from ``R{a_0} = 0`` (the inputs are data):
  ``R{z} = R{a} W^T + a dW^T + db`` through a Linear layer and
  ``R{a'} = phi'(z) * R{z}`` through an activation;
* at the output: ``R{g_o}[n] = H_o[n] R{o}[n]``;
* backward: through an activation ``R{g_z} = phi'(z) * R{g_a'} + phi''(z) g_a' * R{z}``;
  through a Linear layer ``(H v)_W = R{g_z}^T a + g_z^T R{a}``, ``(H v)_b = sum_n R{g_z}``
  and ``R{g_a} = R{g_z} W + g_z dW``.

That is the exact product (the second term of each backward rule is the curvature
of the layer itself, the first the curvature propagated from above), in a handful
of dense matrix products per layer with no graph bookkeeping, and ``k`` tangents
at once are the same products with a leading ``k`` axis. Measured 0.5-0.9x the
time of one backward pass through a cached gradient graph (``hvp_fn`` before this
route), see docs/benchmarks.md. The tests compare it with the loop oracle to 1e-10
in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from ._chain import ChainPlan, _Elementwise, _Linear
from ._memory import CHUNK_BUDGET_BYTES, itemsize

__all__ = ["ChainProducts"]


class ChainProducts:
    """``V -> H V`` for a chain plan, with everything but the tangents cached.

    Attributes:
        gradient: ``{name: tensor}``, the gradient at the point.
    """

    def __init__(self, plan: ChainPlan):
        self._steps = plan.steps[plan.first:]   # below the first trainable layer R{a} = 0
        self._out_hessian = plan.out_hessian    # (N, C, C), or None: the loss graph
        self._loss_graph = plan.loss_graph
        self._out_diagonal = None
        if plan.out_hessian is not None:
            diagonal = plan.out_hessian.diagonal(dim1=1, dim2=2)
            if torch.equal(torch.diag_embed(diagonal), plan.out_hessian):
                self._out_diagonal = diagonal.clone()
        grads: list[torch.Tensor] = [plan.out_grad] * len(self._steps)
        g = plan.out_grad
        for i in range(len(self._steps) - 1, 0, -1):
            grads[i] = g
            step = self._steps[i]
            g = g @ step.weight if isinstance(step, _Linear) else step.phi1 * g
        grads[0] = g
        self._grads = grads                     # gradient at each step's output (N, d)
        # curvature of each activation: phi''(z) * (gradient at its output)
        self._curvature = [s.phi2 * grads[i] if isinstance(s, _Elementwise) else None
                           for i, s in enumerate(self._steps)]
        self._names = list(plan.params)
        self._params_dim = {name: p.dim() for name, p in plan.params.items()}
        self._gradient: dict[str, torch.Tensor] | None = None

    @property
    def gradient(self) -> dict[str, torch.Tensor]:
        """The gradient at the point (computed on first use: products do not need it)."""
        if self._gradient is None:
            gradient: dict[str, torch.Tensor] = {}
            for i, step in enumerate(self._steps):
                if isinstance(step, _Linear):
                    if step.weight_name:
                        gradient[step.weight_name] = self._grads[i].T @ step.inputs
                    if step.bias_name:
                        gradient[step.bias_name] = self._grads[i].sum(0)
            self._gradient = {name: gradient[name] for name in self._names}
        return self._gradient

    @staticmethod
    def applies(plan: ChainPlan) -> bool:
        """Whether the cached per-sample output Hessians are small enough to keep."""
        H = plan.out_hessian
        return H is None or H.numel() * itemsize(H.dtype) <= CHUNK_BUDGET_BYTES

    def input_layer(self) -> tuple[str, torch.Tensor] | None:
        """``(weight name, inputs (N, d_in))`` of the first trainable layer, whose inputs do
        not depend on the parameters; None when its weight is frozen."""
        first = self._steps[0]
        return (first.weight_name, first.inputs) if first.weight_name else None

    def restricted(self, basis: torch.Tensor) -> ChainProducts:
        """The same products on the first layer's weights restricted to ``W U``.

        ``basis`` is ``U`` ``(d_in, r)`` with orthonormal columns spanning (at least) the
        rows of the first layer's inputs ``a``. The weight enters the loss only through
        ``a W^T = (a U)(W U)^T``, so with ``B: W -> W U`` (other parameters unchanged),
        ``H = B^T H_r B``: this returns ``H_r``, whose tangent and product for that weight
        have shape ``(d_out, r)`` (NOTE [data span] in ``hessfunc.operator``).
        """
        out = copy.copy(self)
        first = copy.copy(self._steps[0])
        first.inputs = first.inputs @ basis
        out._steps = [first, *self._steps[1:]]
        return out

    def __call__(self, tangents: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``H v`` for tangents ``{name: shape}``, or ``H V`` for ``{name: (k, *shape)}``
        (all with or all without the leading ``k``); the result has the same layout.

        One tangent runs on ``(N, d)`` directional derivatives; ``k`` tangents on
        sample-major ``(N, k, d)`` ones, so that every sum over samples or features
        is one GEMM for all ``k`` at once.
        """
        first = next(iter(tangents))
        k = (tangents[first].shape[0]
             if tangents[first].dim() == self._params_dim[first] + 1 else None)
        per = (lambda t: t) if k is None else (lambda t: t.unsqueeze(1))  # (N, d) factors
        steps = self._steps
        below: list[torch.Tensor | None] = [None] * len(steps)   # R{input} of each step
        r: torch.Tensor | None = None
        for i, step in enumerate(steps):
            below[i] = r
            if isinstance(step, _Elementwise):
                r = None if r is None else per(step.phi1) * r
                continue
            z = None if r is None else r @ step.weight.T
            if step.weight_name:
                t = _input_times(step.inputs, tangents[step.weight_name], k)
                z = t if z is None else z.add_(t)
            if step.bias_name:
                db = tangents[step.bias_name]
                shape = (step.inputs.shape[0], *db.shape)
                z = db.expand(shape) if z is None else z.add_(db)
            r = z
        if r is None:  # no trainable parameter reaches the output
            return {name: torch.zeros_like(t) for name, t in tangents.items()}
        rg = self._output_product(r, k)               # R{g_o}[n] = H_o[n] R{o}[n]
        out: dict[str, torch.Tensor] = {}
        for i in range(len(steps) - 1, -1, -1):
            step = steps[i]
            if isinstance(step, _Elementwise):
                rg = per(step.phi1) * rg
                if below[i] is not None:
                    rg.addcmul_(per(self._curvature[i]), below[i])
                continue
            g = self._grads[i]
            if step.weight_name:  # R{g_z}^T a + g_z^T R{a}, summed over samples
                hv = _sample_sum(rg, step.inputs, k)
                if below[i] is not None:
                    hv.add_(_sample_sum(g, below[i], k, batched_right=True))
                out[step.weight_name] = hv
            if step.bias_name:
                out[step.bias_name] = rg.sum(0)
            if i == 0:
                break
            rg = rg @ step.weight
            if step.weight_name:  # + g_z dW
                rg.add_(_grad_times(g, tangents[step.weight_name], k))
        return {name: out[name] for name in tangents}


    def _output_product(self, r: torch.Tensor, k: int | None) -> torch.Tensor:
        """The output Hessian applied to ``R{o}``: ``(N, C)``, or ``(N, k, C)``."""
        if self._loss_graph is not None:  # one backward through the loss per tangent
            o, g = self._loss_graph
            if not g.requires_grad:           # the loss is linear in the output
                return torch.zeros_like(r)
            columns = [r] if k is None else list(r.unbind(1))
            with torch.enable_grad():
                products = [torch.autograd.grad(g, o, grad_outputs=c, retain_graph=True,
                                                allow_unused=True)[0] for c in columns]
            products = [torch.zeros_like(r if k is None else r[:, 0]) if p is None else p
                        for p in products]
            return products[0] if k is None else torch.stack(products, dim=1)
        per = (lambda t: t) if k is None else (lambda t: t.unsqueeze(1))
        if self._out_diagonal is not None:   # e.g. MSE: H_o[n] is diagonal
            return per(self._out_diagonal) * r
        if k is None:
            return torch.bmm(self._out_hessian, r.unsqueeze(-1)).squeeze(-1)
        return torch.bmm(r, self._out_hessian.mT)


def _input_times(a: torch.Tensor, dW: torch.Tensor, k: int | None) -> torch.Tensor:
    """``a dW^T``: ``(N, out)``, or ``(N, k, out)`` for ``dW`` of shape ``(k, out, in)``."""
    if k is None:
        return a @ dW.T
    d_out = dW.shape[1]
    return (a @ dW.reshape(k * d_out, -1).T).view(a.shape[0], k, d_out)


def _grad_times(g: torch.Tensor, dW: torch.Tensor, k: int | None) -> torch.Tensor:
    """``g dW``: ``(N, in)``, or ``(N, k, in)`` for ``dW`` of shape ``(k, out, in)``."""
    if k is None:
        return g @ dW
    d_out, d_in = dW.shape[1:]
    return (g @ dW.transpose(0, 1).reshape(d_out, k * d_in)).view(g.shape[0], k, d_in)


def _sample_sum(left: torch.Tensor, right: torch.Tensor, k: int | None, *,
                batched_right: bool = False) -> torch.Tensor:
    """``sum_n left[n]^T right[n]`` per tangent: ``(out, in)``, or ``(k, out, in)`` where the
    batched factor (``left``, or ``right`` with ``batched_right``) is ``(N, k, d)``."""
    if k is None:
        return left.T @ right
    n = left.shape[0]
    if batched_right:   # (N, out)^T @ (N, k, in)
        d_out, d_in = left.shape[1], right.shape[2]
        return (left.T @ right.reshape(n, k * d_in)).view(d_out, k, d_in).transpose(0, 1)
    d_out, d_in = left.shape[2], right.shape[1]   # (N, k, out)^T @ (N, in)
    return (left.reshape(n, k * d_out).T @ right).view(k, d_out, d_in)
