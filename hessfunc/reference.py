"""The oracle: plain loop-based ``torch.autograd`` versions of every quantity.

These are the seed tutorial's algorithms, written plainly and slowly on purpose:
a double backward for H v, one backward per Hessian row or element for blocks,
diagonals and full Hessians, nested ``autograd.grad(create_graph=True)`` for
nth derivatives. The fast paths of hessfunc are tested against them; the fast
paths never import this module.

Conventions: ``loss`` is a scalar tensor whose graph reaches ``params``, tensors
with ``requires_grad=True`` (e.g. ``list(model.parameters())`` right after a
forward pass). ``named_params`` is a dict or an iterable of ``(name, tensor)``
pairs, e.g. ``model.named_parameters()``. Results are detached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = [
    "gradient",
    "hvp",
    "hessian",
    "hessian_blocks",
    "hessian_diag",
    "derivatives",
    "laplacian",
    "input_hessian_diag",
    "jacobian",
    "output_hessian",
    "ggn",
    "ggn_residual",
    "empirical_fisher",
    "mc_fisher",
]


def _as_list(params: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _grad_or_zeros(out: torch.Tensor, inputs: list[torch.Tensor], **kw: bool
                   ) -> list[torch.Tensor]:
    if not out.requires_grad:
        return [torch.zeros_like(p) for p in inputs]
    gs = torch.autograd.grad(out, inputs, allow_unused=True, **kw)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, inputs, strict=True)]


def gradient(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Slow reference: ``d loss / d p`` for each ``p`` in ``params``."""
    return [g.detach() for g in _grad_or_zeros(loss, _as_list(params), retain_graph=True)]


def hvp(loss: torch.Tensor, params: Sequence[torch.Tensor], vector: Sequence[torch.Tensor]
        ) -> list[torch.Tensor]:
    """Slow reference: Hessian-vector product by double backward (the seed's ``compute_hvp``).

    ``g = d loss/d params`` with ``create_graph=True``; ``H v = d <g, v> / d params``.
    """
    params = _as_list(params)
    grads = _grad_or_zeros(loss, params, create_graph=True, retain_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, _as_list(vector), strict=True))
    return [h.detach() for h in _grad_or_zeros(dot, params, retain_graph=True)]


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = _grad_or_zeros(loss, params, create_graph=True, retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads])


def hessian(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Slow reference: the full flat ``(P, P)`` Hessian, one backward per row.

    Parameters are laid out in the given order, each flattened row-major.
    """
    params = _as_list(params)
    g = _flat_grad(loss, params)
    rows = []
    for i in range(g.numel()):
        row = _grad_or_zeros(g[i], params, retain_graph=True)
        rows.append(torch.cat([r.reshape(-1) for r in row]))
    return torch.stack(rows).detach()


def _named(named_params: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
           ) -> dict[str, torch.Tensor]:
    return dict(named_params.items() if isinstance(named_params, dict) else named_params)


def hessian_blocks(loss: torch.Tensor,
                   named_params: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
                   ) -> dict[str, torch.Tensor]:
    """Slow reference: each parameter's own ``(numel, numel)`` Hessian block, row by row.

    The seed's "Hessian Matrix Diagonal + Off Diagonal term".
    """
    blocks = {}
    for name, p in _named(named_params).items():
        g = _flat_grad(loss, [p])
        rows = [_grad_or_zeros(g[i], [p], retain_graph=True)[0].reshape(-1)
                for i in range(p.numel())]
        blocks[name] = torch.stack(rows).detach()
    return blocks


def hessian_diag(loss: torch.Tensor,
                 named_params: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
                 ) -> dict[str, torch.Tensor]:
    """Slow reference: the exact Hessian diagonal, one backward per element (the seed's loop).

    Returns ``{name: tensor shaped like the parameter}``.
    """
    diags = {}
    for name, p in _named(named_params).items():
        g = _flat_grad(loss, [p])
        d = [_grad_or_zeros(g[i], [p], retain_graph=True)[0].reshape(-1)[i]
             for i in range(p.numel())]
        diags[name] = torch.stack(d).reshape(p.shape).detach()
    return diags


def derivatives(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, order: int
                ) -> list[torch.Tensor]:
    """Slow reference: 1st..``order``-th derivatives of an elementwise function at ``x``.

    Nested ``autograd.grad(create_graph=True)`` as in the seed (x**4 at 1: 4, 12, 24).
    ``f`` must act elementwise, so ``d f(x)_i / d x_i`` is obtained by differentiating
    ``sum(f(x))``.
    """
    x = x.detach().requires_grad_(True)
    out = f(x)
    results = []
    for _ in range(order):
        (out,) = _grad_or_zeros(out.sum(), [x], create_graph=True)
        results.append(out.detach())
    return results


def input_hessian_diag(u: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
                       ) -> torch.Tensor:
    """Slow reference: diagonal of the Hessian of scalar ``u`` at ``x``, element by element."""
    x = x.detach().requires_grad_(True)
    (g,) = _grad_or_zeros(u(x), [x], create_graph=True)
    g = g.reshape(-1)
    d = [_grad_or_zeros(g[i], [x], retain_graph=True)[0].reshape(-1)[i] for i in range(g.numel())]
    return torch.stack(d).reshape(x.shape).detach()


def laplacian(u: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Slow reference: trace of the Hessian of scalar ``u`` at point ``x``."""
    return input_hessian_diag(u, x).sum()


# ------------------------------------------------------- Gauss-Newton and Fisher
def jacobian(outputs: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Slow reference: the ``(O, P)`` Jacobian of ``outputs`` (flattened), one backward per
    output (row by row)."""
    params = _as_list(params)
    flat = outputs.reshape(-1)
    rows = [torch.cat([r.reshape(-1) for r in _grad_or_zeros(flat[k], params,
                                                             retain_graph=True)])
            for k in range(flat.numel())]
    return torch.stack(rows).detach()


def output_hessian(loss_fn: Callable[..., torch.Tensor], outputs: torch.Tensor,
                   targets: object) -> torch.Tensor:
    """Slow reference: ``d^2 loss_fn(o, targets) / do^2`` at ``o = outputs``, ``(O, O)``, row by
    row (double backward)."""
    o = outputs.detach().requires_grad_(True)
    return hessian(loss_fn(o, targets), [o])


def ggn(outputs: torch.Tensor, loss_fn: Callable[..., torch.Tensor], targets: object,
        params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Slow reference: the GGN ``J^T H_o J`` ``(P, P)``, summed output by output:
    ``sum_a J_a^T (sum_b (H_o)_ab J_b)`` with ``J`` and ``H_o`` from the loops above."""
    J = jacobian(outputs, params)
    Ho = output_hessian(loss_fn, outputs, targets)
    G = torch.zeros(J.shape[1], J.shape[1], dtype=J.dtype, device=J.device)
    for a in range(J.shape[0]):
        row = sum(Ho[a, b] * J[b] for b in range(J.shape[0]))
        G += torch.outer(J[a], row)
    return G


def ggn_residual(outputs: torch.Tensor, loss_fn: Callable[..., torch.Tensor], targets: object,
                 params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Slow reference: ``H - G = sum_k (dL/do_k) d^2 o_k / dp^2`` ``(P, P)``, one Hessian of
    each output by the loops of :func:`hessian`."""
    o = outputs.detach().requires_grad_(True)
    (dL,) = torch.autograd.grad(loss_fn(o, targets), [o])
    flat = outputs.reshape(-1)
    return sum(dL.reshape(-1)[k] * hessian(flat[k], params) for k in range(flat.numel()))


def empirical_fisher(sample_losses: Iterable[torch.Tensor], params: Sequence[torch.Tensor],
                     scale: float) -> torch.Tensor:
    """Slow reference: ``scale * sum_n g_n g_n^T`` ``(P, P)``, ``g_n`` the gradient of the
    ``n``-th per-sample loss (each a scalar with its own graph)."""
    params = _as_list(params)
    total = None
    for loss in sample_losses:
        g = torch.cat([t.reshape(-1) for t in _grad_or_zeros(loss, params)])
        total = torch.outer(g, g) if total is None else total + torch.outer(g, g)
    return (scale * total).detach()


def mc_fisher(forward: Callable[[torch.Tensor], torch.Tensor], params: Sequence[torch.Tensor],
              inputs: torch.Tensor, likelihood: str, scale: float, mc_samples: int,
              generator: torch.Generator | None) -> torch.Tensor:
    """Slow reference: the Monte-Carlo Fisher ``(scale / M) sum_m sum_n g_nm g_nm^T`` by its
    definition, ``(P, P)``.

    ``forward(x)`` evaluates the model (a graph to ``params``); draw ``m`` takes one label per
    sample from ``p(. | o_n)``, ``o = forward(inputs)``, in the order hessfunc.ggn documents
    (Gaussian: ``o + randn / sqrt 2``; categorical: ``multinomial(softmax(o))``;
    log-categorical: ``multinomial(exp(o))``; Bernoulli: ``bernoulli(sigmoid(o))``), and
    ``g_nm`` is the gradient of ``-log p(yhat_nm | forward(inputs)[n])`` (+ const) for each
    output row ``n`` (the samples, or a sequence model's positions), through the whole
    batch as the model runs (one forward pass per row).
    """
    params = _as_list(params)
    with torch.no_grad():
        out = forward(inputs)
    draws = []
    for _ in range(mc_samples):
        if likelihood == "gaussian":
            noise = torch.randn(out.shape, generator=generator, dtype=out.dtype)
            draws.append(out + noise * 0.5 ** 0.5)
        elif likelihood == "bernoulli":
            draws.append(torch.bernoulli(torch.sigmoid(out), generator=generator))
        else:
            probs = torch.softmax(out, 1) if likelihood == "categorical" else out.exp()
            draws.append(torch.multinomial(probs, 1, generator=generator)[:, 0])
    losses = []
    for labels in draws:
        for n in range(out.shape[0]):  # rows: samples, or a sequence model's positions
            o, t = forward(inputs)[n], labels[n]  # through the batch, as the model runs
            if likelihood == "gaussian":
                losses.append(((o - t) ** 2).sum())
            elif likelihood == "bernoulli":
                losses.append(-(t * torch.log(torch.sigmoid(o))
                                + (1 - t) * torch.log(1 - torch.sigmoid(o))).sum())
            elif likelihood == "categorical":
                losses.append(-torch.log(torch.softmax(o, 0)[t]))
            else:
                losses.append(-o[t])
    return empirical_fisher(losses, params, scale / mc_samples)
