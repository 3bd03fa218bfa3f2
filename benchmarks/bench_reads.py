"""Diagonals of parameters read one element at a time, against pushed tangents.

    nice python -m benchmarks.bench_reads [--repeats 5]

NOTE [parameters read one element at a time] (``hessfunc/graph/curvature.py``): an
embedding table, a LayerNorm's or BatchNorm's weight and bias, positional embeddings and
any parameter broadcast into ``+ - * /`` get their diagonal from ``D S``'s rows summed
by the element read, ``O(N w C)``, where one tangent per element was pushed through the
op, ``O(|p| N w C)``. Both routes are timed side by side in one run (the pushed tangents
forced by patching the plan's ``_reads`` to find none), on the models users bring:

* the small Transformer LM of ``bench_graph`` (20,850 parameters, 8 x 16 tokens):
  ``ggn_diag`` and ``hessian_diag``;
* the MLP 20-128-128-1 with LayerNorm of ``bench_architectures`` (512 samples):
  ``ggn_diag`` and ``hessian_diag``;
* the ResNet-BN of ``bench_architectures`` in eval mode (64 images): ``ggn_diag``.

One thread, float32, medians of ``--repeats`` rounds round-robin (each function built
once, its first call outside the timing); the two routes' diagonals are compared
(largest difference relative to the largest entry).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch.func import functional_call

import hessfunc as hf
from hessfunc.graph.curvature import GraphPlan

from ._timing import interleaved_medians
from .bench_architectures import build
from .bench_graph import transformer


def _problems() -> dict[str, tuple[Any, Any, Any, Any, tuple[str, ...]]]:
    lm = transformer()
    found = {"Transformer LM d=32 (8 x 16 tokens)": (
        lm.model, lm.loss_fn, lm.x, lm.y, ("ggn_diag", "hessian_diag"))}
    for key, quantities in (("mlp-layernorm", ("ggn_diag", "hessian_diag")),
                            ("resnet", ("ggn_diag",))):
        name, model, loss_fn, x, y = build(key)
        found[name] = (model, loss_fn, x, y, quantities)
    return found


def run(repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    real = GraphPlan._reads
    rows = []
    for name, (model, loss_fn, x, y, quantities) in _problems().items():
        params = {k: v.detach() for k, v in model.named_parameters()}

        def g(p: Any, x: Any, model: Any = model) -> torch.Tensor:
            return functional_call(model, p, (x,))

        def f(p: Any, x: Any, y: Any, g: Any = g, loss_fn: Any = loss_fn) -> torch.Tensor:
            return loss_fn(g(p, x), y)

        for quantity in quantities:
            fn = hf.ggn_diag(g, loss_fn) if quantity == "ggn_diag" else hf.hessian_diag(f)

            def timed(reads: bool, fn: Any = fn) -> Any:
                GraphPlan._reads = real if reads else (lambda self, site: None)
                try:
                    return fn(params, x, y)
                finally:
                    GraphPlan._reads = real

            a, b = timed(True), timed(False)
            scale = max(float(t.abs().max()) for t in b.values())
            diff = max(float((a[k] - b[k]).abs().max()) for k in a) / scale
            times = interleaved_medians({"reads": lambda: timed(True),
                                         "pushed tangents": lambda: timed(False)},
                                        repeats=repeats, warmup=1)
            row = {"problem": name, "quantity": quantity, "times_s": times,
                   "speed-up": times["pushed tangents"] / times["reads"],
                   "max_rel_difference": diff}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    run(parser.parse_args().repeats)


if __name__ == "__main__":
    main()
