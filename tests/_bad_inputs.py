"""The bad-input catalogue: every bad argument tried, and the error it must give.

Each entry is ``(id, what is wrong, call, error type, regex the message must match)``.
``docs/robustness.md`` lists the same ids (a test keeps them in sync).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hessfunc as hf


@dataclass(frozen=True)
class Case:
    id: str
    what: str
    call: Callable[[], Any]
    error: type[BaseException]
    match: str


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    f, params = hf.functionalize(model, nn.MSELoss())
    x, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    v = {k: torch.ones_like(t) for k, t in params.items()}
    return model, f, params, x, y, v


MODEL, F_, PARAMS, X, Y, V = _setup()


class _Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count += 1
        return x


def _state_write():
    f, params = hf.functionalize(nn.Sequential(_Counter(), nn.Linear(2, 1)))
    return f(params, torch.ones(3, 2))


def _counted_lookup():
    model = nn.Sequential(nn.Embedding(4, 2, scale_grad_by_freq=True), nn.Flatten(),
                          nn.Linear(4, 1))
    f, params = hf.functionalize(model, nn.MSELoss())
    return hf.hessian_diag(f)(params, torch.tensor([[0, 1], [1, 3]]), torch.zeros(2, 1))
SCALAR = lambda t: (t ** 3).sum()  # noqa: E731
VEC = torch.ones(3, dtype=torch.float64)
H = hf.HessianOperator(F_, PARAMS, (X, Y))
P = H.shape[0]
_NONSCALAR_F, _ = hf.functionalize(MODEL, nn.MSELoss(reduction="none"))
_LOSS_AND_AUX = lambda p, x, y: (F_(p, x, y), x.mean())  # noqa: E731
_G, _ = hf.functionalize(MODEL)

CASES: list[Case] = [
    Case("functionalize-not-module", "model is not an nn.Module",
         lambda: hf.functionalize(lambda x: x), hf.ArgumentError, "`model` must be"),
    Case("functionalize-no-params", "model with no trainable parameters",
         lambda: hf.functionalize(nn.Tanh()), hf.ArgumentError, "no trainable parameters"),
    Case("functionalize-loss-not-callable", "loss_fn is not callable",
         lambda: hf.functionalize(MODEL, "mse"), hf.ArgumentError, "`loss_fn` must be"),
    Case("functionalize-dropout", "active dropout without a randomness choice",
         lambda: hf.functionalize(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()),
         hf.ArgumentError, "randomness='fixed'"),
    Case("lookup-counted-gradient", "a differentiated embedding with scale_grad_by_freq=True",
         _counted_lookup, hf.ArgumentError,
         r"args\[0\]\['0.weight'\].*scale_grad_by_freq=False"),
    Case("functionalize-max-norm", "an embedding that renormalises its table in place",
         lambda: hf.functionalize(nn.Sequential(nn.Embedding(4, 2, max_norm=1.0))),
         hf.ArgumentError, r"max_norm \(\['0'\]\).*max_norm=None"),
    Case("functionalize-state-write", "a forward pass that updates a buffer",
         _state_write, hf.ArgumentError, r"wrote into \['0.count'\]"),
    Case("functionalize-lazy", "a lazy module not yet called",
         lambda: hf.functionalize(nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 1))),
         hf.ArgumentError, r"not made yet \(\['0.weight', '0.bias'\]\); call the model once"),
    Case("functionalize-randomness", "unknown randomness choice",
         lambda: hf.functionalize(MODEL, randomness="different"), hf.ArgumentError,
         "`randomness`"),
    Case("f-params-keys", "params dict with a missing key",
         lambda: F_({"0.weight": PARAMS["0.weight"]}, X, Y), hf.ArgumentError, "missing"),
    Case("grad-non-scalar", "non-scalar loss (reduction='none')",
         lambda: hf.grad(_NONSCALAR_F)(PARAMS, X, Y), hf.ArgumentError, r"scalar \(0-d\)"),
    Case("grad-has-aux-not-pair", "has_aux=True but f returns a tensor, not (loss, aux)",
         lambda: hf.grad(lambda t: t ** 2, has_aux=True)(VEC), hf.ArgumentError,
         r"must return \(scalar, aux\)"),
    Case("grad-integer", "integer tensor where floats are needed",
         lambda: hf.grad(SCALAR)(torch.arange(3)), hf.ArgumentError, "dtype torch.int64"),
    Case("grad-bool", "boolean tensor where floats are needed",
         lambda: hf.grad(SCALAR)(torch.ones(3, dtype=torch.bool)), hf.ArgumentError,
         "dtype torch.bool"),
    Case("grad-half", "float16 input (refused, never silently upcast)",
         lambda: hf.grad(SCALAR)(torch.ones(3, dtype=torch.float16)), hf.ArgumentError,
         "half precision"),
    Case("grad-bfloat16", "bfloat16 input (refused, never silently upcast)",
         lambda: hf.hvp(SCALAR, (torch.ones(3, dtype=torch.bfloat16),),
                        torch.ones(3, dtype=torch.bfloat16)), hf.ArgumentError, "half precision"),
    Case("grad-argnums", "argnums out of range",
         lambda: hf.grad(SCALAR, argnums=2)(VEC), hf.ArgumentError, "`argnums`=2 is out of range"),
    Case("grad-f-not-callable", "f is not callable",
         lambda: hf.grad(3), hf.ArgumentError, "`f` must be a callable"),
    Case("hvp-tangent-structure", "tangent with the wrong structure",
         lambda: hf.hvp(F_, (PARAMS, X, Y), list(V.values())), hf.ArgumentError,
         "`tangent` must have the structure"),
    Case("hvp-tangent-shape", "tangent with a wrong shape",
         lambda: hf.hvp(SCALAR, (VEC,), torch.ones(4, dtype=torch.float64)), hf.ArgumentError,
         r"`tangent` leaf 0 has shape \(4,\)"),
    Case("hvp-tangent-dtype", "tangent with a wrong dtype",
         lambda: hf.hvp(SCALAR, (VEC,), torch.ones(3)), hf.ArgumentError,
         "`tangent` leaf 0 has dtype torch.float32"),
    Case("hvp-primals-not-tuple", "primals not a tuple",
         lambda: hf.hvp(SCALAR, VEC, VEC), hf.ArgumentError, "`primals` must be a tuple"),
    Case("hvp-mode", "unknown HVP mode",
         lambda: hf.hvp(SCALAR, (VEC,), VEC, mode="fwd"), hf.ArgumentError, "`mode` must be"),
    Case("hvp-method", "unknown HVP method",
         lambda: hf.hvp(SCALAR, (VEC,), VEC, method="fast"), hf.ArgumentError,
         "`method` must be one of"),
    Case("hvp-structured-not-a-chain", "method='structured' where it does not apply",
         lambda: hf.hvp(SCALAR, (VEC,), VEC, method="structured"), hf.ArgumentError,
         "method='structured' does not apply here: argnums is not 0 or f takes no batch "
         r"after the parameters; use method='auto' or 'graph'\.$"),
    Case("hvp-fn-method", "unknown hvp_fn method",
         lambda: hf.hvp_fn(F_, (PARAMS, X, Y), method="autograd"), hf.ArgumentError,
         "`method` must be one of"),
    Case("hvp-argnums-tuple", "argnums tuple where one int is needed",
         lambda: hf.hvp(SCALAR, (VEC,), VEC, argnums=(0,)), hf.ArgumentError,
         "`argnums` must be an int"),
    Case("hessian-non-scalar", "non-scalar function output",
         lambda: hf.hessian(lambda t: t ** 2)(VEC), hf.ArgumentError, "scalar"),
    Case("hessian-diag-loss-and-aux", "f returns (loss, aux) on a batch (its diagonal was "
         "all zeros)", lambda: hf.hessian_diag(_LOSS_AND_AUX)(PARAMS, X, Y), hf.ArgumentError,
         r"^hessfunc.hessian_diag: f must return a scalar tensor, got tuple of length 2; if "
         r"f returns \(loss, aux\), differentiate"),
    Case("explain-f-not-callable", "explain given functionalize's (f, params) pair as f (the "
         "trace failed with 'tuple' object is not callable)",
         lambda: hf.explain(hf.functionalize(MODEL, nn.MSELoss()), PARAMS, X, Y),
         hf.ArgumentError, r"^hessfunc.explain: `f` must be a callable, got tuple of length 2"),
    Case("explain-argnums", "argnums out of range for explain",
         lambda: hf.explain(F_, PARAMS, X, Y, argnums=3), hf.ArgumentError,
         r"^hessfunc.explain: `argnums`=3 is out of range"),
    Case("ggn-diag-loss-and-aux", "loss_fn returns (loss, aux) (a raw KeyError before)",
         lambda: hf.ggn_diag(_G, lambda o, t: (nn.functional.mse_loss(o, t), 1.0))(
             PARAMS, X, Y), hf.ArgumentError,
         r"^ggn_diag: `loss_fn\(outputs, targets\)` must return a scalar, got tuple"),
    Case("ggn-blocks-loss-per-sample", "loss_fn returns one loss per sample",
         lambda: hf.ggn_blocks(_G, lambda o, t: ((o - t) ** 2).sum(1))(
             PARAMS, X, Y), hf.ArgumentError,
         r"^ggn_blocks: `loss_fn\(outputs, targets\)` must return a scalar, got Tensor"),
    Case("hessian-blocks-per-sample-losses", "f returns one loss per sample",
         lambda: hf.hessian_blocks(_NONSCALAR_F)(PARAMS, X, Y), hf.ArgumentError,
         r"^hessfunc.hessian_blocks: f must return a scalar \(0-d\) tensor, got shape \(4, 1\)"),
    Case("hessian-chunk-zero", "chunk_size < 1",
         lambda: hf.hessian(SCALAR, chunk_size=0)(VEC), hf.ArgumentError,
         "`chunk_size` must be an int >= 1"),
    Case("hessian-too-large", "dense Hessian over the memory limit",
         lambda: hf.hessian(SCALAR)(torch.zeros(300_000)), hf.DenseMemoryError,
         "over the limit"),
    Case("blocks-chunk-float", "chunk_size not an int",
         lambda: hf.hessian_blocks(SCALAR, chunk_size=2.5)(VEC), hf.ArgumentError,
         "`chunk_size`"),
    Case("diag-method", "unknown diagonal method",
         lambda: hf.hessian_diag(SCALAR, method="fast"), hf.ArgumentError, "`method` must be"),
    Case("diag-structured-na", "structured route where it does not apply",
         lambda: hf.hessian_diag(SCALAR, method="structured")(VEC), hf.ArgumentError,
         "does not apply"),
    Case("derivative-order", "order < 1",
         lambda: hf.derivative(torch.sin, 0), hf.ArgumentError, "`order` must be an int >= 1"),
    Case("derivative-not-elementwise", "function that is not elementwise",
         lambda: hf.derivative(lambda t: t.sum(), 1)(VEC), hf.ArgumentError,
         "must be elementwise"),
    Case("laplacian-non-scalar", "u not scalar per point",
         lambda: hf.laplacian(lambda t: t * 2)(VEC), hf.ArgumentError, "scalar"),
    Case("laplacian-integer", "integer input point",
         lambda: hf.laplacian(SCALAR)(torch.arange(3)), hf.ArgumentError, "dtype torch.int64"),
    Case("operator-empty", "empty data",
         lambda: hf.HessianOperator(F_, PARAMS, []), hf.ArgumentError, "`data` is empty"),
    Case("operator-empty-batch", "a batch with no samples",
         lambda: hf.HessianOperator(F_, PARAMS, [(X, Y), (X[:0], Y[:0])]), hf.ArgumentError,
         "batch 1 of `data` has no samples"),
    Case("diag-per-sample-axes", "per-sample diagonals of targets with another first axis",
         lambda: hf.hessian_diag(F_, per_sample=True)(PARAMS, X, Y[:2]), hf.ArgumentError,
         r"per_sample=True splits the inputs and targets into samples .* sizes \[4, 2\]"),
    Case("diag-per-sample-too-large", "per-sample diagonals over the memory limit",
         lambda: hf.hessian_diag(F_, per_sample=True, max_memory=64)(PARAMS, X, Y),
         hf.DenseMemoryError, "per-sample diagonals"),
    Case("operator-batch-shape", "a batch that is not (inputs, targets)",
         lambda: hf.HessianOperator(F_, PARAMS, [(X, Y, Y)]), hf.ArgumentError,
         r"must be an \(inputs, targets\) pair"),
    Case("operator-shuffle", "a shuffling DataLoader",
         lambda: hf.HessianOperator(F_, PARAMS, DataLoader(TensorDataset(X, Y), shuffle=True)),
         hf.ArgumentError, "shuffle=False"),
    Case("operator-k", "k >= P",
         lambda: H.eigenvalues(P), hf.ArgumentError, f"`k`={P} must be < P={P}"),
    Case("operator-num-samples", "num_samples < 1",
         lambda: H.trace("hutchinson", num_samples=0), hf.ArgumentError, "`num_samples`"),
    Case("operator-vector-size", "vector of the wrong size",
         lambda: H @ torch.ones(P + 2, dtype=torch.float64), hf.ArgumentError,
         r"`v` must have shape \(P,\)"),
    Case("operator-vector-dtype", "vector of the wrong dtype",
         lambda: H @ torch.ones(P), hf.ArgumentError, "dtype torch.float32"),
    Case("operator-params", "params with an integer tensor",
         lambda: hf.HessianOperator(F_, {"w": torch.arange(3)}, (X, Y)), hf.ArgumentError,
         "`params` holds a tensor of dtype torch.int64"),
    Case("operator-dense-limit", "to_dense over the memory limit",
         lambda: H.to_dense(max_memory=8), hf.DenseMemoryError, "over the limit"),
    Case("estimator-num-samples", "an estimator with num_samples=0",
         lambda: hf.estimators.hutchinson_trace(lambda V: V, 3, num_samples=0,
                                                dtype=torch.float64), hf.ArgumentError,
         "num_samples"),
    Case("estimator-k", "Lanczos with k=0",
         lambda: hf.estimators.lanczos_eigenvalues(lambda V: V, 3, k=0, dtype=torch.float64),
         hf.ArgumentError, "k"),
]
