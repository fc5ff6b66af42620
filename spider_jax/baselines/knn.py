"""Leave-one-out k-NN accuracy (cosine) as a cheap transferability proxy.

Rows are L2-normalised; each sample is classified by a majority vote of its
k most similar *other* samples (ties broken towards the nearer neighbours);
the score is the fraction classified correctly. Similarities are computed
one block of rows at a time (`block` x N), so memory is O(block N).
The k neighbours of a block are selected by k rounds of (row max, first
column at the max, mask it): the order of a stable descending sort, which
is what `knn_loo_numpy` uses, at O(k N) per row. (`lax.top_k` on float64 is
a full sort on XLA:CPU, ~50x slower here.)
There is no common reference implementation (see baselines.md 3.14).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spider_jax.baselines import _common


def _core(f, aux, key, *, num_classes, k, block):
  del key
  n = f.shape[0]
  norm = jnp.linalg.norm(f, axis=1, keepdims=True)
  fn = f / jnp.maximum(norm, jnp.finfo(f.dtype).tiny)
  labels = aux["labels"]
  pad = (-n) % block
  fp = jnp.pad(fn, ((0, pad), (0, 0)))
  lp = jnp.pad(labels, (0, pad))
  cols = jax.lax.optimization_barrier(jnp.arange(n, dtype=jnp.int32))
  # Vote weight 1 + tiny rank bonus: majority first, then nearer neighbours.
  weights = 1.0 + 1e-3 * (k - jnp.arange(k)) / k

  def one_block(start):
    rows = jax.lax.dynamic_slice_in_dim(fp, start, block)
    sims = rows @ fn.T                                        # [block, N]
    idx = start + jnp.arange(block, dtype=jnp.int32)
    sims = jnp.where(idx[:, None] == cols[None, :], -jnp.inf, sims)
    nb = _common.top_k_first(sims, k, cols)                   # [block, k]
    votes = jnp.einsum("bk,bkc->bc", jnp.broadcast_to(weights, nb.shape),
                       jax.nn.one_hot(labels[nb], num_classes, dtype=f.dtype))
    pred = jnp.argmax(votes, axis=1)
    return pred == jax.lax.dynamic_slice_in_dim(lp, start, block)

  starts = jnp.arange(0, n + pad, block)
  correct = jax.lax.map(one_block, starts).reshape(-1)[:n]
  return jnp.mean(correct.astype(f.dtype))


def _prepare(labels, num_classes, *, k=5, block=512):
  n = labels.shape[0]
  if not 1 <= k < n:
    raise _common.BaselineError(f"k-NN needs 1 <= k < N={n}, got k={k}.")
  return _common.basic_aux(labels, num_classes), {
      "num_classes": num_classes, "k": int(k),
      "block": int(min(block, n))}


KERNEL = _common.Kernel(_core, _prepare)


def knn_loo(features, labels, *, key=None, k: int = 5) -> jax.Array:
  """Leave-one-out k-NN accuracy with cosine similarity.

  Args:
    features: [N, D] penultimate features.
    labels: [N] integer class ids.
    key: unused.
    k: neighbours per vote.

  Returns:
    [] accuracy in [0, 1], higher = better.
  """
  return _common.score_one(KERNEL, features, labels, key=key, name="knn_loo",
                           k=k)


def knn_loo_numpy(features: np.ndarray, labels: np.ndarray, k: int = 5
                  ) -> float:
  """Plain numpy transcription of `knn_loo` (for tests and benchmarks)."""
  y = np.unique(labels, return_inverse=True)[1]
  c = int(y.max()) + 1
  f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True),
                            np.finfo(np.float64).tiny)
  sims = f @ f.T
  np.fill_diagonal(sims, -np.inf)
  nb = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  w = 1.0 + 1e-3 * (k - np.arange(k)) / k
  votes = np.zeros((f.shape[0], c))
  for j in range(k):
    votes[np.arange(f.shape[0]), y[nb[:, j]]] += w[j]
  return float(np.mean(np.argmax(votes, axis=1) == y))
