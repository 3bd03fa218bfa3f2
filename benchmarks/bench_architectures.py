"""Products, eigenvalues and traces on the architectures users bring, side by side.

    nice python -m benchmarks.bench_architectures [--repeats 7] [--models resnet,...]

One thread, float32. Three models of the captured-graph issue, each written the
torch.func way (``f(p, x, y) = loss(functional_call(model, p, (x,)), y)``):

* ``residual``: a residual tanh MLP 20-128, three residual blocks of 128, 1 output;
  MSE, 512 points (52k parameters);
* ``resnet``: a small ResNet with BatchNorm in eval mode (a 3x3 stem and three basic
  blocks 16-32-64, global pooling, 10 classes; cross-entropy, 64 CIFAR-sized images);
* ``transformer``: a 2-layer Transformer encoder LM with a causal mask (d=64, 4 heads,
  feed-forward 128, sequence 32, vocabulary 200, batch 16; next-token cross-entropy),
  run with torch's math attention kernel (the fused CPU kernel has no double backward,
  which the seed's loop and PyHessian need);
* ``resnet-train``: the ResNet in training mode (BatchNorm normalises by the batch's
  statistics: a map that mixes samples);
* ``mlp-softmax``, ``mlp-layernorm``, ``mlp-batchnorm``: 20-128-128-1 MLPs (MSE, 512
  points) with a softmax between the hidden layers, or LayerNorm, or BatchNorm in
  training mode after each hidden layer (the maps with closed forms).

Timed round-robin in one process (medians of ``--repeats`` rounds), in units of one
gradient (``torch.autograd.grad`` of the loss, forward included):

* ``seed hvp``: the seed's double backward (gradient with ``create_graph=True``, then
  the gradient of ``<g, v>``), ``hessfunc.reference.hvp``;
* ``hf.hvp``: one product from scratch;
* ``hvp_fn product``: one product of a cached ``hvp_fn`` (the linearisation is built
  once, outside the timing), and ``matmat / column`` for 10 columns of
  ``HessianOperator.matmat``;
* ``R-operator product`` and ``graph product``: the same with ``method="structured"``
  (where the graph reads as layers) and ``method="graph"``, the two routes side by side.

Then, timed in 3 rounds alternating (medians; seconds, building the operator
included), hessfunc beside PyHessian (installed with ``pip install pyhessian
--no-deps``) on the same model: the top eigenvalue to a relative tolerance of 1e-6
and a 50-probe Hutchinson trace. Each result is checked: the products against the
seed's (max relative error), the eigenvalue of each library against the other.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessfunc as hf
from hessfunc import reference

from . import _cli
from ._timing import interleaved_medians
from .bench_graph import ResidualMLP


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm; a 1x1 projection where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


class ResNet(nn.Module):
    """A 3x3 stem of 16 channels, basic blocks 16-32-64, global pooling, 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2),
                                    BasicBlock(32, 64, 2))
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


class TransformerLM(nn.Module):
    """Token and position embeddings, a causal 2-layer encoder, logits of shape (B*T, V)."""

    def __init__(self, vocab: int = 200, d: int = 64, heads: int = 4, layers: int = 2,
                 length: int = 32) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Parameter(0.02 * torch.randn(length, d))
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x) + self.positions
        h = self.encoder(h, mask=self.mask, is_causal=True)
        return self.head(h).flatten(0, 1)


class NormedMLP(nn.Module):
    """20-128-128-1 with ``norm`` (a softmax, LayerNorm or BatchNorm) between layers."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(20, 128), nn.Linear(128, 128), nn.Linear(128, 1)
        make = {"layernorm": lambda: nn.LayerNorm(128),
                "batchnorm": lambda: nn.BatchNorm1d(128)}.get(norm)
        self.softmax = make is None
        self.n1, self.n2 = (nn.Identity(), nn.Identity()) if make is None else (make(), make())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.n1(self.a(x)))
        h = self.b(h)
        h = torch.softmax(h, -1) if self.softmax else torch.tanh(self.n2(h))
        return self.c(h)


def build(key: str) -> tuple[str, nn.Module, Any, torch.Tensor, torch.Tensor]:
    """``(name, model, loss_fn, x, y)``, deterministic."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if key.startswith("mlp-"):
        norm = key[4:]
        x, y = torch.randn(512, 20, generator=g), torch.randn(512, 1, generator=g)
        model = NormedMLP(norm).train()  # BatchNorm: the batch's statistics
        return f"MLP 20-128-128-1 with {norm}, MSE, 512", model, F.mse_loss, x, y
    if key == "residual":
        x, y = torch.randn(512, 20, generator=g), torch.randn(512, 1, generator=g)
        return "residual MLP 20-128x3-1, MSE, 512", ResidualMLP(), F.mse_loss, x, y
    if key == "resnet":
        model = ResNet()
        with torch.no_grad():  # running statistics of a trained network, not 0 and 1
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1, generator=g)
                    m.running_var.uniform_(0.5, 1.5, generator=g)
        x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
        return "ResNet-BN (eval) 16-32-64, CE, 64 CIFAR", model.eval(), F.cross_entropy, x, y
    if key == "resnet-train":
        name, model, loss_fn, x, y = build("resnet")
        return "ResNet-BN (train) 16-32-64, CE, 64 CIFAR", model.train(), loss_fn, x, y
    if key == "transformer":
        seq = torch.randint(0, 200, (16, 33), generator=g)
        x, y = seq[:, :-1], seq[:, 1:].reshape(-1)
        return "Transformer LM 2x(d=64, 4 heads), CE, 16x32", TransformerLM().eval(), \
            F.cross_entropy, x, y
    raise KeyError(key)


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a_, b_ = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
    return float((a_ - b_).abs().max() / b_.abs().max())


def _once(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _pyhessian(model: nn.Module, loss_fn: Any, x: torch.Tensor, y: torch.Tensor
               ) -> dict[str, Any]:
    try:
        from pyhessian import hessian as PyH
    except ImportError:
        return {}
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(0)
    made = time.perf_counter()
    H = PyH(model, loss_fn, data=(x, y), cuda=False)
    build_s = time.perf_counter() - made
    eig_s, (eigs, _) = _once(lambda: H.eigenvalues(top_n=1, tol=1e-6, maxIter=1000))
    # tol=-inf: its stopping test divides by the running mean without abs, so a
    # negative mean would stop it at once
    tr_s, traces = _once(lambda: H.trace(maxIter=50, tol=float("-inf")))
    for p in model.parameters():
        p.grad = None
    return {"top eigenvalue": float(eigs[0]), "eig_s": build_s + eig_s,
            "trace": float(sum(traces) / len(traces)), "probes": len(traces),
            "trace_s": build_s + tr_s}


def run(keys: list[str], repeats: int, rounds: int = 3) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for key in keys:
        # torch's fused CPU attention kernel has no double backward: the seed's loop and
        # PyHessian need the math kernel, so every case of the row runs with it
        with sdpa_kernel(SDPBackend.MATH) if key == "transformer" else contextlib.nullcontext():
            rows.append(_row(key, repeats, rounds))
    return rows


def _row(key: str, repeats: int, rounds: int) -> dict:
    name, model, loss_fn, x, y = build(key)
    params = {k: v.detach() for k, v in model.named_parameters()}
    leaves = list(model.parameters())

    def f(p: Any, x: Any, y: Any, model: nn.Module = model, loss_fn: Any = loss_fn) -> Any:
        return loss_fn(functional_call(model, p, (x,)), y)

    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn(t.shape, generator=g) for k, t in params.items()}
    V = torch.randn(sum(t.numel() for t in params.values()), 10, generator=g)
    H = hf.hvp_fn(f, (params, x, y))
    op = hf.HessianOperator(f, params, (x, y))

    def seed_hvp() -> list[torch.Tensor]:
        return reference.hvp(loss_fn(model(x), y), leaves, list(v.values()))

    cases = {
        "gradient": lambda: torch.autograd.grad(loss_fn(model(x), y), leaves),
        "seed hvp": seed_hvp,
        "hf.hvp": lambda: hf.hvp(f, (params, x, y), v),
        "hvp_fn product": lambda: H(v),
        "matmat / column": lambda: op.matmat(V),
    }
    graph = hf.hvp_fn(f, (params, x, y), method="graph")
    cases["graph product"] = lambda: graph(v)
    try:
        structured = hf.hvp_fn(f, (params, x, y), method="structured")
        cases["R-operator product"] = lambda: structured(v)
    except hf.ArgumentError:  # no chain of layers in the graph
        pass
    truth = seed_hvp()
    errors = {name: _rel(list(case().values()), truth) for name, case in cases.items()
              if name in ("hf.hvp", "hvp_fn product", "graph product", "R-operator product")}
    times = interleaved_medians(cases, repeats=repeats, warmup=1)
    times["matmat / column"] /= V.shape[1]
    unit = times["gradient"]
    # as a user calls them: a fresh operator each (PyHessian's times include its own),
    # alternating with PyHessian, medians of the rounds; the first round's trace measures
    # batched against looped products afresh (the products table above measured them on
    # this f), later rounds reuse that
    sys.modules["hessfunc.operators.hessian"]._CHOICES.pop(f, None)
    eig_times, tr_times, their_rounds = [], [], []
    for _ in range(rounds):
        eig_s, eig = _once(lambda: hf.HessianOperator(f, params, (x, y)).eigenvalues(
            1, tol=1e-6))
        tr_s, tr = _once(lambda: hf.HessianOperator(f, params, (x, y)).trace(
            "hutchinson", num_samples=50, seed=0))
        eig_times.append(eig_s)
        tr_times.append(tr_s)
        their_rounds.append(_pyhessian(model, loss_fn, x, y))
    eig_s, tr_s = statistics.median(eig_times), statistics.median(tr_times)
    theirs = their_rounds[-1]
    if theirs:
        for key in ("eig_s", "trace_s"):
            theirs[key] = statistics.median(r[key] for r in their_rounds)
    row = {"model": name, "params": sum(t.numel() for t in params.values()),
           "product route": H.method,
           "times_ms": {k: t * 1e3 for k, t in times.items()},
           "gradients": {k: t / unit for k, t in times.items()},
           "max_rel_error_vs_seed": errors,
           "hessfunc": {"top eigenvalue": float(eig[0]), "eig_s": eig_s,
                        "trace": float(tr.estimate), "trace_s": tr_s,
                        # the first operator on f also measures batched against looped
                        # products (NOTE [batched or looped products]); later ones reuse it
                        "trace_first_round_s": tr_times[0]},
           "PyHessian": theirs}
    if theirs:
        row["eig_rel_diff"] = abs(float(eig[0]) - theirs["top eigenvalue"]) / abs(
            float(eig[0]))
        row["ratio_to_PyHessian"] = {"eig": eig_s / theirs["eig_s"],
                                     "trace": tr_s / theirs["trace_s"]}
    print(json.dumps(row, indent=1), flush=True)
    return row


def main() -> None:
    _cli.main(__doc__, run, default="residual,resnet,transformer", repeats=7, option="--models")


def resnet_eval() -> nn.Module:
    """The ResNet of :func:`build`, in eval mode: a factory for ``hessfunc analyze
    --model benchmarks.bench_architectures:resnet_eval`` (docs/benchmarks.md)."""
    return build("resnet")[1]


if __name__ == "__main__":
    main()
