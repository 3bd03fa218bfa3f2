"""Test the test helpers: drawn problems are float64, finite, and have curvature."""

from __future__ import annotations

import torch
from _helpers import TOL, oracle_loss
from hypothesis import given

import hessfunc as hf
from hessfunc.testing.losses import LOSSES
from hessfunc.testing.strategies import KINDS, problems


@given(problems(kinds=KINDS, scales=(1.0,), freeze=True,
                loss_names=tuple(n for n in LOSSES if n != "huber")))
def test_problems_are_float64_with_nonzero_curvature(prob):
    """At scale 1 every kind and smooth loss has curvature (at the extreme scales a
    saturated network may have none, and Huber has none on a linear model whose residuals
    all pass delta: those draws test stability, not curvature)."""
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    assert all(t.dtype == torch.float64 for t in params.values())
    loss, leaves = oracle_loss(f, params, *prob.batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    H = hf.reference.hessian(loss, list(leaves.values()))
    assert H.abs().max() > 1e-8, f"{prob.name}: zero Hessian would make every test vacuous"


def test_tolerance_table_covers_both_dtypes():
    assert TOL[torch.float64][0] <= 1e-10
    assert TOL[torch.float32][0] < 1e-3
