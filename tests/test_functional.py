"""functionalize: reproduces the model exactly and never touches it."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_same_state, model_state
from hypothesis import given
from torch import nn

import hessfunc as hf
from hessfunc.testing.models import TiedNet
from hessfunc.testing.strategies import problems


@given(problems())
def test_reproduces_model_and_loss_exactly(prob):
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    g, _ = hf.functionalize(prob.model)
    args = prob.inputs if isinstance(prob.inputs, tuple) else (prob.inputs,)
    expected_out = prob.model(*args)
    assert torch.equal(g(params, prob.inputs), expected_out)
    assert torch.equal(f(params, prob.inputs, prob.targets),
                       prob.loss_fn(expected_out, prob.targets))
    assert list(params) == [n for n, _ in prob.model.named_parameters()]


@given(problems())
def test_model_untouched_by_every_transform(prob):
    prob.model.train()
    before = model_state(prob.model)
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    v = {k: torch.ones_like(t) for k, t in params.items()}
    hf.grad(f)(params, *prob.batch)
    hf.hvp(f, (params, *prob.batch), v)
    hf.hvp(f, (params, *prob.batch), v, mode="forward-over-reverse")
    hf.hvp_fn(f, (params, *prob.batch))(v)
    # in-place updates of params must not reach the model
    for t in params.values():
        t.add_(1.0)
    assert_same_state(before, model_state(prob.model))


def test_params_are_detached_copies_and_later_model_changes_do_not_leak():
    model = nn.Linear(3, 2).double()
    f, params = hf.functionalize(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    before = f(params, x)
    with torch.no_grad():
        model.weight.mul_(2.0)
    assert torch.equal(f(params, x), before)
    assert all(not t.requires_grad for t in params.values())
    assert params["weight"].data_ptr() != model.weight.data_ptr()
    model.bias.requires_grad_(False)  # a frozen parameter is held as it was, too
    f, params = hf.functionalize(model)
    before = f(params, x)
    with torch.no_grad():
        model.bias.add_(1.0)
    assert torch.equal(f(params, x), before)


def test_frozen_parameters_left_out_and_held_fixed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    model[0].weight.requires_grad_(False)
    f, params = hf.functionalize(model, nn.MSELoss())
    assert list(params) == ["0.bias", "2.weight", "2.bias"]
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    g = hf.grad(f)(params, x, y)
    model.zero_grad()
    nn.MSELoss()(model(x), y).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g[name], p.grad, rtol=1e-12, atol=1e-14)
    assert model[0].weight.grad is None


def test_tied_weights_appear_once_and_stay_tied():
    torch.manual_seed(1)
    model = TiedNet(3, 4).double()
    f, params = hf.functionalize(model, nn.MSELoss())
    assert list(params) == [n for n, _ in model.named_parameters()]
    assert sorted(params) == ["dec_bias", "enc.bias", "enc.weight"]
    x = torch.randn(6, 3, dtype=torch.float64)
    g = hf.grad(f)(params, x, x)
    model.zero_grad()
    nn.MSELoss()(model(x), x).backward()
    torch.testing.assert_close(g["enc.weight"], model.enc.weight.grad, rtol=1e-12, atol=1e-14)


def test_tied_module_attribute_is_tied_under_functional_call():
    torch.manual_seed(2)
    emb = nn.Linear(3, 3, bias=False).double()
    model = nn.Sequential(emb, nn.Tanh(), nn.Linear(3, 3, bias=False).double())
    model[2].weight = emb.weight  # same Parameter object: named_parameters lists it once
    f, params = hf.functionalize(model, nn.MSELoss())
    assert list(params) == ["0.weight"]
    x = torch.randn(4, 3, dtype=torch.float64)
    new = {"0.weight": params["0.weight"] * 0.5}
    expected = nn.MSELoss()(torch.tanh(x @ new["0.weight"].t()) @ new["0.weight"].t(), x)
    torch.testing.assert_close(f(new, x, x), expected, rtol=1e-14, atol=0)


def test_private_copy_gets_its_own_parameters_back_even_when_the_forward_fails():
    """FunctionalModel._apply swaps the given tensors in for the call only."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    model[0].bias.requires_grad_(False)
    f, params = hf.functionalize(model, nn.MSELoss())
    own = {name: p for name, p in f.module.named_parameters()}
    with pytest.raises(RuntimeError):
        f(params, torch.randn(4, 5, dtype=torch.float64), torch.zeros(4, 1))  # wrong width
    assert {name: p for name, p in f.module.named_parameters()} == own
    assert all(isinstance(p, nn.Parameter) for p in f.module.parameters())
    x = torch.randn(4, 3, dtype=torch.float64)
    shifted = {k: v + 1 for k, v in params.items()}
    expected = nn.MSELoss()(
        torch.tanh(x @ shifted["0.weight"].T + model[0].bias) @ shifted["2.weight"].T
        + shifted["2.bias"], x[:, :1])
    torch.testing.assert_close(f(shifted, x, x[:, :1]), expected, rtol=1e-14, atol=0)
    assert {name: p for name, p in f.module.named_parameters()} == own


def test_private_copy_shares_no_container_with_the_model():
    """Every dict, OrderedDict and set of the copy's modules (hooks, parameters, buffers,
    a user's own cache), empty or not, is a fresh object of the same type and contents;
    one two modules share stays shared between their copies, as ``copy.deepcopy``
    makes it. Hooks added to either side later do not reach the other."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    cache: dict[str, int] = {}
    model[0].cache, model[2].cache, model[1].seen = cache, cache, set()
    model[2].register_forward_hook(lambda *_: None)
    f, _ = hf.functionalize(model, nn.MSELoss())
    pairs = list(zip(model.modules(), f.module.modules(), strict=True))
    for mine, theirs in pairs:
        assert type(mine) is type(theirs)
        for key, value in vars(mine).items():
            if isinstance(value, (dict, set)):
                copied = vars(theirs)[key]
                assert copied is not value and type(copied) is type(value), key
                assert len(copied) == len(value), key
    assert f.module[0].cache is f.module[2].cache
    assert len(f.module[2]._forward_hooks) == 1
    calls = []
    model[0].register_forward_hook(lambda *_: calls.append("model"))
    f.module[0].cache["k"] = 1
    f.module[1].seen.add(1)
    x = torch.randn(2, 3, dtype=torch.float64)
    f(dict(f.module.named_parameters()), x, x[:, :1])
    assert calls == [] and cache == {} and model[1].seen == set()


def test_buffers_captured_as_they_are():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    g, params = hf.functionalize(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(g(params, x), model(x), rtol=0, atol=0)


def test_batchnorm_in_training_mode_uses_batch_stats_without_updating():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    model.train()
    snapshot = copy.deepcopy(model)
    before = model_state(model)
    g, params = hf.functionalize(model)
    x = torch.randn(8, 3, dtype=torch.float64)
    out1, out2 = g(params, x), g(params, x)
    assert torch.equal(out1, out2)
    torch.testing.assert_close(out1, snapshot(x), rtol=1e-14, atol=1e-14)
    assert_same_state(before, model_state(model))


class _RunningScale(nn.Module):
    """Divides by a running mean of ``|h|`` that its forward pass updates in training mode
    (an EMA statistic, as a VQ codebook or a quantisation observer keeps)."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer("scale", torch.ones(d))

    def forward(self, h):
        if self.training:
            with torch.no_grad():
                self.scale.mul_(0.5).add_(0.5 * h.abs().mean(0))
        return h / self.scale


class _StepCounter(nn.Module):
    """Counts its calls in a buffer that its output does not read (the trace's
    functionalisation drops such a write, so the captured routes never saw it)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, h):
        self.steps.add_(1)
        return h


@pytest.mark.parametrize(("state", "name"), [(_RunningScale, "1.scale"),
                                             (_StepCounter, "1.steps")])
def test_a_forward_pass_that_writes_into_the_models_state_is_refused(state, name):
    """f held the buffer fixed only until its first call: each call moved it, and two
    `hessian_diag` calls in a row differed by 45. Every call is refused now, naming the
    buffer, on the captured routes too (their trace runs the forward pass); in eval mode
    the forward pass writes nothing and f is pure."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), state(4) if state is _RunningScale else state(),
                          nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    f, params = hf.functionalize(model, nn.MSELoss())
    for call in (lambda: f(params, x, y), lambda: hf.hessian_diag(f)(params, x, y),
                 lambda: hf.hessian(f)(params, x, y), lambda: hf.hvp(f, (params, x, y), params),
                 lambda: hf.hvp_fn(f, (params, x, y))(params),
                 lambda: hf.ggn_diag(hf.functionalize(model)[0], nn.MSELoss())(params, x, y)):
        with pytest.raises(hf.ArgumentError, match=re.escape(f"wrote into ['{name}']") +
                           ".*training=False"):
            call()
    if state is _StepCounter:
        return  # it counts in eval mode too
    f, params = hf.functionalize(model, nn.MSELoss(), training=False)
    first = hf.hessian_diag(f)(params, x, y)
    again = hf.hessian_diag(f)(params, x, y)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_multiple_inputs_are_unpacked_from_a_tuple():
    class Add(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1).double()

        def forward(self, a, b):
            return self.lin(a * b)

    model = Add()
    g, params = hf.functionalize(model)
    a, b = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    assert torch.equal(g(params, (a, b)), model(a, b))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: hf.functionalize("not a model"), "`model` must be a torch.nn.Module"),
        (lambda: hf.functionalize(nn.Linear(2, 1), loss_fn=3), "`loss_fn` must be callable"),
        (lambda: hf.functionalize(nn.Linear(2, 1).requires_grad_(False)),
         "no trainable parameters"),
        (lambda: hf.functionalize(nn.ReLU()), "no trainable parameters"),
    ],
)
def test_bad_models_and_losses(call, match):
    with pytest.raises(hf.ArgumentError, match=match):
        call()


def test_bad_params_and_targets():
    f, params = hf.functionalize(nn.Linear(2, 1), F.mse_loss)
    x, y = torch.randn(3, 2), torch.randn(3, 1)
    with pytest.raises(hf.ArgumentError, match=r"missing \['bias'\]"):
        f({"weight": params["weight"]}, x, y)
    with pytest.raises(hf.ArgumentError, match="`params` must be a dict"):
        f(list(params.values()), x, y)
    with pytest.raises(hf.ArgumentError, match="expected one `targets`"):
        f(params, x)
    g, _ = hf.functionalize(nn.Linear(2, 1))
    with pytest.raises(hf.ArgumentError, match="takes no targets"):
        g(params, x, y)
