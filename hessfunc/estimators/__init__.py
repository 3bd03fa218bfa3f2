"""Stochastic and Krylov estimators that see an operator only through products.

Every function here takes ``matmat``, a callable mapping a ``(size, k)`` tensor
``V`` to ``A @ V`` for a symmetric operator ``A`` of shape ``(size, size)``, and
nothing model-specific; :class:`hessfunc.HessianOperator` supplies one for the
Hessian of a loss.

- trace: :func:`hutchinson_trace`, :func:`hutchpp_trace`;
- diagonal: :func:`hutchinson_diagonal`;
- extreme eigenpairs: :func:`lanczos_eigenvalues` (and the raw :func:`lanczos`);
- spectral density: :func:`spectral_density`, :func:`quadrature_moments`;
- inverse products: :func:`conjugate_gradient`, :func:`minres` (they see a matvec).

Every random draw comes from the ``generator`` argument, so the same generator
state gives bit-identical results.
"""

from __future__ import annotations

from hessfunc.estimators.hutchinson import TraceEstimate, hutchinson_diagonal, hutchinson_trace
from hessfunc.estimators.hutchpp import hutchpp_trace
from hessfunc.estimators.krylov import SolveResult, conjugate_gradient, minres
from hessfunc.estimators.lanczos import EigenResult, LanczosResult, lanczos, lanczos_eigenvalues
from hessfunc.estimators.slq import SpectralDensity, quadrature_moments, spectral_density

__all__ = [
    # trace and diagonal
    "TraceEstimate",
    "hutchinson_trace",
    "hutchinson_diagonal",
    "hutchpp_trace",
    # eigenvalues
    "EigenResult",
    "LanczosResult",
    "lanczos",
    "lanczos_eigenvalues",
    # spectral density
    "SpectralDensity",
    "spectral_density",
    "quadrature_moments",
    # inverse products
    "SolveResult",
    "conjugate_gradient",
    "minres",
]
