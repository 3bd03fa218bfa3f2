"""HessianOperator against dense truth (float64), estimators on real Hessians, bad input."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close, assert_same_state, model_state, oracle_loss
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hessfunc as hf
from hessfunc.testing.models import TiedNet, build_mlp


def _problem(seed=0, n=24, loss="mse"):
    g = torch.Generator().manual_seed(seed)
    out = 3 if loss == "ce" else 2
    model = build_mlp([3, 5, out], "tanh", seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    if loss == "ce":
        return model, F.cross_entropy, x, torch.randint(0, 3, (n,), generator=g)
    return model, nn.MSELoss(), x, torch.randn(n, out, generator=g, dtype=torch.float64)


def _dense_truth(model, loss_fn, x, y, reduction="mean"):
    """The loop oracle's full Hessian on a graph built by plain autograd (never hessfunc's
    own routes, which the operator shares)."""
    if reduction == "sum":
        loss_fn = nn.MSELoss(reduction="sum")
    f, params = hf.functionalize(model, loss_fn)
    loss, leaves = oracle_loss(f, params, x, y)
    return hf.reference.hessian(loss, list(leaves.values()))


def _oracle_hvp(model, loss_fn, x, y, v):
    """The loop oracle's double-backward product, for a tangent dict."""
    f, params = hf.functionalize(model, loss_fn)
    loss, leaves = oracle_loss(f, params, x, y)
    return dict(zip(params, hf.reference.hvp(loss, list(leaves.values()),
                                             [v[k] for k in params]), strict=True))


def _split(x, y, sizes):
    out, lo = [], 0
    for s in sizes:
        out.append((x[lo:lo + s], y[lo:lo + s]))
        lo += s
    return out


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("layout", ["one", "equal", "unequal", "loader"])
def test_operator_equals_full_batch_hessian(loss, layout):
    model, loss_fn, x, y = _problem(loss=loss)
    data = {
        "one": (x, y),
        "equal": _split(x, y, [8, 8, 8]),
        "unequal": _split(x, y, [5, 13, 1, 5]),
        "loader": DataLoader(TensorDataset(x, y), batch_size=7, shuffle=False),
    }[layout]
    H = hf.HessianOperator.from_model(model, loss_fn, data)
    dense = _dense_truth(model, loss_fn, x, y)
    assert H.shape == dense.shape and H.dtype == torch.float64
    assert_close(H.to_dense(), dense)
    assert_close(H.to_dense(chunk_size=5), dense)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    V = torch.randn(H.shape[0], 4, dtype=torch.float64)
    assert_close(H @ v, dense @ v)
    assert_close(H.matmat(V), dense @ V)
    assert_close(H @ V, dense @ V)
    assert_close(H.diagonal(), dense.diagonal())
    assert_close(H.trace(), dense.trace())


def test_sum_reduction():
    model, _, x, y = _problem()
    H = hf.HessianOperator.from_model(model, nn.MSELoss(reduction="sum"), _split(x, y, [10, 14]),
                                      reduction="sum")
    assert_close(H.to_dense(), _dense_truth(model, None, x, y, reduction="sum"))


def test_flat_vectors_and_params_round_trip():
    model, loss_fn, x, y = _problem()
    H = hf.HessianOperator.from_model(model, loss_fn, (x, y))
    v = torch.randn(H.shape[0], dtype=torch.float64)
    tree = H.flat_to_params(v)
    assert list(tree) == [n for n, _ in model.named_parameters()]
    assert torch.equal(H.params_to_flat(tree), v)
    assert_close(H.flat_to_params(H @ v), _oracle_hvp(model, loss_fn, x, y, tree))


@given(seed=st.integers(0, 50), k=st.integers(1, 4), which=st.sampled_from(["largest",
                                                                            "magnitude",
                                                                            "smallest"]))
def test_lanczos_on_a_real_hessian_equals_eigvalsh(seed, k, which):
    model, loss_fn, x, y = _problem(seed=seed)
    H = hf.HessianOperator.from_model(model, loss_fn, (x, y))
    evals = torch.linalg.eigvalsh(_dense_truth(model, loss_fn, x, y))
    if which == "largest":
        expected = evals.flip(0)[:k]
    elif which == "smallest":
        expected = evals[:k]
    else:
        expected = evals[evals.abs().argsort(descending=True)][:k]
    got = H.eigenvalues(k, which=which, seed=seed)
    scale = float(evals.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8 * scale)


def test_eigenvectors_as_parameter_dicts():
    model, loss_fn, x, y = _problem(seed=3)
    H = hf.HessianOperator.from_model(model, loss_fn, (x, y))
    vals, vecs = H.eigenvalues(2, return_vectors=True, seed=0)
    dense = _dense_truth(model, loss_fn, x, y)
    evals = torch.linalg.eigvalsh(dense)
    scale = float(evals.abs().max())
    torch.testing.assert_close(vals, evals.flip(0)[:2], rtol=1e-8, atol=1e-8 * scale)
    names = [n for n, _ in model.named_parameters()]
    for lam, vec in zip(vals, vecs, strict=True):
        assert list(vec) == names
        u = torch.cat([vec[k].reshape(-1) for k in names])
        assert abs(float(u.norm()) - 1) < 1e-8
        Hv = H.flat_to_params(dense @ u)  # the oracle's H applied to the eigenvector
        for k in vec:
            torch.testing.assert_close(Hv[k], lam * vec[k], rtol=1e-6, atol=1e-8 * scale)
    assert len(H.eigenvectors(1, seed=0)) == 1


def test_scipy_eigsh_agrees_with_lanczos():
    from scipy.sparse.linalg import eigsh

    model, loss_fn, x, y = _problem(seed=4)
    H = hf.HessianOperator.from_model(model, loss_fn, (x, y))
    ours = H.eigenvalues(3, seed=0)
    theirs = np.sort(eigsh(H.to_scipy(), k=3, which="LA", tol=1e-12)[0])[::-1]
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-8)
    truth = torch.linalg.eigvalsh(_dense_truth(model, loss_fn, x, y)).flip(0)[:3]
    np.testing.assert_allclose(theirs, truth.numpy(), rtol=1e-8)


def _check_random_moments(sd, dense, size, num_probes, k=5.0):
    """Random-probe quadrature: each probe's first and second moments are exactly
    ``v^T H v`` and ``v^T H^2 v`` (unit ``v``, 2 <= 2m - 1), so their means are Hutchinson
    estimates of ``tr(H) / size`` and ``tr(H^2) / size``: within ``k`` standard errors
    (from the per-probe values) of the dense oracle's traces, for the fixed seed."""
    per_probe = hf.estimators.quadrature_moments(sd.nodes, sd.weights, [0, 1, 2])
    assert per_probe.shape == (num_probes, 3)
    assert_close(per_probe[:, 0], torch.ones(num_probes, dtype=torch.float64))
    for j, exact in ((1, float(dense.trace()) / size),
                     (2, float((dense @ dense).trace()) / size)):
        mean = float(per_probe[:, j].mean())
        err = float(per_probe[:, j].std() / num_probes ** 0.5)
        assert err > 0
        assert abs(mean - exact) < k * err, (j, mean, exact, err)


def test_spectral_density_moments_match_traces_of_powers():
    model, loss_fn, x, y = _problem(seed=5)
    H = hf.HessianOperator.from_model(model, loss_fn, (x, y))
    dense = _dense_truth(model, loss_fn, x, y)
    P = dense.shape[0]
    probes = torch.eye(P, dtype=torch.float64)  # exact averages: trace(H^j) / P
    sd = H.spectral_density(probes=probes, num_steps=8)
    moments = sd.moments([0, 1, 2, 3])
    assert moments.shape == (4,)
    for j in range(4):  # exact for powers up to 2 m - 1 = 15
        expected = float(torch.linalg.matrix_power(dense, j).trace()) / P
        got = float((sd.weights * sd.nodes ** j).sum(dim=1).mean())
        assert abs(got - expected) <= 1e-9 * (1 + abs(expected))
        assert abs(float(moments[j]) - expected) <= 1e-9 * (1 + abs(expected))
    integral = float(torch.trapezoid(sd.density, sd.grid))
    assert abs(integral - 1.0) < 1e-3
    random_sd = H.spectral_density(num_probes=40, num_steps=10, seed=1)
    _check_random_moments(random_sd, dense, P, 40)


def test_trace_estimators_converge_and_are_reproducible():
    model, loss_fn, x, y = _problem(seed=6)
    H = hf.HessianOperator.from_model(model, loss_fn, (x, y))
    dense = _dense_truth(model, loss_fn, x, y)
    exact = float(dense.trace())
    assert_close(H.trace(), dense.trace())
    few = H.trace("hutchinson", num_samples=4, seed=0)
    many = H.trace("hutchinson", num_samples=2000, seed=0)
    assert abs(float(many.estimate) - exact) < 4 * float(many.std_error) + 1e-12
    assert float(many.std_error) < float(few.std_error)
    again = H.trace("hutchinson", num_samples=2000, seed=0)
    assert torch.equal(many.estimate, again.estimate)
    pp = H.trace("hutch++", num_samples=3 * H.shape[0], seed=0)
    assert abs(float(pp.estimate) - exact) < 1e-8 * (1 + abs(exact))  # sketch spans everything
    diag_est = H.diagonal("hutchinson", num_samples=4000, seed=0)
    truth = dense.diagonal()
    assert float((diag_est - truth).abs().max()) < 0.15 * float(truth.abs().max())
    g1 = torch.Generator().manual_seed(7)
    g2 = torch.Generator().manual_seed(7)
    assert torch.equal(H.eigenvalues(2, generator=g1), H.eigenvalues(2, generator=g2))


def test_model_untouched_by_every_operator_method():
    model, loss_fn, x, y = _problem(seed=8)
    model.train()
    before = model_state(model)
    H = hf.HessianOperator.from_model(model, loss_fn, _split(x, y, [12, 12]))
    H @ torch.ones(H.shape[0], dtype=torch.float64)
    H.diagonal(), H.trace(), H.eigenvalues(1, seed=0), H.to_dense()
    H.spectral_density(num_probes=2, num_steps=4, seed=0)
    assert_same_state(before, model_state(model))


def test_progress_bar_runs(capsys):
    model, loss_fn, x, y = _problem()
    H = hf.HessianOperator.from_model(model, loss_fn, _split(x, y, [12, 12]), progress=True,
                                      cache=False)
    assert_close(H.diagonal(), _dense_truth(model, loss_fn, x, y).diagonal())
    err = capsys.readouterr().err
    assert "diagonal:" in err and "/2 " in err  # a bar over the 2 batches was shown


class _Reshuffling:
    """An iterable whose batches change on every pass."""

    def __init__(self, x, y):
        self.x, self.y, self.calls = x, y, 0

    def __iter__(self):
        self.calls += 1
        perm = torch.randperm(self.x.shape[0], generator=torch.Generator().manual_seed(self.calls))
        return iter(_split(self.x[perm], self.y[perm], [12, 12]))


def test_bad_input():
    model, loss_fn, x, y = _problem()
    f, params = hf.functionalize(model, loss_fn)
    with pytest.raises(hf.ArgumentError, match="`data` is empty"):
        hf.HessianOperator(f, params, [])
    with pytest.raises(hf.ArgumentError, match=r"batch 0 of `data` must be an \(inputs, targets\)"):
        hf.HessianOperator(f, params, [x])
    with pytest.raises(hf.ArgumentError, match="shuffle=True"):
        hf.HessianOperator(f, params, DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True))
    H = hf.HessianOperator(f, params, _Reshuffling(x, y))
    with pytest.raises(hf.ArgumentError, match="different batches on a later pass"):
        H @ torch.ones(H.shape[0], dtype=torch.float64)
    H = hf.HessianOperator(f, params, (x, y))
    P = H.shape[0]
    with pytest.raises(hf.ArgumentError, match=f"`k`={P} must be < P={P}"):
        H.eigenvalues(P)
    with pytest.raises(hf.ArgumentError, match="`num_samples` must be an int >= 1"):
        H.trace("hutchinson", num_samples=0)
    with pytest.raises(hf.ArgumentError, match=r"`v` must have shape \(P,\)"):
        H @ torch.ones(P + 1, dtype=torch.float64)
    with pytest.raises(hf.ArgumentError, match="dtype torch.float32"):
        H @ torch.ones(P)
    with pytest.raises(hf.ArgumentError, match=r"`V` must have shape \(P, k\)"):
        H.matmat(torch.ones(3, P, dtype=torch.float64))
    with pytest.raises(hf.ArgumentError, match="`method` must be"):
        H.trace("exactly")
    with pytest.raises(hf.ArgumentError, match="`reduction`"):
        hf.HessianOperator(f, params, (x, y), reduction="avg")
    with pytest.raises(hf.ArgumentError, match="`data` must be one"):
        hf.HessianOperator(f, params, 3)
    with pytest.raises(hf.DenseMemoryError, match="over the limit"):
        H.to_dense(max_memory=16)


# ---------------------------------------------------------------------------
# NOTE [data span]: fewer samples than the first layer has inputs


def _wide_problem(seed=0, loss="mse", sizes=(4, 5)):
    """A 16-4-c tanh MLP on 9 samples in two batches: the first layer's weight is seen
    only through a 9-dimensional span of its 16 input directions."""
    g = torch.Generator().manual_seed(seed)
    out = 3 if loss == "ce" else 2
    model = build_mlp([16, 4, out], "tanh", seed)
    n = sum(sizes)
    x = torch.randn(n, 16, generator=g, dtype=torch.float64)
    if loss == "ce":
        y, loss_fn = torch.randint(0, out, (n,), generator=g), F.cross_entropy
    else:
        y, loss_fn = torch.randn(n, out, generator=g, dtype=torch.float64), nn.MSELoss()
    return model, loss_fn, x, y, _split(x, y, sizes)


def _restriction_matrix(span, H):
    """``B`` (P_r, P): ``W -> W U`` on the first layer's weight, the identity elsewhere."""
    blocks = []
    for name, shape in zip(H._spec.names, H._spec.shapes, strict=True):
        eye = torch.eye(shape[0] if name == span.name else shape.numel(), dtype=torch.float64)
        blocks.append(torch.kron(eye, span.basis.T) if name == span.name else eye)
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_data_span_operator_is_the_restricted_hessian(loss):
    model, loss_fn, x, y, batches = _wide_problem(loss=loss)
    H = hf.HessianOperator.from_model(model, loss_fn, batches)
    span = H._data_span()
    assert span is not None and span.basis.shape == (16, 9)
    dense = _dense_truth(model, loss_fn, x, y)
    B = _restriction_matrix(span, H)
    assert_close(B @ B.T, torch.eye(B.shape[0], dtype=torch.float64))
    assert_close(B.T @ (B @ dense @ B.T) @ B, dense)          # H = B^T H_r B
    assert_close(span.matmat(torch.eye(span.size, dtype=torch.float64)), B @ dense @ B.T)
    V = torch.randn(span.size, 3, dtype=torch.float64)
    assert_close(span.lift(V), B.T @ V)


@pytest.mark.parametrize("which", ["largest", "magnitude", "smallest"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_data_span_eigenpairs_equal_dense_truth(loss, k, which):
    """Exact on H_r, or (when the zeros could be wanted) on H itself."""
    model, loss_fn, x, y, batches = _wide_problem(seed=1, loss=loss)
    H = hf.HessianOperator.from_model(model, loss_fn, batches)
    dense = _dense_truth(model, loss_fn, x, y)
    evals = torch.linalg.eigvalsh(dense)
    expected = {"largest": evals.flip(0), "smallest": evals,
                "magnitude": evals[evals.abs().argsort(descending=True)]}[which][:k]
    scale = float(evals.abs().max())
    vals, vecs = H.eigenvalues(k, which=which, seed=0, return_vectors=True)
    torch.testing.assert_close(vals, expected, rtol=1e-8, atol=1e-8 * scale)
    torch.testing.assert_close(vals, H.eigenvalues(k, which=which, seed=0, data_span=False),
                               rtol=1e-8, atol=1e-8 * scale)
    V = torch.stack([H.params_to_flat(v) for v in vecs], dim=1)
    torch.testing.assert_close(V.T @ V, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-8)
    residual = torch.linalg.vector_norm(dense @ V - V * vals, dim=0)
    assert (residual <= 1e-6 * scale).all(), residual


def test_data_span_spectral_density_adds_the_zeros_exactly():
    model, loss_fn, x, y, batches = _wide_problem(seed=2)
    H = hf.HessianOperator.from_model(model, loss_fn, batches)
    span, P = H._data_span(), H.shape[0]
    dense = _dense_truth(model, loss_fn, x, y)
    sd = H.spectral_density(num_probes=400, num_steps=span.size, seed=0)
    assert torch.equal(sd.nodes[:, -1], torch.zeros(400, dtype=torch.float64))
    assert_close(sd.weights[:, -1], torch.full((400,), (P - span.size) / P,
                                               dtype=torch.float64))
    assert_close(sd.weights.sum(1), torch.ones(400, dtype=torch.float64))
    assert abs(float(torch.trapezoid(sd.density, sd.grid)) - 1.0) < 1e-3
    # each rule is exact for H_r (num_steps = P_r): the moments are Hutchinson estimates
    per_probe = (sd.weights * sd.nodes).sum(1) * P / span.size   # v^T H_r v
    mean, err = float(per_probe.mean()), float(per_probe.std() / 400**0.5)
    assert abs(mean - float(dense.trace()) / span.size) < 5 * err
    plain = H.spectral_density(num_probes=40, num_steps=8, seed=0, data_span=False)
    assert plain.nodes.shape == (40, 8)
    evals = torch.linalg.eigvalsh(dense)   # Ritz values lie inside the spectrum
    slack = 1e-10 * float(evals.abs().max())
    assert float(plain.nodes.min()) >= float(evals[0]) - slack
    assert float(plain.nodes.max()) <= float(evals[-1]) + slack
    _check_random_moments(plain, dense, P, 40)
    # with given probes each rule is exact: moments v^T H^j v / v^T v, j <= 2 m - 1
    V = torch.randn(P, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    given_sd = H.spectral_density(probes=V, num_steps=8)
    got = hf.estimators.quadrature_moments(given_sd.nodes, given_sd.weights, [0, 1, 2, 3])
    U = V / V.norm(dim=0)
    expected = torch.stack([(U * (torch.linalg.matrix_power(dense, j) @ U)).sum(0)
                            for j in range(4)], dim=1)
    assert_close(got, expected)


def test_data_span_only_where_it_is_exact_and_pays():
    model, loss_fn, x, y, batches = _wide_problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    assert hf.HessianOperator.from_model(model, loss_fn, loader)._data_span() is None  # no cache
    many = torch.cat([x, x]), torch.cat([y, y])     # 18 samples > 0.7 * 16 inputs
    assert hf.HessianOperator.from_model(model, loss_fn, many)._data_span() is None
    frozen = build_mlp([16, 4, 2], "tanh", 0)
    frozen[0].weight.requires_grad_(False)
    assert hf.HessianOperator.from_model(frozen, loss_fn, (x, y))._data_span() is None
    tied = TiedNet(16, 4).double()  # no chain: the first weight is also the last
    targets = torch.randn(len(x), 16, dtype=x.dtype)
    assert hf.HessianOperator.from_model(tied, loss_fn, (x, targets))._data_span() is None


def test_batches_share_one_batched_or_looped_choice(monkeypatch):
    """NOTE [batched or looped products]: the batches of one operator are one graph on
    other data; the first batch's measurement is reused by the others (every batch's
    products hold the operator's choices), and matmat equals the dense truth."""
    model, loss_fn, x, y = _problem(n=24)
    params = {k: v.detach() for k, v in model.named_parameters()}
    monkeypatch.setattr(sys.modules["hessfunc.products"], "graph_chain",
                        lambda *args: (None, "forced: the cached gradient graph"))

    def f(p, x, y):
        return loss_fn(torch.func.functional_call(model, p, (x,)), y)

    op = hf.HessianOperator(f, params, _split(x, y, (8, 8, 8)))
    V = torch.randn(op.shape[0], 12, dtype=torch.float64)
    assert_close(op.matmat(V), _dense_truth(model, loss_fn, x, y) @ V)
    products = [H for _, H in op._cached]
    assert len(products) == 3 and all(H.method == "graph" for H in products)
    assert all(H._choices is op._choices for H in products)
    assert op._choices["products"].per_single > 0  # measured once, on the first batch

    # an operator built again on the same f and shapes reuses the measurement; other
    # shapes, or another f, measure their own
    again = hf.HessianOperator(f, params, _split(x, y, (8, 8, 8)))
    again.matmat(V[:, :1])
    assert again._choices is op._choices
    other_shapes = hf.HessianOperator(f, params, _split(x, y, (12, 12)))
    other_shapes.matmat(V[:, :1])
    assert other_shapes._choices is not op._choices and not other_shapes._choices
    other_f = hf.HessianOperator(lambda p, x, y: f(p, x, y), params, _split(x, y, (8, 8, 8)))
    other_f.matmat(V[:, :1])
    assert other_f._choices is not op._choices
