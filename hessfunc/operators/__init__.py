"""Curvature matrices of a loss over a data set as linear operators on the flat parameter
vector: one base (:mod:`.base`), the data and batch weights (:mod:`.data`), the Hessian
(:mod:`.hessian`), the Gauss-Newton and Fisher matrices (:mod:`.ggn`) and K-FAC
(:mod:`.kfac`)."""

from .base import CurvatureOperator
from .ggn import FisherOperator, GGNOperator
from .hessian import HessianOperator
from .kfac import KFACOperator

__all__ = ["CurvatureOperator", "FisherOperator", "GGNOperator", "HessianOperator",
           "KFACOperator"]
