"""Gauss-Newton diagonals of a Transformer LM under token-level losses given as functions.

    nice python -m benchmarks.bench_token_ggn [--repeats 3]

The small causal Transformer LM of ``bench_graph`` (vocabulary 50, d = 32, 4 heads, 2
layers, 8 sequences of 16 tokens; 20,850 parameters), ``ggn_diag(g, loss_fn)`` with
``loss_fn``:

* ``F.cross_entropy`` itself, the targets flattened outside (its factor in closed form);
* ``lambda o, y: F.cross_entropy(o, y.reshape(-1))``, the targets ``(8, 16)``;
* the same with ``label_smoothing=0.1``.

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

from ._timing import interleaved_medians
from .bench_graph import transformer
from .bench_parts import sampled_ggn_errors


def run(repeats: int) -> dict:
    torch.set_num_threads(1)
    problem = transformer()
    model, x, y = problem.model, problem.x, problem.y
    params = {k: v.detach() for k, v in model.named_parameters()}

    def g(p: Any, x: Any) -> torch.Tensor:
        return functional_call(model, p, (x,))

    losses = {
        "F.cross_entropy (closed form)": (F.cross_entropy, y.reshape(-1)),
        "flattening cross-entropy": (lambda o, t: F.cross_entropy(o, t.reshape(-1)), y),
        "label smoothing 0.1": (
            lambda o, t: F.cross_entropy(o, t.reshape(-1), label_smoothing=0.1), y),
    }
    cases, errors = {}, {}
    for name, (loss_fn, targets) in losses.items():
        fn = hf.ggn_diag(g, loss_fn)
        errors[name] = sampled_ggn_errors(model, x, targets, {name: fn(params, x, targets)},
                                          loss_fn)[name]
        cases[name] = lambda fn=fn, targets=targets: fn(params, x, targets)
    times = interleaved_medians(cases, repeats=repeats, warmup=0)
    row = {"problem": problem.name, "params": problem.num_params, "times_s": times,
           "max_rel_error_sampled": errors}
    print(json.dumps(row, indent=1), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    run(parser.parse_args().repeats)


if __name__ == "__main__":
    main()
