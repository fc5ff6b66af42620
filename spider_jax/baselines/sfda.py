"""SFDA (Shao et al., ECCV 2022), TencentARC/SFDA `SFDA_Score`.

1. Fit a shrunk LDA: S_w = sum_c pi_c cov_c (biased), shrinkage
   lam = max(exp(-5 a), 1e-10) with a the top eigenvalue of S_w from three
   power-iteration rounds (`iterative_A`), S_w~ = (1-lam) S_w + lam tr/D I.
   Because the reference keeps all D generalized eigenvectors,
   coef = M V V^T = M S_w~^{-1}; it is computed with a Cholesky solve.
   p = softmax(X coef^T + b), b_c = -1/2 mu_c coef_c + log pi_c.
2. "Soften" p with a second softmax, ConfMix every sample towards the mean
   of the *other* class means: x <- p_y x + (1 - p_y) mu_{-y}.
3. Refit with the same lam; score = mean_i p(y_i | x_i) (no log).

Deviations: no in-place mutation of the caller's features; labels are
remapped to 0..C-1 first (the reference fails on non-contiguous labels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from spider_jax.baselines import _common


def _top_eigenvalue(a):
  x = jnp.sum(a, axis=1)
  def body(_, carry):
    x, _ = carry
    t = a @ x
    y = t / jnp.linalg.norm(t)
    t = a @ y
    return t / jnp.linalg.norm(t), y
  x, y = jax.lax.fori_loop(0, 3, body, (x, x))
  return x @ a @ y


def _lda_probs(x, onehot, counts, lam=None):
  n, d = x.shape
  means = _common.class_means(x, onehot, counts)              # [C, D]
  r = x - onehot @ means
  sw = r.T @ r / n
  if lam is None:
    lam = jnp.maximum(jnp.exp(-5.0 * _top_eigenvalue(sw)), 1e-10)
  sws = (1.0 - lam) * sw + lam * jnp.trace(sw) / d * jnp.eye(d, dtype=x.dtype)
  coef_t = jsl.cho_solve(jsl.cho_factor(sws, lower=True), means.T)  # [D, C]
  intercept = -0.5 * jnp.sum(means * coef_t.T, axis=1) + jnp.log(counts / n)
  return jax.nn.softmax(x @ coef_t + intercept, axis=1), lam


def _core(f, aux, key, *, num_classes):
  del key
  counts = aux["counts"]
  y = _common.onehot(aux["labels"], num_classes, f.dtype)     # [N, C]
  p, lam = _lda_probs(f, y, counts)
  p = jax.nn.softmax(p, axis=1)
  means = _common.class_means(f, y, counts)
  others = (jnp.sum(means, axis=0)[None] - means) / (num_classes - 1)
  p_y = jnp.sum(p * y, axis=1, keepdims=True)
  mixed = p_y * f + (1.0 - p_y) * (y @ others)
  p2, _ = _lda_probs(mixed, y, counts, lam)
  return jnp.mean(jnp.sum(p2 * y, axis=1))


KERNEL = _common.Kernel(_core, _common.default_prepare)


def sfda(features, labels, *, key=None) -> jax.Array:
  """SFDA score of one model.

  Args:
    features: [N, D] penultimate features.
    labels: [N] integer class ids.
    key: unused.

  Returns:
    [] mean probability of the true class after ConfMix, in (0, 1].
  """
  return _common.score_one(KERNEL, features, labels, key=key, name="sfda")
