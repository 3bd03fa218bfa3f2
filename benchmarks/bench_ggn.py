"""Gauss-Newton products side by side: hessfunc's cached operator, one-shot ``ggn_vp``,
curvlinops' ``GGNLinearOperator``.

    nice python -m benchmarks.bench_ggn [--repeats 15] [--problems simplenet,mlp5k,...]
    nice python -m benchmarks.bench_ggn --problems resnet,transformer   # architectures

One thread, float32, medians of ``--repeats`` rounds timed round-robin, in units of one
gradient (``torch.autograd.grad`` of the loss, forward included), the loss given as
``nn.MSELoss()`` or ``nn.CrossEntropyLoss()`` (to all three). Cases:
``GGNOperator @ v`` (built once outside the timing: the model linearised per batch and
its ``vjp`` kept, so a product is tangent ops, the loss's output Hessian and one
backward pass); ``ggn_vp`` (one product from scratch); curvlinops'
``GGNLinearOperator @ v`` where installed (``pip install curvlinops-for-pytorch
linear_operator jaxtyping --no-deps``). The products are checked against each other
(max relative difference; no float64 oracle needed at these sizes for a ratio).
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import hessfunc as hf

from . import _cli
from ._timing import interleaved_medians
from .problems import PROBLEMS, loss_module


def _curvlinops(model: nn.Module, loss_fn: Any, x: torch.Tensor, y: torch.Tensor
                ) -> Any | None:
    try:
        from curvlinops import GGNLinearOperator
    except ImportError:
        return None
    return GGNLinearOperator(model, loss_fn, list(model.parameters()), [(x, y)],
                             check_deterministic=False)


def _problem(key: str) -> tuple[str, nn.Module, Any, torch.Tensor, torch.Tensor]:
    """``(name, model, loss module, x, y)``: a problem of ``problems.py``, or an
    architecture of ``bench_architectures`` (``resnet``, ``transformer``, ...)."""
    if key in PROBLEMS:
        problem = PROBLEMS[key]()
        # the loss as users pass it, and as curvlinops is given it
        return problem.name, problem.model, loss_module(problem), problem.x, problem.y
    from .bench_architectures import build

    name, model, loss_fn, x, y = build(key)
    modules = {F.cross_entropy: nn.CrossEntropyLoss(), F.mse_loss: nn.MSELoss()}
    return name, model, modules[loss_fn], x, y


def run(keys: list[str], repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for key in keys:
        name, model, loss_fn, x, y = _problem(key)
        leaves = list(model.parameters())
        g, params = hf.functionalize(model)
        op = hf.GGNOperator(g, loss_fn, params, (x, y))
        v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0))
        tree = op.flat_to_params(v)
        cases = {
            "gradient": lambda: torch.autograd.grad(loss_fn(model(x), y), leaves),
            "GGNOperator @ v": lambda: op @ v,
            "ggn_vp": lambda: hf.ggn_vp(g, loss_fn, (params, x, y), tree),
        }
        theirs, failed = _curvlinops(model, loss_fn, x, y), None
        if theirs is not None:
            try:
                theirs @ v
            except Exception as exc:  # e.g. torch's fused encoder layer under forward AD
                theirs, failed = None, f"{type(exc).__name__}: {str(exc)[:120]}"
        if theirs is not None:
            cases["curvlinops GGNLinearOperator @ v"] = lambda: theirs @ v
        ours = op @ v
        diffs = {"ggn_vp": float((op.params_to_flat(cases["ggn_vp"]()) - ours).abs().max()
                                 / ours.abs().max())}
        if theirs is not None:
            diffs["curvlinops"] = float((theirs @ v - ours).abs().max() / ours.abs().max())
        times = interleaved_medians(cases, repeats=repeats, warmup=2)
        unit = times["gradient"]
        rows.append({"problem": name, "params": op.shape[0],
                     "times_ms": {k: t * 1e3 for k, t in times.items()},
                     "gradients": {k: t / unit for k, t in times.items()},
                     "max_rel_difference": diffs,
                     **({"curvlinops failed": failed} if failed else {})})
        print(json.dumps(rows[-1], indent=1), flush=True)
    return rows


def main() -> None:
    _cli.main(__doc__, run, default="simplenet,mlp5k,mlp100k,cnn", repeats=15)


if __name__ == "__main__":
    main()
