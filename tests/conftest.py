"""Test configuration: hypothesis profiles and shared fixtures.

``HYPOTHESIS_PROFILE=ci`` (default) keeps the suite to minutes on 2 cores and draws
fresh examples every run (not derandomised), so repeated CI runs explore more cases;
a failure prints its ``@reproduce_failure`` blob and is saved in ``.hypothesis/``,
which replays it first on the next run (``--hypothesis-seed=N`` fixes a whole run).
``HYPOTHESIS_PROFILE=thorough`` draws many more examples.
"""

from __future__ import annotations

import os
import sys
import weakref

import pytest
import torch
from hypothesis import HealthCheck, settings

import hessfunc.graph.curvature  # noqa: F401 - its trace caches are reset per test
import hessfunc.operators.hessian  # noqa: F401 - and its batched-or-looped choices

settings.register_profile(
    "ci", max_examples=15, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=4, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)


def pytest_report_header(config: pytest.Config) -> str:
    return (f"hypothesis: profile {os.environ.get('HYPOTHESIS_PROFILE', 'ci')}, "
            f"{settings.default.max_examples} examples a property, fresh draws; "
            "a failure prints @reproduce_failure and replays from .hypothesis/")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_trace_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts from empty trace caches and batched-or-looped choices. They are
    keyed by code or by function, and a test's own functions keep their code across runs
    in one process (a mutation tester's workers run the tests again after a clean run), so
    what an earlier run memoised would otherwise hide the code under test."""
    monkeypatch.setattr(sys.modules["hessfunc.graph.curvature"], "_CACHES",
                        weakref.WeakKeyDictionary())
    monkeypatch.setattr(sys.modules["hessfunc.operators.hessian"], "_CHOICES",
                        weakref.WeakKeyDictionary())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
