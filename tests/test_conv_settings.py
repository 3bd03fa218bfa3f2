"""Convolutions with non-square settings, against the loop oracle (float64, rtol 1e-10).

Every other conv test uses one kernel size, stride, padding and dilation for all
spatial axes, so a rule that mixes up the axes (padding in the wrong order for
``F.pad``, the stride of one axis used on the other, stride and dilation swapped)
passes them. Here each axis has its own kernel size, stride, padding and dilation,
inputs are not square, layers have bias or not and may be frozen, and both ways of
the conv terms are exercised (NOTE [convolutions as matrix products] in
``hessfunc/graph/chain_products.py``): matrix products on patches for narrow layers on
the CPU (channels x kernel <= ``PATCH_WIDTH`` = 48, patches <= 16 MiB) and aten's
convolutions elsewhere (forced by ``PATCH_WIDTH = 0``, and met naturally by a wide
layer). ``_conv_input_grad`` has a path of its own for stride 1 (a flipped plain
convolution), also met with non-square settings.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close, oracle_loss
from torch import nn

import hessfunc as hf
from hessfunc.testing.strategies import random_like

PRODUCTS = importlib.import_module("hessfunc.graph.chain_products")
THRESHOLDS = importlib.import_module("hessfunc._thresholds")


def _conv_body(variant):
    """Two convolutions with per-axis settings, activations in between, then Flatten."""
    if variant == "2d-a":  # stride (1, 2), padding (2, 1), dilation (2, 1); then the transposes
        return (2, (7, 10)), [
            nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
            nn.Tanh(),
            nn.Conv2d(3, 2, (3, 2), stride=(2, 1), padding=(0, 1), dilation=(1, 2), bias=False),
            nn.Softplus(),
        ]
    if variant == "2d-b":  # the second layer has stride 1 (the flipped input gradient)
        return (2, (9, 6)), [
            nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False),
            nn.Softplus(),
            nn.Conv2d(3, 2, (2, 3), stride=(1, 1), padding=(1, 0), dilation=(2, 1)),
            nn.Tanh(),
        ]
    if variant == "1d":  # tuple-valued settings, stride != dilation
        return (2, (13,)), [
            nn.Conv1d(2, 3, (3,), stride=(2,), padding=(2,), dilation=(2,)),
            nn.Tanh(),
            nn.Conv1d(3, 2, (2,), stride=(1,), padding=(1,), dilation=(3,), bias=False),
            nn.Softplus(),
        ]
    raise ValueError(variant)


FROZEN = {
    "none": (),
    "first-weight": ("0.weight",),
    "first-conv": ("0.weight", "0.bias"),
    "second-conv": ("2.weight", "2.bias"),
}


def _problem(variant, frozen="none", loss="mse", n=3, seed=0):
    torch.manual_seed(seed)
    (c_in, spatial), layers = _conv_body(variant)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, c_in, *spatial, generator=g, dtype=torch.float64)
    body = nn.Sequential(*layers, nn.Flatten()).double()
    width = body(x).shape[1]
    out = 3 if loss == "cross-entropy" else 2
    model = nn.Sequential(*body, nn.Linear(width, out)).double()
    for name, p in model.named_parameters():
        if name in FROZEN[frozen]:
            p.requires_grad_(False)
    if loss == "cross-entropy":
        y, loss_fn = torch.randint(0, out, (n,), generator=g), F.cross_entropy
    else:
        y, loss_fn = torch.randn(n, out, generator=g, dtype=torch.float64), nn.MSELoss()
    f, params = hf.functionalize(model, loss_fn)
    assert not set(FROZEN[frozen]) & set(params)
    return model, f, params, x, y


def _oracle_hvp(f, params, batch, v):
    loss, leaves = oracle_loss(f, params, *batch)
    return dict(zip(params, hf.reference.hvp(loss, list(leaves.values()),
                                             [v[k] for k in params]), strict=True))


def _check_path(H, path):
    """The conv terms were built on patches (``path == "patches"``) or on aten, for every
    convolution with a trainable weight (a frozen weight needs no patches)."""
    terms = H.chain_products._conv_cache
    assert terms, "no convolution products were computed"
    for t in terms.values():
        assert (t.patches is not None) == (path == "patches" and t.step.weight_name is not None)


@pytest.fixture(params=["patches", "aten"])
def path(request, monkeypatch):
    if request.param == "aten":
        monkeypatch.setattr(THRESHOLDS, "PATCH_WIDTH", 0)
    return request.param


VARIANTS = ["2d-a", "2d-b", "1d"]


@pytest.mark.parametrize("frozen", sorted(FROZEN))
@pytest.mark.parametrize("variant", VARIANTS)
def test_products_with_per_axis_settings_equal_the_oracle(variant, frozen, path):
    loss = "cross-entropy" if variant == "2d-b" else "mse"
    _, f, params, x, y = _problem(variant, frozen, loss)
    vs = [random_like(params, seed) for seed in range(3)]
    expected = [_oracle_hvp(f, params, (x, y), v) for v in vs]
    for method in ("structured", "auto"):
        H = hf.hvp_fn(f, (params, x, y), method=method)
        assert H.method == "structured"
        batched = H.batched({k: torch.stack([v[k] for v in vs]) for k in params})
        for i, (v, hv) in enumerate(zip(vs, expected, strict=True)):
            assert_close(H(v), hv)
            assert_close({k: t[i] for k, t in batched.items()}, hv)
            assert_close(hf.hvp(f, (params, x, y), v, method=method), hv)
        _check_path(H, path)
    for index, key in enumerate(params):  # one parameter's own block rows, k = 3 at once
        rows = H.block_rows(index, torch.stack([v[key] for v in vs]))
        for i, v in enumerate(vs):
            only = {q: t if q == key else torch.zeros_like(t) for q, t in v.items()}
            assert_close(rows[i], _oracle_hvp(f, params, (x, y), only)[key])


def test_a_single_product_builds_no_patches(monkeypatch):
    """One ``hvp`` runs its convolutions on aten: patches cost more to build than one
    product saves. A cached ``hvp_fn`` on the same narrow chain builds them; both equal
    the oracle."""
    built = []
    real = PRODUCTS._conv_patches
    monkeypatch.setattr(PRODUCTS, "_conv_patches", lambda *a: built.append(1) or real(*a))
    _, f, params, x, y = _problem("2d-a", "none", "mse")
    v = random_like(params, 0)
    expected = _oracle_hvp(f, params, (x, y), v)
    assert_close(hf.hvp(f, (params, x, y), v, method="structured"), expected)
    assert not built
    assert_close(hf.hvp_fn(f, (params, x, y))(v), expected)
    assert built


@pytest.mark.parametrize("frozen", ["none", "first-weight", "second-conv"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_quantities_with_per_axis_settings_equal_the_oracle(variant, frozen, path):
    """Diagonal, blocks and the full Hessian of conv chains come from batched structured
    products on one-hot tangents: the same conv terms, many tangents at once."""
    loss = "cross-entropy" if variant == "1d" else "mse"
    _, f, params, x, y = _problem(variant, frozen, loss)
    loss_value, leaves = oracle_loss(f, params, x, y)
    H_ref = hf.reference.hessian(loss_value, list(leaves.values()))
    assert float(H_ref.abs().max()) > 1e-3
    assert_close(hf.hessian(f, flat=True)(params, x, y), H_ref)
    assert_close(hf.hessian(f, flat=True, chunk_size=7)(params, x, y), H_ref)
    assert_close(hf.hessian_blocks(f)(params, x, y),
                 hf.reference.hessian_blocks(loss_value, leaves))
    diag_ref = hf.reference.hessian_diag(loss_value, leaves)
    assert_close(hf.hessian_diag(f)(params, x, y), diag_ref)
    assert_close(hf.hessian_diag(f, method="generic", chunk_size=5)(params, x, y), diag_ref)
    H = hf.hvp_fn(f, (params, x, y))
    H(random_like(params, 0))
    _check_path(H, path)


def test_wide_and_narrow_layers_take_aten_and_patches_by_the_width_rule():
    """No forcing: a layer with max(channels) x kernel = 54 > 48 takes aten, one at 45
    takes patches, in the same chain, with per-axis settings on both."""
    torch.manual_seed(3)
    assert THRESHOLDS.PATCH_WIDTH == 48
    body = nn.Sequential(
        nn.Conv2d(1, 9, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),   # 9 x 6
        nn.Sigmoid(),
        nn.Conv2d(9, 2, (1, 5), stride=(1, 2), padding=(2, 0), dilation=(1, 1)),   # 9 x 5
        nn.Tanh(),
        nn.Flatten(),
    ).double()
    x = torch.randn(2, 1, 5, 8, dtype=torch.float64)
    model = nn.Sequential(*body, nn.Linear(body(x).shape[1], 2)).double()
    y = torch.randn(2, 2, dtype=torch.float64)
    f, params = hf.functionalize(model, nn.MSELoss())
    H = hf.hvp_fn(f, (params, x, y))
    assert H.method == "structured"
    vs = [random_like(params, seed) for seed in range(2)]
    batched = H.batched({k: torch.stack([v[k] for v in vs]) for k in params})
    for i, v in enumerate(vs):
        expected = _oracle_hvp(f, params, (x, y), v)
        assert_close(H(v), expected)
        assert_close({k: t[i] for k, t in batched.items()}, expected)
    terms = H.chain_products._conv_cache
    assert [terms[i].patches is None for i in sorted(terms)] == [True, False]
    loss_value, leaves = oracle_loss(f, params, x, y)
    assert_close(hf.hessian_diag(f)(params, x, y), hf.reference.hessian_diag(loss_value, leaves))
