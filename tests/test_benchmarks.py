"""The benchmark runner: ``--quick`` on SimpleNet, with whatever competitors are installed.

No timing is asserted; the checks are the JSON's structure and that every answer
reported as successful agrees with the float64 reference (the loop oracle, dense autograd).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import competitors, run, tasks  # noqa: E402

STATUSES = {"ok", "inaccurate", "fails", "not installed", "skipped"}
RECORD_KEYS = {"task", "implementation", "library", "hessfunc", "status", "reason", "time_s",
               "runs", "error", "tolerance", "measure", "memory_bytes", "settings", "note",
               "ratio_grad", "ratio_best", "stochastic"}
PARAM_TASKS = [t.key for t in tasks.TASKS.values() if not t.inputs]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    threads = torch.get_num_threads()
    try:
        run.main(["--quick", "--problems", "simplenet", "--budget", "0.1", "--loop-limit", "1",
                  "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    with open(path) as fh:
        return json.load(fh)


def test_json_structure(report: dict) -> None:
    meta = report["meta"]
    for key in ("command", "versions", "machine", "threads", "dtype", "device", "quick",
                "stochastic_settings", "tolerances"):
        assert key in meta
    assert meta["quick"] is True and meta["dtype"] == "float32"
    assert meta["versions"]["torch"] == torch.__version__
    (prob,) = report["problems"]
    assert prob["key"] == "simplenet" and prob["P"] == 141 and prob["N"] == 1000
    assert prob["unit_s"] > 0
    for rec in prob["results"]:
        assert RECORD_KEYS <= set(rec), set(rec) ^ RECORD_KEYS
        assert rec["status"] in STATUSES
        if rec["status"] in ("fails", "skipped"):
            assert rec["reason"]
        if rec["status"] in ("ok", "inaccurate"):
            assert rec["time_s"] > 0 and rec["runs"] >= 1
            assert rec["ratio_grad"] == pytest.approx(rec["time_s"] / prob["unit_s"])
    assert {rec["task"] for rec in prob["results"]} == set(PARAM_TASKS)


def test_every_task_has_a_successful_hessfunc_row(report: dict) -> None:
    results = report["problems"][0]["results"]
    for task in PARAM_TASKS:
        rows = [r for r in results if r["task"] == task and r["hessfunc"]]
        assert rows, task
        assert any(r["status"] == "ok" for r in rows), (task, rows)
        for r in rows:
            assert r["status"] in ("ok", "skipped"), r  # hessfunc never fails nor errs


def test_successful_answers_are_accurate(report: dict) -> None:
    for rec in report["problems"][0]["results"]:
        if rec["status"] != "ok":
            continue
        assert math.isfinite(rec["error"]) and rec["error"] <= rec["tolerance"], rec
        if not rec["stochastic"]:  # exact quantities (and converged eigenvalues) in float32
            assert rec["error"] < 1e-3, rec


def test_installed_competitors_are_not_reported_missing(report: dict) -> None:
    versions = report["meta"]["versions"]
    for rec in report["problems"][0]["results"]:
        if rec["status"] == "not installed":
            assert versions[rec["library"]] == "not installed"
        elif rec["library"] in competitors.OPTIONAL:
            assert versions[rec["library"]] != "not installed"


def test_markdown_table(report: dict) -> None:
    text = run.markdown(report["problems"][0], report["meta"])
    assert "| task | implementation | time |" in text
    assert "hessfunc.hessian_diag" in text


def _context() -> tasks.Context:
    from benchmarks.problems import simplenet

    ctx = tasks.Context("simplenet", simplenet(), torch.float32, torch.device("cpu"), True)
    competitors.setup_context(ctx)
    return ctx


def test_missing_competitor_is_reported_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(competitors, "_import", lambda library: None)
    cases = competitors.all_cases("diag", _context())
    backpack = [c for c in cases if c.library == "BackPACK"]
    assert [c.status for c in backpack] == ["not installed"]
    assert any(c.is_hessfunc for c in cases)


def test_failing_implementation_is_reported_not_raised() -> None:
    ctx = _context()
    ref = tasks.Reference(ctx.problem)
    cfg = run.parse_args(["--quick"])

    def boom() -> None:
        raise RuntimeError("torch.eig was removed\nsecond line")

    rec, timer = run.measure("diag", competitors.Case("broken", "PyHessian", boom), ctx, ref,
                             cfg)
    assert rec["status"] == "fails" and timer is None
    assert rec["reason"] == "RuntimeError: torch.eig was removed"


def test_wrong_answer_is_flagged() -> None:
    ctx = _context()
    ref = tasks.Reference(ctx.problem)
    cfg = run.parse_args(["--quick"])
    f, params = ctx.extra["f"], ctx.extra["params"]
    case = competitors.Case("grad, not diag", "torch.func",
                            lambda: torch.func.grad(f)(params, ctx.problem.x, ctx.problem.y),
                            convert=tasks.flat)
    rec, timer = run.measure("diag", case, ctx, ref, cfg)
    assert rec["status"] == "inaccurate" and rec["error"] > rec["tolerance"]
    assert timer is case.run  # timed all the same, flagged in the table


def test_cases_are_timed_side_by_side() -> None:
    """time_side_by_side: round-robin medians for fast cases, the first call for slow ones."""
    ctx = _context()
    cfg = run.parse_args(["--quick"])
    calls: list[str] = []

    def case(name: str, seconds: float):
        def fn() -> None:
            calls.append(name)
            time.sleep(seconds)
        return {"implementation": name, "time_s": seconds, "note": "", "runs": 1}, fn

    entries = [case("a", 0.001), case("b", 0.002), case("slow", 10.0), (
        {"implementation": "failed", "time_s": None, "note": "", "runs": 0}, None)]
    run.time_side_by_side(entries, ctx, cfg)
    a, b, slow, failed = (rec for rec, _ in entries)
    assert calls[:4] == ["a", "b", "a", "b"] and "slow" not in calls   # round-robin
    assert a["runs"] == b["runs"] == cfg.repeats
    assert 0.001 <= a["time_s"] < b["time_s"]
    assert slow["time_s"] == 10.0 and "one call, incl. warm-up" in slow["note"]
    assert failed["time_s"] is None


def test_cli_rejects_unknown_names() -> None:
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "hessian,nonsense"])
    args = run.parse_args(["--only", "hvp,diag", "--only", "trace", "--problems", "cnn"])
    assert args.only == ["hvp", "diag", "trace"] and args.problems == ["cnn"]


def test_blocks_benchmark_checks_against_the_oracle() -> None:
    """``benchmarks.bench_blocks`` on SimpleNet: every route timed, the graph's blocks and
    full Hessian within float32 rounding of the float64 loop oracle."""
    from benchmarks import bench_blocks

    threads = torch.get_num_threads()
    try:
        (row,) = bench_blocks.run(["simplenet"], repeats=1)
    finally:
        torch.set_num_threads(threads)
    assert set(row["times_ms"]) == {"graph", "rows (before)", "full: graph",
                                    "full: rows (before)", "full: largest block + rows"}
    assert row["max_rel_error_vs_oracle"] < 1e-5
    assert row["full_max_rel_error_vs_oracle"] < 1e-5


def test_architectures_benchmark_on_the_residual_mlp() -> None:
    """``benchmarks.bench_architectures`` on its residual MLP: products equal the seed's,
    and the top eigenvalue agrees with PyHessian's where that is installed."""
    from benchmarks import bench_architectures

    threads = torch.get_num_threads()
    try:
        (row,) = bench_architectures.run(["residual"], repeats=1, rounds=1)
    finally:
        torch.set_num_threads(threads)
    assert row["params"] == 52_353 and row["product route"] == "structured"
    assert max(row["max_rel_error_vs_seed"].values()) < 1e-5
    assert row["gradients"]["gradient"] == 1.0
    if row["PyHessian"]:
        assert row["eig_rel_diff"] < 1e-4


def test_ggn_benchmark_products_agree() -> None:
    """``benchmarks.bench_ggn`` on SimpleNet: the cached operator's product and
    ``ggn_vp`` agree (and curvlinops' where installed)."""
    from benchmarks import bench_ggn

    threads = torch.get_num_threads()
    try:
        (row,) = bench_ggn.run(["simplenet"], repeats=1)
    finally:
        torch.set_num_threads(threads)
    assert {"gradient", "GGNOperator @ v", "ggn_vp"} <= set(row["times_ms"])
    assert max(row["max_rel_difference"].values()) < 1e-5


def test_fisher_benchmark_times_every_task_and_solves_to_its_tolerance() -> None:
    """``benchmarks.bench_fisher`` on SimpleNet: every task has its hessfunc row, the CG
    solve reaches the benchmark's tolerance, and the per-sample GGN diagonals agree with
    BackPACK's where it is installed."""
    from benchmarks import bench_fisher

    threads = torch.get_num_threads()
    try:
        (row,) = bench_fisher.run(["simplenet"], repeats=1)
    finally:
        torch.set_num_threads(threads)
    for task, cases in row["tasks"].items():
        ours = [v for k, v in cases.items() if k.startswith("hessfunc")]
        assert ours and all(isinstance(v, dict) and v["ms"] > 0 for v in ours), task
    assert row["agreement"]["residual reached: hessfunc GGNOperator.solve"] <= bench_fisher.TOL
    if "per-sample GGN diagonal vs BackPACK" in row["agreement"]:
        assert row["agreement"]["per-sample GGN diagonal vs BackPACK"] < 1e-5


def test_graph_benchmark_checks_every_route_against_the_oracle() -> None:
    """``benchmarks.bench_graph`` on SimpleNet: the torch.func ``f`` takes the captured
    graph, and every diagonal it times is within float32 rounding of the float64 loop
    oracle on its subsample (weight decay's own term within its stated shift)."""
    from benchmarks import bench_graph

    threads = torch.get_num_threads()
    try:
        (row,) = bench_graph.run(["simplenet"], repeats=1, generic_limit=200)
    finally:
        torch.set_num_threads(threads)
    assert row["route"] == "structured (captured graph)"
    assert {"torch.func f", "functionalize", "generic (before)"} <= set(row["times_ms"])
    assert max(row["max_rel_error"].values()) < 2e-5
