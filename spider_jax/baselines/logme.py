"""LogME (You et al., ICML 2021; fast fixed point of the JMLR 2022 extension).

LogME = mean over classes c of the maximised Bayesian evidence, per sample,
of a linear model t_c = 1[y = c] ~ N(F w, 1/beta), w ~ N(0, 1/alpha):

  L = D/2 log a + N/2 log b - 1/2 sum_{i<=D} log(a + b s_i) - b/2 |Fm - t|^2
      - a/2 |m|^2 - N/2 log 2pi,          s_i = eigenvalues of F^T F.

* `logme` is thuml's default `_fit_fixed_point` (11 MacKay steps, early break
  when |a/b - t|/t <= 1e-3, 1e-5 in the updates). One eigen-decomposition
  of F^T F (of F F^T when N <= D) is shared by all classes, which
  are updated together with a per-class `done` mask that reproduces the
  reference's early break exactly. For N <= D the eigenvectors of F F^T
  replace thuml's thin SVD of F (same U and singular values, several times
  cheaper).
* `logme_icml` is the ICML algorithm (`_fit_icml`: break when the relative
  change of a/b is < 0.01, epsilons in the evidence).

Deviation from thuml (PR #24): the reference's fast path sums log(a + b s_i)
over only the k = min(N, D) kept directions and so misses
-(D - k)/2 log a whenever N < D. Here the sum always runs over all D
eigenvalues (0 for directions F does not span), which equals the ICML value
and the golden `logme_fast_corrected`; for N > D with full rank it is
identical to the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spider_jax.baselines import _common

_LOG_2PI = float(np.log(2.0 * np.pi))


def _logme_fast_core(f, aux, key, *, num_classes):
  del key, num_classes
  n, d = f.shape
  y = aux["onehot"]                                       # [N, C]
  if n > d:
    sigma, v = jnp.linalg.eigh(f.T @ f)                   # [D], [D, D]
    sigma = jnp.maximum(sigma, 0.0)
    s = jnp.sqrt(sigma)
    keep = s > 1e-10                                      # thuml's truncation
    x = (v.T @ (f.T @ y)) / jnp.where(keep, s, 1.0)[:, None]   # U^T Y, [D, C]
    x = jnp.where(keep[:, None], x, 0.0)
    sigma = jnp.where(keep, sigma, 0.0)
  else:                                                  # k = N
    sigma, u = jnp.linalg.eigh(f @ f.T)                   # = thin SVD of F
    sigma = jnp.maximum(sigma, 0.0)
    x = u.T @ y                                           # [k, C]
  k = sigma.shape[0]
  x2 = x * x
  res_x2 = aux["counts"] - jnp.sum(x2, axis=0)            # |t|^2 - |x|^2, [C]
  sig = sigma[:, None]

  def step(_, state):
    alpha, beta, m2, res2, done = state
    t = alpha / beta
    gamma = jnp.sum(sig / (sig + t), axis=0)
    m2_n = jnp.sum(sig * x2 / (t + sig) ** 2, axis=0)
    res2_n = jnp.sum(x2 / (1.0 + sig / t) ** 2, axis=0) + res_x2
    alpha_n = gamma / (m2_n + 1e-5)
    beta_n = (n - gamma) / (res2_n + 1e-5)
    conv = jnp.abs(alpha_n / beta_n - t) / t <= 1e-3
    upd = ~done
    return (jnp.where(upd, alpha_n, alpha), jnp.where(upd, beta_n, beta),
            jnp.where(upd, m2_n, m2), jnp.where(upd, res2_n, res2),
            done | conv)

  c = y.shape[1]
  ones = jnp.ones((c,), f.dtype)
  init = (ones, ones, 0.0 * ones, 0.0 * ones, jnp.zeros((c,), bool))
  alpha, beta, m2, res2, _ = jax.lax.fori_loop(0, 11, step, init)
  log_det = (jnp.sum(jnp.log(alpha + beta * sig), axis=0)
             + (d - k) * jnp.log(alpha))                  # all D directions
  evidence = (d / 2.0 * jnp.log(alpha) + n / 2.0 * jnp.log(beta)
              - 0.5 * log_det - beta / 2.0 * res2 - alpha / 2.0 * m2
              - n / 2.0 * _LOG_2PI) / n
  return jnp.mean(evidence)


def _logme_icml_core(f, aux, key, *, num_classes):
  del key, num_classes
  n, d = f.shape
  eps = 1e-5
  y = aux["onehot"]
  if n >= d:
    lam, v = jnp.linalg.eigh(f.T @ f)
    tmp = v.T @ (f.T @ y)                                 # V^T F^T t, [D, C]
  else:  # Nonzero spectrum from F F^T; the other D - N eigenvalues are 0.
    lam, u = jnp.linalg.eigh(f @ f.T)
    tmp = jnp.sqrt(jnp.maximum(lam, 0.0))[:, None] * (u.T @ y)
  s = jnp.abs(lam)[:, None]                 # singular values of F^T F
  k = lam.shape[0]
  yy = aux["counts"]                                      # |t|^2, [C]

  def step(_, state):
    alpha, beta, lam_, a_de, b_de, done = state
    gamma = jnp.sum(s / (s + lam_), axis=0)
    z = tmp * beta / (alpha + beta * s)                   # V^T m
    a_de_n = jnp.sum(z * z, axis=0)                       # |m|^2
    alpha_n = gamma / (a_de_n + eps)
    b_de_n = yy - 2.0 * jnp.sum(tmp * z, axis=0) + jnp.sum(lam[:, None] * z * z,
                                                           axis=0)
    beta_n = (n - gamma) / (b_de_n + eps)
    new_lam = alpha_n / beta_n
    conv = jnp.abs(new_lam - lam_) / lam_ < 0.01
    upd = ~done
    return (jnp.where(upd, alpha_n, alpha), jnp.where(upd, beta_n, beta),
            jnp.where(upd & ~conv, new_lam, lam_),
            jnp.where(upd, a_de_n, a_de), jnp.where(upd, b_de_n, b_de),
            done | conv)

  c = y.shape[1]
  ones = jnp.ones((c,), f.dtype)
  init = (ones, ones, ones, 0.0 * ones, 0.0 * ones, jnp.zeros((c,), bool))
  alpha, beta, _, a_de, b_de, _ = jax.lax.fori_loop(0, 11, step, init)
  log_det = jnp.sum(jnp.log(alpha + beta * s), axis=0) + (d - k) * jnp.log(
      alpha)
  evidence = (d / 2.0 * jnp.log(alpha) + n / 2.0 * jnp.log(beta)
              - 0.5 * log_det - beta / 2.0 * (b_de + eps)
              - alpha / 2.0 * (a_de + eps) - n / 2.0 * _LOG_2PI) / n
  return jnp.mean(evidence)


FAST = _common.Kernel(_logme_fast_core, _common.default_prepare)
ICML = _common.Kernel(_logme_icml_core, _common.default_prepare)


def logme(features, labels, *, key=None) -> jax.Array:
  """LogME, thuml's fast fixed point with the full-D evidence (see module).

  Args:
    features: [N, D] penultimate features.
    labels: [N] integer class ids (any values; remapped to 0..C-1).
    key: unused (deterministic).

  Returns:
    [] mean per-sample log evidence, higher = better.
  """
  return _common.score_one(FAST, features, labels, key=key, name="logme")


def logme_icml(features, labels, *, key=None) -> jax.Array:
  """LogME with the ICML 2021 algorithm (`_fit_icml`).

  Args:
    features: [N, D] penultimate features.
    labels: [N] integer class ids.
    key: unused.

  Returns:
    [] mean per-sample log evidence, higher = better.
  """
  return _common.score_one(ICML, features, labels, key=key, name="logme_icml")
