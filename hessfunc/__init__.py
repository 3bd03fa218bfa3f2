"""hessfunc: second- and higher-order derivatives of PyTorch models, the functional way.

    >>> import hessfunc as hf
    >>> f, params = hf.functionalize(model, loss_fn)      # doctest: +SKIP
    >>> hf.hvp(f, (params, x, y), v)                       # doctest: +SKIP
"""

from . import estimators, forward, reference, testing
from ._version import __version__
from .dense import hessian, hessian_blocks
from .derivatives import derivative
from .diagonal import hessian_diag
from .errors import (
    ArgumentError,
    DenseMemoryError,
    DistributedError,
    HessfuncError,
    NonFiniteError,
)
from .explain import Explanation, explain
from .forward import biharmonic, hutchinson_laplacian, input_hessian_diag, taylor
from .functional import FunctionalModel, functionalize
from .ggn import fisher_diag, ggn, ggn_blocks, ggn_diag, ggn_vp
from .gradient import grad
from .laplacians import laplacian
from .operators import FisherOperator, GGNOperator, HessianOperator, KFACOperator
from .products import HVPFunction, hvp, hvp_fn

__all__ = [
    "__version__",
    # pure functions
    "functionalize",
    "FunctionalModel",
    # transforms
    "grad",
    "hvp",
    "hvp_fn",
    "HVPFunction",
    "hessian",
    "hessian_blocks",
    "hessian_diag",
    "derivative",
    "laplacian",
    # which route a call takes, and why
    "explain",
    "Explanation",
    # Gauss-Newton and Fisher
    "ggn_vp",
    "ggn",
    "ggn_diag",
    "ggn_blocks",
    "fisher_diag",
    # input-space derivatives (forward propagation)
    "input_hessian_diag",
    "taylor",
    "biharmonic",
    "hutchinson_laplacian",
    # operators and estimators
    "HessianOperator",
    "GGNOperator",
    "FisherOperator",
    "KFACOperator",
    "estimators",
    "forward",
    # oracle, and verification of users' own second-order code
    "reference",
    "testing",
    # errors
    "HessfuncError",
    "ArgumentError",
    "DenseMemoryError",
    "NonFiniteError",
    "DistributedError",
]
