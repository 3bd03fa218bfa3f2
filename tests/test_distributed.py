"""Curvature of data sharded over processes: 2 and 3 gloo ranks on CPU, spawned here.

Every rank builds the operator on its shard (unequal shard sizes, mixed layouts: a list
of unequal batches, a DataLoader, one batch) and saves what it computes; the parent
compares with the one-process operator over the shards concatenated in rank order (to
rounding, float64), checks products and the dense matrix against the loop oracle on a
plain autograd graph of the full-data loss, and checks that the ranks agree bitwise.
The failure cases run as scenarios in one spawned pair of ranks, each rank recording
what it raised. Ranks meet over a FileStore in a temporary folder; gloo is pinned to
the loopback interface; every group has a timeout and every join a deadline, so a
broken test fails instead of hanging.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hessfunc as hf
from hessfunc._distributed import Group
from hessfunc.cli import main

TIMEOUT = datetime.timedelta(seconds=60)
DEADLINE_S = 120
#: fork where there is one: the ranks inherit the imports (torch.func's lazy ones cost a
#: spawned rank seconds); the workers are module-level functions, so spawn works as well.
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------- plumbing
def _loopback() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), names[0])


def _init(rank: int, world: int, store: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = _loopback()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=TIMEOUT)


def _entry(rank: int, world: int, store: str, out: str, name: str) -> None:
    """Spawned worker: run scenario ``name`` and save what it returns to ``out/rank.pt``."""
    _init(rank, world, store)
    try:
        result = WORKERS[name](rank, world)
        torch.save(result, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, world: int, name: str) -> list[Any]:
    """Run worker ``name`` on ``world`` gloo ranks; every rank's result, by rank."""
    out = tmp_path / f"{name}-{world}"
    out.mkdir()
    ctx = mp.start_processes(_entry, args=(world, str(out / "store"), str(out), name),
                             nprocs=world, join=False, start_method=START_METHOD)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{name} on {world} ranks did not finish in {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out / f"{r}.pt", weights_only=False) for r in range(world)]


# ----------------------------------------------------------------- problems
def _mlp(sizes: list[int], seed: int, out_act: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).double()


#: name: (layer sizes, samples, reduction, shard sizes for 2 and 3 ranks). "span" has
#: fewer samples than inputs, so NOTE [data span] applies to its eigenvalues and density.
PROBLEMS = {
    "mean": ([3, 5, 2], 24, "mean", {2: [7, 17], 3: [5, 11, 8]}),
    "sum": ([3, 4, 2], 15, "sum", {2: [9, 6], 3: [4, 4, 7]}),
    "span": ([40, 3, 2], 13, "mean", {2: [4, 9], 3: [2, 6, 5]}),
}


def _data(name: str) -> tuple[nn.Module, Any, torch.Tensor, torch.Tensor]:
    sizes, n, reduction, _ = PROBLEMS[name]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, sizes[0], generator=g, dtype=torch.float64)
    y = torch.randn(n, sizes[-1], generator=g, dtype=torch.float64)
    return _mlp(sizes, seed=3), nn.MSELoss(reduction=reduction), x, y


def _batches(x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> list[tuple[Any, Any]]:
    out, lo = [], 0
    for s in sizes:
        out.append((x[lo:lo + s], y[lo:lo + s]))
        lo += s
    return out


def _shard(name: str, world: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Rank ``rank``'s rows and its layout: unequal batches on rank 0, a DataLoader on rank
    1, one batch on rank 2 (lists everywhere for "span", whose NOTE needs cached data)."""
    _, x, y = _data(name)[1:]
    sizes = PROBLEMS[name][3][world]
    lo = sum(sizes[:rank])
    xs, ys = x[lo:lo + sizes[rank]], y[lo:lo + sizes[rank]]
    n = xs.shape[0]
    if name == "span" or rank == 0:
        return xs, ys, _batches(xs, ys, [n // 3 or 1, n - (n // 3 or 1)])
    if rank == 1:
        return xs, ys, DataLoader(TensorDataset(xs, ys), batch_size=4, shuffle=False)
    return xs, ys, (xs, ys)


def _quantities(H: hf.HessianOperator, f: Any, params: Any, x: torch.Tensor, y: torch.Tensor,
                group: Any = None) -> dict[str, Any]:
    """Everything compared: products, dense, diagonals, traces, estimators, gradient."""
    P = H.shape[0]
    g = torch.Generator().manual_seed(123)
    v = torch.randn(P, generator=g, dtype=torch.float64)
    V = torch.randn(P, 3, generator=g, dtype=torch.float64)
    grad, value = H.grad_and_value()
    vals, vecs = H.eigenvalues(3, seed=0, return_vectors=True)
    sd = H.spectral_density(num_probes=3, num_steps=6, seed=0)
    kw = {} if group is None else {"process_group": group, "reduction": H.reduction}
    per_sample = hf.hessian_diag(f, per_sample=True, **kw)(params, x, y)
    return {
        "Hv": H @ v, "HV": H @ V, "dense": H.to_dense(), "diagonal": H.diagonal(),
        "trace": H.trace(),
        "hutchinson": H.trace("hutchinson", num_samples=20, seed=0).estimate,
        "hutch++": H.trace("hutch++", num_samples=12, seed=0).estimate,
        "diagonal_hutchinson": H.diagonal("hutchinson", num_samples=10, seed=1),
        "eigenvalues": vals,
        "eigenvectors": torch.stack([H.params_to_flat(t) for t in vecs]),
        "smallest": H.eigenvalues(2, which="smallest", seed=1, data_span=False),
        "density_nodes": sd.nodes, "density_weights": sd.weights,
        "grad": grad, "value": value,
        "hessian_diag": H.params_to_flat(hf.hessian_diag(f, **kw)(params, x, y)),
        "per_sample": torch.cat([t.reshape(t.shape[0], -1) for t in per_sample.values()], 1),
        "num_samples": H.num_samples, "num_batches": H.num_batches,
        "world_size": H.world_size,
    }


def _exact_worker(rank: int, world: int) -> dict[str, Any]:
    results = {}
    for name in PROBLEMS:
        model, loss_fn = _data(name)[:2]
        x, y, data = _shard(name, world, rank)
        f, params = hf.functionalize(model, loss_fn)
        H = hf.HessianOperator(f, params, data, reduction=PROBLEMS[name][2],
                               process_group=dist.group.WORLD)
        results[name] = _quantities(H, f, params, x, y, group=dist.group.WORLD)
        results[name]["span"] = H._data_span() is not None
    return results


class _Reshuffled:
    """An iterable of batches whose order changes after the first pass."""

    def __init__(self, batches: list[tuple[Any, Any]]):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches if self.passes == 1 else self.batches[::-1])


def _failure_worker(rank: int, world: int) -> dict[str, Any]:
    """Every failure scenario in turn; what each rank raised (type name, message) or None."""
    import warnings

    warnings.simplefilter("ignore")  # the broadcasting target of "structure" warns
    model, loss_fn, x, y = _data("mean")
    f, params = hf.functionalize(model, loss_fn)
    xs, ys = x[rank * 12:(rank + 1) * 12], y[rank * 12:(rank + 1) * 12]
    group = dist.group.WORLD
    v = torch.randn(sum(t.numel() for t in params.values()),
                    generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out: dict[str, Any] = {}

    def record(name: str, fn: Any) -> None:
        try:
            fn()
            out[name] = None
        except Exception as exc:  # noqa: BLE001 - what was raised is the result
            out[name] = (type(exc).__name__, str(exc), traceback.format_exc()[-2000:])

    def op(data: Any = (xs, ys), p: Any = params, g: Any = group, **kw: Any
           ) -> hf.HessianOperator:
        return hf.HessianOperator(f, p, data, process_group=g, **kw)

    moved = {k: t + (1e-12 if rank == 1 and k == "2.bias" else 0.0) for k, t in params.items()}
    record("params", lambda: op(p=moved))
    record("empty shard", lambda: op(data=[] if rank == 1 else (xs, ys)))
    wide = torch.randn(12, 4, dtype=torch.float64)
    record("samples do not fit", lambda: op(data=(wide, ys) if rank == 1 else (xs, ys)))
    f1, params1 = hf.functionalize(_mlp([3, 5, 1], seed=1), nn.MSELoss())
    y1 = ys[:, :1] if rank == 0 else ys[:, 0]  # (n, 1) against (n,): broadcasts silently
    record("structure", lambda: hf.HessianOperator(f1, params1, (xs, y1), process_group=group))
    record("reduction", lambda: op(reduction="sum" if rank == 1 else "mean"))
    record("shuffling loader", lambda: op(data=DataLoader(TensorDataset(xs, ys), batch_size=4,
                                                         shuffle=rank == 1)))
    batches = _batches(xs, ys, [5, 7])
    H = op(data=_Reshuffled(batches) if rank == 1 else batches)
    record("later pass", lambda: H @ v)
    H = op()
    record("recovers", lambda: H @ v)
    record("different vectors",
           lambda: H @ torch.randn(v.shape[0], generator=torch.Generator().manual_seed(rank),
                                   dtype=torch.float64))
    torch.manual_seed(rank)  # a rank-dependent global RNG, and no seed: different probes
    record("unseeded estimator", lambda: H.eigenvalues(1))
    like = torch.empty(0, dtype=torch.float64)
    record("different steps", lambda: Group(group, "test").sum(
        "a" if rank == 0 else "b", (3,), like, lambda t: None))
    record("hessian_diag params", lambda: hf.hessian_diag(f, process_group=group)(moved, xs, ys))
    record("hessian_diag empty", lambda: hf.hessian_diag(f, process_group=group)(
        params, xs[:0] if rank == 0 else xs, ys[:0] if rank == 0 else ys))
    record("group type", lambda: op(g="WORLD"))
    # a collective that times out: rank 1 builds the operator but never calls the product;
    # it waits in a barrier of the other group until rank 0 has given up
    short = dist.new_group(timeout=datetime.timedelta(seconds=2))
    H = op(g=short)
    out["timeout"] = None
    if rank == 0:
        record("timeout", lambda: H @ v)
    dist.barrier(group=group)
    return out


WORKERS = {"exact": _exact_worker, "failures": _failure_worker}


# ---------------------------------------------------------------- exactness
@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}-ranks")
def sharded(request, tmp_path_factory
            ) -> tuple[int, list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """(world size, every rank's results, the one-process results); the one-process ones
    first, so that forked ranks inherit what their computation imports."""
    world = request.param
    one = {name: _one_process(name, world) for name in PROBLEMS}
    return world, _spawn(tmp_path_factory.mktemp("exact"), world, "exact"), one


def _one_process(name: str, world: int) -> dict[str, Any]:
    """The one-process operator over the shards' batches concatenated in rank order."""
    model, loss_fn, x, y = _data(name)
    f, params = hf.functionalize(model, loss_fn)
    batches = []
    for rank in range(world):
        xs, ys, data = _shard(name, world, rank)
        batches += [data] if isinstance(data, tuple) else [tuple(b) for b in data]
    H = hf.HessianOperator(f, params, batches, reduction=PROBLEMS[name][2])
    got = _quantities(H, f, params, x, y)
    got["span"] = H._data_span() is not None
    return got


def _oracle(f: Any, params: Any, x: torch.Tensor, y: torch.Tensor
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_(True) for t in params.values()]
    loss = f(dict(zip(params, leaves, strict=True)), x, y)
    return hf.reference.hessian(loss, leaves), leaves


EXACT = ("Hv", "HV", "dense", "diagonal", "trace", "hutchinson", "hutch++",
         "diagonal_hutchinson", "eigenvalues", "eigenvectors", "smallest", "density_nodes",
         "density_weights", "grad", "value", "hessian_diag", "per_sample")


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_every_quantity_equals_one_process_over_the_concatenated_data(sharded, name):
    world, ranks, ones = sharded
    one = ones[name]
    first = ranks[0][name]
    assert first["world_size"] == world and one["world_size"] == 1
    assert first["num_samples"] == one["num_samples"] == PROBLEMS[name][1]
    assert first["num_batches"] == one["num_batches"]
    assert first["span"] == one["span"] == (name == "span")
    for key in EXACT:
        got = first[key]
        if key == "per_sample":  # each rank holds its own samples' rows
            got = torch.cat([r[name][key] for r in ranks])
        torch.testing.assert_close(got, one[key], rtol=1e-10, atol=1e-12, msg=lambda m, k=key:
                                   f"{name}, {world} ranks, {k}: {m}")


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_products_and_dense_equal_the_loop_oracle(sharded, name):
    world, ranks, _ = sharded
    model, loss_fn, x, y = _data(name)
    f, params = hf.functionalize(model, loss_fn)
    dense, leaves = _oracle(f, params, x, y)
    got = ranks[0][name]
    torch.testing.assert_close(got["dense"], dense, rtol=1e-10, atol=1e-12)
    g = torch.Generator().manual_seed(123)
    v = torch.randn(dense.shape[0], generator=g, dtype=torch.float64)
    V = torch.randn(dense.shape[0], 3, generator=g, dtype=torch.float64)
    loss = f(dict(zip(params, leaves, strict=True)), x, y)
    hv = hf.reference.hvp(loss, leaves, list(hf.HessianOperator(f, params, (x, y)
                                                                ).flat_to_params(v).values()))
    torch.testing.assert_close(got["Hv"], torch.cat([t.reshape(-1) for t in hv]),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["HV"], dense @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["diagonal"], dense.diagonal(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["grad"], torch.cat(
        [t.reshape(-1) for t in hf.reference.gradient(loss, leaves)]), rtol=1e-10, atol=1e-12)
    evals = torch.linalg.eigvalsh(dense)
    torch.testing.assert_close(got["eigenvalues"], evals.flip(0)[:3], rtol=1e-8, atol=1e-10)


def test_every_rank_holds_the_same_answers_bitwise(sharded):
    world, ranks, _ = sharded
    for name in PROBLEMS:
        for key in EXACT:
            if key == "per_sample":
                continue
            for r in range(1, world):
                assert torch.equal(ranks[r][name][key], ranks[0][name][key]), (name, key, r)


# ------------------------------------------------------------------ failures
@pytest.fixture(scope="module")
def failures(tmp_path_factory) -> list[dict[str, Any]]:
    return _spawn(tmp_path_factory.mktemp("failures"), 2, "failures")


def _raised(outcome: Any, kind: str, pattern: str) -> None:
    assert outcome is not None, f"expected {kind} matching {pattern!r}, nothing was raised"
    name, message, trace = outcome
    assert name == kind, trace
    assert re.search(pattern, message), f"{pattern!r} not in: {message}"


REFUSALS = [
    ("params", r"different parameter values: rank\(s\) 1 differ from rank 0 in \['2.bias'\]",
     None),
    ("empty shard",
     r"shard of `data` on rank\(s\) 1 is empty \(samples per rank: \[12, 0\]\)", None),
    ("structure", r"rank\(s\) 1 have another structure.*targets: 1-d float64.*rank 0: "
                  r"inputs: 2-d float64, targets: 2-d float64", None),
    ("reduction", r"`reduction` is 'sum' on rank\(s\) 1 and 'mean' on rank 0", None),
    ("hessian_diag params", r"hessian_diag: the ranks hold different parameter values: "
                            r"rank\(s\) 1", None),
    ("hessian_diag empty", r"hessian_diag: the shard of `data` on rank\(s\) 0 is empty", None),
    ("different vectors", r"step 'H @ v', rank \d of 2: the ranks passed different vectors",
     None),
    ("unseeded estimator", r"the ranks passed different vectors.*seed", None),
    ("group type", r"`process_group` must be a torch.distributed.ProcessGroup.*got str", None),
    ("samples do not fit", r"rank\(s\) 1 refused their input.*do not fit `f`",
     r"step 'set-up', rank 1 of 2: the samples of this rank's shard of `data` do not fit "
     r"`f`.*inputs Tensor\(shape=\(12, 4\).*RuntimeError"),
    ("shuffling loader", r"step 'set-up'.*rank\(s\) 1 refused their input.*shuffle=True",
     r"DataLoader with shuffle=True"),
    ("later pass", r"step 'H @ v'.*rank\(s\) 1 refused their input.*different batches on a "
                   r"later pass", r"different batches on a later pass"),
]


@pytest.mark.parametrize(("scenario", "both", "rank1"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_shards_are_refused_on_every_rank(failures, scenario, both, rank1):
    _raised(failures[0][scenario], "ArgumentError", both)
    _raised(failures[1][scenario], "ArgumentError", rank1 or both)


def test_the_group_stays_usable_after_a_refusal(failures):
    assert failures[0]["recovers"] is None and failures[1]["recovers"] is None


def test_ranks_at_different_steps_are_refused(failures):
    for rank in (0, 1):
        _raised(failures[rank]["different steps"], "DistributedError",
                r"rank \d of 2: the ranks reached different steps")


def test_a_timed_out_collective_names_the_rank_and_the_step(failures):
    _raised(failures[0]["timeout"], "DistributedError",
            r"HessianOperator, step 'H @ v', rank 0 of 2: the all_reduce over the process "
            r"group failed: .*[Tt]imed out.*init_process_group\(timeout=")
    assert failures[1]["timeout"] is None


def test_process_group_without_torch_distributed_initialised():
    model, loss_fn, x, y = _data("mean")
    f, params = hf.functionalize(model, loss_fn)
    assert not dist.is_initialized()
    fix = r"call torch.distributed.init_process_group"
    with pytest.raises(hf.ArgumentError, match=r"HessianOperator: `process_group` was given "
                                               r"\(object\) but torch.distributed is not "
                                               r"initialised.*" + fix):
        hf.HessianOperator(f, params, (x, y), process_group=object())
    with pytest.raises(hf.ArgumentError, match=r"hessian_diag: `process_group` was given.*" + fix):
        hf.hessian_diag(f, process_group=object())


def test_torchrun_without_init_process_group_warns(monkeypatch):
    model, loss_fn, x, y = _data("mean")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(RuntimeWarning, match=r"one of 2 processes .* not initialised.*"
                                            r"group.WORLD \(which is None before init\)"):
        hf.HessianOperator.from_model(model, loss_fn, (x, y))


# ------------------------------------------------------------------- analyze
MODEL_FILE = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int) -> list[str]:
    """torchrun on this machine only: the rendezvous and gloo on the loopback interface."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
            str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
            "--local-addr", "127.0.0.1"]


def _env(*paths: Path) -> dict[str, str]:
    return dict(os.environ, GLOO_SOCKET_IFNAME=_loopback(), OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(str(p) for p in (ROOT, *paths)))


def test_the_documented_script_runs_under_torchrun(tmp_path):
    """docs/distributed.md's script, launched as the page says, checks itself against one
    process over all of the data on each of 2 ranks."""
    page = (ROOT / "docs" / "distributed.md").read_text(encoding="utf-8")
    script = re.search(r"^```python\n(.*?)^```", page, re.M | re.S).group(1)
    (tmp_path / "curvature.py").write_text(script)
    proc = subprocess.run([*_torchrun(2), "curvature.py"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("2 process(es): top eigenvalues") == 1, proc.stdout


def test_analyze_under_torchrun_reports_the_one_process_numbers(tmp_path, monkeypatch):
    (tmp_path / "tinymodel.py").write_text(MODEL_FILE)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(41, 3, generator=g, dtype=torch.float64)
    torch.save({"x": x, "y": torch.randn(41, 2, generator=g, dtype=torch.float64)},
               tmp_path / "data.pt")
    args = ["analyze", "--model", "tinymodel:make", "--data", "data.pt", "--batch-size", "8",
            "--top-k", "3"]
    proc = subprocess.run([*_torchrun(2), "-m", "hessfunc", *args, "--out", "two",
                           "--timeout", "60"], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("Analysing") == 1  # rank 0 prints, rank 1 is silent
    assert "in 2 shards (20, 21 samples)" in proc.stdout
    assert re.search(r"processes \(world size\) +\| 2 ", proc.stdout), proc.stdout
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main([*args, "--out", "one"]) == 0
    two, one = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("two", "one"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["num_samples"] == one["num_samples"] == 41
    for key in ("loss", "grad_norm", "trace_exact", "trace_hutchinson",
                "trace_hutchinson_std_error", "top_eigenvalues", "density_integral"):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-10, err_msg=key)
    for key in ("grid", "density"):
        np.testing.assert_allclose(two["spectral_density"][key], one["spectral_density"][key],
                                   rtol=1e-9, atol=1e-12, err_msg=key)
    for name, values in one["diagonal"].items():
        np.testing.assert_allclose(two["diagonal"][name], values, rtol=1e-10, atol=1e-14)
    assert (tmp_path / "two" / "spectrum.png").is_file()
    assert (tmp_path / "two" / "diagonal.png").is_file()
