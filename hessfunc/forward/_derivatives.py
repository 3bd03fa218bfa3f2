"""Derivatives ``phi^(m)(z)``, m = 1..K, of the elementwise functions with a fast rule.

Each table entry maps ``(z, y, order, *op_args)`` (``y = phi(z)`` already
computed by the op itself) to ``[phi'(z), ..., phi^(K)(z)]``, shape of ``z``,
``None`` for a derivative that is identically zero. The closed forms:

* ``tanh``: ``phi^(m) = p_m(tanh z)`` with ``p_1 = 1 - t^2``,
  ``p_(m+1)(t) = p_m'(t) (1 - t^2)``.
* ``sigmoid``: ``q_1 = s - s^2``, ``q_(m+1)(s) = q_m'(s) (s - s^2)``.
* ``sin``/``cos``: ``sin^(m)(z) = sin(z + m pi/2)``, ``cos^(m)(z) = cos(z + m pi/2)``.
* ``exp``: ``exp``; ``log``: ``(-1)^(m-1) (m-1)! z^-m``;
  ``z^c``: ``c (c-1) ... (c-m+1) z^(c-m)``.
* ``softplus_beta``: ``beta^(m-1) sigma^(m-1)(beta z)`` below the threshold, 1 then 0 above.
* ``silu = z sigma(z)``: ``z sigma^(m) + m sigma^(m-1)``.
* ``gelu = z Phi(z)``: ``z Phi^(m) + m Phi^(m-1)`` with
  ``Phi^(m) = (-1)^(m-1) He_(m-1)(z) pdf(z)`` (probabilists' Hermite).
* ``erf``: ``2/sqrt(pi) (-1)^(m-1) H_(m-1)(z) exp(-z^2)`` (physicists' Hermite).
* ``relu``, ``abs``: first derivative only (zero curvature inside each piece).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

__all__ = ["DERIVATIVES"]

Derivatives = list[Tensor | None]
_aten = torch.ops.aten


# --- polynomials as coefficient tuples (lowest degree first) -------------------


def _poly_mul(p: tuple[float, ...], q: tuple[float, ...]) -> tuple[float, ...]:
    out = [0.0] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            out[i + j] += a * b
    return tuple(out)


def _poly_der(p: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(i * c for i, c in enumerate(p))[1:] or (0.0,)


def _horner(p: tuple[float, ...], t: Tensor) -> Tensor:
    acc = torch.full_like(t, p[-1])
    for c in reversed(p[:-1]):
        acc = acc * t + c
    return acc


@cache
def _riccati_poly(m: int, generator: tuple[float, ...]) -> tuple[float, ...]:
    """``p_m`` with ``p_1 = generator`` and ``p_(m+1) = p_m' * generator``.

    ``tanh' = 1 - tanh^2`` and ``sigmoid' = s - s^2`` are both of this form.
    """
    if m == 1:
        return generator
    return _poly_mul(_poly_der(_riccati_poly(m - 1, generator)), generator)


_TANH = (1.0, 0.0, -1.0)
_SIGMOID = (0.0, 1.0, -1.0)


def _tanh(z: Tensor, y: Tensor, order: int) -> Derivatives:
    return [_horner(_riccati_poly(m, _TANH), y) for m in range(1, order + 1)]


def _sigmoid_derivatives(s: Tensor, order: int) -> Derivatives:
    """``sigma^(m)`` for m = 1..order, given ``s = sigma(z)``."""
    return [_horner(_riccati_poly(m, _SIGMOID), s) for m in range(1, order + 1)]


def _sigmoid(z: Tensor, y: Tensor, order: int) -> Derivatives:
    return _sigmoid_derivatives(y, order)


def _sin(z: Tensor, y: Tensor, order: int) -> Derivatives:
    cycle = [torch.cos(z), -y, None, y]
    cycle[2] = -cycle[0]
    return [cycle[(m - 1) % 4] for m in range(1, order + 1)]


def _cos(z: Tensor, y: Tensor, order: int) -> Derivatives:
    s = torch.sin(z)
    cycle = [-s, -y, s, y]
    return [cycle[(m - 1) % 4] for m in range(1, order + 1)]


def _sinh(z: Tensor, y: Tensor, order: int) -> Derivatives:
    c = torch.cosh(z)
    return [c if m % 2 else y for m in range(1, order + 1)]


def _cosh(z: Tensor, y: Tensor, order: int) -> Derivatives:
    s = torch.sinh(z)
    return [s if m % 2 else y for m in range(1, order + 1)]


def _exp(z: Tensor, y: Tensor, order: int) -> Derivatives:
    return [y] * order


def _expm1(z: Tensor, y: Tensor, order: int) -> Derivatives:
    return [y + 1] * order


def _log_of(base: Tensor, order: int, scale: float = 1.0) -> Derivatives:
    r = torch.reciprocal(base)
    out, rm = [], r
    for m in range(1, order + 1):
        out.append(rm * ((-1) ** (m - 1) * math.factorial(m - 1) * scale))
        rm = rm * r
    return out


def _log(z: Tensor, y: Tensor, order: int) -> Derivatives:
    return _log_of(z, order)


def _log1p(z: Tensor, y: Tensor, order: int) -> Derivatives:
    return _log_of(1 + z, order)


def _log2(z: Tensor, y: Tensor, order: int) -> Derivatives:
    return _log_of(z, order, 1 / math.log(2))


def _reciprocal(z: Tensor, y: Tensor, order: int) -> Derivatives:
    out, ym = [], y * y
    for m in range(1, order + 1):
        out.append(ym * ((-1) ** m * math.factorial(m)))
        ym = ym * y
    return out


def _power(z: Tensor, order: int, c: float | Tensor) -> Derivatives:
    """Derivatives of ``z^c`` for a constant exponent (number or tensor)."""
    out: Derivatives = []
    falling: float | Tensor = 1.0
    for m in range(1, order + 1):
        falling = falling * (c - (m - 1))
        if isinstance(falling, (int, float)):
            if falling == 0:
                out.extend([None] * (order - m + 1))  # integer power: a polynomial
                break
            e = c - m
            zm = torch.ones_like(z) if e == 0 else (z if e == 1 else torch.pow(z, e))
            out.append(falling * zm)
        else:
            zm = torch.pow(z, c - m)
            out.append(torch.where(falling == 0, torch.zeros_like(zm), falling * zm))
    return out


def _pow_tensor_scalar(z: Tensor, y: Tensor, order: int, exponent: float) -> Derivatives:
    return _power(z, order, exponent)


def _pow_tensor_tensor(z: Tensor, y: Tensor, order: int, exponent: Tensor) -> Derivatives:
    return _power(z, order, exponent)


def _pow_scalar(z: Tensor, y: Tensor, order: int, base: float) -> Derivatives:
    # y = base^z = exp(z log base): every derivative is y (log base)^m
    lb = math.log(base)
    return [y * lb**m for m in range(1, order + 1)]


def _sqrt(z: Tensor, y: Tensor, order: int) -> Derivatives:
    return _power(z, order, 0.5)


def _rsqrt(z: Tensor, y: Tensor, order: int) -> Derivatives:
    return _power(z, order, -0.5)


def _softplus(
    z: Tensor, y: Tensor, order: int, beta: float = 1.0, threshold: float = 20.0
) -> Derivatives:
    bz = z * beta
    s = torch.sigmoid(bz)
    linear = bz > threshold  # torch returns z itself there
    sig = [s, *_sigmoid_derivatives(s, order - 1)]
    out: Derivatives = []
    for m in range(1, order + 1):
        d = sig[m - 1] * beta ** (m - 1)
        fill = 1.0 if m == 1 else 0.0
        out.append(torch.where(linear, torch.full_like(d, fill), d))
    return out


def _silu(z: Tensor, y: Tensor, order: int) -> Derivatives:
    s = torch.sigmoid(z)
    sig = [s, *_sigmoid_derivatives(s, order)]
    return [z * sig[m] + m * sig[m - 1] for m in range(1, order + 1)]


def _hermite(z: Tensor, n: int, physicists: bool) -> list[Tensor]:
    """``He_0..He_n`` (or ``H_0..H_n`` for ``physicists``) evaluated at ``z``."""
    a = 2.0 if physicists else 1.0
    hs = [torch.ones_like(z), a * z]
    for k in range(1, n):
        hs.append(a * z * hs[k] - a * k * hs[k - 1])
    return hs[: n + 1]


def _gelu(z: Tensor, y: Tensor, order: int, approximate: str = "none") -> Derivatives:
    if approximate != "none":
        raise NotImplementedError("gelu(approximate='tanh') uses the generic rule")
    cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
    pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
    he = _hermite(z, order, physicists=False)
    # Phi^(m) for m = 0..order
    phi = [cdf] + [((-1) ** (m - 1)) * he[m - 1] * pdf for m in range(1, order + 1)]
    return [z * phi[m] + m * phi[m - 1] for m in range(1, order + 1)]


def _erf(z: Tensor, y: Tensor, order: int) -> Derivatives:
    g = torch.exp(-z * z) * (2 / math.sqrt(math.pi))
    h = _hermite(z, order, physicists=True)
    return [((-1) ** (m - 1)) * h[m - 1] * g for m in range(1, order + 1)]


def _relu(z: Tensor, y: Tensor, order: int) -> Derivatives:
    return [(z > 0).to(z.dtype)] + [None] * (order - 1)


def _abs(z: Tensor, y: Tensor, order: int) -> Derivatives:
    return [torch.sign(z)] + [None] * (order - 1)


DERIVATIVES: dict[object, Callable[..., Derivatives]] = {
    _aten.tanh.default: _tanh,
    _aten.sigmoid.default: _sigmoid,
    _aten.sin.default: _sin,
    _aten.cos.default: _cos,
    _aten.sinh.default: _sinh,
    _aten.cosh.default: _cosh,
    _aten.exp.default: _exp,
    _aten.expm1.default: _expm1,
    _aten.log.default: _log,
    _aten.log1p.default: _log1p,
    _aten.log2.default: _log2,
    _aten.reciprocal.default: _reciprocal,
    _aten.pow.Tensor_Scalar: _pow_tensor_scalar,
    _aten.pow.Tensor_Tensor: _pow_tensor_tensor,
    _aten.pow.Scalar: _pow_scalar,
    _aten.sqrt.default: _sqrt,
    _aten.rsqrt.default: _rsqrt,
    _aten.softplus.default: _softplus,
    _aten.silu.default: _silu,
    _aten.gelu.default: _gelu,
    _aten.erf.default: _erf,
    _aten.relu.default: _relu,
    _aten.abs.default: _abs,
}
