"""Parameter-tree helpers: a tree of tensors as one flat vector and back.

A *tree* is a tensor, or a dict / tuple / list nesting of tensors (what
``torch.func`` calls a pytree). hessfunc's flat ordering is the order of
``torch.utils._pytree.tree_flatten``, which for a parameter dict built from
``model.named_parameters()`` is the ``named_parameters`` order.

Everything here is plain tensor code (``reshape``, ``cat``, ``split``), so it
works under ``torch.func.vmap`` and keeps dtype and device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = [
    "FlatSpec",
    "flat_spec",
    "tree_to_vector",
    "vector_to_tree",
    "tree_dot",
    "tree_add",
    "tree_leaves",
    "one_hot_chunks",
]

Tree = Any


def tree_leaves(tree: Tree) -> list[torch.Tensor]:
    """The tensors of ``tree`` in flat order."""
    return pytree.tree_leaves(tree)


def tree_add(a: Tree, b: Tree, alpha: float = 1.0) -> Tree:
    """Leafwise ``a + alpha * b``."""
    return pytree.tree_map(lambda x, y: x + alpha * y, a, b)


def tree_dot(a: Tree, b: Tree) -> torch.Tensor:
    """Euclidean inner product ``<a, b> = sum_leaves sum(a * b)`` as a 0-d tensor."""
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"tree_dot: trees have {len(la)} and {len(lb)} leaves")
    return sum((x * y).sum() for x, y in zip(la, lb, strict=True))


@dataclass(frozen=True)
class FlatSpec:
    """Bookkeeping of a tree laid out as one flat vector of length ``numel``.

    Attributes:
        treespec: the pytree structure.
        names: a readable name per leaf (dict keys joined by ``.``, or indices).
        shapes: the shape of every leaf.
        numels: ``prod(shape)`` of every leaf.
        offsets: where every leaf starts in the flat vector.
        dtype, device: of the first leaf (flat vectors are built in it).
    """

    treespec: Any
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]
    offsets: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def numel(self) -> int:
        """Total number of scalars ``P``."""
        return sum(self.numels)

    def slices(self) -> dict[str, slice]:
        """``{leaf name: slice of the flat vector}``."""
        triples = zip(self.names, self.offsets, self.numels, strict=True)
        return {n: slice(o, o + k) for n, o, k in triples}


def _leaf_name(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts) if parts else "<tensor>"


def flat_spec(tree: Tree) -> FlatSpec:
    """Describe how ``tree`` maps onto a flat vector.

    Example:
        >>> spec = flat_spec({"w": torch.zeros(2, 3), "b": torch.zeros(2)})
        >>> spec.numel, spec.offsets, spec.names
        (8, (0, 6), ('w', 'b'))
    """
    paths_leaves, treespec = pytree.tree_flatten_with_path(tree)
    if not paths_leaves:
        raise ValueError("flat_spec: the tree has no tensors")
    names, shapes, numels, offsets = [], [], [], []
    offset = 0
    for path, leaf in paths_leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"flat_spec: leaf {_leaf_name(path)!r} is {type(leaf).__name__}, "
                            "expected a torch.Tensor")
        names.append(_leaf_name(path))
        shapes.append(leaf.shape)
        numels.append(leaf.numel())
        offsets.append(offset)
        offset += leaf.numel()
    first = paths_leaves[0][1]
    return FlatSpec(treespec, tuple(names), tuple(shapes), tuple(numels), tuple(offsets),
                    first.dtype, first.device)


def tree_to_vector(tree: Tree) -> torch.Tensor:
    """Concatenate the leaves of ``tree`` into one vector of shape ``(P,)``.

    Example:
        >>> tree_to_vector({"w": torch.ones(2, 2), "b": torch.zeros(1)})
        tensor([1., 1., 1., 1., 0.])
    """
    leaves = tree.values() if type(tree) is dict and _flat_dict(tree) else tree_leaves(tree)
    return torch.cat([leaf.reshape(-1) for leaf in leaves])


def vector_to_tree(vector: torch.Tensor, spec: FlatSpec | Tree) -> Tree:
    """Inverse of :func:`tree_to_vector`.

    ``vector`` has shape ``(..., P)``; each leaf gets shape ``(..., *leaf.shape)``,
    so a stack of ``k`` flat vectors becomes a tree of batched leaves.

    Example:
        >>> like = {"w": torch.zeros(2, 2), "b": torch.zeros(1)}
        >>> vector_to_tree(torch.arange(5.0), like)["w"]
        tensor([[0., 1.],
                [2., 3.]])
    """
    if not isinstance(spec, FlatSpec):
        spec = flat_spec(spec)
    if vector.shape[-1] != spec.numel:
        raise ValueError(f"vector_to_tree: vector has {vector.shape[-1]} entries in its last "
                         f"dimension, the tree has {spec.numel}")
    batch = vector.shape[:-1]
    pieces = torch.split(vector, spec.numels, dim=-1)
    leaves = [p.reshape((*batch, *s)) for p, s in zip(pieces, spec.shapes, strict=True)]
    treespec = spec.treespec
    if treespec.type is dict and treespec.num_nodes == len(leaves) + 1:  # a flat dict
        return dict(zip(treespec.context, leaves, strict=True))
    return pytree.tree_unflatten(leaves, treespec)


def _flat_dict(tree: dict[Any, Any]) -> bool:
    """Whether every value of the dict is a tensor (its values are then its leaves)."""
    return all(isinstance(v, torch.Tensor) for v in tree.values())


def one_hot_chunks(spec: FlatSpec, chunk_size: int | None = None, *, start: int = 0,
                   stop: int | None = None) -> Iterator[tuple[int, int, Tree]]:
    """Yield the standard basis ``e_start .. e_{stop-1}`` of the flat space in chunks.

    Each item is ``(lo, hi, basis)`` where ``basis`` is a tree like the spec whose
    leaves carry a leading dimension ``hi - lo``: row ``r`` is the one-hot vector
    ``e_{lo + r}``. Built in the spec's dtype and device.
    """
    stop = spec.numel if stop is None else stop
    chunk_size = stop - start if chunk_size is None else chunk_size
    for lo in range(start, stop, chunk_size):
        hi = min(lo + chunk_size, stop)
        rows = torch.arange(hi - lo, device=spec.device)
        basis = torch.zeros(hi - lo, spec.numel, dtype=spec.dtype, device=spec.device)
        basis[rows, rows + lo] = 1
        yield lo, hi, vector_to_tree(basis, spec)
