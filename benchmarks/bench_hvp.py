"""HVP cost in units of one gradient, side by side in one run.

    python -m benchmarks.bench_hvp [--threads 1] [--repeats 20]

Compares, on each problem: a plain autograd gradient (the unit), torch.func.grad,
the seed's double backward (``hessfunc.reference.hvp``), ``hessfunc.hvp`` (the graph
route in both modes, and structured products on the chain found afresh), plain
``torch.func`` recipes, and ``hessfunc.hvp_fn`` (cached products, structured and
through the graph; and for ``f`` written the torch.func way, its products, with a
weight decay added to the loss, and the set-up of a lambda made afresh on every call).
The cases
are timed round-robin (``interleaved_medians``), so drift of the machine cancels in
the ratios.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.func import functional_call, jvp, vjp
from torch.func import grad as func_grad

import hessfunc as hf

from ._timing import interleaved_medians, median_time
from .problems import PROBLEMS


def run(problem_names: list[str], repeats: int, dtype: torch.dtype) -> list[dict]:
    rows = []
    for key in problem_names:
        prob = PROBLEMS[key](dtype=dtype)
        f, params = hf.functionalize(prob.model, prob.loss_fn)
        x, y = prob.x, prob.y
        v = {k: torch.randn_like(t) for k, t in params.items()}

        def autograd_grad():
            return torch.autograd.grad(prob.loss_fn(prob.model(x), y),
                                       list(prob.model.parameters()))

        def seed_double_backward():
            loss = prob.loss_fn(prob.model(x), y)
            return hf.reference.hvp(loss, list(prob.model.parameters()), list(v.values()))

        def func_rev_rev():
            return vjp(lambda p: func_grad(f)(p, x, y), params)[1](v)

        def func_fwd_rev():
            return jvp(lambda p: func_grad(f)(p, x, y), (params,), (v,))[1]

        cached = hf.hvp_fn(f, (params, x, y))
        cached_graph = hf.hvp_fn(f, (params, x, y), method="graph")

        def plain() -> Any:  # f the torch.func way, a new function object on every call
            return lambda p, x, y: prob.loss_fn(functional_call(prob.model, p, (x,)), y)

        cached_plain = hf.hvp_fn(plain(), (params, x, y))
        assert cached_plain.method == "structured"

        def decayed(p: Any, x: Any, y: Any) -> Any:  # NOTE [parameter terms]
            return plain()(p, x, y) + 1e-4 * sum((w ** 2).sum() for w in p.values())

        cached_decayed = hf.hvp_fn(decayed, (params, x, y))
        assert cached_decayed.method == "structured"
        cached_decayed_graph = hf.hvp_fn(decayed, (params, x, y), method="graph")
        cases = {
            "one autograd gradient (unit)": autograd_grad,
            "torch.func.grad": lambda: func_grad(f)(params, x, y),
            "hessfunc.grad": lambda: hf.grad(f)(params, x, y),
            "seed double backward": seed_double_backward,
            "torch.func vjp(grad)": func_rev_rev,
            "torch.func jvp(grad)": func_fwd_rev,
            "hessfunc.hvp (default: the double backward)":
                lambda: hf.hvp(f, (params, x, y), v),
            "hessfunc.hvp method='structured' (chain found on each call)":
                lambda: hf.hvp(f, (params, x, y), v, method="structured"),
            "hessfunc.hvp graph route, reverse-over-reverse":
                lambda: hf.hvp(f, (params, x, y), v, method="graph"),
            "hessfunc.hvp graph route, forward-over-reverse":
                lambda: hf.hvp(f, (params, x, y), v, mode="forward-over-reverse"),
            "hessfunc.hvp_fn per product (structured)": lambda: cached(v),
            "hessfunc.hvp_fn per product (graph route)": lambda: cached_graph(v),
            "hessfunc.hvp_fn per product, torch.func f (chain from the captured graph)":
                lambda: cached_plain(v),
            "hessfunc.hvp_fn per product, torch.func f + weight decay (chain and the "
            "decay's own products)": lambda: cached_decayed(v),
            "hessfunc.hvp_fn per product, torch.func f + weight decay, graph route":
                lambda: cached_decayed_graph(v),
            "hessfunc.hvp_fn set-up, torch.func f made afresh":
                lambda: hf.hvp_fn(plain(), (params, x, y)),
            "hessfunc.hvp_fn set-up, torch.func f made afresh, graph route":
                lambda: hf.hvp_fn(plain(), (params, x, y), method="graph"),
        }
        times = interleaved_medians(cases, repeats=repeats)
        unit = times.pop("one autograd gradient (unit)")
        row = {"problem": prob.name, "params": prob.num_params, "grad_ms": unit * 1e3}
        for name, t in times.items():
            row[name] = t if isinstance(t, str) else t / unit
        rows.append(row)
    return rows


def run_chunks(problem_names: list[str], repeats: int, dtype: torch.dtype) -> None:
    """Generic exact diagonal (one-hot rows) time against the chunk of tangents per pass."""
    print("| problem | " + " | ".join(f"chunk {c}" for c in CHUNKS) + " |")
    print("| --- |" + " --- |" * len(CHUNKS))
    for key in problem_names:
        prob = PROBLEMS[key](dtype=dtype)
        f, params = hf.functionalize(prob.model, prob.loss_fn)
        cells = []
        for c in CHUNKS:
            fn = hf.hessian_diag(f, chunk_size=c, method="generic")
            t = median_time(lambda: fn(params, prob.x, prob.y), repeats=repeats, warmup=1)
            cells.append(f"{t * 1e3:.1f} ms")
        print(f"| {prob.name} | " + " | ".join(cells) + " |")


CHUNKS = (1, 8, 32, 128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--only", nargs="*", default=["simplenet", "mlp5k", "mlp100k"])
    ap.add_argument("--chunks", action="store_true",
                    help="instead: generic-diagonal time against the tangent chunk size")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.chunks:
        run_chunks([k for k in args.only if k != "mlp100k"], max(1, args.repeats // 5),
                   getattr(torch, args.dtype))
        return
    rows = run(args.only, args.repeats, getattr(torch, args.dtype))
    names = [k for k in rows[0] if k not in ("problem", "params", "grad_ms")]
    print(f"HVP cost in gradients (median of {args.repeats}, {args.threads} thread(s), "
          f"{args.dtype}, torch {torch.__version__})")
    print("| implementation | " + " | ".join(r["problem"] for r in rows) + " |")
    print("| --- |" + " --- |" * len(rows))
    print("| one autograd gradient (unit) | "
          + " | ".join(f"{r['grad_ms']:.3f} ms" for r in rows) + " |")
    for n in names:
        cells = [r[n] if isinstance(r[n], str) else f"{r[n]:.2f}x" for r in rows]
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
