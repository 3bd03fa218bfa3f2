"""Input-space derivatives of per-point scalar fields in one forward pass.

Physics-informed networks need, at every point of a batch, the Laplacian, the
input-Hessian diagonal or higher directional derivatives of a network output
``u(x)``. ``vmap(hessian(u))`` forms a ``d x d`` matrix per point to read a
trace off it; the functions here instead trace ``u`` once at the ATen level
and push Taylor coefficients forward through its graph (forward Laplacian,
Li et al. 2023; collapsed Taylor mode, Dangel et al. 2025).

Convention: ``u`` maps ONE point ``x`` to a scalar (0-d tensor); batch with
``torch.func.vmap``. Each function returns a function, torch.func style:

    forward_laplacian(u)(x)           # Delta u, shape ()
    input_hessian_diag(u)(x)          # diag(d2u/dx2), shape of x
    biharmonic(u)(x)                  # Delta^2 u, shape ()
    hutchinson_laplacian(u, num_samples=S, generator=g)(x)
    taylor(u, x, v, order=K)          # (K + 1, *u(x).shape)

See docs/input-derivatives.md for the rules and measurements.
"""

from .biharmonic import biharmonic
from .diagonal import input_hessian_diag
from .hutchinson import hutchinson_laplacian
from .laplacian import forward_laplacian
from .taylor import taylor

__all__ = [
    "biharmonic",
    "forward_laplacian",
    "hutchinson_laplacian",
    "input_hessian_diag",
    "taylor",
]
