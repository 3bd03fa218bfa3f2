"""Hypothesis strategies: models with curvature, losses, batches, parameters, tangents.

For property tests of second-order code::

    from hypothesis import given
    from hessfunc.testing import strategies as hst

    @given(hst.problems())
    def test_my_hvp(prob):
        f, params = hf.functionalize(prob.model, prob.loss_fn)
        hf.testing.assert_hvp_close(my_hvp, f, (params, *prob.batch))

Every strategy draws small float64 (or, on request, float32) problems that shrink to
small counter-examples: sizes shrink towards one unit, depths towards the minimum,
kinds and losses towards the first of their lists, values towards the plain case
(scale 1, no frozen parameters, distinct rows). The hard cases are drawn on purpose:
depth >= 2 with curved activations, skip connections, concatenations, tied weights,
non-square convolutions, ``bias=False``, whole frozen layers, input scales from 1e-8
to 1e3 and weight scales from 1e-8 to 10, zero and duplicate rows, more than three
outputs. Each draw records its kind, loss and hard cases with ``hypothesis.event``
(``pytest --hypothesis-show-statistics`` lists them).

Needs hypothesis (``pip install hypothesis``); the rest of :mod:`hessfunc.testing`
does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

try:
    from hypothesis import event
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "hessfunc.testing.strategies needs hypothesis, which is not installed. Install it "
        "with `pip install hypothesis` (or `pip install 'hessfunc[test]'`); the assertions "
        "and check_derivatives in hessfunc.testing work without it."
    ) from None

from .losses import LOSSES, Loss
from .models import (
    ACTIVATIONS,
    MLP,
    ConcatNet,
    ConvNet,
    NormedMLP,
    ResidualMLP,
    TiedNet,
    TwoInputNet,
)

__all__ = [
    "KINDS",
    "Problem",
    "activations",
    "mlps",
    "convnets",
    "models",
    "losses",
    "batches",
    "frozen",
    "params_like",
    "tangents",
    "problems",
    "random_like",
]

#: Model kinds drawn by :func:`models`: chains, DAGs, weight sharing, convolutions, and
#: normalisations (BatchNorm in eval mode, LayerNorm).
KINDS = ("mlp", "residual", "concat", "tied", "two-input", "conv1d", "conv2d", "normed")

#: Scales of inputs drawn (the first is the plain case hypothesis shrinks to).
SCALES = (1.0, 1e-8, 1e-3, 10.0, 1e3)

#: Scales of one layer's weight drawn by :func:`problems`. A weight at 1e3 leaves a tanh
#: half-saturated (``1 - tanh^2`` keeping 4 digits) or puts ``sin(1e3 x)`` in the loss:
#: float64 results then agree to 1e-9 rather than 1e-10, conditioning rather than a bug.
#: Pass ``weight_scales=SCALES`` to draw it anyway, with a tolerance to match.
WEIGHT_SCALES = (1.0, 1e-8, 1e-3, 10.0)


def activations() -> st.SearchStrategy[str]:
    """Names of smooth activations with curvature (keys of ``models.ACTIVATIONS``)."""
    return st.sampled_from(sorted(ACTIVATIONS))


@st.composite
def mlps(draw: st.DrawFn, min_depth: int = 1, max_depth: int = 3, max_width: int = 8,
         max_in: int = 4, min_out: int = 1, max_out: int = 3, bias: bool | None = None,
         dtype: torch.dtype = torch.float64) -> MLP:
    """A tanh-like chain ``[d_in, widths..., d_out]`` with ``min_depth..max_depth`` Linears.

    ``bias=None`` draws, per layer, whether it has a bias.
    """
    depth = draw(st.integers(min_depth, max_depth))
    sizes = [draw(st.integers(1, max_in))]
    sizes += [draw(st.integers(1, max_width)) for _ in range(depth - 1)]
    sizes.append(draw(st.integers(min_out, max_out)))
    biases = [draw(st.booleans().map(lambda b: not b)) if bias is None else bias
              for _ in range(depth)]
    act = draw(activations())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = MLP(sizes, act, biases).to(dtype)
    model.name = f"mlp{sizes}-{act}" + ("" if all(biases) else "-nobias")
    return model


def _conv_layer(draw: st.DrawFn, dims: int, size: list[int]) -> tuple[dict, list[int]]:
    """One convolution's settings that leave a non-empty output, per-dimension tuples."""
    ints = [st.integers(1, 3), st.integers(1, 2), st.integers(0, 1), st.integers(1, 2)]
    kernel, stride, padding, dilation = ([draw(s) for _ in range(dims)] for s in ints)
    out = []
    for i in range(dims):
        while dilation[i] * (kernel[i] - 1) + 1 > size[i] + 2 * padding[i]:
            if dilation[i] > 1:
                dilation[i] -= 1
            else:
                kernel[i] -= 1
        out.append((size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1)
                   // stride[i] + 1)
    spec = dict(out_channels=draw(st.integers(1, 3)), kernel_size=tuple(kernel),
                stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
                bias=draw(st.booleans().map(lambda b: not b)))
    if dims == 1:
        spec.update({k: v[0] for k, v in spec.items() if isinstance(v, tuple)})
    return spec, out


@st.composite
def convnets(draw: st.DrawFn, dims: int = 2, max_layers: int = 2, min_out: int = 1,
             max_out: int = 3, dtype: torch.dtype = torch.float64) -> ConvNet:
    """``[Conv -> act] * 1..max_layers -> Flatten -> Linear`` with non-square settings.

    Kernels, strides, paddings and dilations are drawn per dimension, so tuple-valued
    and non-square settings are reached.
    """
    spatial = [draw(st.integers(3, 6)) for _ in range(dims)]
    in_channels = draw(st.integers(1, 2))
    layers, size = [], spatial
    for _ in range(draw(st.integers(1, max_layers))):
        spec, size = _conv_layer(draw, dims, size)
        layers.append(spec)
    act = draw(activations())
    num_outputs = draw(st.integers(min_out, max_out))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = ConvNet(in_channels, tuple(spatial), layers, num_outputs, act).to(dtype)
    model.name = f"conv{dims}d{spatial}-{layers}-{act}"
    return model


@st.composite
def models(draw: st.DrawFn, kinds: tuple[str, ...] = KINDS, min_outputs: int = 1,
           max_outputs: int = 3, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A small model of one of ``kinds`` (see :data:`KINDS`), with ``input_shape``,
    ``num_outputs`` and a readable ``name``.

    ``mlp`` chains have depth >= 2 here (a curved activation between two Linears);
    use :func:`mlps` for depth 1.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"models(kinds=...): unknown kinds {sorted(unknown)}; "
                         f"expected some of {KINDS}")
    kind = draw(st.sampled_from(kinds))
    event(f"model kind: {kind}")
    if kind == "mlp":
        return draw(mlps(min_depth=2, min_out=min_outputs, max_out=max_outputs, dtype=dtype))
    if kind in ("conv1d", "conv2d"):
        return draw(convnets(dims=int(kind[4]), min_out=min_outputs, max_out=max_outputs,
                             dtype=dtype))
    d_in, width = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    d_out = draw(st.integers(min_outputs, max_outputs))
    act, bias = draw(activations()), draw(st.booleans().map(lambda b: not b))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if kind == "residual":
        model: nn.Module = ResidualMLP(d_in, width, draw(st.integers(1, 3)), d_out, act, bias)
    elif kind == "concat":
        model = ConcatNet(d_in, width, d_out, act, bias)
    elif kind == "tied":
        model = TiedNet(max(d_in, min_outputs), width, act)
    elif kind == "normed":
        norm = draw(st.sampled_from(("batch", "layer", "rms", "softmax")))
        event(f"norm: {norm}")
        model = NormedMLP(d_in, max(width, 2), d_out, act, norm)
    else:
        model = TwoInputNet(d_in, draw(st.integers(1, 3)), width, d_out)
    model = model.to(dtype)
    model.name = f"{kind}({d_in}->{width}->{model.num_outputs}, " \
        f"{'tanh' if kind == 'two-input' else act})"
    return model


def losses(num_outputs: int | None = None, names: tuple[str, ...] | None = None
           ) -> st.SearchStrategy[Loss]:
    """A :class:`~hessfunc.testing.losses.Loss` that makes sense for ``num_outputs``."""
    pool = [LOSSES[n] for n in (names or tuple(LOSSES))]
    if num_outputs is not None:
        pool = [loss for loss in pool if num_outputs >= loss.min_outputs]
    if not pool:
        raise ValueError(f"losses(num_outputs={num_outputs}, names={names}): no loss fits")
    return st.sampled_from(pool)


def _input_shapes(model: nn.Module) -> tuple[tuple[int, ...], ...]:
    shape = getattr(model, "input_shape", None)
    if shape is None:
        first = next((m for m in model.modules()
                      if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))), None)
        if isinstance(first, nn.Linear):
            shape = (first.in_features,)
        elif first is not None:
            shape = (first.in_channels, *([5] * (first.weight.dim() - 2)))
        else:
            raise ValueError(f"batches: cannot tell the input shape of {type(model).__name__}; "
                             "give it an `input_shape` attribute (one sample's shape)")
    return shape if isinstance(shape[0], tuple) else (shape,)


def _num_outputs(model: nn.Module) -> int:
    if hasattr(model, "num_outputs"):
        return model.num_outputs
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"batches: cannot tell the number of outputs of "
                         f"{type(model).__name__}; give it a `num_outputs` attribute")
    return last[-1].out_features


@st.composite
def batches(draw: st.DrawFn, model: nn.Module, loss: Loss | None = None, min_size: int = 1,
            max_size: int = 6, scales: tuple[float, ...] = SCALES,
            rows: tuple[str, ...] = ("random", "zero row", "duplicate rows")
            ) -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` for ``model`` and ``loss`` (real targets when ``loss`` is None).

    Inputs are standard normal times a drawn scale; ``rows`` may zero one row or repeat
    one. ``inputs`` is a tensor, or a tuple for models with several inputs.
    """
    dtype = next(model.parameters()).dtype
    n = draw(st.integers(min_size, max_size))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from(scales))
    pattern = draw(st.sampled_from(rows)) if n > 1 else "random"
    event(f"batch rows: {pattern}")
    event(f"input scale: {scale:g}")
    inputs = []
    for shape in _input_shapes(model):
        x = scale * torch.randn(n, *shape, generator=g, dtype=dtype)
        if pattern == "zero row":
            x[draw(st.integers(0, n - 1))] = 0
        elif pattern == "duplicate rows":
            x[n - 1] = x[0]
        inputs.append(x)
    c = _num_outputs(model)
    kind = "real" if loss is None else loss.targets
    if kind == "class":
        targets = torch.randint(0, c, (n,), generator=g)
    elif kind == "binary":
        targets = torch.randint(0, 2, (n, c), generator=g).to(dtype)
    else:
        targets = torch.randn(n, c, generator=g, dtype=dtype)
    return (inputs[0] if len(inputs) == 1 else tuple(inputs)), targets


@st.composite
def frozen(draw: st.DrawFn, model: nn.Module) -> nn.Module:
    """``model`` with a drawn subset of its parameters frozen (``requires_grad=False``),
    in place: none, single tensors, or whole layers; at least one stays trainable."""
    layers = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    names = [n for n, _ in model.named_parameters()]
    how = draw(st.sampled_from(["none", "tensors", "whole layers"]))
    event(f"frozen: {how}")
    if how == "tensors" and len(names) > 1:
        chosen = draw(st.sets(st.sampled_from(names), max_size=len(names) - 1))
        for n, p in model.named_parameters():
            p.requires_grad_(n not in chosen)
    elif how == "whole layers" and len(layers) > 1:
        chosen_layers = draw(st.sets(st.integers(0, len(layers) - 1),
                                     min_size=1, max_size=len(layers) - 1))
        for i in chosen_layers:
            for p in layers[i].parameters(recurse=False):
                p.requires_grad_(False)
    return model


@st.composite
def _scaled_weights(draw: st.DrawFn, model: nn.Module, scales: tuple[float, ...]) -> float:
    """Scale one drawn layer's weight (scaling every layer would compound to 1e3^depth:
    outputs of 1e9, where even sin(output) in float64 keeps only 7 digits)."""
    if isinstance(model, TiedNet):  # its one weight is used twice: a scale would square
        return 1.0
    scale = draw(st.sampled_from(scales))
    event(f"weight scale: {scale:g}")
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    if scale != 1.0 and layers:
        with torch.no_grad():
            layers[draw(st.integers(0, len(layers) - 1))].weight.mul_(scale)
    return scale


def _tree_strategy(params: dict[str, torch.Tensor], scale: float, max_elements: int
                   ) -> st.SearchStrategy[dict[str, torch.Tensor]]:
    total = sum(p.numel() for p in params.values())
    if total <= max_elements:
        floats = st.floats(-scale, scale, allow_nan=False, allow_infinity=False)
        flat = st.lists(floats, min_size=total, max_size=total)

        def build(values: list[float]) -> dict[str, torch.Tensor]:
            out, i = {}, 0
            for k, p in params.items():
                out[k] = torch.tensor(values[i:i + p.numel()], dtype=p.dtype,
                                      device=p.device).reshape(p.shape)
                i += p.numel()
            return out

        return flat.map(build)
    return st.integers(0, 2**31 - 1).map(
        lambda seed: {k: scale * v for k, v in random_like(params, seed).items()})


def params_like(params: dict[str, torch.Tensor], scale: float = 1.0, max_elements: int = 64
                ) -> st.SearchStrategy[dict[str, torch.Tensor]]:
    """Trees shaped, typed and placed like ``params`` with values in ``[-scale, scale]``.

    Element-wise draws (shrinking value by value) up to ``max_elements`` numbers in
    all; larger trees are drawn from a seed (shrinking only the seed).
    """
    return _tree_strategy(params, scale, max_elements)


def tangents(params: dict[str, torch.Tensor], max_elements: int = 64
             ) -> st.SearchStrategy[dict[str, torch.Tensor]]:
    """Tangent vectors like ``params`` (not all zero: a zero tangent tests nothing)."""
    return _tree_strategy(params, 1.0, max_elements).filter(
        lambda t: any(bool(v.ne(0).any()) for v in t.values()))


def random_like(tree: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Standard normal tensors shaped and typed like ``tree``, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype).to(v.device)
            for k, v in tree.items()}


@dataclass
class Problem:
    """A model, a loss and a batch drawn together; ``name`` says what was drawn."""

    model: nn.Module
    loss_fn: Any
    inputs: Any  # a tensor or a tuple of tensors
    targets: torch.Tensor
    name: str

    @property
    def batch(self) -> tuple[Any, torch.Tensor]:
        return self.inputs, self.targets


@st.composite
def problems(draw: st.DrawFn, kinds: tuple[str, ...] = ("mlp", "two-input", "tied"),
             max_batch: int = 6, loss_names: tuple[str, ...] | None = None,
             scales: tuple[float, ...] = SCALES,
             weight_scales: tuple[float, ...] = WEIGHT_SCALES, freeze: bool = False,
             min_depth: int = 1, dtype: torch.dtype = torch.float64) -> Problem:
    """A model of one of ``kinds``, a loss that fits its outputs and a batch for both.

    ``freeze=True`` also draws frozen parameters (:func:`frozen`). Either one layer's
    weight is scaled by a draw from ``weight_scales`` or the inputs by one from
    ``scales`` (``scales=(1.0,)`` turns both off). ``mlp`` models have depth ``min_depth..3``.
    """
    kind = draw(st.sampled_from(kinds))
    loss = draw(losses(names=loss_names))
    event(f"loss: {loss.name}")
    event(f"model kind: {kind}")
    min_out = loss.min_outputs
    if kind == "mlp":
        model = draw(mlps(min_depth=min_depth, min_out=min_out, dtype=dtype))
    else:
        model = draw(models(kinds=(kind,), min_outputs=min_out, dtype=dtype))
    scale = draw(_scaled_weights(model, tuple(s for s in weight_scales if s in scales)
                                 or (1.0,)))
    if freeze:
        draw(frozen(model))
    # inputs and a weight both at 1e3 would put sin(1e6) in float64: 7 digits of a
    # derivative, conditioning rather than a bug, so one of the two is scaled at a time
    input_scales = scales if scale == 1.0 else (1.0,)
    inputs, targets = draw(batches(model, loss, max_size=max_batch, scales=input_scales))
    name = f"{model.name}/{loss.name}/n={targets.shape[0]}" + (
        f"/a weight x{scale:g}" if scale != 1.0 else "")
    return Problem(model, loss, inputs, targets, name)
