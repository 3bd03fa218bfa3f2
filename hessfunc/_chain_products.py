"""Hessian-vector products on a verified chain, by Pearlmutter's R-operator.

NOTE [structured products]: on a chain found by :func:`hessfunc._chain.analyze`
(NOTE [structured route]; for products, convolutions and ``Flatten`` may be links
too) the product ``H v`` needs no autograd graph through the model. Write ``R{.}``
for the directional derivative along ``v = (dW_l, db_l)_l``. With the activations
``a``, the derivatives ``phi'``/``phi''`` of every activation and the gradients
``g`` at every layer output cached once at the point, one product is

* forward, from ``R{a_0} = 0`` (the inputs are data):
  ``R{z} = R{a} W^T + a dW^T + db`` through a Linear layer,
  ``R{z} = conv(R{a}, W) + conv(a, dW) + db`` through a convolution and
  ``R{a'} = phi'(z) * R{z}`` through an activation;
* at the output: ``R{g_o} = H_o R{o}``, with ``H_o`` the loss's Hessian in the
  model output: per-sample blocks ``H_o[n]`` cached once (``hvp_fn``, the
  operator), or one backward pass through the loss's own gradient graph (a single
  ``hvp``: exact even when the loss couples samples);
* backward: through an activation ``R{g_z} = phi'(z) * R{g_a'} + phi''(z) g_a' * R{z}``;
  through a Linear layer ``(H v)_W = R{g_z}^T a + g_z^T R{a}``, ``(H v)_b = sum_n R{g_z}``
  and ``R{g_a} = R{g_z} W + g_z dW``; through a convolution the same with its weight
  and input gradients (transposed convolutions) in place of the matrix products.

That is the exact product (the second term of each backward rule is the curvature
of the layer itself, the first the curvature propagated from above), in a handful
of dense products per layer with no graph bookkeeping, and ``k`` tangents at once
are the same products with a ``k`` axis (sample-major, one GEMM for all of them).
It needs neither the gradient's weight products nor a graph, so even one product
with its set-up costs less than the double backward. Measured
(``python -m benchmarks.bench_hvp``) 0.8-0.9x a gradient per cached product on
the MLPs against 1.1-1.4x through the cached graph, and one ``hvp`` at 0.89-1.0x
the seed's double backward; see docs/benchmarks.md. The tests compare it with the
loop oracle to 1e-10 in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from ._chain import ChainPlan, _Conv, _Elementwise, _Flatten, _Linear

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
            g = _backprop(step, g)
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
                g = self._grads[i]
                if isinstance(step, _Linear):
                    if step.weight_name:
                        gradient[step.weight_name] = g.T @ step.inputs
                    if step.bias_name:
                        gradient[step.bias_name] = g.sum(0)
                elif isinstance(step, _Conv):
                    if step.weight_name:
                        gradient[step.weight_name] = _conv_weight_grad(
                            step, step.inputs, g, step.weight.shape)
                    if step.bias_name:
                        gradient[step.bias_name] = g.sum([0, *range(2, g.dim())])
            self._gradient = {name: gradient[name] for name in self._names}
        return self._gradient

    def input_layer(self) -> tuple[str, torch.Tensor] | None:
        """``(weight name, inputs (N, d_in))`` of the first trainable layer, whose inputs do
        not depend on the parameters; None when its weight is frozen."""
        first = self._steps[0]
        if isinstance(first, _Linear) and first.weight_name:
            return first.weight_name, first.inputs
        return None

    def restricted(self, inputs: torch.Tensor) -> ChainProducts:
        """The same products on the first layer's weights restricted to ``W U``.

        ``U`` ``(d_in, r)`` has orthonormal columns spanning (at least) the rows of the
        first layer's inputs ``a``, and ``inputs`` is ``a U`` ``(N, r)``. The weight
        enters the loss only through ``a W^T = (a U)(W U)^T``, so with ``B: W -> W U``
        (other parameters unchanged), ``H = B^T H_r B``: this returns ``H_r``, whose
        tangent and product for that weight have shape ``(d_out, r)`` (NOTE [data span]
        in ``hessfunc.operator``).
        """
        out = copy.copy(self)
        first = copy.copy(self._steps[0])
        first.inputs = inputs
        out._steps = [first, *self._steps[1:]]
        out._gradient = None  # in the restricted coordinates, if asked for
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
            if isinstance(step, _Flatten):
                r = None if r is None else r.flatten(1 if k is None else 2)
                continue
            if isinstance(step, _Conv):
                r = self._conv_forward(i, step, r, tangents, k)
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
            if isinstance(step, _Flatten):
                rg = rg.reshape(*rg.shape[:1 if k is None else 2], *step.shape)
                continue
            if isinstance(step, _Conv):
                rg = self._conv_backward(i, step, rg, below[i], tangents, out, k)
                if i == 0:
                    break
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

    def _conv_forward(self, i: int, step: _Conv, r: torch.Tensor | None,
                      tangents: Mapping[str, torch.Tensor], k: int | None
                      ) -> torch.Tensor | None:
        """``R{z} = conv(R{a}, W) + conv(a, dW) + db`` (NOTE [structured products])."""
        conv = _CONV[step.weight.dim()][0]
        kw = dict(stride=step.stride, padding=step.padding, dilation=step.dilation)
        n, out_shape = step.inputs.shape[0], self._grads[i].shape[1:]
        z = None
        merged = k is None and r is not None and step.weight_name is not None
        if merged:  # one convolution over both parts' channels
            z = conv(torch.cat([r, step.inputs], dim=1),
                     torch.cat([step.weight, tangents[step.weight_name]], dim=1), **kw)
        elif r is not None:
            z = conv(r if k is None else r.flatten(0, 1), step.weight, **kw)
            z = z if k is None else z.view(n, k, *out_shape)
        if step.weight_name and not merged:
            dW = tangents[step.weight_name]
            t = conv(step.inputs, dW if k is None else dW.flatten(0, 1), **kw)
            t = t if k is None else t.view(n, k, *out_shape)
            z = t if z is None else z.add_(t)
        if step.bias_name:
            db = tangents[step.bias_name]
            db = db.view(*db.shape, *[1] * (len(out_shape) - 1))
            full = (n, *out_shape) if k is None else (n, k, *out_shape)
            z = db.expand(full) if z is None else z.add_(db)
        return z

    def _conv_backward(self, i: int, step: _Conv, rg: torch.Tensor, below: torch.Tensor | None,
                       tangents: Mapping[str, torch.Tensor], out: dict[str, torch.Tensor],
                       k: int | None) -> torch.Tensor:
        """Weight and bias products at a convolution, and ``R{g_a}`` below it:
        the transposes of the forward rule, as for a Linear layer."""
        g, a = self._grads[i], step.inputs
        n, c_out, c_in = a.shape[0], *step.weight.shape[:2]
        kernel = step.weight.shape[2:]
        if k is None:
            dW = tangents[step.weight_name] if step.weight_name else None
            if dW is not None:  # sum_n R{g_z} * a + g_z * R{a}, as weight gradients
                hv = _conv_weight_grad(step, a, rg, step.weight.shape)
                if below is not None:
                    hv.add_(_conv_weight_grad(step, below, g, step.weight.shape))
                out[step.weight_name] = hv
            if step.bias_name:
                out[step.bias_name] = rg.sum([0, *range(2, rg.dim())])
            if i == 0:
                return rg
            below_grad = _conv_input_grad(step, rg, step.weight, a.shape)
            if dW is not None:
                below_grad.add_(_conv_input_grad(step, g, dW, a.shape))
            return below_grad
        if step.weight_name:  # sum_n R{g_z} * a + g_z * R{a}, as weight gradients
            hv = _conv_weight_grad(step, a, rg.flatten(1, 2),
                                   (k * c_out, c_in, *kernel)).view(k, c_out, c_in, *kernel)
            if below is not None:  # the k tangents as k blocks of input channels
                hv.add_(_conv_weight_grad(step, below.flatten(1, 2), g,
                                          (c_out, k * c_in, *kernel))
                        .view(c_out, k, c_in, *kernel).transpose(0, 1))
            out[step.weight_name] = hv
        if step.bias_name:
            out[step.bias_name] = rg.sum([0, *range(3, rg.dim())])
        if i == 0:
            return rg
        below_grad = _conv_input_grad(step, rg.flatten(0, 1), step.weight,
                                      (n * k, *a.shape[1:]))
        below_grad = below_grad.view(n, k, *a.shape[1:])
        if step.weight_name:  # g_z through each dW_j: one grouped transpose, group j = dW_j
            dW = tangents[step.weight_name].flatten(0, 1)
            repeated = g.repeat(1, k, *[1] * (g.dim() - 2))
            t = _conv_input_grad(step, repeated, dW, (n, k * c_in, *a.shape[2:]), groups=k)
            below_grad.add_(t.view(n, k, *a.shape[1:]))
        return below_grad

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


#: conv, weight gradient and input gradient of 1-d and 2-d convolutions (by weight rank)
_CONV = {
    3: (torch.nn.functional.conv1d, torch.nn.grad.conv1d_weight, torch.nn.grad.conv1d_input),
    4: (torch.nn.functional.conv2d, torch.nn.grad.conv2d_weight, torch.nn.grad.conv2d_input),
}


def _conv_input_grad(step: _Conv, g: torch.Tensor, weight: torch.Tensor,
                     input_shape: tuple[int, ...] | torch.Size, groups: int = 1) -> torch.Tensor:
    """The input gradient of ``conv(a, weight, groups=groups)`` against output gradients ``g``.

    NOTE [input gradient as a convolution]: with stride 1 the transposed convolution is
    a plain one, of ``g`` with the kernel flipped in space and its channel axes swapped
    (per group), padded by ``dilation (kernel - 1) - padding``. On torch 2.13's CPU
    (oneDNN) that runs 3x faster than ``convolution_backward``'s input part for a few
    channels (0.10 against 0.31 ms on the benchmark CNN's 4-channel layer) and as fast
    for many; other strides keep the transposed convolution.
    """
    kernel = weight.shape[2:]
    pad = [d * (s - 1) - p for d, s, p in zip(step.dilation, kernel, step.padding, strict=True)]
    if any(s != 1 for s in step.stride) or any(p < 0 for p in pad):
        return _CONV[weight.dim()][2](input_shape, weight, g, stride=step.stride,
                                      padding=step.padding, dilation=step.dilation,
                                      groups=groups)
    c_out, c_in = weight.shape[0] // groups, weight.shape[1]
    flipped = (weight.view(groups, c_out, c_in, *kernel).transpose(1, 2)
               .reshape(groups * c_in, c_out, *kernel).flip(list(range(2, weight.dim()))))
    return _CONV[weight.dim()][0](g, flipped, padding=pad, dilation=step.dilation,
                                  groups=groups)


def _conv_weight_grad(step: _Conv, a: torch.Tensor, g: torch.Tensor,
                      shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """``sum_n`` of the weight gradient of ``conv(a, W)`` against output gradients ``g``."""
    return _CONV[step.weight.dim()][1](a, shape, g, stride=step.stride, padding=step.padding,
                                       dilation=step.dilation)


def _backprop(step: object, g: torch.Tensor) -> torch.Tensor:
    """The gradient at a step's input from the gradient ``g`` at its output."""
    if isinstance(step, _Linear):
        return g @ step.weight
    if isinstance(step, _Elementwise):
        return step.phi1 * g
    if isinstance(step, _Flatten):
        return g.reshape(g.shape[0], *step.shape)
    return _conv_input_grad(step, g, step.weight, step.inputs.shape)


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
