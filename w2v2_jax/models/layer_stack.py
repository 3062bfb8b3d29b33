"""The encoder's two parameter forms, and the conversion between them.

Looped (model.scan_layers=False): encoder/layers_0 ... layers_{N-1}, HF's per-layer names. Scanned:
encoder/layers, every leaf stacked on a leading layer axis (logical name "layers"). The conversion applies
to any tree that holds parameter-shaped dicts: parameters, optimizer moments and masks, abstract states
(jax.ShapeDtypeStruct leaves keep their shardings, with the layer axis replicated).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_LOOPED = re.compile(r"layers_(\d+)$")


def is_scanned(tree) -> bool | None:
  """True if the tree's encoder parameters are stacked, False if per layer, None if it holds no encoder."""
  forms = {("layers" in enc) if "layers" in enc or "layers_0" in enc else None for enc in _encoders(tree)}
  forms.discard(None)
  if len(forms) > 1:
    raise ValueError("a tree holds encoder parameters in both the stacked and the per-layer form")
  return forms.pop() if forms else None


def _encoders(tree):
  """Every dict found under an "encoder" key, anywhere in the tree."""
  if isinstance(tree, dict):
    if isinstance(tree.get("encoder"), dict):
      yield tree["encoder"]
    for child in tree.values():
      yield from _encoders(child)
  elif (split := _children(tree)) is not None:
    for child in split[0]:
      yield from _encoders(child)


def to_form(tree, scanned: bool):
  """`tree` with every encoder's layers in the scanned (stacked) or looped (per-layer) form; a no-op if
  they already are. Works on arrays (numpy or jax, also under jit) and jax.ShapeDtypeStruct leaves."""
  return _convert(tree, scanned, None if scanned else _layer_count(tree))


def _convert(tree, scanned: bool, n: int | None):
  if isinstance(tree, dict):
    out = {k: _convert(v, scanned, n) for k, v in tree.items()}
    enc = out.get("encoder")
    if isinstance(enc, dict):
      out["encoder"] = _stack(enc) if scanned else _unstack(enc, n)
    return out
  split = _children(tree)
  if split is None:
    return tree
  children, treedef = split
  return treedef.unflatten([_convert(c, scanned, n) for c in children])


def _layer_count(tree) -> int | None:
  """The length of the stacked layer axis, read from every stacked encoder in the tree (a frozen
  part's optimizer slots hold no arrays, so they take it from the parameters)."""
  sizes = {
    _leading(x)
    for enc in _encoders(tree)
    if "layers" in enc
    for x in jax.tree.leaves(enc["layers"], is_leaf=_is_masked)
  }
  sizes.discard(None)
  if len(sizes) > 1:
    raise ValueError(f"stacked encoder layers disagree on the layer count: {sorted(sizes)}")
  return sizes.pop() if sizes else None


def _children(node):
  """A pytree node's immediate children and its treedef, or None for a leaf."""
  children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda c: c is not node)
  if treedef.num_leaves == 1 and children and children[0] is node:
    return None
  return children, treedef


def _stack(encoder: dict) -> dict:
  numbered = sorted((int(m.group(1)), k) for k in encoder if (m := _LOOPED.match(k)))
  if not numbered:
    return encoder
  if [i for i, _ in numbered] != list(range(len(numbered))):
    raise ValueError(f"encoder layers are not numbered 0..N-1: {[k for _, k in numbered][:8]}")
  rest = {k: v for k, v in encoder.items() if not _LOOPED.match(k)}
  layers = [encoder[k] for _, k in numbered]
  return {**rest, "layers": jax.tree.map(lambda *leaves: _stack_leaves(leaves), *layers, is_leaf=_is_masked)}


def _unstack(encoder: dict, n: int | None) -> dict:
  if "layers" not in encoder:
    return encoder
  stacked = encoder["layers"]
  if n is None:
    raise ValueError("stacked encoder layers without any array: the layer count is unknown")
  rest = {k: v for k, v in encoder.items() if k != "layers"}
  per_layer = {f"layers_{i}": jax.tree.map(lambda x, i=i: _index(x, i), stacked, is_leaf=_is_masked) for i in range(n)}
  return {**rest, **per_layer}


def _is_masked(x) -> bool:
  """optax's MaskedNode (a frozen parameter's empty optimizer slot) and None stay as they are."""
  return x is None or type(x).__name__ == "MaskedNode"


def _leading(x):
  return x.shape[0] if hasattr(x, "shape") and len(x.shape) else None


def _stack_leaves(leaves):
  first = leaves[0]
  masked = {_is_masked(x) for x in leaves}
  if len(masked) > 1:
    raise ValueError("some encoder layers are frozen and others not: the stacked form freezes all or none")
  if _is_masked(first):
    return first
  if isinstance(first, jax.ShapeDtypeStruct):
    sharding = first.sharding
    if isinstance(sharding, NamedSharding):
      sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=sharding)
  if isinstance(first, np.ndarray):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _index(x, i: int):
  if _is_masked(x):
    return x
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = x.sharding
    if isinstance(sharding, NamedSharding):
      spec = tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec))
      sharding = NamedSharding(sharding.mesh, P(*spec[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)
  return x[i]
