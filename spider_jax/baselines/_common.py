"""Shared plumbing for the transferability baselines.

Every baseline is a *kernel*: a traceable `core(x, aux, key, **static)` that
scores one model from its inputs `x` ([N, D] features or [N, S] source
probabilities), plus a host-side `prepare(labels, num_classes, **options)`
that turns the task labels into label-derived arrays `aux` (shared by every
model of a zoo) and hashable static options. `score_one` jits the core;
`score_many` jits `vmap(core)` over a stack of models with the same shape.

Precision: inputs are cast to the widest float JAX allows *at call time*
(float64 under `jax.enable_x64(True)`, float32 otherwise). This module never
touches `jax.config`; entry points (CLIs, benchmarks, tests) enable x64.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np


class BaselineError(ValueError):
  """Bad input to a transferability baseline (the message names the fix)."""


def float_dtype() -> np.dtype:
  """float64 when x64 is enabled (see `jax.enable_x64`), else float32."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


# ----------------------------------------------------------------------------
# Input checks (host side).


def check_labels(labels, n: int | None = None) -> tuple[np.ndarray, int]:
  """Validates labels and remaps them to 0..C-1 (`np.unique` order).

  Args:
    labels: [N] integer class ids, any values (e.g. {0, 3, 7}).
    n: expected N, or None.

  Returns:
    (labels [N] int32 in 0..C-1, C).

  Raises:
    BaselineError: not 1-D integers, wrong length, or fewer than 2 classes.
  """
  y = np.asarray(labels)
  if y.ndim != 1 or y.dtype.kind not in "iu":
    raise BaselineError(f"labels must be a 1-D integer array [N], got "
                        f"{y.dtype} {y.shape}; cast class ids to int.")
  if n is not None and y.shape[0] != n:
    raise BaselineError(f"labels have {y.shape[0]} rows but the inputs have "
                        f"{n}; pass one label per row.")
  classes, remapped = np.unique(y, return_inverse=True)
  if classes.size < 2:
    raise BaselineError(f"need at least 2 classes to score transferability, "
                        f"got {classes.size} ({classes.tolist()}).")
  return remapped.astype(np.int32).reshape(-1), int(classes.size)


def check_matrix(x, *, what: str, n: int | None = None,
                 probs: bool = False) -> np.ndarray:
  """Validates a finite 2-D [N, D] array; probabilities must be >= 0.

  Returns:
    The array as float64 numpy (cast to the JAX dtype later), or the
    `jax.Array` itself (checked on device, no host round trip).
  """
  if isinstance(x, jax.Array):
    if x.ndim != 2:
      raise BaselineError(f"{what} must be a 2-D [N, D] array, got shape "
                          f"{x.shape}.")
    if n is not None and x.shape[0] != n:
      raise BaselineError(f"{what} has {x.shape[0]} rows, expected {n}.")
    if not np.isfinite(float(jnp.sum(x))):
      raise BaselineError(f"{what} contains NaN/Inf values; fix the "
                          "extractor first.")
    if probs and float(jnp.min(x)) < 0:
      raise BaselineError(f"{what} must be probabilities (>= 0); pass "
                          "softmax(logits), not logits.")
    return x
  a = np.asarray(x)
  if a.ndim != 2:
    raise BaselineError(f"{what} must be a 2-D [N, D] array, got shape "
                        f"{a.shape}.")
  if a.dtype.kind not in "fiu":
    raise BaselineError(f"{what} must be numeric, got {a.dtype}.")
  if n is not None and a.shape[0] != n:
    raise BaselineError(f"{what} has {a.shape[0]} rows, expected {n}.")
  a = a.astype(np.float64, copy=False)
  if not np.isfinite(np.sum(a)) and not np.all(np.isfinite(a)):  # 1 pass
    raise BaselineError(f"{what} contains {int(np.sum(~np.isfinite(a)))} "
                        "NaN/Inf values; fix the extractor first.")
  if probs and a.size and np.min(a) < 0:
    raise BaselineError(f"{what} must be probabilities (>= 0); pass "
                        "softmax(logits), not logits.")
  return a


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """[C] float64 sample counts of contiguous labels."""
  return np.bincount(labels, minlength=num_classes).astype(np.float64)


def class_table(labels: np.ndarray, num_classes: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Row indices of each class, padded to the largest class.

  Args:
    labels: [N] int in 0..C-1.
    num_classes: C.

  Returns:
    (index [C, n_max] int32, mask [C, n_max] bool); padded slots point at
    row 0 and are masked out.
  """
  counts = np.bincount(labels, minlength=num_classes)
  n_max = int(counts.max())
  index = np.zeros((num_classes, n_max), np.int32)
  mask = np.zeros((num_classes, n_max), bool)
  order = np.argsort(labels, kind="stable")
  start = 0
  for c in range(num_classes):
    rows = order[start:start + counts[c]]
    index[c, :rows.size] = rows
    mask[c, :rows.size] = True
    start += counts[c]
  return index, mask


def basic_aux(labels: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
  """Label arrays most kernels need: labels [N], onehot [N, C], counts [C]."""
  dtype = float_dtype()
  return {
      "labels": labels.astype(np.int32),
      "onehot": np.eye(num_classes, dtype=dtype)[labels],
      "counts": class_counts(labels, num_classes).astype(dtype),
  }


# ----------------------------------------------------------------------------
# Kernels.


@dataclasses.dataclass(frozen=True)
class Kernel:
  """A baseline as a jittable core plus host-side label preparation.

  Attributes:
    core: `core(x, aux, key, **static) -> []` for one model.
    prepare: `prepare(labels, num_classes, **options) -> (aux, static)`;
      `aux` is a pytree of label-derived arrays, `static` a dict of hashables.
    input: "features" ([N, D]) or "source_probs" ([N, S]).
    needs_key: whether the core consumes a PRNG key.
    batched: optional override `batched(x [M, N, D], labels, num_classes,
      keys, **options) -> [M]` for kernels with data-dependent shapes.
    check: optional `check(input_dim, **options)` raising BaselineError.
  """
  core: Callable[..., jax.Array]
  prepare: Callable[..., tuple[Any, Mapping[str, Any]]]
  input: str = "features"
  needs_key: bool = False
  batched: Callable[..., jax.Array] | None = None
  check: Callable[..., None] | None = None


def default_prepare(labels, num_classes, **options):
  """`basic_aux` plus `num_classes` and the options as static arguments."""
  return basic_aux(labels, num_classes), {"num_classes": num_classes,
                                          **options}


@functools.lru_cache(maxsize=256)
def _compiled(core, static_items: tuple, batched: bool):
  fn = functools.partial(core, **dict(static_items))
  if batched:
    fn = jax.vmap(fn, in_axes=(0, None, 0))
  return jax.jit(fn)


def _check_key(kernel: Kernel, key, name: str):
  if kernel.needs_key and key is None:
    raise BaselineError(f"{name} is randomised: pass an explicit PRNG key, "
                        "e.g. key=jax.random.key(0).")
  if not kernel.needs_key:
    return None
  return key


def score_one(kernel: Kernel, x, labels, *, key=None, name: str = "baseline",
              **options) -> jax.Array:
  """Scores one model.

  Args:
    kernel: the baseline.
    x: [N, D] features or [N, S] source probabilities (`kernel.input`).
    labels: [N] integer labels (remapped to 0..C-1).
    key: PRNG key when `kernel.needs_key`.
    name: method name for error messages.
    **options: method options (static).

  Returns:
    [] score, higher = predicted to transfer better.
  """
  key = _check_key(kernel, key, name)
  y, c = check_labels(labels)
  x = check_matrix(x, what=kernel.input, n=y.shape[0],
                   probs=kernel.input == "source_probs")
  if kernel.check is not None:
    kernel.check(x.shape[1], **options)
  if kernel.batched is not None:
    keys = None if key is None else key[None]
    return kernel.batched(x[None], y, c, keys, **options)[0]
  aux, static = kernel.prepare(y, c, **options)
  xj = jnp.asarray(x, float_dtype())
  return _compiled(kernel.core, tuple(sorted(static.items())), False)(
      xj, aux, key)


def score_many(kernel: Kernel, xs, labels, *, keys=None,
               name: str = "baseline", **options) -> jax.Array:
  """Scores M models with equal input shapes in one compiled call.

  Args:
    kernel: the baseline.
    xs: [M, N, D] stacked inputs of M models.
    labels: [N] integer labels.
    keys: [M] PRNG keys when `kernel.needs_key`, else None.
    name: method name for error messages.
    **options: method options (static).

  Returns:
    [M] scores.
  """
  if kernel.needs_key and keys is None:
    raise BaselineError(f"{name} is randomised: pass one PRNG key per model.")
  y, c = check_labels(labels)
  xs = np.asarray(xs)
  if xs.ndim != 3 or xs.shape[1] != y.shape[0]:
    raise BaselineError(f"expected stacked inputs [M, N={y.shape[0]}, D], "
                        f"got {xs.shape}.")
  for i in range(xs.shape[0]):
    check_matrix(xs[i], what=f"{kernel.input} of model {i}",
                 probs=kernel.input == "source_probs")
  if kernel.check is not None:
    kernel.check(xs.shape[2], **options)
  keys = keys if kernel.needs_key else None
  if kernel.batched is not None:
    return kernel.batched(xs.astype(np.float64), y, c, keys, **options)
  aux, static = kernel.prepare(y, c, **options)
  xj = jnp.asarray(xs, float_dtype())
  return _compiled(kernel.core, tuple(sorted(static.items())), True)(
      xj, aux, keys)


# ----------------------------------------------------------------------------
# Small numerical helpers used by several kernels.


def centered(x: jax.Array) -> jax.Array:
  """[N, D] -> [N, D] minus the column means."""
  return x - jnp.mean(x, axis=0, keepdims=True)


def class_means(x: jax.Array, onehot: jax.Array,
                counts: jax.Array) -> jax.Array:
  """[N, D], [N, C], [C] -> [C, D] per-class means."""
  return (onehot.T @ x) / counts[:, None]


def pinv_hermitian_parts(a: jax.Array, rcond: float = 1e-15):
  """Eigen-decomposed pseudo-inverse of a symmetric matrix (numpy rcond rule).

  Args:
    a: [D, D] symmetric.
    rcond: singular values below rcond * max are treated as zero.

  Returns:
    (inv_eigenvalues [D], eigenvectors [D, D]): pinv(a) = V diag(inv) V^T.
  """
  lam, v = jnp.linalg.eigh(a)
  cutoff = rcond * jnp.max(jnp.abs(lam))
  keep = jnp.abs(lam) > cutoff
  inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
  return inv, v
