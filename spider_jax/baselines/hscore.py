"""H-score (Bao et al., ICIP 2019) and regularized H-score (Ibrahim et al.).

  H = tr(cov(F)^+ cov(G)),  row i of G = mean feature of class y_i,

with both covariances at ddof = 1 and numpy's `pinv(rcond=1e-15)`, as TLlib
`h_score` and Model Spider `H_Score`. Computed without forming G:
cov(G) = sum_c n_c (mu_c - mu)(mu_c - mu)^T / (N - 1), so
H = sum_c n_c |Lambda^{-1/2} V^T (mu_c - mu)|^2 / (N - 1) from one eigh of
cov(F). (google-research stable_transfer multiplies element-wise instead of
matrix-multiplying; that bug is *not* reproduced.)

`hscore_regularized` is TLlib `regularized_h_score`: the feature covariance
is replaced by sklearn's Ledoit-Wolf shrinkage estimate
S_a = (1 - a) S + a tr(S)/D I (S biased), and cov(G) is scaled by (1 - a).
The Ledoit-Wolf coefficient is sklearn's `ledoit_wolf_shrinkage` formula
written out in O(N D^2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spider_jax.baselines import _common


def _between(fc, aux):
  """[C, D] centred class means and [C] counts of centred features."""
  counts = aux["counts"]
  sums = jax.ops.segment_sum(fc, aux["labels"], counts.shape[0])  # [C, D]
  return sums / counts[:, None], counts


def _trace_pinv_between(cov, mc, counts, n):
  inv, v = _common.pinv_hermitian_parts(cov)
  proj = mc @ v                                               # [C, D]
  return jnp.sum(counts[:, None] * proj * proj * inv[None, :]) / (n - 1)


def _hscore_core(f, aux, key, *, num_classes):
  del key, num_classes
  n = f.shape[0]
  fc = _common.centered(f)
  cov = fc.T @ fc / (n - 1)
  mc, counts = _between(fc, aux)
  return _trace_pinv_between(cov, mc, counts, n)


def ledoit_wolf(x: jax.Array):
  """sklearn `LedoitWolf(assume_centered=False).fit(x)`, O(N D^2).

  Args:
    x: [N, D] samples.

  Returns:
    (covariance [D, D] shrunk, shrinkage []).
  """
  n, d = x.shape
  x = _common.centered(x)
  emp = x.T @ x / n
  x2 = x * x
  emp_trace = jnp.sum(x2, axis=0) / n
  mu = jnp.sum(emp_trace) / d
  beta_ = jnp.sum(jnp.sum(x2, axis=1) ** 2)                   # sum(X2^T X2)
  delta_ = jnp.sum(emp * emp)                                 # |X^T X|^2/N^2
  beta = (beta_ / n - delta_) / (d * n)
  delta = (delta_ - 2.0 * mu * jnp.sum(emp_trace) + d * mu ** 2) / d
  beta = jnp.minimum(beta, delta)
  shrink = jnp.where(beta == 0, 0.0, beta / jnp.where(delta == 0, 1.0, delta))
  cov = (1.0 - shrink) * emp + shrink * mu * jnp.eye(d, dtype=x.dtype)
  return cov, shrink


def _hscore_reg_core(f, aux, key, *, num_classes):
  del key, num_classes
  n = f.shape[0]
  fc = _common.centered(f)
  cov, shrink = ledoit_wolf(fc)
  mc, counts = _between(fc, aux)
  return (1.0 - shrink) * _trace_pinv_between(cov, mc, counts, n)


HSCORE = _common.Kernel(_hscore_core, _common.default_prepare)
HSCORE_REGULARIZED = _common.Kernel(_hscore_reg_core, _common.default_prepare)


def hscore(features, labels, *, key=None) -> jax.Array:
  """H-score of one model.

  Args:
    features: [N, D] penultimate features.
    labels: [N] integer class ids.
    key: unused.

  Returns:
    [] tr(cov(F)^+ cov(G)), higher = better (C - 1 exactly when N <= D).
  """
  return _common.score_one(HSCORE, features, labels, key=key, name="hscore")


def hscore_regularized(features, labels, *, key=None) -> jax.Array:
  """Ledoit-Wolf regularized H-score of one model (TLlib).

  Args:
    features: [N, D] penultimate features.
    labels: [N] integer class ids.
    key: unused.

  Returns:
    [] regularized H-score, higher = better.
  """
  return _common.score_one(HSCORE_REGULARIZED, features, labels, key=key,
                           name="hscore_regularized")
