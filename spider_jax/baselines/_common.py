"""Shared plumbing for the transferability baselines.

Every baseline is a *kernel*: a traceable `core(x, aux, key, **static)` that
scores one model from its inputs `x` ([N, D] features or [N, S] source
probabilities), plus a host-side `prepare(labels, num_classes, **options)`
that turns the task labels into label-derived arrays `aux` (shared by every
model of a zoo) and hashable static options. `score_one` jits the core
together with the input's NaN/Inf (and negative-probability) check, so one
call is one compiled dispatch; the prepared label arrays are memoised on the
device per labelling. `score_many` jits `vmap(core)` over a stack of models
with the same shape.

Precision: inputs are cast to the widest float JAX allows *at call time*
(float64 under `jax.enable_x64(True)`, float32 otherwise). This module never
touches `jax.config`; entry points (CLIs, benchmarks, tests) enable x64.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
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

  Non-negative ids with a modest range (the usual case) are remapped with
  one `np.bincount` pass instead of `np.unique`'s sort.

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
  if y.size and y.min() >= 0 and y.max() < max(4 * y.size, 1 << 16):
    present = np.bincount(y) > 0
    c = int(np.count_nonzero(present))
    if c == present.size:                       # already 0..C-1
      remapped = y.astype(np.int32)
    else:
      remapped = (np.cumsum(present, dtype=np.int32) - 1)[y]
  else:
    classes, remapped = np.unique(y, return_inverse=True)
    c = int(classes.size)
    remapped = remapped.astype(np.int32).reshape(-1)
  if c < 2:
    raise BaselineError(f"need at least 2 classes to score transferability, "
                        f"got {c} ({np.unique(y).tolist()}).")
  return remapped, c


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
  if probs or not np.isfinite(np.sum(a)):  # One pass for finite features.
    err = _value_error(a, what=what, probs=probs)
    if err is not None:
      raise err
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
  """Label arrays most kernels need: labels [N] int32, counts [C] float.

  The one-hot matrix is built inside the kernels (`onehot`), so the
  label-derived arrays stay O(N + C).
  """
  return {
      "labels": labels.astype(np.int32),
      "counts": class_counts(labels, num_classes).astype(float_dtype()),
  }


def onehot(labels: jax.Array, num_classes: int, dtype) -> jax.Array:
  """[N] int labels -> [N, C] one-hot matrix of `dtype` (traceable)."""
  return (labels[:, None] == jnp.arange(num_classes, dtype=labels.dtype)
          ).astype(dtype)


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
    checks_values: the core itself returns NaN when its input holds NaN/Inf
      (or a negative probability), from reductions it needs anyway, so
      `score_one` adds no check pass of its own.
  """
  core: Callable[..., jax.Array]
  prepare: Callable[..., tuple[Any, Mapping[str, Any]]]
  input: str = "features"
  needs_key: bool = False
  batched: Callable[..., jax.Array] | None = None
  check: Callable[..., None] | None = None
  checks_values: bool = False


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


@functools.lru_cache(maxsize=256)
def _compiled_checked(core, static_items: tuple, probs: bool,
                      core_checks: bool = False):
  """One jitted call: cast, on-device input check, and the kernel.

  Returns `(score, ok)`; `ok` is False when the input holds NaN/Inf (or,
  with `probs`, a negative value), in which case the kernel is skipped
  (`lax.cond`) and the score is NaN. The check is two full reductions (no
  host round trip before the kernel runs). With `core_checks`
  (`Kernel.checks_values`) the core does the check and `ok` is
  `isfinite(score)`.
  """
  fn = functools.partial(core, **dict(static_items))

  def run(x, aux, key):
    x = x.astype(float_dtype())
    if core_checks:
      score = fn(x, aux, key)
      return score, jnp.all(jnp.isfinite(score))
    ok = jnp.isfinite(jnp.sum(x))
    if probs:
      ok = ok & (jnp.min(x, initial=0.0) >= 0)      # NaN compares False
    out = jax.eval_shape(fn, x, aux, key)
    score = jax.lax.cond(
        ok, fn, lambda *_: jnp.full(out.shape, jnp.nan, out.dtype),
        x, aux, key)
    return score, ok

  return jax.jit(run)


_AUX_CACHE: collections.OrderedDict = collections.OrderedDict()
_AUX_CACHE_SIZE = 32
_AUX_LOCK = threading.Lock()


def _prepared(kernel: Kernel, labels: np.ndarray, num_classes: int,
              options: Mapping[str, Any]):
  """`kernel.prepare` with its arrays on the device, memoised per labels.

  Repeated calls on the same task (one per model of a zoo) reuse the
  device-resident label arrays instead of rebuilding and copying them.
  """
  try:
    ck = (kernel.prepare, num_classes, np.dtype(float_dtype()).str,
          labels.tobytes(), tuple(sorted(options.items())))
    hash(ck)
  except TypeError:                                  # unhashable option
    ck = None
  if ck is not None:
    with _AUX_LOCK:
      hit = _AUX_CACHE.get(ck)
      if hit is not None:
        _AUX_CACHE.move_to_end(ck)
        return hit
  aux, static = kernel.prepare(labels, num_classes, **options)
  entry = (jax.tree.map(jnp.asarray, aux), static)
  if ck is not None:
    with _AUX_LOCK:
      _AUX_CACHE[ck] = entry
      while len(_AUX_CACHE) > _AUX_CACHE_SIZE:
        _AUX_CACHE.popitem(last=False)
  return entry


def _check_key(kernel: Kernel, key, name: str):
  if kernel.needs_key and key is None:
    raise BaselineError(f"{name} is randomised: pass an explicit PRNG key, "
                        "e.g. key=jax.random.key(0).")
  if not kernel.needs_key:
    return None
  return key


def _check_shape(x, *, what: str, n: int):
  """Host-side shape / dtype checks of a 2-D input (no pass over values).

  Returns:
    x itself when it is a `jax.Array`, else `np.asarray(x)`.
  """
  if not isinstance(x, jax.Array):
    x = np.asarray(x)
  if x.ndim != 2:
    raise BaselineError(f"{what} must be a 2-D [N, D] array, got shape "
                        f"{x.shape}.")
  if np.dtype(x.dtype).kind not in "fiu":
    raise BaselineError(f"{what} must be numeric, got {x.dtype}.")
  if x.shape[0] != n:
    raise BaselineError(f"{what} has {x.shape[0]} rows, expected {n}.")
  return x


# Smallest non-zero row max of source probabilities that NCE's arithmetic
# first-argmax orders exactly (a softmax row's max is >= 1/S).
MIN_PROB_ROW_MAX = 2.0 ** -900


def _value_error(x, *, what: str, probs: bool) -> BaselineError | None:
  """The exact (host) value check, run only when the device check fails."""
  a = np.asarray(x, dtype=np.float64)
  bad = int(np.sum(~np.isfinite(a)))
  if bad:
    return BaselineError(f"{what} contains {bad} NaN/Inf values; fix the "
                         "extractor first.")
  if probs and a.size and np.min(a) < 0:
    return BaselineError(f"{what} must be probabilities (>= 0); pass "
                         "softmax(logits), not logits.")
  if probs and a.size:
    row_max = np.max(a, axis=1)
    tiny = int(np.sum((row_max > 0) & (row_max < MIN_PROB_ROW_MAX)))
    if tiny:
      return BaselineError(
          f"{what} has {tiny} rows whose largest value is below 2^-900 but "
          "not 0; these are not probabilities (a softmax row's max is >= "
          "1/S): pass softmax(logits).")
  return None


def score_one(kernel: Kernel, x, labels, *, key=None, name: str = "baseline",
              **options) -> jax.Array:
  """Scores one model.

  The input check (NaN/Inf, negative probabilities) runs on the device in
  the same compiled call as the kernel; label arrays are prepared once per
  distinct labelling and kept on the device (`_prepared`).

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
  probs = kernel.input == "source_probs"
  if kernel.batched is not None:
    x = check_matrix(x, what=kernel.input, n=y.shape[0], probs=probs)
    if kernel.check is not None:
      kernel.check(x.shape[1], **options)
    keys = None if key is None else key[None]
    return kernel.batched(x[None], y, c, keys, **options)[0]
  x = _check_shape(x, what=kernel.input, n=y.shape[0])
  if kernel.check is not None:
    kernel.check(x.shape[1], **options)
  aux, static = _prepared(kernel, y, c, options)
  static_items = tuple(sorted(static.items()))
  score, ok = _compiled_checked(kernel.core, static_items, probs,
                                kernel.checks_values)(x, aux, key)
  if not bool(ok):
    err = _value_error(x, what=kernel.input, probs=probs)
    if err is not None:
      raise err
    # False alarm (a sum of finite values overflowed): run unchecked.
    return _compiled(kernel.core, static_items, False)(
        jnp.asarray(x, float_dtype()), aux, key)
  return score


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
  aux, static = _prepared(kernel, y, c, options)
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


def top_k_first(sims: jax.Array, k: int, cols: jax.Array) -> jax.Array:
  """Column indices of the k largest entries of each row, ties to lower index.

  Args:
    sims: [B, N] finite values (-inf entries are never picked while k finite
      entries remain).
    k: static number of columns.
    cols: [N] int32 `arange(N)` (pass it through `optimization_barrier`).

  Returns:
    [B, k] int32, row i = the first k of `argsort(-sims[i], kind="stable")`.
  """
  n = sims.shape[1]
  picked = []
  for j in range(k):
    m = jnp.max(sims, axis=1, keepdims=True)
    i = jnp.min(jnp.where(sims == m, cols[None, :], n), axis=1)
    picked.append(i)
    if j + 1 < k:
      sims = jnp.where(cols[None, :] == i[:, None], -jnp.inf, sims)
  return jnp.stack(picked, axis=1)


def gram(a: jax.Array, *, rows: bool = False) -> jax.Array:
  """Symmetric Gram matrix a^T a ([D, D]), or a a^T ([N, N]) with `rows`.

  On CPU, XLA's dot has no symmetric rank-k update (numpy's `f.T @ f` uses
  BLAS syrk, half the flops). Here the output is split into nb x nb blocks
  (nb <= 8, width >= ~128); only the nb (nb + 1) / 2 upper blocks are
  multiplied, each as a product of two contiguous row blocks of a^T (one
  transposed copy of `a`), and mirrored. For [5000, 1024] float64 that is
  ~1.7x faster than `a.T @ a`. Elsewhere (GPU / TPU) it is one product.

  Args:
    a: [N, D].
    rows: contract over D instead (a a^T).

  Returns:
    [D, D] (or [N, N]) symmetric matrix.
  """
  at = a if rows else a.T                  # the rows of `at` are contracted
  d = at.shape[0]
  nb = min(8, max(1, round(d / 128)))
  if nb == 1 or jax.default_backend() != "cpu":
    return at @ at.T
  edges = np.linspace(0, d, nb + 1).round().astype(int)
  blocks = [at[edges[i]:edges[i + 1]] for i in range(nb)]
  blk = {(i, j): blocks[i] @ blocks[j].T
         for i in range(nb) for j in range(i, nb)}
  return jnp.block([[blk[i, j] if j >= i else blk[j, i].T for j in range(nb)]
                    for i in range(nb)])


def eigh(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(eigenvalues [D] in LAPACK's order, eigenvectors [D, D]) of a symmetric
  matrix: one syevd, without jnp.linalg.eigh's symmetrisation and re-sort."""
  v, w = jax.lax.linalg.eigh(a, symmetrize_input=False,
                             sort_eigenvalues=False)
  return w, v
