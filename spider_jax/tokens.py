"""Task tokens: class prototypes, padding buckets and masks.

A task is represented by its class prototypes: the per-class mean of
L2-normalised features (`task_token="prototype"`, Model Spider), the
prototype concatenated with the per-class, per-dimension standard deviation
of those features (`"prototype_spread"`, twice as wide), or the prototype
minus the mean of the task's prototypes (`"prototype_centered"`: the
task's offset in feature space, e.g. its image domain, is removed), or the
prototype followed by the class's and the task's training-image counts
(`"prototype_size"`, `size_features`: fine-tuned rankings change with the
amount of training data, which prototypes alone do not show). Tokens
are padded to a static *bucket* so that jit compiles once per bucket, and a
boolean mask marks the real rows.

Every function accepts numpy or JAX arrays and returns the same kind (numpy
in the host-side data pipeline, jnp under jit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Bucket sizes: powers of two and their 1.5x midpoints up to 256, then steps
# of 64 up to 1024, then powers of two and midpoints again: padding wastes
# at most a third of the tokens, and at most 64 of a few hundred (10 classes
# -> 12, 85 -> 96, 397 -> 448).
_BUCKETS = tuple(sorted(
    {b for p in range(3, 9) for b in (2 ** p, 3 * 2 ** (p - 1))
     if b <= 256} | set(range(320, 1025, 64)) |
    {b for p in range(10, 16) for b in (2 ** p, 3 * 2 ** (p - 1))}))


def _xp(x):
  return jnp if isinstance(x, jax.Array) else np


def bucket_size(n: int, minimum: int = 8) -> int:
  """Smallest bucket >= max(n, minimum) among 8, 12, 16, 24, 32, 48, 64, ...

  Args:
    n: number of real tokens (e.g. classes).
    minimum: the smallest bucket to use.

  Returns:
    The padded length.
  """
  n = max(int(n), int(minimum))
  for b in _BUCKETS:
    if b >= n:
      return b
  raise ValueError(f"{n} tokens exceed the largest bucket {_BUCKETS[-1]}.")


def l2_normalize(features, eps: float = 1e-12):
  """Rows divided by their L2 norm: [N, D] -> [N, D]."""
  xp = _xp(features)
  norm = xp.sqrt(xp.sum(features * features, axis=-1, keepdims=True))
  return features / xp.maximum(norm, eps)


def class_prototypes(features, labels, num_classes: int, *,
                     normalize: bool = True):
  """Per-class mean of (L2-normalised) features.

  Args:
    features: [N, D] float features.
    labels: [N] int in 0..num_classes-1.
    num_classes: C (static).
    normalize: L2-normalise each sample before averaging (Model Spider).

  Returns:
    [C, D] prototypes; a class without samples gives a zero row.
  """
  xp = _xp(features)
  x = l2_normalize(features) if normalize else features
  onehot = (labels[:, None] == xp.arange(num_classes)[None, :]).astype(x.dtype)
  sums = onehot.T @ x
  counts = onehot.sum(axis=0)[:, None]
  return sums / xp.maximum(counts, 1)


TASK_TOKENS = ("prototype", "prototype_spread", "prototype_centered",
               "prototype_size")


def token_dim(dim: int, task_token: str = "prototype") -> int:
  """Width of a task token built from D-wide features: D, 2 D or D + 2."""
  if task_token not in TASK_TOKENS:
    raise ValueError(f"unknown task_token {task_token!r}; use one of "
                     f"{TASK_TOKENS}.")
  if task_token == "prototype_size":
    return dim + 2
  return dim * (2 if task_token == "prototype_spread" else 1)


def size_features(counts):
  """Per-class size columns of `prototype_size` tokens.

  Args:
    counts: [C] training images per class (0 = absent class).

  Returns:
    [C, 2]: log2(1 + class count) / 10 and log2(1 + task count) / 10 (about
    0.1-1.1 for 1-2,000 images, the scale of a prototype's entries); zeros
    for absent classes.
  """
  xp = _xp(counts)
  counts = counts.astype(xp.float32)
  total = xp.broadcast_to(counts.sum(), counts.shape)
  cols = xp.stack([xp.log2(1.0 + counts), xp.log2(1.0 + total)], axis=1) / 10
  return xp.where(counts[:, None] > 0, cols, 0.0)


def class_tokens(features, labels, num_classes: int, *,
                 task_token: str = "prototype", counts=None):
  """One token per class: its prototype, optionally with its spread or size.

  Args:
    features: [N, D] float features.
    labels: [N] int in 0..num_classes-1.
    num_classes: C (static).
    task_token: "prototype" ([C, D] `class_prototypes`),
      "prototype_spread" ([C, 2 D]: prototype, then the per-dimension
      standard deviation of the class's L2-normalised features),
      "prototype_centered" ([C, D]: prototypes minus their mean over the
      classes that have samples) or "prototype_size" ([C, D + 2]:
      prototype, then `size_features(counts)`).
    counts: [C] training images per class for "prototype_size"; default
      the rows given. (Training passes the task's full counts while its
      prototypes come from a random subset of the rows.)

  Returns:
    [C, token_dim(D, task_token)]; a class without samples gives zeros.
  """
  token_dim(1, task_token)                       # validates the name
  protos = class_prototypes(features, labels, num_classes)
  if task_token == "prototype":
    return protos
  xp = _xp(features)
  if task_token == "prototype_size":
    if counts is None:
      counts = (labels[:, None] == xp.arange(num_classes)[None, :]).sum(0)
    return xp.concatenate([protos, size_features(xp.asarray(counts)
                                                 ).astype(protos.dtype)], 1)
  if task_token == "prototype_centered":  # Mean over non-empty classes.
    present = (labels[:, None] == xp.arange(num_classes)[None, :]).any(0)
    mean = (protos * present[:, None]).sum(0) / xp.maximum(present.sum(), 1)
    return xp.where(present[:, None], protos - mean, 0.0)
  x = l2_normalize(features)
  second = class_prototypes(x * x, labels, num_classes, normalize=False)
  spread = xp.sqrt(xp.maximum(second - protos * protos, 0.0))
  return xp.concatenate([protos, spread], axis=1)


def pad_tokens(tokens, length: int):
  """Zero-pads [C, D] tokens to [length, D] and returns (tokens, mask [length]).

  Raises:
    ValueError: if C > length.
  """
  xp = _xp(tokens)
  c = tokens.shape[0]
  if c > length:
    raise ValueError(f"{c} tokens do not fit a bucket of {length}; use a "
                     "larger bucket (tokens.bucket_size).")
  padded = xp.concatenate(
      [tokens, xp.zeros((length - c,) + tokens.shape[1:], tokens.dtype)], 0)
  mask = xp.arange(length) < c
  return padded, mask


def task_tokens(features, labels, num_classes: int, *,
                length: int | None = None, normalize: bool = True):
  """Padded, masked task tokens of one task.

  Args:
    features: [N, D] features of the task's (training) images.
    labels: [N] int in 0..num_classes-1.
    num_classes: C.
    length: padded length; default `bucket_size(C)`.
    normalize: L2-normalise samples before averaging.

  Returns:
    (tokens [length, D] float32, mask [length] bool).
  """
  length = bucket_size(num_classes) if length is None else length
  protos = class_prototypes(features, labels, num_classes, normalize=normalize)
  xp = _xp(protos)
  return pad_tokens(protos.astype(xp.float32), length)
