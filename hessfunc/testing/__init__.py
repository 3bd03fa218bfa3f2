"""Property-based verification of second-order code, for users.

The machinery hessfunc checks itself with, importable:

- assertions against the loop-based oracle (:mod:`hessfunc.reference`):
  :func:`assert_hvp_close`, :func:`assert_hessian_close`, :func:`assert_diag_close`,
  :func:`assert_laplacian_close`, with one tolerance table per dtype
  (:data:`TOLERANCES`) and failure messages that name the worst entry;
- :func:`check_derivatives`: derivatives of any order, forward and reverse mode,
  against finite differences (JAX's ``check_grads`` for parameter trees);
- :mod:`hessfunc.testing.strategies`: hypothesis strategies for models with curvature,
  losses, batches, parameters and tangents (needs hypothesis, imported only there);
- :mod:`hessfunc.testing.models` and :mod:`hessfunc.testing.losses`: the small models
  and losses the strategies draw, usable on their own.

Everything works inside plain pytest tests and inside ``@given`` tests, with no
fixtures.

Example:
    >>> from hessfunc.testing import assert_hvp_close
    >>> f = lambda p: (p["w"] ** 4).sum()          # H = diag(12 w^2)
    >>> def my_hvp(f, primals, v):
    ...     (params,) = primals
    ...     return {"w": 12 * params["w"] ** 2 * v["w"]}
    >>> assert_hvp_close(my_hvp, f, ({"w": torch.tensor([1.0, -2.0], dtype=torch.float64)},))
"""

from __future__ import annotations

from typing import Any

from . import losses, models
from ._compare import TOLERANCES
from .assertions import (
    assert_diag_close,
    assert_hessian_close,
    assert_hvp_close,
    assert_laplacian_close,
)
from .finite_differences import FD_SETTINGS, check_derivatives

__all__ = [
    "assert_hvp_close",
    "assert_hessian_close",
    "assert_diag_close",
    "assert_laplacian_close",
    "check_derivatives",
    "TOLERANCES",
    "FD_SETTINGS",
    "models",
    "losses",
    "strategies",
]


def __getattr__(name: str) -> Any:
    # strategies needs hypothesis, an optional dependency: imported on first use only
    if name == "strategies":
        import importlib

        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
