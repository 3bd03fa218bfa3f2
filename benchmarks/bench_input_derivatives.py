"""Input-space derivatives: the forward engine against vmap(hessian) and nested AD.

Run as ``python -m benchmarks.bench_input_derivatives`` or
``python benchmarks/bench_input_derivatives.py`` (``--help`` for the options).

The model is a 5-layer tanh MLP (d = 100 inputs, width 256, one output,
float32, parameters without gradients) on a batch of ``--batch`` points (128 by
default, which fits a 2-core CPU in a few hundred milliseconds per call).
Three groups, each side by side in one run:

* Laplacian: ``vmap(forward_laplacian(u))`` vs ``vmap(hessian(u))`` + trace;
  with ``--compile`` also ``torch.compile`` of both (compile time reported).
* input-Hessian diagonal: ``vmap(input_hessian_diag(u))`` (forward-then-backward),
  the purely forward variant, vs ``vmap(hessian(u))`` + diagonal.
* biharmonic on ``--biharmonic-batch`` points (cost grows like d^2):
  ``vmap(biharmonic(u))`` vs nested AD ``trace(hessian(x -> trace(hessian(u)(x))))``.

Time: the median (and min) of ``--repeats`` calls after two warm-up calls,
methods of a group interleaved call by call so that load drift hits them alike;
speed-up = baseline median / method median. Memory: each method runs once more
in a fresh subprocess after a warm-up on a single point (on the full batch for
compiled graphs); the peak resident set (VmHWM, reset through
/proc/self/clear_refs) minus the resident set just before the call is reported
(tracemalloc does not see torch's CPU tensors); mem ratio = baseline peak /
method peak. Every method is checked against its baseline first (rel. err).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.func import hessian, vmap
from torch.fx.experimental.proxy_tensor import make_fx

if __package__ in (None, ""):  # run as a script: make `hessfunc` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hessfunc.forward import biharmonic, forward_laplacian, input_hessian_diag  # noqa: E402
from hessfunc.forward.diagonal import _input_hessian_diag_forward  # noqa: E402

D, WIDTH, DEPTH = 100, 256, 5


def make_mlp(seed: int = 0) -> torch.nn.Module:
    """5 linear layers (d -> 256 -> 256 -> 256 -> 256 -> 1) with tanh between."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    sizes = [D] + [WIDTH] * (DEPTH - 1) + [1]
    for i in range(DEPTH):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < DEPTH - 1:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers).requires_grad_(False)


def methods(net: torch.nn.Module, compile_: bool) -> dict[str, dict[str, Callable]]:
    """Benchmark groups: name -> {method name: f(X)}; the first method is the baseline."""

    def u(x: torch.Tensor) -> torch.Tensor:
        return net(x).squeeze(-1)

    def lap_hessian(x: torch.Tensor) -> torch.Tensor:
        return hessian(u)(x).trace()

    groups: dict[str, dict[str, Callable]] = {
        "laplacian": {
            "vmap(hessian) + trace": vmap(lap_hessian),
            "forward_laplacian": vmap(forward_laplacian(u)),
        },
        "hessian diagonal": {
            "vmap(hessian) + diagonal": vmap(lambda x: hessian(u)(x).diagonal()),
            "input_hessian_diag (fwd-bwd)": vmap(input_hessian_diag(u)),
            "forward-only diagonal": vmap(_input_hessian_diag_forward(u)),
        },
        "biharmonic": {
            "nested AD hessian(trace hessian)": vmap(lambda x: hessian(lap_hessian)(x).trace()),
            "biharmonic (nested forward)": vmap(biharmonic(u)),
        },
    }
    if compile_:
        groups["laplacian"]["compiled vmap(hessian)"] = torch.compile(vmap(lap_hessian))
        groups["laplacian"]["compiled forward_laplacian"] = _traced_and_compiled(
            vmap(forward_laplacian(u))
        )
    return groups


def _traced_and_compiled(fn: Callable) -> Callable:
    """``make_fx`` the whole vmapped propagation into one graph, then ``torch.compile`` it.

    The engine interprets u's graph in Python; tracing that interpretation on
    the batch gives a flat graph of plain ops that inductor can fuse.
    """
    compiled: dict[tuple, Callable] = {}

    def run(x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        if key not in compiled:
            graph = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(x)
            compiled[key] = torch.compile(graph)
        return compiled[key](x)

    return run


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(group: str, name: str, batch: int, threads: int, compile_: bool, q) -> None:
    torch.set_num_threads(threads)
    fn = methods(make_mlp(), compile_)[group][name]
    x = torch.randn(batch, D)
    with torch.no_grad():
        warm = x if "compiled" in name else x[:1]  # compiled graphs are batch-specialised
        fn(warm)  # trace (and compile) before measuring
        fn(warm)
        before = _rss_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        fn(x)
        peak = _rss_kib("VmHWM")
    q.put(max(peak - before, 0) / 1024)


def peak_memory_mb(group: str, name: str, batch: int, threads: int, compile_: bool) -> float:
    """Peak resident memory added by one call, in a fresh process (MiB)."""
    # Fixed mmap threshold: freed large blocks go back to the OS at once, so the
    # peak resident set tracks the peak of live tensors (glibc would otherwise
    # raise the threshold after the first frees and keep memory around).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_memory_child, args=(group, name, batch, threads, compile_, q))
    p.start()
    p.join()
    return q.get() if not q.empty() else float("nan")


def time_group(
    fns: dict[str, Callable], x: torch.Tensor, repeats: int
) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call, methods interleaved call by call."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(x)
            fn(x)
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def check(fns: dict[str, Callable], x: torch.Tensor) -> dict[str, float]:
    """Max relative deviation of each method from the group's baseline (float32)."""
    with torch.no_grad():
        outs = {name: fn(x) for name, fn in fns.items()}
    ref = next(iter(outs.values()))
    scale = ref.abs().max().clamp_min(1e-30)
    return {name: float((o - ref).abs().max() / scale) for name, o in outs.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="points per call (default 128)")
    parser.add_argument("--biharmonic-batch", type=int, default=4, help="points for biharmonic")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per method")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--compile", action="store_true", help="also torch.compile'd versions")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--groups", default="laplacian,hessian diagonal,biharmonic")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    net = make_mlp()
    groups = methods(net, args.compile)
    print(
        f"# tanh MLP d={D}, width={WIDTH}, {DEPTH} linear layers, float32, "
        f"{args.threads} thread(s), torch {torch.__version__}; "
        f"median of {args.repeats} calls"
    )
    header = f"| {'group':<17} | {'method':<33} | {'batch':>5} | {'median ms':>9} |"
    header += f" {'min ms':>8} | {'speed-up':>8} |"
    header += f" {'peak MiB':>8} | {'mem ratio':>9} | {'rel. err':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for group in args.groups.split(","):
        fns = groups[group]
        batch = args.biharmonic_batch if group == "biharmonic" else args.batch
        x = torch.randn(batch, D, generator=torch.Generator().manual_seed(1))
        t0 = time.perf_counter()
        errors = check(fns, x)
        setup = time.perf_counter() - t0
        times = time_group(fns, x, args.repeats)
        base_name = next(iter(fns))
        mems = {}
        for name in fns:
            mems[name] = (
                float("nan")
                if args.no_memory
                else peak_memory_mb(group, name, batch, args.threads, args.compile)
            )
        for name in fns:
            median, fastest = times[name]
            speed = times[base_name][0] / median
            mem_ratio = mems[base_name] / mems[name] if mems[name] > 0 else float("nan")
            print(
                f"| {group:<17} | {name:<33} | {batch:>5} | {median * 1e3:>9.1f} |"
                f" {fastest * 1e3:>8.1f} | {speed:>7.2f}x | {mems[name]:>8.1f} |"
                f" {mem_ratio:>8.2f}x | {errors[name]:>8.1e} |"
            )
        sys.stdout.flush()
        if args.compile and group == "laplacian":
            print(f"(first calls incl. compilation: {setup:.1f} s)")


if __name__ == "__main__":
    main()
