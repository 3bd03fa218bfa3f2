"""Per-parameter Hessian blocks of ``f`` written the torch.func way, side by side.

    nice python -m benchmarks.bench_blocks [--repeats 5] [--problems simplenet,mlp5k]

One thread, float32, medians of ``--repeats`` rounds timed round-robin. For each
problem: ``hessian_blocks`` of ``lambda p, x, y: loss(functional_call(model, p, (x,)),
y)`` (the captured graph: the curvature at each parameter's place), the batched Hessian
rows it took before (``hessfunc.dense._generic_blocks``), and the Linear-chain route of
``functionalize`` models (``hessfunc._chain``) where the model is a chain. The graph's
blocks are checked against the float64 loop oracle (``hessfunc.reference``).
"""

from __future__ import annotations

import json

import torch

import hessfunc as hf
from hessfunc import _chain
from hessfunc._tree import flat_spec
from hessfunc.dense import _generic_blocks

from . import _cli
from ._timing import interleaved_medians
from .bench_graph import ALL, torch_func_loss


def run(keys: list[str], repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for key in keys:
        problem = ALL[key]()
        model, loss_fn, x, y = problem.model, problem.loss_fn, problem.x, problem.y
        params = {k: v.detach() for k, v in model.named_parameters()}

        plain = torch_func_loss(model, loss_fn)

        spec = flat_spec(params)
        cases = {
            "graph": lambda: hf.hessian_blocks(plain)(params, x, y),
            "rows (before)": lambda: _generic_blocks(hf.hvp_fn(plain, (params, x, y)), spec,
                                                     None),
        }
        fm, _ = hf.functionalize(model, loss_fn)
        if _chain.plan(fm, (params, x, y), 0) is not None:
            cases["chain"] = lambda fm=fm: _chain.plan(fm, (params, x, y), 0).blocks()
        model.double()
        try:
            p64 = dict(model.named_parameters())
            y64 = y.double() if y.is_floating_point() else y
            truth = hf.reference.hessian_blocks(loss_fn(model(x.double()), y64), p64)
        finally:
            model.float()
        ours = cases["graph"]()
        error = max(float((ours[k] - truth[k]).abs().max() / truth[k].abs().max().clamp_min(
            1e-30)) for k in params)
        times = interleaved_medians(cases, repeats=repeats, warmup=1)
        rows.append({"problem": problem.name, "params": problem.num_params,
                     "times_ms": {k: v * 1e3 for k, v in times.items()},
                     "ratio_to_graph": {k: v / times["graph"] for k, v in times.items()},
                     "max_rel_error_vs_oracle": error})
        print(json.dumps(rows[-1], indent=1), flush=True)
    return rows


def main() -> None:
    _cli.main(__doc__, run, default="simplenet,mlp5k,cnn", repeats=5)


if __name__ == "__main__":
    main()
