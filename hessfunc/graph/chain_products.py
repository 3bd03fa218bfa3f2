"""Hessian-vector products on a verified chain, by Pearlmutter's R-operator.

NOTE [structured products]: on a chain read off the captured graph (NOTE [chains
from the graph]: Linear layers, convolutions, scales, linear maps and elementwise maps)
the product ``H v`` needs no autograd graph through the model. Write ``R{.}`` for the
directional derivative along ``v = (dW_l, db_l)_l``. With the activations
``a``, the derivatives ``phi'``/``phi''`` of every activation and the gradients
``g`` at every layer output cached once at the point, one product is

* forward, from ``R{a_0} = 0`` (the inputs are data):
  ``R{z} = R{a} W^T + a dW^T + db`` through a Linear layer,
  ``R{z} = conv(R{a}, W) + conv(a, dW) + db`` through a convolution,
  ``R{z} = R{x} * s w + a * dw + db`` through a scale ``z = a * w + b`` of
  ``a = (x - m) * s``, ``R{z} = L R{a}`` through a linear map ``L`` and
  ``R{a'} = phi'(z) * R{z}`` through an activation;
* at the output: ``R{g_o} = H_o R{o}``, with ``H_o`` the loss's Hessian in the
  model output: per-sample blocks ``H_o[n]`` cached once (``hvp_fn``, the
  operator), or one backward pass through the loss's own gradient graph (a single
  ``hvp``: exact even when the loss couples samples);
* backward: through an activation ``R{g_z} = phi'(z) * R{g_a'} + phi''(z) g_a' * R{z}``;
  through a Linear layer ``(H v)_W = R{g_z}^T a + g_z^T R{a}``, ``(H v)_b = sum_n R{g_z}``
  and ``R{g_a} = R{g_z} W + g_z dW``; through a convolution the same with its weight
  and input gradients (transposed convolutions) in place of the matrix products;
  through a scale the same with a diagonal weight, ``(H v)_w`` summed over the axes
  ``w`` is broadcast along, ``R{g_x} = R{g_z} * s w + (g_z * s) dw``; through a linear
  map ``R{g_a} = L^T R{g_z}`` (its vector-Jacobian product); through a softmax or a
  normalisation by its closed form (NOTE [softmax and standardisation]); through another
  map without a rule by its own ops (NOTE [maps without a rule]).

On a DAG of these steps (NOTE [skip connections]) ``R{a + b} = R{a} + R{b}`` forward,
and backward a value read by several steps sums the ``g`` and ``R{g}`` they send it.

That is the exact product (the second term of each backward rule is the curvature
of the layer itself, the first the curvature propagated from above), in a handful
of dense products per layer with no graph bookkeeping, and ``k`` tangents at once
are the same products with a ``k`` axis (sample-major, one GEMM for all of them).
It needs neither the gradient's weight products nor a graph: cached, a product costs
about one gradient (docs/benchmarks.md). Finding the chain costs about another, so one
``hvp`` alone takes the double backward unless asked for ``method="structured"``. The
tests compare the products with the loop oracle to 1e-10 in float64.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Collection, Mapping

import torch

from .. import _thresholds
from .chain_plan import (
    ChainPlan,
    _Add,
    _Conv,
    _Elementwise,
    _Embedding,
    _Flatten,
    _Linear,
    _LinearMap,
    _Map,
    _Product,
    _Scale,
    _ShapeMap,
    _ShapeOp,
    _Softmax,
    standardised,
)

__all__ = ["ChainProducts"]


class ChainProducts:
    """``V -> H V`` for a chain plan, with everything but the tangents cached.

    ``patches``: a convolution's products may run on its patches (NOTE [convolutions as
    matrix products]); building them costs more than one product saves, so a single
    product passes False.

    ``output_matrix``: the Gauss-Newton form ``V -> J^T M J V`` instead, ``M`` applied to
    one ``(N, C)`` tangent of the output: the same forward pass, ``M`` in place of the
    loss's Hessian, and a backward pass without the second-order terms (the activations'
    ``phi''``, the layers' ``g_z dW`` and ``g_z^T R{a}``, the parameter terms' ``H_R``).

    Attributes:
        gradient: ``{name: tensor}``, the gradient at the point.
    """

    def __init__(self, plan: ChainPlan, patches: bool = True, *,
                 output_matrix: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self._patches = patches
        self._output_matrix = output_matrix
        self._second_order = output_matrix is None  # the terms J^T M J leaves out
        self._steps = plan.steps
        self._sources = plan.sources
        self._start = plan.first                # below the first trainable layer R{a} = 0
        self._out_hessian = plan.out_hessian    # (N, C, C), or None: the loss graph
        self._loss_graph = plan.loss_graph
        self._out_diagonal = None
        if plan.out_hessian is not None:
            diagonal = plan.out_hessian.diagonal(dim1=1, dim2=2)
            if torch.equal(torch.diag_embed(diagonal), plan.out_hessian):
                self._out_diagonal = diagonal.clone()
        # the gradient at each value, summed over its readers, down to the first layer
        grads: list[torch.Tensor | None] = [None] * (len(self._steps) + 1)
        grads[-1] = plan.out_grad
        self._maps: dict[int, _MapTerms] = {}
        for i in range(len(self._steps) - 1, self._start, -1):
            g, step = grads[i + 1], self._steps[i]
            if isinstance(step, _Map):
                self._maps[i] = _map_terms(step, g)
            parts = self._maps[i].gradients if isinstance(step, _Map) else _backprop(step, g)
            for j, part in zip(self._sources[i], parts, strict=True):
                if j > self._start:  # a value below the first layer needs none
                    _accumulate(grads, j, part)
        self._grads = grads[1:]                 # gradient at each step's output (N, d)
        # curvature of each activation: phi''(z) * (gradient at its output)
        self._curvature = [s.phi2 * self._grads[i] if isinstance(s, _Elementwise) and
                           self._second_order and i >= self._start and bool(s.phi2.any())
                           else None for i, s in enumerate(self._steps)]  # None: linear map
        # at z = (x - m) * s * w + b, the gradient at its output times s: the second-order
        # terms of a scale step reach x through s
        self._scaled_grads = {i: self._grads[i] if s.pre is None else self._grads[i] * s.pre
                              for i, s in enumerate(self._steps)
                              if isinstance(s, _Scale) and s.weight_name and self._second_order
                              and i >= self._start}
        self._names = list(plan.params)
        # the loss's terms of the parameters alone
        self._terms = plan.terms if self._second_order else None
        self._shapes = {name: p.shape for name, p in plan.params.items()}
        self._gradient: dict[str, torch.Tensor] | None = None
        self._conv_cache: dict[int, _ConvTerms] = {}
        self._layer_of = {name: i for i, step in enumerate(self._steps)   # parameter -> step
                          for name in (getattr(step, "weight_name", None),
                                       getattr(step, "bias_name", None)) if name}

    @property
    def gradient(self) -> dict[str, torch.Tensor]:
        """The gradient at the point (computed on first use: products do not need it)."""
        if self._gradient is None:
            gradient: dict[str, torch.Tensor] = {}
            for i in range(self._start, len(self._steps)):
                step, g = self._steps[i], self._grads[i]
                if isinstance(step, _Linear):
                    if step.weight_name:
                        gradient[step.weight_name] = _sample_sum(g, step.inputs, None)
                    if step.bias_name:
                        gradient[step.bias_name] = _bias_sum(g, None)
                elif isinstance(step, _Conv):
                    if step.weight_name:
                        gradient[step.weight_name] = _conv_weight_grad(
                            step, step.inputs, g, step.weight.shape)
                    if step.bias_name:
                        gradient[step.bias_name] = g.sum([0, *range(2, g.dim())])
                elif isinstance(step, _Embedding):
                    if step.weight_name:
                        gradient[step.weight_name] = _scatter_rows(step, g, None)
                elif isinstance(step, _Scale):
                    if step.weight_name:
                        gradient[step.weight_name] = self._reduce(
                            g * step.inputs, step.weight, step.weight_name, None)
                    if step.bias_name:
                        gradient[step.bias_name] = self._reduce(g, step.bias, step.bias_name,
                                                                None)
            if self._terms is not None:
                for name, g in self._terms.grad.items():
                    g = g.detach()
                    gradient[name] = gradient[name] + g if name in gradient else g
            self._gradient = {name: gradient[name] for name in self._names}
        return self._gradient

    def input_layer(self) -> tuple[str, torch.Tensor] | None:
        """``(weight name, inputs (N, d_in))`` of the first trainable layer, whose inputs do
        not depend on the parameters; None when its weight is frozen."""
        first = self._steps[self._start]
        if isinstance(first, _Linear) and first.weight_name and first.inputs.dim() == 2 and (
                self._terms is None or first.weight_name not in self._terms.leaves):
            return first.weight_name, first.inputs
        return None  # a frozen weight, or one a term of the parameters alone also reads

    def restricted(self, inputs: torch.Tensor) -> ChainProducts:
        """The same products on the first layer's weights restricted to ``W U``.

        ``U`` ``(d_in, r)`` has orthonormal columns spanning (at least) the rows of the
        first layer's inputs ``a``, and ``inputs`` is ``a U`` ``(N, r)``. The weight
        enters the loss only through ``a W^T = (a U)(W U)^T``, so with ``B: W -> W U``
        (other parameters unchanged), ``H = B^T H_r B``: this returns ``H_r``, whose
        tangent and product for that weight have shape ``(d_out, r)`` (NOTE [data span]
        in ``hessfunc.operators.base``).
        """
        out = copy.copy(self)
        first = copy.copy(self._steps[self._start])
        first.inputs = inputs
        out._steps = [*self._steps[:self._start], first, *self._steps[self._start + 1:]]
        out._gradient = None  # in the restricted coordinates, if asked for
        out._conv_cache = {}
        return out

    def __call__(self, tangents: Mapping[str, torch.Tensor],
                 wanted: Collection[str] | None = None) -> dict[str, torch.Tensor]:
        """``H v`` for tangents ``{name: shape}``, or ``H V`` for ``{name: (k, *shape)}``
        (all with or all without the leading ``k``); the result has the same layout.

        A parameter missing from ``tangents`` has a zero tangent. ``wanted``: the
        parameters whose products to return, default those in ``tangents``; the
        forward pass starts at the first layer with a tangent and the backward pass
        stops at the last wanted one (one leaf's own block rows cost a fraction of a
        full product). One tangent runs on ``(N, d)`` directional derivatives; ``k``
        tangents on sample-major ``(N, k, d)`` ones, so that every sum over samples or
        features is one GEMM for all ``k`` at once.
        """
        order = list(tangents if wanted is None else wanted)  # the result's key order
        wanted = set(order)
        first = next(iter(tangents))
        k = (tangents[first].shape[0]
             if tangents[first].dim() == len(self._shapes[first]) + 1 else None)
        per = (lambda t: t) if k is None else (lambda t: t.unsqueeze(1))  # (N, d) factors
        steps, start = self._steps, self._start
        values: list[torch.Tensor | None] = [None] * (len(steps) + 1)  # R{value}
        for i in range(start, len(steps)):
            step = steps[i]
            r = values[self._sources[i][0]]
            if isinstance(step, _Map):
                r = self._maps[i].forward([values[j] for j in self._sources[i]], k)
            elif isinstance(step, _Add):
                a, b = (values[j] for j in self._sources[i])
                r = a if b is None else b if a is None else a + b
            elif isinstance(step, _Elementwise):
                r = None if r is None else per(step.phi1) * r
            elif isinstance(step, _Flatten):
                r = None if r is None else r.flatten(1 if k is None else 2)
            elif isinstance(step, _Conv):
                r = self._conv_forward(i, step, r, tangents, k)
            elif isinstance(step, _Scale):
                r = _scale_forward(step, r, tangents, k)
            elif isinstance(step, _LinearMap):
                r = None if r is None else _folded(step.apply, r, k)
            elif isinstance(step, _ShapeMap):
                r = None if r is None else _shape_forward(step, r, k)
            elif isinstance(step, _Embedding):
                r = None if step.weight_name not in tangents else \
                    _lookup_rows(tangents[step.weight_name], step.indices, k)
            else:
                z = None if r is None else r @ step.weight.T
                if step.weight_name in tangents:
                    t = _input_times(step.inputs, tangents[step.weight_name], k)
                    z = t if z is None else z.add_(t)
                if step.bias_name in tangents:
                    db = tangents[step.bias_name]  # (out,), (k, out): as one row
                    lead = step.inputs.shape[:-1]
                    if k is not None:
                        db = db.view(k, *(1 for _ in lead[1:]), db.shape[-1])
                    shape = (*lead, db.shape[-1]) if k is None else \
                        (lead[0], k, *lead[1:], db.shape[-1])
                    z = db.expand(shape) if z is None else z.add_(db)
                r = z
            values[i + 1] = r
        out: dict[str, torch.Tensor] = {}
        lowest = min((self._layer_of[name] for name in wanted if name in self._layer_of),
                     default=len(steps))
        adjoints: list[torch.Tensor | None] = [None] * (len(steps) + 1)  # R{g} at each value
        if values[-1] is None:  # no tangent reaches the output: the parameter terms only
            lowest = len(steps)
        else:
            adjoints[-1] = self._output_product(values[-1], k)  # R{g_o}[n] = H_o[n] R{o}[n]
        for i in range(len(steps) - 1, lowest - 1, -1):
            step, rg = steps[i], adjoints[i + 1]
            below = values[self._sources[i][0]]   # R{input}
            if isinstance(step, _Map):
                parts = self._maps[i].backward(rg, [values[j] for j in self._sources[i]], k,
                                               self._second_order)
                for j, part in zip(self._sources[i], parts, strict=True):
                    if j > lowest:
                        _accumulate(adjoints, j, part)
                continue
            if isinstance(step, _Add):
                for j in self._sources[i]:
                    if j > lowest:
                        _accumulate(adjoints, j, rg)
                continue
            if isinstance(step, _Embedding):  # linear in W, reading the data alone
                if step.weight_name in wanted:
                    out[step.weight_name] = _scatter_rows(step, rg, k)
                continue
            if isinstance(step, _Elementwise):
                rg = per(step.phi1) * rg
                if below is not None and self._curvature[i] is not None:
                    rg.addcmul_(per(self._curvature[i]), below)
            elif isinstance(step, _Flatten):
                rg = rg.reshape(*rg.shape[:1 if k is None else 2], *step.shape)
            elif isinstance(step, _Conv):
                rg = self._conv_backward(i, step, rg, below, tangents, out, k, wanted,
                                         last=i == lowest)
            elif isinstance(step, _Scale):
                rg = self._scale_backward(i, step, rg, below, tangents, out, k, wanted)
            elif isinstance(step, _LinearMap):
                rg = _folded(lambda t, s=step: _transpose(s, t), rg, k)
            elif isinstance(step, _ShapeMap):
                rg = _shape_transpose(step, rg, k)
            else:
                g = self._grads[i]
                if step.weight_name in wanted:  # R{g_z}^T a + g_z^T R{a}, summed over samples
                    hv = _sample_sum(rg, step.inputs, k)
                    if below is not None and self._second_order:
                        hv.add_(_sample_sum(g, below, k, batched_right=True))
                    out[step.weight_name] = hv
                if step.bias_name in wanted:
                    out[step.bias_name] = _bias_sum(rg, k)
                if i == lowest:
                    break
                rg = rg @ step.weight
                if step.weight_name in tangents and self._second_order:  # + g_z dW
                    rg.add_(_grad_times(g, tangents[step.weight_name], k))
            if self._sources[i][0] > lowest:
                _accumulate(adjoints, self._sources[i][0], rg)
        if self._terms is not None:  # + H_R v
            for name, hv in self._terms.products(tangents, k).items():
                if name in wanted:
                    out[name] = out[name] + hv if name in out else hv
        return {name: out[name] if name in out else self._zeros(name, k) for name in order}

    def _zeros(self, name: str, k: int | None) -> torch.Tensor:
        """A zero product for parameter ``name``, ``(k, *shape)`` with ``k`` tangents (the
        first Linear weight as ``(out, r)`` after :meth:`restricted`)."""
        shape = self._shapes[name]
        first = self._steps[self._start]
        if isinstance(first, _Linear) and name == first.weight_name:
            shape = (first.weight.shape[0], first.inputs.shape[-1])
        like = self._grads[-1]
        return like.new_zeros(shape if k is None else (k, *shape))

    def _reduce(self, t: torch.Tensor, like: torch.Tensor, name: str, k: int | None
                ) -> torch.Tensor:
        """``t`` ``(N, [k,] *shape)`` summed over samples and over the axes along which
        ``like``, parameter ``name`` of a :class:`_Scale` step viewed to broadcast against
        one sample, is broadcast; in the parameter's shape."""
        lead = 1 if k is None else 2
        axes = [0, *(lead + j for j, size in enumerate(like.shape) if size == 1)]
        total = t.sum(axes, keepdim=True)[0]
        return total.reshape(self._shapes[name] if k is None else (k, *self._shapes[name]))

    def _scale_backward(self, i: int, step: _Scale, rg: torch.Tensor, below: torch.Tensor | None,
                        tangents: Mapping[str, torch.Tensor], out: dict[str, torch.Tensor],
                        k: int | None, wanted: Collection[str]) -> torch.Tensor:
        """Products at ``z = a * w + b``, ``a = (x - m) * s``, and
        ``R{g_x} = R{g_z} * s w + g_z * s dw``: a Linear layer's rules with a diagonal
        weight, each sum over what ``w`` is broadcast along (``R{a} = s R{x}``)."""
        per = (lambda t: t) if k is None else (lambda t: t.unsqueeze(1))
        if step.weight_name in wanted:   # sum R{g_z} * a + g_z * R{a}
            hv = rg * per(step.inputs)
            if below is not None and self._second_order:
                hv.addcmul_(per(self._scaled_grads[i]), below)
            out[step.weight_name] = self._reduce(hv, step.weight, step.weight_name, k)
        if step.bias_name in wanted:
            out[step.bias_name] = self._reduce(rg, step.bias, step.bias_name, k)
        if step.gain is not None:
            rg = rg * step.gain
        if step.weight_name in tangents and self._second_order:  # a weight: rg is fresh
            dw = _viewed(tangents[step.weight_name], step.weight, k)
            rg = rg.addcmul_(per(self._scaled_grads[i]), dw)
        return rg

    def _conv_terms(self, i: int, step: _Conv) -> _ConvTerms:
        """The products with the cached ``a`` and ``g`` of conv step ``i``, built once."""
        terms = self._conv_cache.get(i)
        if terms is None:
            terms = self._conv_cache[i] = _ConvTerms(step, self._grads[i], self._patches)
        return terms

    def _conv_forward(self, i: int, step: _Conv, r: torch.Tensor | None,
                      tangents: Mapping[str, torch.Tensor], k: int | None
                      ) -> torch.Tensor | None:
        """``R{z} = conv(R{a}, W) + conv(a, dW) + db`` (NOTE [structured products])."""
        conv = _CONV[step.weight.dim()][0]
        kw = dict(stride=step.stride, padding=step.padding, dilation=step.dilation)
        n, out_shape = step.inputs.shape[0], self._grads[i].shape[1:]
        terms = self._conv_terms(i, step)
        z = None
        merged = (k is None and r is not None and step.weight_name in tangents
                  and terms.patches is None)
        if merged:  # one convolution over both parts' channels
            z = conv(torch.cat([r, step.inputs], dim=1),
                     torch.cat([step.weight, tangents[step.weight_name]], dim=1), **kw)
        elif r is not None:
            z = conv(r if k is None else r.flatten(0, 1), step.weight, **kw)
            z = z if k is None else z.view(n, k, *out_shape)
        if step.weight_name in tangents and not merged:
            t = terms.forward(tangents[step.weight_name], k)
            z = t if z is None else z.add_(t)
        if step.bias_name in tangents:
            db = tangents[step.bias_name]
            db = db.view(*db.shape, *[1] * (len(out_shape) - 1))
            full = (n, *out_shape) if k is None else (n, k, *out_shape)
            z = db.expand(full) if z is None else z.add_(db)
        return z

    def _conv_backward(self, i: int, step: _Conv, rg: torch.Tensor, below: torch.Tensor | None,
                       tangents: Mapping[str, torch.Tensor], out: dict[str, torch.Tensor],
                       k: int | None, wanted: Collection[str], last: bool) -> torch.Tensor:
        """Weight and bias products at a convolution, and ``R{g_a}`` below it unless it is
        the ``last`` step down: the transposes of the forward rule, as for a Linear layer."""
        terms = self._conv_terms(i, step)
        if step.weight_name in wanted:  # sum_n R{g_z} * a + g_z * R{a}, as weight gradients
            hv = terms.weight_from_output(rg, k)
            if below is not None and self._second_order:
                hv.add_(terms.weight_from_input(below, k))
            out[step.weight_name] = hv
        if step.bias_name in wanted:
            out[step.bias_name] = rg.sum([0, *range(2 if k is None else 3, rg.dim())])
        if last:
            return rg
        a = step.inputs
        if k is None:
            below_grad = _conv_input_grad(step, rg, step.weight, a.shape)
        else:
            below_grad = _conv_input_grad(step, rg.flatten(0, 1), step.weight,
                                          (a.shape[0] * k, *a.shape[1:]))
            below_grad = below_grad.view(a.shape[0], k, *a.shape[1:])
        if step.weight_name in tangents and self._second_order:  # + g_z through dW
            below_grad.add_(terms.input_from_weight(tangents[step.weight_name], k))
        return below_grad

    def _output_product(self, r: torch.Tensor, k: int | None) -> torch.Tensor:
        """The output Hessian (or ``output_matrix``) applied to ``R{o}``: ``(N, C)``, or
        ``(N, k, C)``."""
        if self._output_matrix is not None:
            M = self._output_matrix
            return M(r) if k is None else torch.func.vmap(M, in_dims=1, out_dims=1)(r)
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


class _ConvTerms:
    """The four products of a convolution step with its cached input ``a`` and output
    gradient ``g`` that the R-operator needs, each for one tangent or ``k``:

    * ``forward(dW)``: ``conv(a, dW)``, ``(N, [k,] C_out, *L)``;
    * ``weight_from_output(rg)``: ``sum_n rg[n] * a[n]``, the weight gradient of
      ``conv(a, .)`` against ``rg``, ``([k,] C_out, C_in, *K)``;
    * ``weight_from_input(below)``: the weight gradient of ``conv(below, .)`` against ``g``;
    * ``input_from_weight(dW)``: the input gradient of ``conv(., dW)`` against ``g``,
      ``(N, [k,] C_in, *Y)``.

    NOTE [convolutions as matrix products]: all four are linear in a tangent, with the
    rest fixed: with the patches ``P[(c, k), (n, l)] = a_pad[n, c, l s + k d]`` (the
    inputs each output position sees) and their transpose on the output side,
    ``G[(o, k), (n, y)] = g[n, o, l]`` where ``y + p = l s + k d``, each is one matrix
    product (``dW P``, ``rg P^T``, ``below G^T``, ``dW^T G``), ``k`` tangents in the same
    one. oneDNN's convolutions cost 80-120 us a call on this CPU whatever their size
    below a few channels; the products on the patches then run 2x faster (measured on
    the benchmark CNN's 4-channel layers: 0.22 against 0.44 ms for the four), but 1.2-2x
    slower from 8 channels on, hence the width rule. Patches take ``(C_in L + C_out Y)
    K N`` numbers (9x the activations for a 3x3 kernel), hence the byte cap.
    Elsewhere the products are aten's (grouped over the ``k`` tangents).
    """

    def __init__(self, step: _Conv, g: torch.Tensor, patches: bool = True):
        self.step, self.g = step, g
        self.patches = _conv_patches(step, g) if patches and step.weight_name else None

    def forward(self, dW: torch.Tensor, k: int | None) -> torch.Tensor:
        step, a = self.step, self.step.inputs
        n, out_shape = a.shape[0], self.g.shape[1:]
        if self.patches is not None:
            c_out = out_shape[0]
            t = dW.reshape((k or 1) * c_out, -1) @ self.patches[0]
            t = t.view(k or 1, c_out, n, *out_shape[1:])
            return t[0].transpose(0, 1) if k is None else t.permute(2, 0, 1, *range(3, t.dim()))
        conv = _CONV[step.weight.dim()][0]
        t = conv(a, dW if k is None else dW.flatten(0, 1), stride=step.stride,
                 padding=step.padding, dilation=step.dilation)
        return t if k is None else t.view(n, k, *out_shape)

    def weight_from_output(self, rg: torch.Tensor, k: int | None) -> torch.Tensor:
        step, a = self.step, self.step.inputs
        c_out, c_in, *kernel = step.weight.shape
        if self.patches is not None:  # (k C_out, N L) @ P^T
            rows = rg.transpose(0, 1) if k is None else rg.permute(1, 2, 0, *range(3, rg.dim()))
            hv = rows.reshape((k or 1) * c_out, -1) @ self.patches[0].T
            return hv.view(step.weight.shape) if k is None else hv.view(k, c_out, c_in, *kernel)
        if k is None:
            return _conv_weight_grad(step, a, rg, step.weight.shape)
        return _conv_weight_grad(step, a, rg.flatten(1, 2),
                                 (k * c_out, c_in, *kernel)).view(k, c_out, c_in, *kernel)

    def weight_from_input(self, below: torch.Tensor, k: int | None) -> torch.Tensor:
        step = self.step
        c_out, c_in, *kernel = step.weight.shape
        if self.patches is not None:  # (k C_in, N Y) @ G^T
            rows = (below.transpose(0, 1) if k is None
                    else below.permute(1, 2, 0, *range(3, below.dim())))
            hv = rows.reshape((k or 1) * c_in, -1) @ self.patches[1].T
            hv = hv.view(k or 1, c_in, c_out, *kernel).transpose(1, 2)
            return hv[0] if k is None else hv
        if k is None:
            return _conv_weight_grad(step, below, self.g, step.weight.shape)
        # the k tangents as k blocks of input channels
        return (_conv_weight_grad(step, below.flatten(1, 2), self.g, (c_out, k * c_in, *kernel))
                .view(c_out, k, c_in, *kernel).transpose(0, 1))

    def input_from_weight(self, dW: torch.Tensor, k: int | None) -> torch.Tensor:
        step, a, g = self.step, self.step.inputs, self.g
        n, c_in = a.shape[:2]
        if self.patches is not None:  # dW^T (k C_in, C_out K) @ G
            rows = dW.transpose(0, 1) if k is None else dW.transpose(1, 2)
            t = rows.reshape((k or 1) * c_in, -1) @ self.patches[1]
            t = t.view(k or 1, c_in, n, *a.shape[2:])
            return t[0].transpose(0, 1) if k is None else t.permute(2, 0, 1, *range(3, t.dim()))
        if k is None:
            return _conv_input_grad(step, g, dW, a.shape)
        # one grouped transpose, group j = dW_j
        repeated = g.repeat(1, k, *[1] * (g.dim() - 2))
        t = _conv_input_grad(step, repeated, dW.flatten(0, 1), (n, k * c_in, *a.shape[2:]),
                             groups=k)
        return t.view(n, k, *a.shape[1:])


def _conv_patches(step: _Conv, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``P`` ``(C_in K, N L)`` and ``G`` ``(C_out K, N Y)`` of NOTE [convolutions as matrix
    products], or None where the rule there says no."""
    a, (c_out, c_in, *kernel) = step.inputs, step.weight.shape
    n, spatial, out_spatial = a.shape[0], list(a.shape[2:]), list(g.shape[2:])
    k = math.prod(kernel)
    numbers = (c_in * math.prod(out_spatial) + c_out * math.prod(spatial)) * k * n
    if (a.device.type != "cpu" or max(c_in, c_out) * k > _thresholds.PATCH_WIDTH
            or numbers * a.element_size() > _thresholds.PATCH_BYTES):
        return None
    dims = len(spatial)
    # P: windows of the zero-padded input, every d-th element of each
    windows = torch.nn.functional.pad(a, [p for p in reversed(step.padding) for _ in "lr"])
    for j in range(dims):
        windows = windows.unfold(2 + j, (kernel[j] - 1) * step.dilation[j] + 1, step.stride[j])
    windows = windows[(..., *(slice(None, None, d) for d in step.dilation))]  # (N, C, *L, *K)
    P = windows.permute(1, *range(2 + dims, 2 + 2 * dims), 0, *range(2, 2 + dims))
    P = P.reshape(c_in * k, -1)
    # G: g placed at y + p = l s + k d for every kernel offset, then the padding cut off
    padded = [y + 2 * p for y, p in zip(spatial, step.padding, strict=True)]
    G = g.new_zeros(c_out, *kernel, n, *padded)
    per_channel = g.transpose(0, 1)
    for offset in itertools.product(*(range(size) for size in kernel)):
        where = [slice(o * d, o * d + (size - 1) * s + 1, s) for o, d, size, s in
                 zip(offset, step.dilation, out_spatial, step.stride, strict=True)]
        G[(slice(None), *offset, slice(None), *where)] = per_channel
    cut = [slice(p, p + y) for p, y in zip(step.padding, spatial, strict=True)]
    G = G[(..., *cut)].reshape(c_out * k, -1)
    return P, G


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


def _backprop(step: object, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The gradient at each value a step reads from the gradient ``g`` at its output."""
    if isinstance(step, _Add):
        return g, g
    if isinstance(step, _Linear):
        return (g @ step.weight,)
    if isinstance(step, _Elementwise):
        return (step.phi1 * g,)
    if isinstance(step, _Flatten):
        return (g.reshape(g.shape[0], *step.shape),)
    if isinstance(step, _Scale):
        return (g if step.gain is None else g * step.gain,)
    if isinstance(step, _LinearMap):
        return (_transpose(step, g),)
    if isinstance(step, _ShapeMap):
        return (_shape_transpose(step, g, None),)
    return (_conv_input_grad(step, g, step.weight, step.inputs.shape),)


class _MapTerms:
    """NOTE [maps without a rule]: a map ``z = F(a_1, ..., a_m)`` of the model's values
    that no step's rule or closed form covers (a product of two branches, a normalisation
    other than those of NOTE [softmax and standardisation]) is differentiated through its
    own ops, once: with leaves ``a_i``
    and a leaf ``u`` valued ``g``, the gradient at ``z``, the graph of ``z = F(a)`` and
    of ``w_i = J_i^T u`` (``create_graph``) is kept. Then every product is backward
    passes through that cached graph, none through the rest of the model:

    * forward, ``R{z} = sum_i J_i R{a_i}``: ``w`` is linear in ``u``, so its gradient in
      ``u`` against ``R{a}`` is ``J R{a}`` (the double-backward trick; no forward-mode
      rule is needed, only the double backward the graph route needs anyway);
    * backward, ``R{g_a_i} = J_i^T R{g_z} + sum_j d(J_i^T g)/d a_j R{a_j}``: the gradient
      of ``z`` against ``R{g_z}`` plus that of ``w`` (at ``u = g``) against ``R{a}``, one
      backward pass; the Gauss-Newton form keeps the first term only.

    ``k`` tangents run as ``k`` such passes. Exact whatever ``F`` is, also where it mixes
    samples, and the layers around it keep their rules. But the captured graph holds
    ``F`` decomposed into primitive ops, whose double backward costs more than that of
    the fused ops autograd records when the graph route differentiates ``f`` itself: a
    softmax or a LayerNorm taken this way measured slower than the cached graph (stop 29
    in docs/benchmarks.md). So ``method="auto"`` takes the R-operator where every map is
    linear (views, a concatenation, a broadcasting add, a mean over the batch: their
    double backward is nothing) or has a closed form, and the cached graph where another
    map is curved (``ChainPlan.curved_maps``); ``method="structured"`` takes the
    R-operator anyway. The
    Gauss-Newton and Fisher operators take the linearised model wherever the chain has a
    map, a scale or a linear map (measured faster there, ``hessfunc/operators/ggn.py``).
    """

    def __init__(self, step: _Map, g: torch.Tensor):
        self.leaves = [t.detach().requires_grad_(True) for t in step.inputs]
        self.u = g.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            self.z = step.apply(*self.leaves)
            w = torch.autograd.grad(self.z, self.leaves, self.u, create_graph=True,
                                    allow_unused=True)
        self.w = list(w)
        #: the gradient at each value the map reads
        self.gradients = tuple(torch.zeros_like(a) if t is None else t.detach()
                               for t, a in zip(w, self.leaves, strict=True))

    def _columns(self, k: int | None, fn: Callable[[Callable], list[torch.Tensor | None]]
                 ) -> list[torch.Tensor | None]:
        """``fn(column)`` for one tangent, or stacked over the ``k`` columns (axis 1)."""
        if k is None:
            return fn(lambda t: t)
        runs = [fn(lambda t, j=j: t[:, j]) for j in range(k)]
        return [None if parts[0] is None else torch.stack(parts, dim=1)
                for parts in zip(*runs, strict=True)]

    def _grad(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
              grad_outputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        with torch.enable_grad():
            return list(torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True,
                                            allow_unused=True))

    def forward(self, tangents: list[torch.Tensor | None], k: int | None
                ) -> torch.Tensor | None:
        """``R{z}`` from ``R{a_i}`` (None: zero), or None where all are zero."""
        pairs = [(w, t) for w, t in zip(self.w, tangents, strict=True)
                 if t is not None and w is not None and w.requires_grad]
        if not pairs:
            return None if all(t is None for t in tangents) else self._zeros_out(k)

        def one(col: Callable) -> list[torch.Tensor | None]:
            (r,) = self._grad([w for w, _ in pairs], [self.u], [col(t) for _, t in pairs])
            return [torch.zeros_like(self.u) if r is None else r]

        return self._columns(k, one)[0]

    def _zeros_out(self, k: int | None) -> torch.Tensor:
        z = self.z.detach()
        return torch.zeros_like(z) if k is None else \
            z.new_zeros(z.shape[0], k, *z.shape[1:])

    def backward(self, rg: torch.Tensor, below: list[torch.Tensor | None], k: int | None,
                 second_order: bool) -> list[torch.Tensor]:
        """``R{g_a_i}`` for every value the map reads."""
        curved = [(w, b) for w, b in zip(self.w, below, strict=True)
                  if second_order and b is not None and w is not None and w.requires_grad]

        def one(col: Callable) -> list[torch.Tensor | None]:
            found = self._grad([self.z, *(w for w, _ in curved)], self.leaves,
                               [col(rg), *(col(b) for _, b in curved)])
            return [torch.zeros_like(a) if r is None else r
                    for r, a in zip(found, self.leaves, strict=True)]

        return self._columns(k, one)


def _k_front(t: torch.Tensor | None, k: int | None) -> torch.Tensor | None:
    """``k`` tangents ``(N, k, ...)`` as ``(k, N, ...)``, where the cached values of a
    sample broadcast against them (a broadcast along an inner axis costs more on CPU)."""
    return t if k is None or t is None else t.movedim(1, 0)


def _k_back(t: torch.Tensor, k: int | None) -> torch.Tensor:
    """The inverse of :func:`_k_front`."""
    return t if k is None else t.movedim(0, 1)


class _ClosedMapTerms:
    """NOTE [softmax and standardisation]: the maps users put between layers most often
    have a symmetric Jacobian ``J`` with a closed form, so products need none of the
    double backward passes of NOTE [maps without a rule]. With ``y`` the map's output,
    ``g`` the gradient at it, ``<.>`` the mean (sum, for the softmax) over the map's axes:

    * softmax ``y = softmax(a)``: ``J t = y (t - <y t>)``; the second-order term of the
      backward rule, ``d(J^T g)/da R{a} = R{y} (g - <y g>) - y <R{y} g>``;
    * standardisation ``y = (a - <a>) r``, ``r = (var + eps)^(-1/2)`` (or ``y = a r``,
      ``r = (<a^2> + eps)^(-1/2)``, RMSNorm, without the centring term ``<t>``):
      ``J t = r (t - <t> - y <y t>)``; with ``w = J^T g`` and ``m = <y g>`` the
      second-order term is ``-r (<y R{a}> w + m R{y} + y <R{y} g>)``.

    (Differentiate ``r`` by ``dr = -r^2 <y da>``, then ``w / r = g - <g> - y m``.)
    Each product is a few elementwise passes and reductions over the map's values. The
    axes may include the batch (BatchNorm in training mode): the forms hold as they are.
    """

    def __init__(self, step: _Map, g: torch.Tensor):
        form = step.form
        a = step.inputs[0].detach()
        self._dims = form.dims
        self._softmax = isinstance(form, _Softmax)
        if self._softmax:
            self.y = step.apply(a).detach()
            self.r = None
        else:
            self.y, self.r = standardised(form, a)
        self._centred = not self._softmax and form.centred
        self.g = g.detach()
        self.m = self._reduce(self.y * self.g, self._dims)
        self.w = self._jacobian(self.g, None)
        self.gradients = (self.w,)

    def _reduce(self, t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return t.sum(dim=dims, keepdim=True) if self._softmax else t.mean(dim=dims, keepdim=True)

    def _jacobian(self, t: torch.Tensor, k: int | None) -> torch.Tensor:
        """``J t`` (also ``J^T t``: ``J`` is symmetric), ``t`` ``([k,] N, *shape)`` (the
        ``k`` tangents in front, :func:`_k_front`)."""
        dims, y = self._axes(k), self.y
        out = t - self._reduce(y * t, dims) * (1.0 if self._softmax else y)
        if self._softmax:
            return y * out
        if self._centred:
            out = out - t.mean(dim=dims, keepdim=True)
        return self.r * out

    def _axes(self, k: int | None) -> tuple[int, ...]:
        return self._dims if k is None else tuple(d + 1 for d in self._dims)

    def forward(self, tangents: list[torch.Tensor | None], k: int | None
                ) -> torch.Tensor | None:
        (t,) = tangents
        return None if t is None else _k_back(self._jacobian(_k_front(t, k), k), k)

    def backward(self, rg: torch.Tensor, below: list[torch.Tensor | None], k: int | None,
                 second_order: bool) -> list[torch.Tensor]:
        out = self._jacobian(_k_front(rg, k), k)
        ra = _k_front(below[0], k)
        if not second_order or ra is None:
            return [_k_back(out, k)]
        dims, y, g = self._axes(k), self.y, self.g
        ry = self._jacobian(ra, k)
        if self._softmax:
            out = out + ry * (g - self.m) - y * self._reduce(ry * g, dims)
        else:
            curvature = self._reduce(y * ra, dims) * self.w + self.m * ry + \
                y * self._reduce(ry * g, dims)
            out = out - self.r * curvature
        return [_k_back(out, k)]


class _ProductTerms:
    """NOTE [products of two values]: ``z = a b`` (``bmm``, or ``mul`` broadcasting) is
    bilinear: ``R{z} = R{a} b + a R{b}``; the gradients are ``g_a = g b^T`` and
    ``g_b = a^T g`` (``bmm``; for ``mul``, ``g b`` and ``a g`` summed to each operand's
    shape), and the backward rule's second-order terms are the same products with the
    other operand's tangent: ``R{g_a} = R{g} b^T + g R{b}^T``, ``R{g_b} = a^T R{g} +
    R{a}^T g``. The Gauss-Newton form keeps the first terms. ``k`` tangents ``(N, k, ...)``
    run with ``k`` in front, broadcast against the operands."""

    def __init__(self, step: _Map, g: torch.Tensor):
        self.a, self.b = (t.detach() for t in step.inputs)
        self._bmm = step.form.batched_matmul
        self.g = g.detach()
        self.gradients = (self._left(self.g, self.b), self._right(self.a, self.g))

    def _times(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b if self._bmm else a * b

    def _left(self, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``J_a^T g`` at the other operand ``b``."""
        if self._bmm:
            return g @ b.mT
        return _sum_to(g * b, self.a)

    def _right(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``J_b^T g`` at the other operand ``a``."""
        if self._bmm:
            return a.mT @ g
        return _sum_to(a * g, self.b)

    def forward(self, tangents: list[torch.Tensor | None], k: int | None
                ) -> torch.Tensor | None:
        ra, rb = (_k_front(t, k) for t in tangents)
        if ra is None and rb is None:
            return None
        z = None if ra is None else self._times(ra, self.b)
        if rb is not None:
            z = self._times(self.a, rb) if z is None else z + self._times(self.a, rb)
        return _k_back(z, k)

    def backward(self, rg: torch.Tensor, below: list[torch.Tensor | None], k: int | None,
                 second_order: bool) -> list[torch.Tensor]:
        rg = _k_front(rg, k)
        ga, gb = self._left(rg, self.b), self._right(self.a, rg)
        ra, rb = (_k_front(t, k) for t in below)
        if second_order and rb is not None:
            ga = ga + self._left(self.g, rb)
        if second_order and ra is not None:
            gb = gb + self._right(ra, self.g)
        return [_k_back(ga, k), _k_back(gb, k)]


def _sum_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` ``([k,] *shape)`` summed over the axes along which ``like`` was broadcast."""
    return t.sum_to_size(*t.shape[:t.dim() - like.dim()], *like.shape)


def _map_terms(step: _Map, g: torch.Tensor) -> _MapTerms | _ClosedMapTerms | _ProductTerms:
    """A map's cached terms: its closed form where the walk recognised one."""
    if step.form is None:
        return _MapTerms(step, g)
    return _ProductTerms(step, g) if isinstance(step.form, _Product) else \
        _ClosedMapTerms(step, g)


def _viewed(tangent: torch.Tensor, like: torch.Tensor, k: int | None) -> torch.Tensor:
    """A :class:`_Scale` parameter's tangent viewed as ``like`` (broadcast against one
    sample), with its ``k`` axis first when there is one."""
    return tangent.reshape(like.shape if k is None else (k, *like.shape))


def _scale_forward(step: _Scale, r: torch.Tensor | None, tangents: Mapping[str, torch.Tensor],
                   k: int | None) -> torch.Tensor | None:
    """``R{z} = R{x} * s w + a * dw + db`` at ``z = a * w + b``, ``a = (x - m) * s``."""
    z = None if r is None else r if step.gain is None else r * step.gain
    if step.weight_name in tangents:
        a = step.inputs if k is None else step.inputs.unsqueeze(1)
        dw = _viewed(tangents[step.weight_name], step.weight, k)
        z = a * dw if z is None else z.addcmul_(a, dw)  # z = R{x} * gain, a fresh tensor
    if step.bias_name in tangents:
        db = _viewed(tangents[step.bias_name], step.bias, k)
        if z is None:
            n, per_sample = step.inputs.shape[0], step.inputs.shape[1:]
            z = db.expand((n, *per_sample) if k is None else (n, k, *per_sample))
        else:
            z = z + db
    return z


def _folded(apply: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor, k: int | None
            ) -> torch.Tensor:
    """``apply`` (an op on ``(M, ...)`` rows) on ``t`` ``(N, ...)``, or on ``(N, k, ...)``
    with the ``k`` tangents folded into the rows."""
    if k is None:
        return apply(t)
    return apply(t.flatten(0, 1)).unflatten(0, t.shape[:2])


def _transpose(step: _LinearMap, t: torch.Tensor) -> torch.Tensor:
    """The transpose of a linear map applied to ``t`` ``(M, *out)``: its vector-Jacobian
    product (at zero: the map is linear)."""
    _, vjp = torch.func.vjp(step.apply, t.new_zeros(t.shape[0], *step.shape))
    return vjp(t)[0]


_aten = torch.ops.aten
_REORDERS = {_aten.t.default, _aten.transpose.int, _aten.permute.default}


def _dims(dims: list[int], ndim: int, shift: int) -> list[int]:
    return [d % ndim + shift for d in dims]


def _shape_forward(step: _ShapeMap, t: torch.Tensor, k: int | None) -> torch.Tensor:
    """NOTE [shape maps]: an op that only moves or repeats entries is linear, ``R{z}`` is
    the op on ``R{a}``. ``k`` tangents ``(N, k, ...)`` run with ``k`` moved to the front
    and the op's axes shifted by one, so that the op may move or merge the batch axis
    (heads and positions in attention); its transpose runs the same way: a view back to
    the input's shape, the inverse order, a sum over what ``expand`` repeated, a scatter
    of what ``select``/``slice`` picked. A run of such ops is one step (fewer steps,
    less Python per product)."""
    x = _k_front(t, k)
    for op in step.ops:
        x = _shape_op(op, x, k)
    return _k_back(x, k)


def _shape_transpose(step: _ShapeMap, t: torch.Tensor, k: int | None) -> torch.Tensor:
    """The transpose of :func:`_shape_forward` on ``t`` of the run's output shape."""
    x = _k_front(t, k)
    for op in reversed(step.ops):
        x = _shape_op_transpose(op, x, k)
    return _k_back(x, k)


def _shape_op(step: _ShapeOp, x: torch.Tensor, k: int | None) -> torch.Tensor:
    """One op of a run on ``x``, ``k`` (if any) in front."""
    lead, shift = ((), 0) if k is None else ((k,), 1)
    op, args, n_in = step.op, step.args, len(step.in_shape)
    if op in _REORDERS:
        order = [1, 0] if op is _aten.t.default else list(args) if op is \
            _aten.transpose.int else list(args[0])
        if op is _aten.permute.default:
            z = x.permute(*range(shift), *_dims(order, n_in, shift))
        else:
            d0, d1 = _dims(order, n_in, shift)
            z = x.transpose(d0, d1)
    elif op is _aten.expand.default:
        ones = (1,) * (len(step.out_shape) - n_in)
        z = x.reshape(*lead, *ones, *step.in_shape).expand(*lead, *step.out_shape)
    elif op is _aten.select.int:
        z = x.select(args[0] % n_in + shift, args[1])
    elif op is _aten.slice.Tensor:
        z = _aten.slice.Tensor(x, args[0] % n_in + shift if args else shift, *args[1:])
    else:  # views, squeeze, unsqueeze, clone, alias: the same entries in the same order
        z = x.reshape(*lead, *step.out_shape)
    return z


def _shape_op_transpose(step: _ShapeOp, x: torch.Tensor, k: int | None) -> torch.Tensor:
    """The transpose of :func:`_shape_op` on ``x`` of the op's output shape."""
    lead, shift = ((), 0) if k is None else ((k,), 1)
    op, args, n_in = step.op, step.args, len(step.in_shape)
    if op in _REORDERS:
        if op is _aten.permute.default:
            order = _dims(list(args[0]), n_in, 0)
            inverse = sorted(range(n_in), key=order.__getitem__)
            z = x.permute(*range(shift), *(d + shift for d in inverse))
        else:
            pair = [1, 0] if op is _aten.t.default else list(args)
            d0, d1 = _dims(pair, n_in, shift)
            z = x.transpose(d0, d1)
    elif op is _aten.expand.default:
        ones = (1,) * (len(step.out_shape) - n_in)
        z = x.sum_to_size(*lead, *ones, *step.in_shape).reshape(*lead, *step.in_shape)
    elif op in (_aten.select.int, _aten.slice.Tensor):
        z = x.new_zeros((*lead, *step.in_shape))
        dim = (args[0] if args else 0) % n_in + shift
        z = torch.select_scatter(z, x, dim, args[1]) if op is _aten.select.int else \
            torch.slice_scatter(z, x, dim, *args[1:])
    else:
        z = x.reshape(*lead, *step.in_shape)
    return z


def _lookup_rows(dW: torch.Tensor, indices: torch.Tensor, k: int | None) -> torch.Tensor:
    """``R{z} = dW[i]``: ``(N, ..., d)``, or ``(N, k, ..., d)`` for ``dW`` ``(k, V, d)``."""
    return dW[indices] if k is None else dW[:, indices].movedim(0, 1)


def _scatter_rows(step: _Embedding, t: torch.Tensor, k: int | None) -> torch.Tensor:
    """The transpose of the lookup: ``t`` ``(N, [k,] ..., d)`` summed into the rows of a
    ``(V, d)`` weight (``(k, V, d)``) that each position looked up."""
    rows = step.indices.reshape(-1)
    V, d = step.weight.shape
    if k is None:
        return t.new_zeros(V, d).index_add_(0, rows, t.reshape(-1, d))
    return t.new_zeros(k, V, d).index_add_(1, rows, t.movedim(1, 0).reshape(k, -1, d))


def _accumulate(sums: list[torch.Tensor | None], j: int, part: torch.Tensor) -> None:
    """``sums[j] += part``, out of place: a value read by several steps (a skip
    connection) sums what each sends back, and ``part`` may be another value's too."""
    sums[j] = part if sums[j] is None else sums[j] + part


def _input_times(a: torch.Tensor, dW: torch.Tensor, k: int | None) -> torch.Tensor:
    """``a dW^T``: ``(N, ..., out)`` for ``a`` ``(N, ..., in)``, or ``(N, k, ..., out)`` for
    ``dW`` of shape ``(k, out, in)`` (one GEMM on the rows of ``a``)."""
    if k is None:
        return a @ dW.T
    d_out = dW.shape[1]
    rows = a.reshape(-1, a.shape[-1]) @ dW.reshape(k * d_out, -1).T
    return rows.view(*a.shape[:-1], k, d_out).movedim(-2, 1)


def _grad_times(g: torch.Tensor, dW: torch.Tensor, k: int | None) -> torch.Tensor:
    """``g dW``: ``(N, ..., in)`` for ``g`` ``(N, ..., out)``, or ``(N, k, ..., in)`` for
    ``dW`` of shape ``(k, out, in)``."""
    if k is None:
        return g @ dW
    d_out, d_in = dW.shape[1:]
    rows = g.reshape(-1, d_out) @ dW.transpose(0, 1).reshape(d_out, k * d_in)
    return rows.view(*g.shape[:-1], k, d_in).movedim(-2, 1)


def _rows(t: torch.Tensor, k: int | None) -> torch.Tensor:
    """``t`` ``(N, ..., d)`` as rows ``(M, d)``, or ``(N, k, ..., d)`` as ``(M, k * d)``."""
    return t.reshape(-1, t.shape[-1]) if k is None else \
        t.movedim(1, -2).reshape(-1, k * t.shape[-1])


def _sample_sum(left: torch.Tensor, right: torch.Tensor, k: int | None, *,
                batched_right: bool = False) -> torch.Tensor:
    """``sum_n left[n]^T right[n]`` per tangent, over samples and the axes between the
    first and the last: ``(out, in)``, or ``(k, out, in)`` where the batched factor
    (``left``, or ``right`` with ``batched_right``) is ``(N, k, ..., d)``."""
    if k is None:
        return _rows(left, None).T @ _rows(right, None)
    if batched_right:   # (M, out)^T @ (M, k * in)
        d_out, d_in = left.shape[-1], right.shape[-1]
        return (_rows(left, None).T @ _rows(right, k)).view(d_out, k, d_in).transpose(0, 1)
    d_out, d_in = left.shape[-1], right.shape[-1]   # (M, k * out)^T @ (M, in)
    return (_rows(left, k).T @ _rows(right, None)).view(k, d_out, d_in)


def _bias_sum(t: torch.Tensor, k: int | None) -> torch.Tensor:
    """``t`` ``(N, [k,] ..., out)`` summed over all axes but ``k`` and the last."""
    lead = 1 if k is None else 2
    return t.sum([0, *range(lead, t.dim() - 1)])
