"""Doctest namespace: docstring examples may use torch, nn, F and hf unimported."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessfunc as hf


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace: dict) -> None:
    doctest_namespace.update(torch=torch, nn=nn, F=F, hf=hf)
