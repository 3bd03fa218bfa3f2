"""hessfunc side by side with the tools users would otherwise pick.

    python -m benchmarks [--quick] [--threads 1] [--only TASK ...] [--problems P,...]
                         [--repeats N] [--device cpu|cuda] [--dtype float32|float64]
                         [--json PATH] [--markdown PATH]

For every problem and task, each implementation (hessfunc, the seed's loops in
``hessfunc.reference``, ``torch.autograd.functional``, plain ``torch.func``
recipes, BackPACK, PyHessian, curvlinops, hessian-eigenthings) is run once (the
warm-up, with its peak memory sampled), its answer checked against a float64
truth that hessfunc's own routes never compute (the loop oracle
``hessfunc.reference``, ``torch.autograd.functional.hessian`` + ``eigvalsh``, or on
the large problems a cheaper float64 computation checked against the oracle on a
subsample; each table names its truths below it), then the implementations of a
task are timed side by side, round-robin: the median of up to ``--repeats`` rounds
within a per-case time budget (a single further call for slow ones). Loops whose estimate
from a partial run exceeds ``--loop-limit`` seconds are skipped with that estimate.
Output: one markdown table per problem, and the same in JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import competitors, tasks  # noqa: E402
from benchmarks._timing import median_time, peak_memory  # noqa: E402
from benchmarks.problems import INPUT_PROBLEMS, PROBLEMS  # noqa: E402

ALL_PROBLEMS = {**PROBLEMS, **INPUT_PROBLEMS}
DEFAULT_PROBLEMS = ["simplenet", "mlp5k", "mlp100k", "cnn", "input_mlp"]
#: (per-case timing budget in s, default repeats, loop limit in s), full and quick
MODES = {False: (3.0, 10, 60.0), True: (0.3, 3, 2.0)}


# ------------------------------------------------------------------ memory
class _RSSSampler(threading.Thread):
    """Samples this process's resident set size every ``interval`` seconds."""

    def __init__(self, interval: float = 5e-4):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = 0
        self._stop_event = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self.rss())


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def first_call(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, int | None]:
    """Run ``fn`` once (the warm-up): its output, seconds, and peak memory in bytes.

    CUDA: ``max_memory_allocated`` above the level before the call. CPU: peak RSS
    above the level before the call (sampled every 0.5 ms, freed heap returned to
    the OS first); cheap calls are repeated for 20 ms so the sampler sees them.
    """
    if device.type == "cuda":
        holder: dict[str, Any] = {}

        def call() -> None:
            t0 = time.perf_counter()
            holder["out"] = fn()
            torch.cuda.synchronize(device)
            holder["t"] = time.perf_counter() - t0

        mem = peak_memory(call, device)
        return holder["out"], holder["t"], mem
    if not os.path.exists("/proc/self/statm"):  # not Linux: no RSS sampling
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0, None
    _trim()
    sampler = _RSSSampler()
    base = sampler.rss()
    sampler.start()
    try:
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter() - t0
        while time.perf_counter() - t0 < 0.02:
            fn()
    finally:
        peak = sampler.stop()
    return out, t1, max(peak - base, 0)


# ------------------------------------------------------------------ measure
def measure(task: str, case: competitors.Case, ctx: tasks.Context, ref: tasks.Reference,
            cfg: argparse.Namespace) -> tuple[dict[str, Any], Callable[[], Any] | None]:
    """The first call of a case (memory sampled) and the check of its answer: the record,
    and the function to time (None when it failed, was skipped or is unavailable)."""
    rec: dict[str, Any] = {
        "task": task, "implementation": case.name, "library": case.library,
        "hessfunc": case.is_hessfunc, "settings": case.settings, "note": case.note,
        "status": case.status or "ok", "reason": case.reason, "time_s": None, "runs": 0,
        "error": None, "tolerance": None, "measure": "", "memory_bytes": None,
        "estimate_s": None, "stochastic": False,
    }
    if case.status:
        return rec, None
    if case.estimate is not None:
        try:
            est = case.estimate()
        except Exception as exc:  # noqa: BLE001
            return {**rec, "status": "fails", "reason": competitors.short_reason(exc)}, None
        rec["estimate_s"] = est
        if est > cfg.loop_limit:
            return {**rec, "status": "skipped", "reason": f"est. {est:,.0f} s from a partial "
                    f"run (limit {cfg.loop_limit:g} s)"}, None
    try:
        out, t1, mem = first_call(case.run, ctx.device)
        converted = case.convert(out)
        chk = tasks.check(task, converted, ref, ctx)
    except Exception as exc:  # noqa: BLE001 - report, never crash
        return {**rec, "status": "fails", "reason": competitors.short_reason(exc)}, None
    rec.update(error=chk.error, tolerance=chk.tolerance, measure=chk.measure, memory_bytes=mem,
               stochastic=chk.stochastic, time_s=t1, runs=1)
    if not (chk.error <= chk.tolerance):
        rec["status"] = "inaccurate"
    return rec, case.run


def time_side_by_side(entries: list[tuple[dict[str, Any], Callable[[], Any] | None]],
                      ctx: tasks.Context, cfg: argparse.Namespace) -> None:
    """Time one task's cases side by side, filling in ``time_s`` and ``runs``.

    The cases whose first call fits the budget three times over are timed round-robin,
    after one untimed round: each round calls every one of them once, so that a drift
    of the machine (clock speed, a busy neighbour) moves them all alike and the ratios
    between them hold; the median of up to ``repeats`` rounds within ``budget`` seconds
    per case. A slower case gets one more call, and one over the budget keeps its
    first call as the measurement.
    """
    fast = []
    for rec, fn in entries:
        if fn is None:
            continue
        t1 = rec["time_s"]
        if rec["implementation"].endswith("(unit)") or t1 * 3 <= cfg.budget:
            fast.append((rec, fn))
        elif t1 <= cfg.budget:
            rec["time_s"] = median_time(fn, repeats=1, warmup=0, device=ctx.device)
        else:  # slow: the first call is the measurement
            rec["note"] = (rec["note"] + "; " if rec["note"] else "") + "one call, incl. warm-up"
    if not fast:
        return
    for _, fn in fast:
        fn()
    rounds = max(cfg.repeats, 5 if any(r["implementation"].endswith("(unit)")
                                       for r, _ in fast) else 1)
    times: list[list[float]] = [[] for _ in fast]
    start = time.perf_counter()
    for i in range(rounds):
        for j, (_, fn) in enumerate(fast):
            times[j].append(_timed(fn, ctx.device))
        if i >= 2 and time.perf_counter() - start > cfg.budget * len(fast):
            break
    for (rec, _), ts in zip(fast, times, strict=True):
        rec.update(time_s=statistics.median(ts), runs=len(ts))


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def unit_case(ctx: tasks.Context) -> competitors.Case:
    """One plain autograd gradient: the unit of every ratio."""
    model, x, y = ctx.problem.model, ctx.problem.x, ctx.problem.y
    if ctx.inputs:
        def run() -> torch.Tensor:
            xr = x.detach().requires_grad_(True)
            return torch.autograd.grad(model(xr).sum(), xr)[0]
        return competitors.Case("torch.autograd.grad (unit)", "torch.autograd", run)
    params = list(model.parameters())
    return competitors.Case("torch.autograd.grad (unit)", "torch.autograd",
                            lambda: torch.autograd.grad(ctx.problem.loss_fn(model(x), y), params),
                            convert=tasks.flat)


def prime(device: torch.device) -> None:
    """First calls pay one-time costs (functorch and oneDNN set-up, lazy imports): pay them
    here, on a tiny CNN, so that no measured first call carries them."""
    import hessfunc as hf

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(8, 2)).to(device)
    x = torch.randn(3, 1, 4, 4, device=device)
    y = torch.tensor([0, 1, 1], device=device)
    ce = torch.nn.functional.cross_entropy
    f, params = hf.functionalize(model, ce)
    v = {k: torch.ones_like(t) for k, t in params.items()}
    torch.autograd.grad(ce(model(x), y), list(model.parameters()))
    torch.func.grad(f)(params, x, y)
    torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
    torch.func.jvp(lambda p: torch.func.grad(f)(p, x, y), (params,), (v,))
    hf.hvp(f, (params, x, y), v)
    hf.hessian_diag(f)(params, x, y)
    hf.HessianOperator(f, params, (x, y)).eigenvalues(1)
    lin = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    g, p2 = hf.functionalize(lin, torch.nn.functional.mse_loss)
    hf.hessian_diag(g, per_sample=True)(p2, torch.randn(4, 2), torch.randn(4, 1))


def task_skip(task: str, ctx: tasks.Context) -> str:
    """Why ``task`` is skipped on this problem for every implementation ('' if it is not)."""
    item = ctx.problem.x.element_size()
    params = ctx.extra["params"]
    if task == "hessian" and ctx.P ** 2 * item > competitors.MEMORY_LIMIT:
        return (f"P = {ctx.P:,}: the dense Hessian needs {ctx.P ** 2 * item / 2 ** 30:.1f} GiB "
                f"(limit {competitors.MEMORY_LIMIT / 2 ** 30:.0f} GiB)")
    if task == "blocks":
        nbytes = sum(t.numel() ** 2 for t in params.values()) * item
        if nbytes > competitors.MEMORY_LIMIT:
            big = max(params, key=lambda k: params[k].numel())
            return (f"the {params[big].numel():,}-entry tensor {big!r} alone has a "
                    f"{params[big].numel() ** 2 * item / 2 ** 30:.1f} GiB block")
    return ""


def run_problem(key: str, cfg: argparse.Namespace) -> dict[str, Any]:
    with warnings.catch_warnings():
        # the competitors' own notices (BackPACK's hooks, PyHessian's create_graph backward)
        warnings.simplefilter("ignore")
        return _run_problem(key, cfg)


def _run_problem(key: str, cfg: argparse.Namespace) -> dict[str, Any]:
    dtype = getattr(torch, cfg.dtype)
    device = torch.device(cfg.device)
    problem = ALL_PROBLEMS[key](dtype=dtype, device=cfg.device)
    inputs = key in INPUT_PROBLEMS
    ctx = tasks.Context(key, problem, dtype, device, cfg.quick, inputs=inputs)
    competitors.setup_context(ctx)
    ref = tasks.Reference(problem, inputs=inputs)
    selected = [t for t in tasks.TASKS.values() if t.key == "gradient"
                or (t.inputs == inputs and (not cfg.only or t.key in cfg.only))]
    results, skipped = [], {}
    t_start = time.perf_counter()
    for task in selected:
        why = task_skip(task.key, ctx)
        if why:
            skipped[task.key] = why
            continue
        cases = competitors.all_cases(task.key, ctx)
        if task.key == "gradient":
            cases.insert(0, unit_case(ctx))
        entries = [measure(task.key, case, ctx, ref, cfg) for case in cases]
        time_side_by_side(entries, ctx, cfg)
        for rec, _ in entries:
            results.append(rec)
            if cfg.verbose:
                print(f"  [{key}] {task.key:16s} {rec['library']:26s} {rec['implementation']:45s} "
                      f"{rec['status']:10s} {_fmt_time(rec['time_s']):>9s} "
                      f"{rec['reason']}", file=sys.stderr, flush=True)
    unit = next(r["time_s"] for r in results if r["implementation"].endswith("(unit)"))
    _ratios(results, unit)
    truth = {task.key: ref.source(task.key) for task in selected
             if task.key not in skipped}
    return {"key": key, "name": problem.name, "P": ctx.P, "N": ctx.N, "unit_s": unit,
            "inputs": inputs, "results": results, "skipped_tasks": skipped, "truth": truth,
            "notes": sorted(set(ref.notes)), "seconds": time.perf_counter() - t_start}


def _ratios(results: list[dict[str, Any]], unit: float) -> None:
    best: dict[str, float] = {}
    for r in results:
        if r["status"] == "ok" and not r["hessfunc"] and r["time_s"] is not None:
            best[r["task"]] = min(best.get(r["task"], math.inf), r["time_s"])
    for r in results:
        t = r["time_s"]
        r["ratio_grad"] = None if t is None else t / unit
        b = best.get(r["task"])
        r["ratio_best"] = None if t is None or b is None else t / b


# ------------------------------------------------------------------ output
def _fmt_time(t: float | None) -> str:
    if t is None:
        return "—"
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.3g} µs"


def _fmt_ratio(r: float | None) -> str:
    if r is None:
        return "—"
    return f"{r:.3g}x" if r < 1000 else f"{r:,.0f}x"


def _fmt_mem(b: int | None) -> str:
    if b is None:
        return "—"
    if b < 2 ** 20 / 10:
        return "<0.1 MiB"
    return f"{b / 2 ** 20:.3g} MiB" if b < 2 ** 30 else f"{b / 2 ** 30:.3g} GiB"


def _fmt_error(r: dict[str, Any]) -> str:
    if r["status"] in ("ok", "inaccurate"):
        e = f"{r['error']:.1e}"
        if r["status"] == "inaccurate":
            return f"**inaccurate: {e}** (tol {r['tolerance']:.1g})"
        return f"{e} (tol {r['tolerance']:.1g})" if r["stochastic"] else e
    if r["status"] == "fails":
        return f"fails: {r['reason']}"
    if r["status"] == "skipped":
        return f"skipped: {r['reason']}"
    return r["status"]


def markdown(prob: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"### {prob['name']}", "",
             f"P = {prob['P']:,} parameters, N = {prob['N']:,} samples; one gradient "
             f"(the unit) = {_fmt_time(prob['unit_s'])}; {meta['dtype']}, {meta['device']}, "
             f"{meta['threads']} thread(s).", "",
             "| task | implementation | time | × gradient | × best competitor "
             "| error (vs float64 truth, below) | peak memory | settings / notes |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | --- |"]
    last = None
    for r in prob["results"]:
        title = tasks.TASKS[r["task"]].title if r["task"] != last else ""
        last = r["task"]
        name = f"**{r['library']}** {r['implementation']}" if r["hessfunc"] else \
            f"{r['library']}: {r['implementation']}" if r["implementation"] != r["library"] \
            else r["library"]
        notes = "; ".join(s for s in (r["settings"], r["note"]) if s)
        if r["runs"] > 1:
            notes = (notes + "; " if notes else "") + f"median of {r['runs']}"
        lines.append(f"| {title} | {name} | {_fmt_time(r['time_s'])} | "
                     f"{_fmt_ratio(r['ratio_grad'])} | {_fmt_ratio(r['ratio_best'])} | "
                     f"{_fmt_error(r)} | {_fmt_mem(r['memory_bytes'])} | {notes} |")
    for task, why in prob["skipped_tasks"].items():
        lines.append(f"| {tasks.TASKS[task].title} | all | — | — | — | skipped: {why} | — | |")
    if prob.get("truth"):
        lines += ["", "Float64 truth of each task (never hessfunc's own routes):", ""]
        lines += [f"- {tasks.TASKS[t].title}: {src}" for t, src in prob["truth"].items()]
    if prob["notes"]:
        lines += [""] + [f"- {n}" for n in prob["notes"]]
    return "\n".join(lines) + "\n"


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small budgets: 3 repeats, 0.3 s per case, loops over 2 s skipped, "
                         "fewer probes")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per case (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--only", action="append", default=[],
                    help=f"task(s), repeatable or comma list: {', '.join(tasks.TASKS)}")
    ap.add_argument("--problems", action="append", default=[],
                    help=f"problem(s), repeatable or comma list: {', '.join(ALL_PROBLEMS)}")
    ap.add_argument("--loop-limit", type=float, default=None,
                    help="skip loops whose estimate exceeds this many seconds")
    ap.add_argument("--budget", type=float, default=None, help="timing seconds per case")
    ap.add_argument("--json", dest="json_path", default=None, help="write the results here")
    ap.add_argument("--markdown", default=None, help="write the tables here")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per case on stderr")
    args = ap.parse_args(argv)
    split = lambda items: [s.strip() for item in items for s in item.split(",") if s.strip()]  # noqa: E731
    args.only = split(args.only)
    args.problems = split(args.problems) or DEFAULT_PROBLEMS
    for t in args.only:
        if t not in tasks.TASKS:
            ap.error(f"--only: unknown task {t!r}; choose from {', '.join(tasks.TASKS)}")
    for p in args.problems:
        if p not in ALL_PROBLEMS:
            ap.error(f"--problems: unknown problem {p!r}; choose from {', '.join(ALL_PROBLEMS)}")
    budget, repeats, limit = MODES[args.quick]
    args.budget = budget if args.budget is None else args.budget
    args.repeats = repeats if args.repeats is None else args.repeats
    args.loop_limit = limit if args.loop_limit is None else args.loop_limit
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "command": command.strip(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "versions": competitors.versions(), "threads": args.threads, "device": args.device,
        "dtype": args.dtype, "quick": args.quick, "repeats": args.repeats,
        "budget_s": args.budget, "loop_limit_s": args.loop_limit,
        "stochastic_settings": competitors.SETTINGS[args.quick],
        "tolerances": {"exact": tasks.TOLERANCE[getattr(torch, args.dtype)],
                       "eigenvalues": tasks.EIGEN_TOLERANCE[getattr(torch, args.dtype)],
                       "stochastic_sd": tasks.Z},
    }
    print(f"hessfunc benchmarks: {meta['machine']['cpu']}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {args.dtype}, {args.device}"
          + (", quick" if args.quick else ""))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prime(torch.device(args.device))
    t0 = time.perf_counter()
    problems, texts = [], []
    for key in args.problems:
        prob = run_problem(key, args)
        problems.append(prob)
        texts.append(markdown(prob, meta))
        print(texts[-1], flush=True)
    meta["seconds"] = time.perf_counter() - t0
    if hasattr(os, "getloadavg"):
        meta["machine"]["loadavg_end"] = list(os.getloadavg())
    result = {"meta": meta, "problems": problems}
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(result, fh, indent=1, default=_json_default)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(texts))
    print(f"total {meta['seconds']:.0f} s")
    return result


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


__all__ = ["main", "parse_args", "measure"]


if __name__ == "__main__":
    main()
