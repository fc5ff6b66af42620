"""LogME (You et al., ICML 2021; fast fixed point of the JMLR 2022 extension).

LogME = mean over classes c of the maximised Bayesian evidence, per sample,
of a linear model t_c = 1[y = c] ~ N(F w, 1/beta), w ~ N(0, 1/alpha):

  L = D/2 log a + N/2 log b - 1/2 sum_{i<=D} log(a + b s_i) - b/2 |Fm - t|^2
      - a/2 |m|^2 - N/2 log 2pi,          s_i = eigenvalues of F^T F.

* `logme` is thuml's default `_fit_fixed_point` (11 MacKay steps, early break
  when |a/b - t|/t <= 1e-3, 1e-5 in the updates). The smaller Gram matrix
  (F^T F when N > D, as thuml's `truncated_svd`; F F^T otherwise, whose
  eigenvectors are thuml's thin-SVD U) is only tridiagonalised,
  G = Q T Q^T (LAPACK sytrd); the eigenvalues of T come from bisection,
  and thuml's per-class sums over the eigenbasis (|m|^2 and the residual,
  functions of U^T t) are written as resolvents (T + t I)^{-1} Q^T b, one
  batched tridiagonal solve per step (see `_spectral_terms`). U, V and the
  eigenvectors are never formed: syevd's back-transformation is most of an
  eigh's cost. All classes are updated together with a per-class `done`
  mask that reproduces the reference's early break exactly. Agrees with
  thuml's SVD formulas to ~1e-14.
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


def _class_sums(a, aux, num_classes):
  """[N, K] -> [K, C] = a^T Y (Y one-hot), by segment sums (no [N, C])."""
  return jax.ops.segment_sum(a, aux["labels"], num_classes).T


def _apply_qt(a_out, taus, b, block=32):
  """Q^T b for the reflectors of `lax.linalg.tridiagonal(lower=True)`.

  LAPACK sytrd (uplo = L): Q = H_0 ... H_{D-2}, H_i = I - tau_i v_i v_i^T,
  v_i = (0, ..., 0, 1 at i + 1, a_out[i + 2:, i]). Applied `block`
  reflectors at a time in compact WY form, H_j ... H_{j+b-1} = I - V T V^T
  with T^{-1} = diag(1 / tau) + strict_upper(V^T V) (Puglisi; Joffrain et
  al. 2006): all blocks' T come from one batched triangular solve, then a
  loop over the D / b blocks applies them with matrix products (O(D^2 C)),
  without forming Q. A reflector with tau = 0 (or padding) is the
  identity (v = 0, tau = 1).
  """
  dim = a_out.shape[0]
  k = dim - 1
  if k == 0:                                # 1 x 1: Q = I
    return b
  nblk = -(-k // block)
  kp = nblk * block
  v = (jnp.tril(a_out[:, :k], -2)
       + jnp.eye(dim, k, -1, dtype=a_out.dtype))           # [D, D - 1]
  live = taus != 0
  v = jnp.pad(v * live[None, :], ((0, 0), (0, kp - k)))    # [D, kp]
  tau = jnp.pad(jnp.where(live, taus, 1.0), (0, kp - k), constant_values=1.0)
  vbs = v.reshape(dim, nblk, block).transpose(1, 0, 2)     # [nblk, D, b]
  t_inv = (jnp.triu(jnp.einsum("kdi,kdj->kij", vbs, vbs), 1)
           + jax.vmap(jnp.diag)(1.0 / tau.reshape(nblk, block)))
  eye = jnp.broadcast_to(jnp.eye(block, dtype=v.dtype), t_inv.shape)
  t = jax.scipy.linalg.solve_triangular(t_inv, eye, lower=False)  # [nblk,b,b]

  def apply_block(i, b):                    # matrix products only
    vb = vbs[i]                             # [D, b], zero above row j0 + 1
    return b - vb @ (t[i].T @ (vb.T @ b))

  return jax.lax.fori_loop(0, nblk, apply_block, b)


def _spectral_terms(f, aux, num_classes):
  """The smaller Gram matrix G = Q T Q^T (sytrd), eigenvalues of T (bisection).

  N > D: G = F^T F (thuml's `truncated_svd`), b_c = F^T t_c; N <= D:
  G = F F^T (thuml's thin SVD of F), b_c = t_c. With c = Q^T b_c and
  z = (T + t I)^{-1} c, thuml's per-class sums over the eigenbasis are
    N > D:  m2 = sum (v_i.b)^2 / (t + s_i)^2 = |z|^2,
            res2 = |y|^2 - sum (v_i.b)^2 (s_i + 2t) / (t + s_i)^2
                 = |y|^2 - z.c - t |z|^2;
    N <= D: x = U^T t, m2 = sum s_i x_i^2 / (t + s_i)^2 = z.c - t |z|^2,
            res2 = sum x_i^2 t^2 / (t + s_i)^2 + |y|^2 - |x|^2
                 = t^2 |z|^2 + |y|^2 - |c|^2,
  one batched tridiagonal solve per fixed-point step instead of the
  eigenvectors (syevd's back-transformation is most of an eigh's cost).

  Returns:
    (sigma [k] (truncated as thuml when N > D), terms(t [C]) -> (m2, res2)).
  """
  n, d = f.shape
  wide = n <= d
  a_out, dd, ee, taus = jax.lax.linalg.tridiagonal(
      _common.gram(f, rows=wide), lower=True)
  if wide:
    b = _common.onehot(aux["labels"], num_classes, f.dtype)  # [N, C]
  else:
    b = _class_sums(f, aux, num_classes)                      # [D, C]
  c = _apply_qt(a_out, taus, b).T                             # [C, k]
  sigma = jnp.maximum(jax.scipy.linalg.eigh_tridiagonal(
      dd, ee, eigvals_only=True), 0.0)
  if not wide:
    sigma = jnp.where(jnp.sqrt(sigma) > 1e-10, sigma, 0.0)  # thuml truncation
  zero = jnp.zeros((1,), dd.dtype)
  dl = jnp.broadcast_to(jnp.concatenate([zero, ee]), c.shape)
  du = jnp.broadcast_to(jnp.concatenate([ee, zero]), c.shape)
  counts = aux["counts"]                                      # |y|^2
  c2 = jnp.sum(c * c, axis=1)

  def terms(t):
    z = jax.lax.linalg.tridiagonal_solve(
        dl, dd[None, :] + t[:, None], du, c[..., None])[..., 0]  # [C, k]
    zz = jnp.sum(z * z, axis=1)
    zc = jnp.sum(z * c, axis=1)
    if wide:
      return zc - t * zz, t * t * zz + (counts - c2)
    return zz, counts - zc - t * zz

  return sigma, terms


def _logme_fast_core(f, aux, key, *, num_classes):
  del key
  n, d = f.shape
  sigma, terms = _spectral_terms(f, aux, num_classes)
  k = sigma.shape[0]                                      # min(N, D)
  sig = sigma[:, None]
  c = aux["counts"].shape[0]
  ones = jnp.ones((c,), f.dtype)
  alpha, beta, m2, res2 = ones, ones, 0.0 * ones, 0.0 * ones
  done = jnp.zeros((c,), bool)
  # thuml's 11 steps with its early break, all classes at once (a class
  # keeps its values once converged). Unrolled: each step calls LAPACK
  # (gtsv), which must not sit inside an XLA:CPU loop.
  for _ in range(11):
    t = alpha / beta
    gamma = jnp.sum(sig / (sig + t), axis=0)
    m2_n, res2_n = terms(t)
    alpha_n = gamma / (m2_n + 1e-5)
    beta_n = (n - gamma) / (res2_n + 1e-5)
    conv = jnp.abs(alpha_n / beta_n - t) / t <= 1e-3
    upd = ~done
    alpha = jnp.where(upd, alpha_n, alpha)
    beta = jnp.where(upd, beta_n, beta)
    m2 = jnp.where(upd, m2_n, m2)
    res2 = jnp.where(upd, res2_n, res2)
    done = done | conv
  log_det = (jnp.sum(jnp.log(alpha + beta * sig), axis=0)
             + (d - k) * jnp.log(alpha))                  # all D directions
  evidence = (d / 2.0 * jnp.log(alpha) + n / 2.0 * jnp.log(beta)
              - 0.5 * log_det - beta / 2.0 * res2 - alpha / 2.0 * m2
              - n / 2.0 * _LOG_2PI) / n
  return jnp.mean(evidence)


def _logme_icml_core(f, aux, key, *, num_classes):
  del key
  n, d = f.shape
  eps = 1e-5
  if n >= d:
    lam, v = _common.eigh(_common.gram(f))
    tmp = v.T @ _class_sums(f, aux, num_classes)          # V^T F^T t, [D, C]
  else:  # Nonzero spectrum from F F^T; the other D - N eigenvalues are 0.
    lam, u = _common.eigh(_common.gram(f, rows=True))
    tmp = jnp.sqrt(jnp.maximum(lam, 0.0))[:, None] * _class_sums(
        u, aux, num_classes)
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

  c = tmp.shape[1]
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
