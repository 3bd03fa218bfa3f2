"""Per-parameter Hessian blocks and full Hessians of ``f`` written the torch.func way,
side by side.

    nice python -m benchmarks.bench_blocks [--repeats 5] [--problems simplenet,mlp5k]

(problems: those of ``bench_graph`` and ``mlp5k-layernorm``, a 20-64-64-1 MLP with
LayerNorm).

One thread, float32, medians of ``--repeats`` rounds timed round-robin. For each
problem: ``hessian_blocks`` of ``lambda p, x, y: loss(functional_call(model, p, (x,)),
y)`` (the captured graph: the curvature at each parameter's place), the batched Hessian
rows it took before (``hessfunc.dense._generic_blocks``). Then the full Hessian,
``hessian(flat=True)`` of the same ``f`` (per-sample backpropagation where the graph
is a chain, else the largest parameter's block from the graph and the other
parameters' rows), that fallback itself (``full: largest block + rows``: the route of
chains with scales or normalisations before they had per-sample rules) and every row
``H e_i`` (``hessfunc.dense.rows_and_block`` without a block). The
graph's blocks and full Hessian are checked against the float64 loop oracle
(``hessfunc.reference``).
"""

from __future__ import annotations

import json

import torch

import hessfunc as hf
from hessfunc._tree import flat_spec
from hessfunc.dense import _generic_blocks, _largest_block, rows_and_block

from . import _cli
from ._timing import interleaved_medians
from .bench_graph import ALL, torch_func_loss
from .problems import layernorm_mlp

PROBLEMS = {**ALL, "mlp5k-layernorm": layernorm_mlp}


def run(keys: list[str], repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for key in keys:
        problem = PROBLEMS[key]()
        model, loss_fn, x, y = problem.model, problem.loss_fn, problem.x, problem.y
        params = {k: v.detach() for k, v in model.named_parameters()}

        plain = torch_func_loss(model, loss_fn)

        spec = flat_spec(params)
        cases = {
            "graph": lambda: hf.hessian_blocks(plain)(params, x, y),
            "rows (before)": lambda: _generic_blocks(hf.hvp_fn(plain, (params, x, y)), spec,
                                                     None),
        }
        full = {
            "full: graph": lambda: hf.hessian(plain, flat=True)(params, x, y),
            "full: rows (before)": lambda: rows_and_block(hf.hvp_fn(plain, (params, x, y)),
                                                          spec, None),
            "full: largest block + rows": lambda: rows_and_block(
                hf.hvp_fn(plain, (params, x, y)), spec, None,
                *_largest_block(plain, (params, x, y), 0, spec)),
        }
        model.double()
        try:
            p64 = dict(model.named_parameters())
            y64 = y.double() if y.is_floating_point() else y
            loss64 = loss_fn(model(x.double()), y64)
            truth = hf.reference.hessian_blocks(loss64, p64)
            full_truth = hf.reference.hessian(loss64, list(p64.values())).float()
        finally:
            model.float()
        ours = cases["graph"]()
        error = max(float((ours[k] - truth[k]).abs().max() / truth[k].abs().max().clamp_min(
            1e-30)) for k in params)
        full_error = float((full["full: graph"]() - full_truth).abs().max() /
                           full_truth.abs().max())
        times = interleaved_medians(cases, repeats=repeats, warmup=1)
        full_times = interleaved_medians(full, repeats=repeats, warmup=1)
        rows.append({"problem": problem.name, "params": problem.num_params,
                     "times_ms": {k: v * 1e3 for k, v in {**times, **full_times}.items()},
                     "ratio_to_graph": {**{k: v / times["graph"] for k, v in times.items()},
                                        **{k: v / full_times["full: graph"]
                                           for k, v in full_times.items()}},
                     "max_rel_error_vs_oracle": error,
                     "full_max_rel_error_vs_oracle": full_error})
        print(json.dumps(rows[-1], indent=1), flush=True)
    return rows


def main() -> None:
    _cli.main(__doc__, run, default="simplenet,mlp5k,cnn", repeats=5)


if __name__ == "__main__":
    main()
