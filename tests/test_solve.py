"""Inverse products: ``op.solve`` and the CG / MINRES estimators against dense solves of the
loop oracle's Hessian (float64), and their refusals."""

from __future__ import annotations

import pytest
import torch
from _helpers import oracle_loss
from torch import nn

import hessfunc as hf
from hessfunc.estimators import conjugate_gradient, minres
from hessfunc.testing.models import build_mlp

DT = torch.float64


def _problem(seed=0, n=12, sizes=(3, 4, 2)):
    g = torch.Generator().manual_seed(seed)
    model = build_mlp(list(sizes), "tanh", seed)
    x = torch.randn(n, sizes[0], generator=g, dtype=DT)
    y = 2 * torch.randn(n, sizes[-1], generator=g, dtype=DT)
    return model, nn.MSELoss(), x, y


def _dense(model, loss_fn, x, y):
    f, params = hf.functionalize(model, loss_fn)
    loss, leaves = oracle_loss(f, params, x, y)
    return hf.reference.hessian(loss, list(leaves.values()))


def _rhs(P, seed=1):
    return torch.randn(P, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _check(H, damping, b, x, tol):
    A = H + damping * torch.eye(H.shape[0], dtype=DT)
    assert torch.linalg.vector_norm(A @ x - b) <= tol * torch.linalg.vector_norm(b)
    truth = torch.linalg.solve(A, b)
    cond = torch.linalg.cond(A)
    assert torch.linalg.vector_norm(x - truth) <= 10 * cond * tol * truth.norm()


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_solve_matches_dense_with_damping(method):
    model, loss_fn, x, y = _problem()
    H = _dense(model, loss_fn, x, y)
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    damping = max(0.0, -lam_min) + 0.1  # positive definite after damping
    op = hf.HessianOperator.from_model(model, loss_fn, (x, y))
    b = _rhs(H.shape[0])
    sol, info = op.solve(b, damping=damping, method=method, tol=1e-12, return_info=True)
    assert isinstance(sol, torch.Tensor) and sol.shape == b.shape
    _check(H, damping, b, sol, 1e-12)
    assert info.converged and float(info.relative_residual) <= 1e-12
    # the true residual it reports is the true one
    A = H + damping * torch.eye(H.shape[0], dtype=DT)
    assert torch.isclose(info.residual_norm, torch.linalg.vector_norm(b - A @ sol),
                         rtol=1e-6, atol=1e-14)


def test_minres_on_indefinite_hessian_and_tree_rhs():
    model, loss_fn, x, y = _problem(seed=3)
    H = _dense(model, loss_fn, x, y)
    ev = torch.linalg.eigvalsh(H)
    assert ev[0] < -1e-6 < 1e-6 < ev[-1], "the test needs an indefinite Hessian"
    assert ev.abs().min() > 1e-8
    op = hf.HessianOperator.from_model(model, loss_fn, (x, y))
    b = _rhs(H.shape[0], seed=2)
    tree = op.flat_to_params(b)
    sol = op.solve(tree, method="minres", tol=1e-11)
    assert isinstance(sol, dict) and list(sol) == list(tree)
    assert all(sol[k].shape == tree[k].shape for k in tree)
    _check(H, 0.0, b, op.params_to_flat(sol), 1e-11)


def test_cg_detects_negative_curvature():
    model, loss_fn, x, y = _problem(seed=3)
    op = hf.HessianOperator.from_model(model, loss_fn, (x, y))
    b = _rhs(op.shape[0], seed=2)
    with pytest.raises(hf.ArgumentError, match=r"HessianOperator\.solve.*curvature.*<= 0.*"
                                               r"not positive definite.*minres.*damping"):
        op.solve(b, method="cg")


def test_refusals():
    model, loss_fn, x, y = _problem()
    op = hf.HessianOperator.from_model(model, loss_fn, (x, y))
    P = op.shape[0]
    b = _rhs(P)
    with pytest.raises(hf.ArgumentError, match=r"solve: `damping` must be >= 0 with "
                                               r"method='cg', got -1.*minres"):
        op.solve(b, damping=-1.0)
    with pytest.raises(hf.ArgumentError, match=rf"solve: `b` must be a flat \({P},\) vector.*"
                                               r"shape \(3,\)"):
        op.solve(torch.zeros(3, dtype=DT))
    with pytest.raises(hf.ArgumentError, match=r"solve: `b` must be a flat .* tree structured "
                                               r"like `params`"):
        op.solve({"nope": torch.zeros(P, dtype=DT)})
    with pytest.raises(hf.ArgumentError, match=r"solve: `b` has dtype torch.float32"):
        op.solve(b.float())
    with pytest.raises(hf.ArgumentError, match=r"solve: `method` must be 'cg'.*'minres'"):
        op.solve(b, method="gmres")
    with pytest.raises(hf.ArgumentError, match=r"expected `tol` to be a number in \(0, 1\)"):
        op.solve(b, damping=1.0, tol=0.0)


def test_zero_rhs_and_unconverged_warning():
    model, loss_fn, x, y = _problem()
    op = hf.HessianOperator.from_model(model, loss_fn, (x, y))
    P = op.shape[0]
    x0, info = op.solve(torch.zeros(P, dtype=DT), damping=1.0, return_info=True)
    assert torch.equal(x0, torch.zeros(P, dtype=DT)) and info.num_matvecs == 0
    with pytest.warns(RuntimeWarning, match="raise `max_steps`"):
        _, info = op.solve(_rhs(P), damping=1.0, max_steps=2, return_info=True)
    assert not info.converged and info.num_matvecs <= 3


def test_estimators_on_a_matrix():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=DT))
    ev = torch.linspace(-3, 5, 30, dtype=DT)
    ev[ev.abs() < 0.2] = 0.5
    A = Q @ torch.diag(ev) @ Q.T
    b = torch.randn(30, generator=g, dtype=DT)
    res = minres(lambda v: A @ v, b, tol=1e-12)
    assert torch.allclose(res.solution, torch.linalg.solve(A, b), rtol=0, atol=1e-9)
    spd = A @ A + torch.eye(30, dtype=DT)
    res = conjugate_gradient(lambda v: spd @ v, b, damping=0.5, tol=1e-12)
    truth = torch.linalg.solve(spd + 0.5 * torch.eye(30, dtype=DT), b)
    assert torch.allclose(res.solution, truth, rtol=0, atol=1e-10)
    # MINRES with a negative shift, which CG refuses
    res = minres(lambda v: spd @ v, b, damping=-0.5, tol=1e-12)
    truth = torch.linalg.solve(spd - 0.5 * torch.eye(30, dtype=DT), b)
    assert torch.allclose(res.solution, truth, rtol=0, atol=1e-9)
    with pytest.raises(hf.ArgumentError, match=r"conjugate_gradient\(\): `damping` must be >= 0"):
        conjugate_gradient(lambda v: spd @ v, b, damping=-0.5)
    with pytest.raises(hf.ArgumentError, match=r"`b` to be a floating \(size,\) tensor"):
        minres(lambda v: v, [1.0, 2.0])


# ------------------------------------------------- under a process group (2 gloo ranks)
SHARDS = [5, 9]


def _sharded_problem():
    model, loss_fn, x, y = _problem(seed=3, n=sum(SHARDS))
    return model, loss_fn, x, y


def _operators(model, loss_fn, data, group):
    return {
        "hessian": hf.HessianOperator.from_model(model, loss_fn, data, process_group=group),
        "ggn": hf.GGNOperator.from_model(model, loss_fn, data, process_group=group),
        "kfac": hf.KFACOperator.from_model(model, loss_fn, data, process_group=group),
    }


def _answers(ops):
    P = ops["ggn"].shape[0]
    b = _rhs(P, seed=4)
    return {
        "G b": ops["ggn"] @ b,
        "G dense": ops["ggn"].to_dense(),
        "G solve": ops["ggn"].solve(b, damping=0.1, tol=1e-12),
        "H solve": ops["hessian"].solve(b, method="minres", tol=1e-12),
        "K solve": ops["kfac"].solve(b, damping=0.1),
        "K cg": ops["kfac"].solve(b, damping=0.1, method="cg", tol=1e-12),
    }


def _rank_entry(rank, world, store, out):
    import os

    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        model, loss_fn, x, y = _sharded_problem()
        lo = sum(SHARDS[:rank])
        shard = (x[lo:lo + SHARDS[rank]], y[lo:lo + SHARDS[rank]])
        torch.save(_answers(_operators(model, loss_fn, shard, dist.group.WORLD)),
                   f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_solve_and_ggn_operators_under_a_process_group(tmp_path):
    """Each rank passes its shard; the solves (and the GGN and K-FAC operators) equal the
    one-process ones over the shards concatenated, and the ranks agree bitwise."""
    import socket

    import torch.multiprocessing as mp

    if "lo" not in [name for _, name in socket.if_nameindex()]:
        pytest.skip("no loopback interface named lo")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(_rank_entry, args=(2, str(tmp_path / "store"), str(tmp_path)),
                             nprocs=2, join=False, start_method=method)
    try:
        assert ctx.join(timeout=120) or ctx.join(timeout=60)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    model, loss_fn, x, y = _sharded_problem()
    want = _answers(_operators(model, loss_fn, (x, y), None))
    for key, value in want.items():
        assert torch.equal(got[0][key], got[1][key]), key
        assert torch.allclose(got[0][key], value, rtol=1e-9, atol=1e-11), key
