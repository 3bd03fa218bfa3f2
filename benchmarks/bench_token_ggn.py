"""Gauss-Newton diagonals of a Transformer LM under token-level losses given as functions.

    nice python -m benchmarks.bench_token_ggn [--repeats 3] [--model small|large]
                                              [--per-sample]

The small causal Transformer LM of ``bench_graph`` (vocabulary 50, d = 32, 4 heads, 2
layers, 8 sequences of 16 tokens; 20,850 parameters), ``ggn_diag(g, loss_fn)`` with
``loss_fn``:

* ``F.cross_entropy`` itself, the targets flattened outside (its factor in closed form);
* ``lambda o, y: F.cross_entropy(o, y.reshape(-1))``, the targets ``(8, 16)``;
* the same with ``label_smoothing=0.1``.

``--model large``: the LM of ``bench_architectures`` (vocabulary 200, d = 64, 16
sequences of 32 tokens; 95k parameters), its targets ``(512,)`` flattened outside ``g``
as that benchmark passes them; its factor sweep needs more than the memory budget, so
the batch is taken in parts, the targets cut in their proved rows (NOTE [rows of every
sample]). Before that, the dense Jacobian, out of memory.

``--per-sample`` (small model only): ``ggn_diag(g, loss_fn, per_sample=True)`` for the
two losses with ``(8, 16)`` targets, each sample's own loss; ``nn.TransformerEncoder``
runs other ops on one sample than on the batch, so each sample's loss is swept under
``vmap`` (NOTE [per-sample losses]); before, one dense Jacobian per sample. Samples 0 and 1
are checked.

A function has no closed form: the loss's Hessian at the logits comes from autograd,
row by row where the loss is proved a sum over the rows (NOTE [rows of the output] in
``hessfunc/graph/curvature.py``). One thread, float32, medians of ``--repeats`` rounds
round-robin (each function built once, its first call outside the timing). Three entries
of every parameter tensor are checked against float64 ``e_i^T J^T H_o J e_i``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

import hessfunc as hf
from hessfunc.graph.curvature import GGNLoss, plan_ggn_diagonal

from ._timing import interleaved_medians
from .bench_architectures import build
from .bench_graph import transformer
from .bench_parts import sampled_ggn_errors


def run(repeats: int, size: str = "small", per_sample: bool = False) -> dict:
    torch.set_num_threads(1)
    if per_sample and size != "small":
        raise SystemExit("--per-sample takes the small model (the large one's targets are "
                         "flattened outside g)")
    if size == "small":
        problem = transformer()
        name, model, x, y = problem.name, problem.model, problem.x, problem.y
        losses = {
            "F.cross_entropy (closed form)": (F.cross_entropy, y.reshape(-1)),
            "flattening cross-entropy": (lambda o, t: F.cross_entropy(o, t.reshape(-1)), y),
            "label smoothing 0.1": (
                lambda o, t: F.cross_entropy(o, t.reshape(-1), label_smoothing=0.1), y),
        }
    else:
        name, model, _, x, y = build("transformer")  # y: (N T,), flattened outside g
        losses = {
            "F.cross_entropy (closed form)": (F.cross_entropy, y),
            "label smoothing 0.1": (
                lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1), y),
        }
    params = {k: v.detach() for k, v in model.named_parameters()}

    def g(p: Any, x: Any) -> torch.Tensor:
        return functional_call(model, p, (x,))

    if per_sample:
        losses = {f"per-sample, {case}": loss for case, loss in losses.items()
                  if loss[1].shape[0] == x.shape[0]}
    cases, errors, parts = {}, {}, {}
    for case, (loss_fn, targets) in losses.items():
        plan, why = plan_ggn_diagonal(GGNLoss.of(g, loss_fn), (params, x, targets),
                                      per_sample=per_sample)
        parts[case] = len(plan.parts) if plan is not None else why
        fn = hf.ggn_diag(g, loss_fn, per_sample=per_sample)
        got = fn(params, x, targets)
        errors[case] = max(
            sampled_ggn_errors(model, x[n:n + 1], targets[n:n + 1],
                               {case: {k: v[n] for k, v in got.items()}}, loss_fn)[case]
            for n in range(2)) if per_sample else \
            sampled_ggn_errors(model, x, targets, {case: got}, loss_fn)[case]
        cases[case] = lambda fn=fn, targets=targets: fn(params, x, targets)
    times = interleaved_medians(cases, repeats=repeats, warmup=0)
    row = {"problem": name, "params": sum(p.numel() for p in params.values()),
           "parts": parts, "times_s": times, "max_rel_error_sampled": errors}
    print(json.dumps(row, indent=1), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=("small", "large"), default="small")
    parser.add_argument("--per-sample", action="store_true")
    args = parser.parse_args()
    run(args.repeats, args.model, args.per_sample)


if __name__ == "__main__":
    main()
