"""hessfunc.testing: correct code passes, deliberately wrong code fails, strategies reach
every case, and bad input gets a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import jvp, vjp

import hessfunc as hf
from hessfunc.testing import (
    assert_diag_close,
    assert_hessian_close,
    assert_hvp_close,
    assert_laplacian_close,
    check_derivatives,
)
from hessfunc.testing import strategies as hst
from hessfunc.testing.losses import LOSSES
from hessfunc.testing.models import ResidualMLP, build_mlp

SMOOTH_LOSSES = tuple(n for n in LOSSES if n != "huber")  # finite differences need smoothness


def _hvp(f, primals, v):
    return hf.hvp(f, tuple(primals), v)


def _hessian_nested(f, primals):
    return hf.hessian(f)(*primals)


def _hessian_flat(f, primals):
    return hf.hessian(f, flat=True)(*primals)


def _diag(f, primals):
    return hf.hessian_diag(f)(*primals)


# -- every correct hessfunc implementation passes, on every kind of model ---------------

@given(hst.problems(kinds=hst.KINDS, max_batch=3, freeze=True,
                    scales=tuple(s for s in hst.SCALES if s < 1e3)))
def test_hessfunc_transforms_pass_the_assertions_on_every_model_kind(prob):
    """Inputs at 1e3 are left out: there a saturated cross-entropy leaves the float64 loop
    oracle itself 4% off entries 1e-7 of the largest (hessfunc matched the 50-digit
    mpmath value to 16 digits), which the assertions cannot tell from an error."""
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    primals = (params, *prob.batch)
    assert_hvp_close(_hvp, f, primals)
    assert_hvp_close(lambda f, p, v: hf.hvp_fn(f, tuple(p))(v), f, primals)
    assert_diag_close(_diag, f, primals)
    if sum(p.numel() for p in params.values()) <= 150:
        assert_hessian_close(_hessian_flat, f, primals)
        assert_hessian_close(_hessian_nested, f, primals)


@pytest.mark.filterwarnings("ignore:check_derivatives. torch cannot:RuntimeWarning")
@given(hst.problems(kinds=("mlp", "residual", "concat", "conv1d"), max_batch=3,
                    loss_names=SMOOTH_LOSSES, scales=(1.0,)))
def test_check_derivatives_passes_on_drawn_losses_to_order_two(prob):
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    check_derivatives(f, (params, *prob.batch), order=2)


def test_laplacian_passes_pointwise_and_batched():
    u = lambda z: torch.sin(z).sum() * torch.tanh(z).prod()  # noqa: E731
    x = torch.randn(4, 3, dtype=torch.float64)
    assert_laplacian_close(lambda u, z: hf.laplacian(u)(z), u, x[0])
    assert_laplacian_close(lambda u, z: torch.func.vmap(hf.laplacian(u))(z), u, x, batched=True)


@given(hst.problems(kinds=hst.KINDS, max_batch=3, dtype=torch.float32, scales=(1.0, 1e-3),
                    loss_names=SMOOTH_LOSSES))
def test_float32_transforms_pass_on_every_model_kind(prob):
    """float32 within the float32 table, against the float64 oracle, on well-conditioned
    draws. A weight x10 is not one: it drives logits to 13, where float32 holds
    1 - sigmoid(z) to a digit and any float32 BCE curvature is 1e-3 off the float64
    truth (measured: torch's own double backward too)."""
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    assert_hvp_close(_hvp, f, (params, *prob.batch))
    assert_diag_close(_diag, f, (params, *prob.batch))


def test_float32_results_pass_within_the_float32_table():
    model = build_mlp([3, 5, 2], "tanh", seed=1, dtype=torch.float32)
    f, params = hf.functionalize(model, nn.MSELoss())
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    assert_hvp_close(_hvp, f, (params, x, y))
    assert_diag_close(_diag, f, (params, x, y))
    check_derivatives(f, (params, x, y), order=2)


# -- deliberately wrong implementations fail ---------------------------------------------

def _tanh_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = build_mlp([3, 4, 4, 2], "tanh", seed=seed)
    f, params = hf.functionalize(model, nn.MSELoss())
    g, _ = hf.functionalize(model)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    return f, g, params, x, y


def _ggn_vp(g, params, x, y, v, factor=1.0):
    """J^T (d2 loss / d out2) J v: the Hessian without the network's second derivatives."""
    out, Jv = jvp(lambda p: g(p, x), (params,), (v,))
    H_out = torch.func.hessian(lambda o: F.mse_loss(o, y))(out)
    HJv = factor * torch.einsum("abcd,cd->ab", H_out, Jv)
    return vjp(lambda p: g(p, x), params)[1](HJv)[0]


def test_missing_activation_curvature_fails_the_hvp_assertion():
    f, g, params, x, y = _tanh_problem()
    with pytest.raises(AssertionError, match=r"H v \(tangents\[0\]\) differs from the oracle"):
        assert_hvp_close(lambda f, p, v: _ggn_vp(g, params, x, y, v), f, (params, x, y))


def test_doubled_loss_hessian_fails_the_hvp_assertion():
    f, g, params, x, y = _tanh_problem(1)

    def doubled(f, primals, v):  # H v + G v: the loss's Hessian counted twice
        Hv = hf.hvp(f, tuple(primals), v)
        return {k: Hv[k] + G for k, G in _ggn_vp(g, params, x, y, v).items()}

    with pytest.raises(AssertionError, match="differs from the oracle"):
        assert_hvp_close(doubled, f, (params, x, y))


def test_sign_error_in_one_parameter_fails_and_names_it():
    f, _, params, x, y = _tanh_problem(2)
    name = list(params)[3]

    def flipped(f, primals, v):
        return {k: -t if k == name else t for k, t in hf.hvp(f, tuple(primals), v).items()}

    with pytest.raises(AssertionError, match=rf"at {name}\["):
        assert_hvp_close(flipped, f, (params, x, y))


def test_asymmetric_hvp_fails_the_symmetry_check_alone():
    f = lambda p: (p["w"][0] * p["w"][1] ** 2)  # noqa: E731
    p = {"w": torch.tensor([0.5, 2.0], dtype=torch.float64)}
    A = torch.tensor([[0.0, 4.0], [3.0, 1.0]], dtype=torch.float64)  # true H = [[0,4],[4,1]]
    u, v = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}, \
        {"w": torch.tensor([0.0, 1.0], dtype=torch.float64)}
    with pytest.raises(AssertionError):
        assert_hvp_close(lambda f, pr, t: {"w": A @ t["w"]}, f, (p,), [u, v], check_symmetry=False)
    with pytest.raises(AssertionError, match="not symmetric"):  # values within a loose
        assert_hvp_close(lambda f, pr, t: {"w": A @ t["w"]}, f, (p,), [u, v],  # tolerance
                         rtol=0.5, atol=0.5)


def test_transposed_block_fails_the_hessian_assertion():
    f, _, params, x, y = _tanh_problem(3)
    square = next(k for k, t in params.items() if t.dim() == 2 and t.shape[0] == t.shape[1])

    def transposed(f, primals):
        H = hf.hessian(f)(*primals)
        H[square][square] = H[square][square].permute(1, 0, 3, 2)  # W^T's block for W's
        return H

    with pytest.raises(AssertionError, match="the flat Hessian"):
        assert_hessian_close(transposed, f, (params, x, y))


def test_ggn_diagonal_fails_the_diagonal_assertion():
    f, g, params, x, y = _tanh_problem(4)

    def ggn_diag(f, primals):  # one-hot GGN products: no activation curvature
        out = {}
        for k, t in params.items():
            d = torch.zeros(t.numel(), dtype=t.dtype)
            for i in range(t.numel()):
                e = {j: torch.zeros_like(s) for j, s in params.items()}
                e[k].view(-1)[i] = 1
                d[i] = _ggn_vp(g, params, x, y, e)[k].reshape(-1)[i]
            out[k] = d.reshape(t.shape)
        return out

    with pytest.raises(AssertionError, match="the Hessian diagonal"):
        assert_diag_close(ggn_diag, f, (params, x, y))


def test_laplacian_missing_a_coordinate_fails():
    u = lambda z: (z ** 3).sum() + torch.sin(z).prod()  # noqa: E731
    x = torch.tensor([0.3, -1.1, 0.7], dtype=torch.float64)
    with pytest.raises(AssertionError, match="the Laplacian"):
        assert_laplacian_close(lambda u, z: torch.func.hessian(u)(z).diagonal()[1:].sum(), u, x)


class _Cube(torch.autograd.Function):
    """x^3 whose first derivative is right and whose second is wrong (3x, not 6x)."""

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * _WrongSquare.apply(x)


class _WrongSquare(torch.autograd.Function):
    """3 x^2 with a wrong derivative: 3x instead of 6x."""

    @staticmethod
    def forward(x):
        return 3 * x ** 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * x


def test_wrong_double_backward_passes_order_one_and_fails_order_two():
    f = lambda p: _Cube.apply(p["w"]).sum()  # noqa: E731
    p = {"w": torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64)}
    check_derivatives(f, (p,), order=1, modes=("rev",))
    with pytest.raises(AssertionError, match=r"reverse-mode derivative of vjp"):
        check_derivatives(f, (p,), order=2, modes=("rev",))


def test_check_derivatives_catches_a_wrong_jvp():
    class Sin(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return torch.sin(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])
            ctx.save_for_forward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            return g * torch.cos(ctx.saved_tensors[0])

        @staticmethod
        def jvp(ctx, t):
            return t * torch.sin(ctx.saved_tensors[0])  # wrong: should be cos

    x = torch.tensor([0.2, 1.0], dtype=torch.float64)
    check_derivatives(Sin.apply, (x,), order=1, modes=("rev",))
    with pytest.raises(AssertionError, match="forward-mode derivative of f"):
        check_derivatives(Sin.apply, (x,), order=1, modes=("fwd",))


# -- failure messages and tolerances ------------------------------------------------------

def test_failure_message_names_the_worst_entry_and_both_values():
    f = lambda p: (p["a"] ** 2).sum() + (p["b"] ** 4).sum()  # noqa: E731
    p = {"a": torch.ones(2, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64)}
    v = {"a": torch.ones(2, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64)}

    def off_by_one(f, primals, t):
        Hv = {"a": 2 * t["a"], "b": 12 * t["b"]}
        Hv["b"][2] += 1e-6
        return Hv

    with pytest.raises(AssertionError, match=r"at b\[2\]: got 12\.000001.*expected 12\.0"):
        assert_hvp_close(off_by_one, f, (p,), v)
    assert_hvp_close(off_by_one, f, (p,), v, rtol=1e-6)  # a stated looser tolerance passes


# -- strategies reach every case ---------------------------------------------------------

def test_strategies_reach_every_kind_loss_and_hard_case():
    seen: set[str] = set()

    # a fixed set of draws (derandomize): coverage is a property of the strategies
    @settings(max_examples=500, database=None, derandomize=True)
    @given(hst.problems(kinds=hst.KINDS, freeze=True))
    def draw(prob):
        m = prob.model
        seen.add(f"kind:{type(m).__name__}")
        if hasattr(m, "norm"):
            seen.add(f"norm:{type(m.norm).__name__}")
        seen.add(f"loss:{prob.loss_fn.name}")
        if any(getattr(layer, "bias", 0) is None for layer in m.modules()):
            seen.add("bias=False")
        if not all(p.requires_grad for p in m.parameters()):
            seen.add("frozen")
        x = prob.inputs if isinstance(prob.inputs, torch.Tensor) else prob.inputs[0]
        if x.shape[0] > 1 and bool((x == 0).all(dim=tuple(range(1, x.dim()))).any()):
            seen.add("zero row")
        if x.shape[0] > 1 and torch.equal(x[0], x[-1]):
            seen.add("duplicate rows")
        scale = float(x.abs().max())
        seen.add("tiny inputs" if scale < 1e-6 else "huge inputs" if scale > 100 else "inputs")
        convs = [layer for layer in m.modules() if isinstance(layer, nn.Conv2d)]
        if any(len(set(c.kernel_size)) > 1 or len(set(c.stride)) > 1
               or len(set(c.dilation)) > 1 for c in convs):
            seen.add("non-square conv")

    draw()
    expected = {f"kind:{c}" for c in ("MLP", "ResidualMLP", "ConcatNet", "TiedNet",
                                       "TwoInputNet", "ConvNet", "NormedMLP")}
    expected |= {f"loss:{n}" for n in LOSSES}
    expected |= {f"norm:{n}" for n in ("BatchNorm1d", "LayerNorm", "RMSNorm", "Softmax")}
    expected |= {"bias=False", "frozen", "zero row", "duplicate rows", "tiny inputs",
                 "huge inputs", "non-square conv"}
    assert expected <= seen, f"never drawn: {sorted(expected - seen)}"


@given(hst.problems(kinds=("mlp",), min_depth=2, scales=(1.0,), max_batch=4,
                    loss_names=("mse", "cross-entropy", "bce-with-logits", "custom")))
def test_drawn_structured_models_exercise_activation_curvature(prob):
    """The Hessian differs from its Gauss-Newton part J^T H_out J: the activations'
    second derivatives enter every drawn structured model (computed with plain autograd)."""
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    g, _ = hf.functionalize(prob.model)
    x, y = prob.batch
    names = list(params)
    flat = torch.cat([params[n].reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def unflat(z):
        return {n: t.reshape(params[n].shape) for n, t in zip(names, z.split(sizes), strict=True)}

    H = torch.autograd.functional.hessian(lambda z: f(unflat(z), x, y), flat)
    out = g(params, x)
    J = torch.autograd.functional.jacobian(lambda z: g(unflat(z), x), flat)
    J = J.reshape(-1, flat.numel())
    H_out = torch.autograd.functional.hessian(lambda o: prob.loss_fn(o, y), out)
    G = J.T @ H_out.reshape(out.numel(), out.numel()) @ J
    assert (H - G).abs().max() > 1e-6 * H.abs().max(), prob.name


@given(st.data())
def test_params_like_and_tangents_match_the_tree(data):
    params = {"w": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(3)}
    drawn = data.draw(hst.params_like(params, scale=2.0))
    v = data.draw(hst.tangents(params))
    for tree in (drawn, v):
        assert list(tree) == ["w", "b"]
        assert all(tree[k].shape == params[k].shape and tree[k].dtype == params[k].dtype
                   for k in params)
    assert max(float(t.abs().max()) for t in drawn.values()) <= 2.0
    assert any(bool(t.ne(0).any()) for t in v.values())
    big = {"w": torch.zeros(20, 20, dtype=torch.float64)}
    assert data.draw(hst.params_like(big))["w"].shape == (20, 20)


def test_batches_for_a_plain_sequential_and_a_residual_model():
    conv = nn.Sequential(nn.Conv1d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4)).double()

    @settings(max_examples=5, database=None)
    @given(hst.batches(conv, LOSSES["cross-entropy"]),
           hst.batches(ResidualMLP(3, 4, 2, 2).double()))
    def draw(conv_batch, res_batch):
        x, y = conv_batch
        assert x.shape[1:] == (2, 5) and y.dtype == torch.int64 and int(y.max()) < 4
        assert res_batch[0].shape[1:] == (3,) and res_batch[1].shape[1:] == (2,)

    draw()


# -- bad input ---------------------------------------------------------------------------

def test_bad_input_gets_clear_errors():
    f = lambda p: (p["w"] ** 3).sum()  # noqa: E731
    ints = {"w": torch.arange(3)}
    with pytest.raises(hf.ArgumentError, match=r"primals\[0\].*floating"):
        assert_hvp_close(_hvp, f, (ints,))
    p = {"w": torch.ones(3, dtype=torch.float64)}
    with pytest.raises(AssertionError, match="wrong structure"):
        assert_hvp_close(lambda f, pr, v: [v["w"]], f, (p,))
    with pytest.raises(AssertionError, match=r"shape \(2,\), expected \(3,\)"):
        assert_hvp_close(lambda f, pr, v: {"w": v["w"][:2]}, f, (p,))
    with pytest.raises(hf.ArgumentError, match="Tangents must be shaped like primals"):
        assert_hvp_close(_hvp, f, (p,), {"v": torch.ones(3)})
    with pytest.raises(hf.ArgumentError, match="half precision"):
        check_derivatives(f, ({"w": torch.ones(3, dtype=torch.float16)},))
    with pytest.raises(hf.ArgumentError, match="`modes`"):
        check_derivatives(f, (p,), modes=("sideways",))
    with pytest.raises(hf.ArgumentError, match="`order`"):
        check_derivatives(f, (p,), order=0)
    with pytest.raises(hf.ArgumentError, match="scalar"):
        assert_hvp_close(_hvp, lambda p: p["w"] ** 2, (p,))


def test_missing_hypothesis_is_a_clear_import_error():
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "import hessfunc.testing as t\n"
            "x = __import__('torch').ones(2).double()\n"
            "t.check_derivatives(lambda x: x.sin().sum(), (x,))\n"
            "try:\n    t.strategies\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ERR hessfunc.testing.strategies needs hypothesis" in out.stdout
    assert "pip install hypothesis" in out.stdout
