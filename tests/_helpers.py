"""Shared test helpers: one tolerance table per dtype, oracle plumbing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import hessfunc as hf

#: (rtol, atol) per dtype, the table users get in hessfunc.testing. float64 results
#: must equal the oracle to rounding; float32 ones agree with the float64 truth within
#: these stated tolerances.
TOL = hf.testing.TOLERANCES


def assert_close(actual: Any, expected: Any, dtype: torch.dtype = torch.float64,
                 scale: float = 1.0) -> None:
    """``|a - e| <= rtol |e| + atol max(1, max|e|)`` leaf by leaf, times ``scale``: entries
    far below the largest one carry the rounding of the large terms they cancel (drawn
    inputs and weights reach 1e3), so atol grows with the largest entry, never below
    its absolute value."""
    rtol, atol = TOL[dtype]
    leaves = [t for t in torch.utils._pytree.tree_leaves(expected)
              if isinstance(t, torch.Tensor) and t.numel()]
    largest = max([1.0] + [float(t.detach().abs().max()) for t in leaves])
    torch.testing.assert_close(actual, expected, rtol=rtol * scale,
                               atol=atol * scale * largest)


def leaf_params(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh leaves requiring grad, for building a graph for the oracle."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def oracle_loss(f: Any, params: dict[str, torch.Tensor], *batch: Any
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    leaves = leaf_params(params)
    return f(leaves, *batch), leaves


def oracle_hessian(f: Any, params: dict[str, torch.Tensor], *batch: Any) -> torch.Tensor:
    """The loop oracle's full ``(P, P)`` Hessian of ``f(params, *batch)``, leaves in
    ``params`` order."""
    loss, leaves = oracle_loss(f, params, *batch)
    return hf.reference.hessian(loss, list(leaves.values()))


def oracle_grad(f: Any, params: dict[str, torch.Tensor], batch: tuple[Any, ...]
                ) -> dict[str, torch.Tensor]:
    """The loop oracle's gradient of ``f(params, *batch)``."""
    loss, leaves = oracle_loss(f, params, *batch)
    return dict(zip(params, hf.reference.gradient(loss, list(leaves.values())), strict=True))


def oracle_hvp(f: Any, params: dict[str, torch.Tensor], batch: tuple[Any, ...],
               v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loop oracle's (the seed's double backward) ``H v``."""
    loss, leaves = oracle_loss(f, params, *batch)
    hv = hf.reference.hvp(loss, list(leaves.values()), [v[k] for k in params])
    return dict(zip(params, hv, strict=True))


def check_products(H: Any, f: Any, params: dict[str, torch.Tensor], batch: tuple[Any, ...],
                   vs: list[dict[str, torch.Tensor]], *, single: bool = False) -> None:
    """``H(v)``, the batched ``H`` (and with ``single`` one ``hvp`` with
    ``method="structured"``) equal the oracle for every tangent in ``vs``."""
    stacked = {k: torch.stack([v[k] for v in vs]) for k in params}
    batched = H.batched(stacked)
    # the R-operator's k-axis pass itself: batched() loops over single products for a
    # few columns (NOTE [batched or looped products])
    wide = H.chain_products(stacked) if H.method == "structured" else batched
    for i, v in enumerate(vs):
        expected = oracle_hvp(f, params, batch, v)
        if single:
            assert_close(hf.hvp(f, (params, *batch), v, method="structured"), expected)
        assert_close(H(v), expected)
        assert_close({k: t[i] for k, t in batched.items()}, expected)
        assert_close({k: t[i] for k, t in wide.items()}, expected)


def as_dict(names: list[str], tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip(names, tensors, strict=True))


def flat(tree: Any) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in torch.utils._pytree.tree_leaves(tree)])


def unflat(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`flat` for a dict shaped like ``like``."""
    out, i = {}, 0
    for k, p in like.items():
        out[k] = vector[i:i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def assert_nested_close(nested: Any, H: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
    """Nested blocks ``nested[a][b]`` (shape ``a.shape + b.shape``) equal the flat ``H``."""
    starts = dict(zip(params, [0, *torch.tensor([p.numel() for p in params.values()])
                               .cumsum(0).tolist()], strict=False))
    for a, pa in params.items():
        for b, pb in params.items():
            assert nested[a][b].shape == pa.shape + pb.shape
            ra, rb = starts[a], starts[b]
            assert_close(nested[a][b].reshape(pa.numel(), pb.numel()),
                         H[ra:ra + pa.numel(), rb:rb + pb.numel()])


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """Everything a call must not change: parameters, buffers, grads, flags, mode."""
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "grads": {k: None if v.grad is None else v.grad.clone()
                  for k, v in model.named_parameters()},
        "requires_grad": {k: v.requires_grad for k, v in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
    }


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in ("requires_grad", "training"):
        assert a[key] == b[key], key
    for key in ("params", "buffers", "grads"):
        assert a[key].keys() == b[key].keys(), key
        for k in a[key]:
            x, y = a[key][k], b[key][k]
            assert (x is None) == (y is None), (key, k)
            if x is not None:
                assert torch.equal(x, y), (key, k)


def count_captures(monkeypatch: Any) -> list[Any]:
    """The functions the graph capture traces from now on, in order (one entry per
    trace), through ``monkeypatch``."""
    from hessfunc.graph import capture as capture_module

    traced: list[Any] = []
    real = capture_module.capture

    def counting(*args: Any, **kwargs: Any) -> Any:
        traced.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(capture_module, "capture", counting)
    return traced


class Attention(nn.Module):
    """``nn.MultiheadAttention`` (4 features, 2 heads) averaged over positions, and a
    Linear head to 3 outputs: on one sample its projection runs other ops than on the
    batch, so per-sample routes that trace one sample do not apply."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.h = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(self.a(x, x, x)[0].mean(1))


def custom_function(forward: Any, slope: float) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` computing ``forward`` whose stated derivative is
    ``slope`` everywhere (backward and jvp): a straight-through estimator for a rounding
    ``forward``, a deliberately scaled gradient for the identity."""

    class Stated(torch.autograd.Function):
        @staticmethod
        def forward(z):
            return forward(z)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, grad):
            return slope * grad

        @staticmethod
        def jvp(ctx, tangent):
            return slope * tangent

    return Stated
