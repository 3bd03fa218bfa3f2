"""Parameter-tree helpers: round trips, vmap, dtype and device."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import vmap

from hessfunc._tree import (
    flat_spec,
    one_hot_chunks,
    tree_add,
    tree_dot,
    tree_to_vector,
    vector_to_tree,
)

shapes = st.lists(st.lists(st.integers(1, 3), min_size=0, max_size=3), min_size=1, max_size=4)


@given(shapes, st.sampled_from([torch.float32, torch.float64]))
def test_round_trip_and_spec(shape_list, dtype):
    tree = {f"p{i}": torch.randn(tuple(s), dtype=dtype) for i, s in enumerate(shape_list)}
    spec = flat_spec(tree)
    vec = tree_to_vector(tree)
    assert vec.dtype == dtype and vec.shape == (spec.numel,)
    back = vector_to_tree(vec, spec)
    assert list(back) == list(tree)
    for k in tree:
        assert torch.equal(back[k], tree[k])
    assert spec.offsets[0] == 0
    assert all(a + n == b for a, n, b in zip(spec.offsets, spec.numels, spec.offsets[1:]))
    for name, sl in spec.slices().items():
        assert torch.equal(vec[sl], tree[name].reshape(-1))


@given(shapes)
def test_batched_vectors_and_vmap(shape_list):
    tree = {f"p{i}": torch.randn(tuple(s), dtype=torch.float64) for i, s in enumerate(shape_list)}
    spec = flat_spec(tree)
    V = torch.randn(5, spec.numel, dtype=torch.float64)
    batched = vector_to_tree(V, spec)
    via_vmap = vmap(lambda v: vector_to_tree(v, spec))(V)
    for k in tree:
        assert batched[k].shape == (5, *tree[k].shape)
        assert torch.equal(batched[k], via_vmap[k])
    assert torch.equal(vmap(tree_to_vector)(batched), V)
    dots = vmap(lambda t: tree_dot(t, tree))(batched)
    torch.testing.assert_close(dots, V @ tree_to_vector(tree))


@given(shapes, st.integers(1, 7))
def test_one_hot_chunks_cover_the_identity(shape_list, chunk):
    tree = {f"p{i}": torch.randn(tuple(s), dtype=torch.float64) for i, s in enumerate(shape_list)}
    spec = flat_spec(tree)
    rows = []
    for lo, hi, basis in one_hot_chunks(spec, chunk):
        assert hi - lo <= chunk
        assert all(t.dtype == torch.float64 for t in basis.values())
        rows.append(vmap(tree_to_vector)(basis))
    torch.testing.assert_close(torch.cat(rows), torch.eye(spec.numel, dtype=torch.float64))


def test_tuple_and_tensor_trees():
    t = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(tree_to_vector(t), torch.arange(6.0))
    assert torch.equal(vector_to_tree(torch.arange(6.0), t), t)
    tup = (torch.ones(2), torch.zeros(1, 2))
    back = vector_to_tree(tree_to_vector(tup), tup)
    assert isinstance(back, tuple) and back[1].shape == (1, 2)


def test_tree_add_is_leafwise():
    a = {"w": torch.ones(2, 2), "b": torch.zeros(3)}
    b = {"w": torch.full((2, 2), 2.0), "b": torch.ones(3)}
    out = tree_add(a, b, alpha=0.5)
    assert torch.equal(out["w"], torch.full((2, 2), 2.0))
    assert torch.equal(out["b"], torch.full((3,), 0.5))
