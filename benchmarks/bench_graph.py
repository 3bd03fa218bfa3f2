"""The exact Hessian diagonal of ``f`` written the way users write it, side by side.

    nice python -m benchmarks.bench_graph [--repeats 7] [--problems simplenet,mlp5k,...]

One thread, float32. For each problem, in one process and timed round-robin (medians
of ``--repeats`` rounds, so ratios survive a drifting machine):

* ``torch.func f``: ``hessian_diag`` of ``lambda p, x, y: loss(functional_call(model, p,
  (x,)), y)`` (the captured-graph route, hessfunc/graph);
* ``torch.func f + decay``: the same plus ``1e-4 * sum of squared parameters``;
* ``functionalize``: ``hessian_diag`` of ``functionalize(model, loss)`` (also the graph);
* ``BackPACK DiagHessian`` where BackPACK is installed and supports the model;
* ``per-sample, ...``: ``hessian_diag(per_sample=True)`` of the torch.func f and
  BackPACK's ``BatchDiagHessian``;
* ``generic (before)``: one-hot products (``method="generic"``, what a torch.func f got
  before; per sample: their ``vmap``), for problems of at most ``--generic-limit``
  parameters, timed after the others (3 calls): its large allocations slow whatever
  runs next.

Problems: the three MLPs of ``benchmarks/problems.py``, the residual tanh MLP of the
captured-graph issue (20-128, three residual blocks of 128, 1 output; MSE, 512 points;
52k parameters), the same widths without the skips, a small Transformer LM (21k
parameters) and an MNIST-sized MLP 784-512-512-10 (670k). The first call of every case
is checked against the float64 loop oracle on a subsample of parameters (``--check``).
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

from ._timing import interleaved_medians
from .problems import PROBLEMS, Problem, loss_module, mlp


class ResidualMLP(nn.Module):
    """20-128, ``blocks`` residual tanh blocks of 128, 1 output (``skips=False``: a chain)."""

    def __init__(self, width: int = 128, blocks: int = 3, skips: bool = True) -> None:
        super().__init__()
        self.stem = nn.Linear(20, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.head = nn.Linear(width, 1)
        self.skips = skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        for block in self.blocks:
            h = h + torch.tanh(block(h)) if self.skips else torch.tanh(block(h))
        return self.head(h)


def torch_func_loss(model: nn.Module, loss_fn: Any) -> Any:
    """``f(p, x, y) = loss_fn(functional_call(model, p, (x,)), y)``: the torch.func idiom."""
    def f(p: Any, x: Any, y: Any) -> Any:
        return loss_fn(functional_call(model, p, (x,)), y)

    return f


def residual(skips: bool) -> Problem:
    torch.manual_seed(5)
    model = ResidualMLP(skips=skips)
    if not skips:  # the same widths as a plain Sequential chain
        layers: list[nn.Module] = [model.stem, nn.Tanh()]
        for block in model.blocks:
            layers += [block, nn.Tanh()]
        model = nn.Sequential(*layers, model.head)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(512, 20, generator=g), torch.randn(512, 1, generator=g)
    name = "residual MLP 20-128x3-1 (512 pts)" if skips else "same widths, no skips"
    return Problem(name, model, F.mse_loss, x, y)


def transformer() -> Problem:
    """A small causal Transformer LM (vocabulary 50, d = 32, 4 heads, 2 layers, sequences
    of 16, 8 of them): nn.TransformerEncoder's attention, LayerNorms and Linear layers on
    every position; logits ``(N T, V)`` and cross-entropy."""
    from .bench_architectures import TransformerLM

    torch.manual_seed(6)
    model = TransformerLM(vocab=50, d=32, heads=4, layers=2, length=16).eval()
    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, 50, (8, 16), generator=g)
    y = torch.randint(0, 50, (8, 16), generator=g)  # one row per sequence: per-sample too
    return Problem("Transformer LM d=32 (8 x 16 tokens)", model, token_cross_entropy, x, y)


def token_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every position, the ``(N, T)`` targets flattened inside."""
    return F.cross_entropy(logits, y.reshape(-1))


def wide() -> Problem:
    """An MNIST-sized tanh MLP 784-512-512-10 with cross-entropy on 512 samples (670k
    parameters): its frontier's blocks need 6 GiB, so the sweep runs on parts of the batch
    (NOTE [the batch in parts])."""
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(512, 784, generator=g), torch.randint(0, 10, (512,), generator=g)
    return Problem("MLP 784-512-512-10 (512 pts)", mlp([784, 512, 512, 10]), F.cross_entropy,
                   x, y)


ALL = {**PROBLEMS,
       "residual": lambda: residual(True), "chain": lambda: residual(False),
       "transformer": transformer, "wide": wide}


def _backpack(problem: Problem, per_sample: bool = False) -> Any:
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchDiagHessian, DiagHessian
    except ImportError:
        return None
    if not isinstance(problem.model, nn.Sequential):
        return None
    model = extend(copy.deepcopy(problem.model))  # BackPACK's hooks stay on its own copy
    loss = extend(loss_module(problem))

    def diag() -> list[torch.Tensor]:
        model.zero_grad()
        with backpack(BatchDiagHessian() if per_sample else DiagHessian()), \
                warnings.catch_warnings():
            # BackPACK's hooks on a first layer whose input needs no gradient
            warnings.filterwarnings("ignore", "Full backward hook is firing")
            loss(model(problem.x), problem.y).backward()
        return [p.diag_h_batch if per_sample else p.diag_h for p in model.parameters()]

    return diag


def _check(diag: Any, f64: Any, shift: float = 0.0) -> float:
    """Largest error of a float32 result against the float64 oracle (plus ``shift``, the
    weight decay's own curvature), relative to the largest oracle entry of the leaf."""
    truth, picks = f64
    got = diag if isinstance(diag, dict) else dict(zip(truth, diag, strict=True))
    worst = 0.0
    for k, idx in picks.items():
        ref = truth[k].reshape(-1)[idx] + shift
        err = (got[k].double().reshape(-1)[idx] - ref).abs().max() / ref.abs().max().clamp_min(
            1e-30)
        worst = max(worst, float(err))
    return worst


def _check_per_sample(cases: dict[str, Any], problem: Problem, samples: int = 3
                      ) -> dict[str, float]:
    """Per-sample cases against the float64 oracle of each of the first ``samples``
    samples' own losses (BackPACK's ``BatchDiagHessian`` is of the batch's loss, which
    for a mean is 1/N of each sample's own: scaled by N)."""
    errors: dict[str, float] = {}
    if not any("per-sample" in name or "Batch" in name for name in cases):
        return errors
    truths = []
    for n in range(samples):
        one = Problem(problem.name, problem.model, problem.loss_fn, problem.x[n:n + 1],
                      problem.y[n:n + 1])
        truths.append(_oracle(one))
    for name, fn in cases.items():
        if "per-sample" not in name and "Batch" not in name:
            continue
        got = fn()
        if not isinstance(got, dict):
            names = list(truths[0][0])
            got = {k: g * problem.x.shape[0] for k, g in zip(names, got, strict=True)}
        errors[name] = max(_check({k: v[n] for k, v in got.items()}, truths[n])
                           for n in range(samples))
    return errors


def _oracle(problem: Problem, per_leaf: int = 6) -> tuple[dict, dict]:
    """The float64 loop oracle on ``per_leaf`` entries of every parameter."""
    model = problem.model.double()
    try:
        x = problem.x.double() if problem.x.is_floating_point() else problem.x
        y = problem.y.double() if problem.y.is_floating_point() else problem.y
        params = dict(model.named_parameters())
        with second_order_kernels():  # attention kernels with double-backward rules
            loss = problem.loss_fn(model(x), y)
        truth, picks = {}, {}
        g = torch.Generator().manual_seed(0)
        for k, p in params.items():
            grad = torch.autograd.grad(loss, p, create_graph=True)[0].reshape(-1)
            idx = torch.randperm(p.numel(), generator=g)[:per_leaf]
            d = torch.zeros(p.numel(), dtype=torch.float64)
            for i in idx.tolist():
                d[i] = torch.autograd.grad(grad[i], p, retain_graph=True)[0].reshape(-1)[i]
            truth[k], picks[k] = d.reshape(p.shape), idx
        return truth, picks
    finally:
        problem.model.float()


def run(keys: list[str], repeats: int, generic_limit: int) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for key in keys:
        problem = ALL[key]()
        model, loss_fn, x, y = problem.model, problem.loss_fn, problem.x, problem.y
        params = {k: v.detach() for k, v in model.named_parameters()}

        plain = torch_func_loss(model, loss_fn)

        def decayed(p: Any, x: Any, y: Any) -> Any:
            return plain(p, x, y) + 1e-4 * sum((w ** 2).sum() for w in p.values())

        fm, _ = hf.functionalize(model, loss_fn)
        cases = {
            "torch.func f": lambda: hf.hessian_diag(plain)(params, x, y),
            "torch.func f + decay": lambda: hf.hessian_diag(decayed)(params, x, y),
            "functionalize": lambda: hf.hessian_diag(fm)(params, x, y),
        }
        bp = _backpack(problem)
        if bp is not None:
            cases["BackPACK DiagHessian"] = bp
        if y.shape[0] == x.shape[0]:  # (a language model's targets are per position)
            cases["per-sample, torch.func f"] = lambda: hf.hessian_diag(
                plain, per_sample=True)(params, x, y)
        bp = _backpack(problem, per_sample=True)
        if bp is not None:
            cases["BackPACK BatchDiagHessian"] = bp

        slow = {}
        if problem.num_params <= generic_limit:  # timed apart: its allocations would
            # slow the case after it in every round
            slow["generic (before)"] = lambda: hf.hessian_diag(plain, method="generic")(
                params, x, y)
            if "per-sample, torch.func f" in cases:
                slow["per-sample, generic (before)"] = lambda: hf.hessian_diag(
                    plain, per_sample=True, method="generic")(params, x, y)
        oracle = _oracle(problem)
        errors = {name: _check(fn(), oracle, 2e-4 if "decay" in name else 0.0)
                  for name, fn in {**cases, **slow}.items() if "per-sample" not in name
                  and "Batch" not in name}
        errors.update(_check_per_sample({**cases, **slow}, problem))
        times = interleaved_medians(cases, repeats=repeats, warmup=1)
        times.update(interleaved_medians(slow, repeats=3, warmup=0))
        base = times["torch.func f"]
        report = hf.explain(plain, params, x, y)
        rows.append({"problem": problem.name, "params": problem.num_params,
                     "route": f"{report['hessian_diag'].name} ({report['hessian_diag'].engine})",
                     "times_ms": {k: v * 1e3 for k, v in times.items()},
                     "ratio_to_torch_func_f": {k: v / base for k, v in times.items()},
                     "max_rel_error": errors})
        print(json.dumps(rows[-1], indent=1), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", default=",".join(ALL))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--generic-limit", type=int, default=6000)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = run(args.problems.split(","), args.repeats, args.generic_limit)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
