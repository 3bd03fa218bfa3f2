"""Gauss-Newton diagonals over the memory budget: the batch in parts, beside BackPACK.

    nice python -m benchmarks.bench_parts [--repeats 3] [--classes 1000]

A 784-1024-1024-C tanh MLP with cross-entropy on 512 samples (C = 1000: 2.8M
parameters). Its Gauss-Newton factor sweep needs about 12.6 GiB, over the budget of a
quarter of the free memory on a 24 GiB machine, so ``ggn_diag`` runs on parts of the
batch (NOTE [the batch in parts] in ``hessfunc/graph/curvature.py``); its fallback before,
the dense Jacobian, needs terabytes. One thread, float32, medians of ``--repeats`` rounds
round-robin with BackPACK's ``DiagGGNExact``. Three entries of every parameter tensor are
checked against float64 ``e_i^T J^T H_o J e_i`` (``J e_i`` by forward mode, ``H_o`` by
double backward of the loss at the outputs), for both.
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hessfunc as hf
from hessfunc._autodiff import second_order_kernels
from hessfunc.graph.curvature import GGNLoss, plan_ggn_diagonal

from ._timing import interleaved_medians


def sampled_ggn_errors(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       results: dict[str, dict[str, torch.Tensor]],
                       loss_fn: Any = F.cross_entropy) -> dict[str, float]:
    """Largest error of each GGN diagonal in ``results`` at 3 random entries per
    parameter tensor, against ``e_i^T J^T H_o J e_i`` in float64, relative to the entry
    (or to 1e-6 of the largest entry sampled, for entries that are zero: an embedding's
    rows for tokens the batch does not hold)."""
    md = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in md.named_parameters()}
    xd = x.double() if x.is_floating_point() else x

    def g(p: Any) -> torch.Tensor:
        return functional_call(md, p, (xd,))

    out = g(params).detach().requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(out, y), out, create_graph=True)
    gen = torch.Generator().manual_seed(0)
    truths = []
    for k, p in params.items():
        for i in torch.randperm(p.numel(), generator=gen)[:3].tolist():
            e = {q: torch.zeros_like(v) for q, v in params.items()}
            e[k].view(-1)[i] = 1.0
            with second_order_kernels():  # attention's math kernel has forward mode
                _, u = torch.func.jvp(g, (params,), (e,))
            (hu,) = torch.autograd.grad(grad, out, u, retain_graph=True)
            truths.append((k, i, float((u * hu).sum())))
    floor = 1e-6 * max(abs(t) for *_, t in truths)
    return {name: max(abs(float(got[k].reshape(-1)[i]) - t) / max(abs(t), floor)
                      for k, i, t in truths) for name, got in results.items()}


def run(repeats: int, classes: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(),
                          nn.Linear(1024, classes))
    g_ = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 784, generator=g_), torch.randint(0, classes, (512,), generator=g_)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def g(p: Any, x: Any) -> torch.Tensor:
        return functional_call(model, p, (x,))

    plan, why = plan_ggn_diagonal(GGNLoss.of(g, F.cross_entropy), (params, x, y))
    cases = {"hessfunc ggn_diag": lambda: hf.ggn_diag(g, F.cross_entropy)(params, x, y)}
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact
    except ImportError:
        pass
    else:
        theirs, loss = extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss())

        def backpack_diag() -> dict[str, torch.Tensor]:
            theirs.zero_grad()
            with backpack(DiagGGNExact()), warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Full backward hook is firing")
                loss(theirs(x), y).backward()
            return {k: p.diag_ggn_exact for k, p in theirs.named_parameters()}

        cases["BackPACK DiagGGNExact"] = backpack_diag
    errors = sampled_ggn_errors(model, x, y, {name: fn() for name, fn in cases.items()})
    times = interleaved_medians(cases, repeats=repeats, warmup=0)
    row = {"problem": f"MLP 784-1024-1024-{classes}, CE, 512 samples",
           "params": sum(p.numel() for p in params.values()),
           "parts": len(plan.parts) if plan is not None else why,
           "times_s": times, "max_rel_error_sampled": errors}
    print(json.dumps(row, indent=1), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args()
    run(args.repeats, args.classes)


if __name__ == "__main__":
    main()
