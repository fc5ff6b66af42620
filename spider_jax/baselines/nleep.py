"""N-LEEP (Li et al., CVPR 2021): LEEP on Gaussian-mixture posteriors.

1. PCA keeping the fewest leading components that explain >= 80% of the
   variance (sklearn `PCA(n_components=0.8)`).
2. A full-covariance Gaussian mixture with K components, fitted by EM with
   sklearn's defaults (k-means initialisation, reg_covar = 1e-6,
   max_iter = 100, tol = 1e-3 on the mean log-likelihood), seeded by an
   explicit PRNG key (k-means++ with 2 + floor(log K) local trials, then
   Lloyd iterations). EM works on the packed products
   Z[n] = (x_i x_j)_{i <= j} ([N, T], T = d (d + 1) / 2): the M-step's
   second moments are resp^T Z (covariance = E[x x^T] - mu mu^T, then a
   batched Cholesky), and the E-step's Mahalanobis terms x^T Lambda_k x are
   Z @ packed(Lambda_k)^T, plus a linear and a constant term per component.
   Each step is a few large GEMMs (half the flops of the per-component
   (x - mu_k) P_k form). Rows go in blocks of at most 2^23 elements of Z
   (64 MiB in float64) per model, so memory stays bounded for large d.
   The expanded form rounds to ~eps |x|^2 |Lambda_k| (vs eps maha), fine in
   float64; float32 inputs (x64 off) use the per-component form.
3. LEEP of the posteriors [N, K] against the labels (`leep.leep_from_probs`).

K defaults to Model Spider's rule max(min(C, floor(0.2 N)), floor(0.1 N));
pass `num_components` (an int, or a callable (N, C) -> int) to change it,
e.g. `lambda n, c: 5 * c` for SFDA / stable_transfer.

Batching: models of one zoo have different PCA dimensions d_m. All models of
a call are projected to d_max = max_m d_m dimensions and the surplus
coordinates of model m are set to 0. A zero coordinate has variance
reg_covar in every component and no covariance with the others, so it adds
the same constant to every component's log-density and leaves k-means, the
posteriors and the convergence test unchanged: one vmapped fit serves all.

The mixture is not bitwise sklearn's (different k-means seeding), so the
score agrees with the reference at the level of model rankings, not digits.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from spider_jax.baselines import _common
from spider_jax.baselines import leep as leep_lib


def modelspider_components(n: int, c: int) -> int:
  """Model Spider / pactran rule: max(min(C, floor(0.2 N)), floor(0.1 N))."""
  return max(min(c, int(0.2 * n)), int(0.1 * n))


# ----------------------------------------------------------------------------
# PCA.


@jax.jit
def _pca_spectra(xs):
  """[M, N, D] -> centred [M, N, D], eigenvalues [M, D] desc, vectors."""
  xc = xs - jnp.mean(xs, axis=1, keepdims=True)
  lam, v = jax.vmap(lambda a: jnp.linalg.eigh(_common.gram(a)))(xc)
  return xc, lam[:, ::-1], v[:, :, ::-1]


def pca_dims(eigenvalues: np.ndarray, n: int, variance: float) -> np.ndarray:
  """sklearn's PCA(n_components=variance) dimension per model.

  Args:
    eigenvalues: [M, D] eigenvalues of the centred X^T X, descending.
    n: N (only min(N, D) components exist).
    variance: fraction of variance to keep, in (0, 1).

  Returns:
    [M] int dims.
  """
  k = min(n, eigenvalues.shape[1])
  lam = np.maximum(eigenvalues[:, :k], 0.0)
  ratio = np.cumsum(lam, axis=1) / np.sum(lam, axis=1, keepdims=True)
  return np.array([np.searchsorted(r, variance, side="right") + 1
                   for r in ratio])


# ----------------------------------------------------------------------------
# k-means and EM (one model; vmapped by the caller).


def _sq_dists(x, centers):
  return (jnp.sum(x * x, axis=1)[:, None] - 2.0 * x @ centers.T
          + jnp.sum(centers * centers, axis=1)[None, :])


def kmeans(x: jax.Array, key: jax.Array, k: int, *, max_iter: int = 300,
           tol: float = 1e-4) -> jax.Array:
  """k-means++ seeding then Lloyd iterations (sklearn's defaults).

  Args:
    x: [N, d] points.
    key: PRNG key for the seeding.
    k: number of clusters.
    max_iter: Lloyd iterations at most.
    tol: stop when the squared centre shift <= tol * mean feature variance.

  Returns:
    [N] int32 cluster labels.
  """
  n, _ = x.shape
  trials = 2 + int(math.log(k))
  k0, key = jax.random.split(key)
  first = jax.random.randint(k0, (), 0, n)
  centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
  closest = jnp.sum((x - x[first]) ** 2, axis=1)

  tiny = jnp.finfo(x.dtype).tiny
  cols = jax.lax.optimization_barrier(jnp.arange(n, dtype=jnp.int32))

  def seed(i, carry):
    centers, closest = carry
    # jax.random.categorical(kk, log(closest), shape=(trials,)) draws
    # argmax(log(closest) - log(-log U)); the same draw is
    # argmax(log(U) / closest): one log per point instead of two.
    u = jax.random.uniform(jax.random.fold_in(key, i), (trials, n), x.dtype,
                           minval=tiny, maxval=1.0)
    cand = _common.top_k_first(jnp.log(u) / jnp.maximum(closest, 0.0),
                               1, cols)[:, 0]
    d2 = jnp.minimum(closest[None, :], _sq_dists(x, x[cand]).T)  # [T, N]
    best = jnp.argmin(jnp.sum(d2, axis=1))
    return centers.at[i].set(x[cand[best]]), d2[best]

  centers, _ = jax.lax.fori_loop(1, k, seed, (centers, closest))
  thresh = tol * jnp.mean(jnp.var(x, axis=0))

  def lloyd_cond(carry):
    it, _, shift = carry
    return (it < max_iter) & (shift > thresh)

  def lloyd(carry):
    it, centers, _ = carry
    lab = jnp.argmin(_sq_dists(x, centers), axis=1)
    cnt = jax.ops.segment_sum(jnp.ones_like(x[:, 0]), lab, k)
    new = jnp.where(cnt[:, None] > 0,
                    jax.ops.segment_sum(x, lab, k)
                    / jnp.maximum(cnt, 1.0)[:, None], centers)
    return it + 1, new, jnp.sum((new - centers) ** 2)

  _, centers, _ = jax.lax.while_loop(
      lloyd_cond, lloyd, (0, centers, jnp.asarray(jnp.inf, x.dtype)))
  return jnp.argmin(_sq_dists(x, centers), axis=1)


# EM on packed second moments: Z[n, t] = x_i x_j over the pairs i <= j of
# row n (t = 0..T-1, T = d (d + 1) / 2, `np.triu_indices` order). One EM
# iteration is then a few large GEMMs instead of K small per-component ones.

Z_BLOCK_ELEMS = 1 << 23   # default cap on one row block of Z: 64 MiB float64


def _row_blocks(n: int, t: int, block_elems: int) -> tuple[int, int]:
  """(rows per block B, blocks nb): B T <= block_elems (B >= 1), nb B >= N."""
  nb = -(-n // max(1, min(n, block_elems // t)))
  return -(-n // nb), nb


# Z and the packed precisions feed the big GEMMs. Up to d = _CONCAT_MAX_D
# they are d static slices and one concatenation: XLA's CPU backend lays a
# `[:, iu]` gather out transposed, which made those GEMMs ~1.4x slower at
# d = 48. Beyond, the gather (compile time grows with the number of slices,
# ~+10 s at d = 200).
_CONCAT_MAX_D = 64


def _packed(x):
  """[B, d] -> [B, T] products x_i x_j, i <= j."""
  d = x.shape[1]
  if d <= _CONCAT_MAX_D:
    return jnp.concatenate([x[:, i:i + 1] * x[:, i:] for i in range(d)],
                           axis=1)
  iu, ju = np.triu_indices(d)
  return x[:, iu] * x[:, ju]


def _upper(a):
  """[K, d, d] -> [K, T] upper triangles, i <= j."""
  d = a.shape[1]
  if d <= _CONCAT_MAX_D:
    return jnp.concatenate([a[:, i, i:] for i in range(d)], axis=1)
  iu, ju = np.triu_indices(d)
  return a[:, iu, ju]


def _gaussians(stats, n, reg_covar):
  """M-step: weights [K], means [K, d], precision Cholesky factors [K, d, d].

  `stats` = (sum_n r_nk x_n [K, d], sum_n r_nk Z_n [K, T], sum_n r_nk [K]).
  The covariance sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T / n_k expands to
  S_k - (2 - r_k / n_k) mu_k mu_k^T with S_k = sum_n r_nk x_n x_n^T / n_k
  and n_k = r_k + 10 eps (sklearn's guard), exactly as written per component.
  """
  sx, sz, rk = stats
  d = sx.shape[1]
  iu, ju = np.triu_indices(d)
  nk = rk + 10.0 * jnp.finfo(sx.dtype).eps
  means = sx / nk[:, None]
  cov = (sz / nk[:, None]
         - (2.0 - rk / nk)[:, None] * (means[:, iu] * means[:, ju])
         + reg_covar * jnp.asarray(iu == ju, sx.dtype))
  full = np.zeros((d, d), np.int32)                  # packed index of (i, j)
  full[iu, ju] = full[ju, iu] = np.arange(iu.size)
  chol = jnp.linalg.cholesky(cov[:, full])                    # batched
  eye = jnp.eye(d, dtype=sx.dtype)
  prec_chol = jnp.swapaxes(jax.scipy.linalg.solve_triangular(
      chol, jnp.broadcast_to(eye, chol.shape), lower=True), -1, -2)
  return nk / n, means, prec_chol


def _e_terms(weights, means, prec_chol):
  """Per-component terms of the E-step.

  With Lambda_k = P_k P_k^T, the Mahalanobis distance is
  x^T Lambda_k x - 2 x^T Lambda_k mu_k + mu_k^T Lambda_k mu_k, and
  x^T Lambda_k x = Z(x) . q_k with q_k the packed upper triangle of
  Lambda_k, off-diagonal entries doubled.

  Returns:
    (q [K, T], h = Lambda mu [K, d], mu^T Lambda mu [K],
     log w_k + log det P_k - d/2 log(2 pi) [K]).
  """
  d = means.shape[1]
  iu, ju = np.triu_indices(d)
  lam = prec_chol @ jnp.swapaxes(prec_chol, -1, -2)           # [K, d, d]
  q = _upper(lam) * jnp.asarray(np.where(iu == ju, 1.0, 2.0), lam.dtype)
  h = jnp.einsum("kij,kj->ki", lam, means)
  log_det = jnp.sum(jnp.log(jnp.diagonal(prec_chol, axis1=1, axis2=2)),
                    axis=1)
  base = log_det + jnp.log(weights) - 0.5 * d * math.log(2 * math.pi)
  return q, h, jnp.sum(means * h, axis=1), base


def _log_resp_t(x, z, terms):
  """[B, d], [B, T] -> (log-likelihood [B], log posteriors [K, B]).

  Components along rows: on CPU the [K, T] x [T, B] product and the
  M-step's [K, B] x [B, T] one are ~1.5x faster than their transposes.
  """
  q, h, mu_term, base = terms
  maha = q @ z.T - 2.0 * (h @ x.T) + mu_term[:, None]
  wlp = base[:, None] - 0.5 * jnp.maximum(maha, 0.0)   # clamp rounding
  norm = jax.scipy.special.logsumexp(wlp, axis=0)
  return norm, wlp - norm[None, :]


# Float32 fallback: the packed form's rounding, ~eps |x|^2 |Lambda|, exceeds
# reg_covar there (NaN Cholesky factors with many small components), so
# float32 keeps sklearn's per-component (x - mu_k) form.


def _m_step_per_component(x, resp, reg_covar):
  n, d = x.shape
  nk = jnp.sum(resp, axis=0) + 10.0 * jnp.finfo(x.dtype).eps   # [K]
  means = (resp.T @ x) / nk[:, None]
  eye = jnp.eye(d, dtype=x.dtype)

  def component(args):                    # matmuls only inside the map
    r, mu, nkk = args
    diff = x - mu
    return (diff * r[:, None]).T @ diff / nkk

  cov = jax.lax.map(component, (resp.T, means, nk), batch_size=32)
  chol = jnp.linalg.cholesky(cov + reg_covar * eye)           # batched
  prec_chol = jnp.swapaxes(jax.scipy.linalg.solve_triangular(
      chol, jnp.broadcast_to(eye, chol.shape), lower=True), -1, -2)
  return nk / n, means, prec_chol                 # weights, [K, d], [K, d, d]


def _e_step_per_component(x, weights, means, prec_chol):
  d = x.shape[1]

  def component(args):
    mu, p = args
    y = (x - mu) @ p
    return jnp.sum(y * y, axis=1)

  maha = jax.lax.map(component, (means, prec_chol), batch_size=32).T  # [N, K]
  log_det = jnp.sum(jnp.log(jnp.diagonal(prec_chol, axis1=1, axis2=2)),
                    axis=1)
  wlp = (-0.5 * (d * math.log(2 * math.pi) + maha) + log_det
         + jnp.log(weights))
  norm = jax.scipy.special.logsumexp(wlp, axis=1)
  return jnp.mean(norm), wlp - norm[:, None]


def _em(params, step, max_iter, tol, dtype):
  """EM iterations `lb, params = step(params)` until the mean log-likelihood
  lb changes by less than tol, or max_iter steps; returns the params."""
  def cond(carry):
    it, _, lb, prev = carry
    return (it < max_iter) & ~(jnp.abs(lb - prev) < tol)

  def body(carry):
    it, params, lb, _ = carry
    return (it + 1, *step(params)[::-1], lb)

  inf = jnp.asarray(jnp.inf, dtype)
  return jax.lax.while_loop(cond, body, (0, params, -inf, -2 * inf))[1]


def _gmm_posteriors_per_component(x, key, k, reg_covar, max_iter, tol):
  lab = kmeans(x, key, k)
  resp = jax.nn.one_hot(lab, k, dtype=x.dtype)

  def step(params):
    lb, log_resp = _e_step_per_component(x, *params)
    return lb, _m_step_per_component(x, jnp.exp(log_resp), reg_covar)

  params = _em(_m_step_per_component(x, resp, reg_covar), step, max_iter,
               tol, x.dtype)
  _, log_resp = _e_step_per_component(x, *params)
  return jnp.exp(log_resp)


def gmm_posteriors(x: jax.Array, key: jax.Array, k: int, *,
                   reg_covar: float = 1e-6, max_iter: int = 100,
                   tol: float = 1e-3,
                   block_elems: int = Z_BLOCK_ELEMS) -> jax.Array:
  """Fits a full-covariance GMM by EM and returns its posteriors.

  E-step and M-step sums run over row blocks of B rows, B T <= block_elems
  (N padded with zero rows of zero responsibility). With one block, Z
  [N, T] is formed once for the whole fit; else once per block and pass.
  Float32 inputs use the per-component form instead (see above).

  Args:
    x: [N, d] points.
    key: PRNG key (k-means seeding).
    k: number of components.
    reg_covar: added to every covariance diagonal.
    max_iter: EM iterations at most.
    tol: stop when the mean log-likelihood changes by less than tol.
    block_elems: cap on the elements of one row block of Z (memory).

  Returns:
    [N, K] posterior probabilities (sklearn `predict_proba`).
  """
  if jnp.finfo(x.dtype).bits < 64:
    return _gmm_posteriors_per_component(x, key, k, reg_covar, max_iter, tol)
  n, d = x.shape
  t = d * (d + 1) // 2
  b, nb = _row_blocks(n, t, block_elems)
  pad = nb * b - n
  lab = kmeans(x, key, k)
  # Padded rows are zero (x, Z) with validity 0: they add nothing to a sum.
  xb = jnp.pad(x, ((0, pad), (0, 0))).reshape(nb, b, d)
  valid = (jnp.arange(nb * b) < n).astype(x.dtype).reshape(nb, b)
  labb = jnp.pad(lab, (0, pad)).reshape(nb, b)
  # One block: Z once for the whole fit; else per block and pass.
  zb = _packed(x)[None] if nb == 1 else None

  def block_z(xk, zk):
    return _packed(xk) if zk is None else zk

  def init_stats(acc, blk):                   # hard k-means responsibilities
    xk, vk, lk, zk = blk
    seg = functools.partial(jax.ops.segment_sum, segment_ids=lk,
                            num_segments=k)
    sx, sz, rk = acc
    return (sx + seg(xk), sz + seg(block_z(xk, zk)), rk + seg(vk)), None

  def em_stats(terms):                        # E-step fused with M-step sums
    def step(acc, blk):
      xk, vk, zk = blk
      zk = block_z(xk, zk)
      norm, log_resp = _log_resp_t(xk, zk, terms)
      resp = jnp.exp(log_resp) * vk[None, :]                  # [K, B]
      sx, sz, rk, ll = acc
      return (sx + resp @ xk, sz + resp @ zk, rk + jnp.sum(resp, axis=1),
              ll + jnp.sum(norm * vk)), None
    return step

  def scan(f, init, xs):                      # no loop for a single block
    if nb == 1:
      return f(init, jax.tree.map(lambda a: a[0], xs))
    return jax.lax.scan(f, init, xs)

  zeros = (jnp.zeros((k, d), x.dtype), jnp.zeros((k, t), x.dtype),
           jnp.zeros((k,), x.dtype))
  stats, _ = scan(init_stats, zeros, (xb, valid, labb, zb))
  params = _gaussians(stats, n, reg_covar)

  def step(params):
    (*stats, ll), _ = scan(em_stats(_e_terms(*params)),
                           (*zeros, jnp.zeros((), x.dtype)), (xb, valid, zb))
    return ll / n, _gaussians(stats, n, reg_covar)

  params = _em(params, step, max_iter, tol, x.dtype)
  terms = _e_terms(*params)
  _, log_resp = scan(
      lambda _, blk: (None, _log_resp_t(blk[0], block_z(*blk), terms)[1]),
      None, (xb, zb))
  if nb == 1:
    log_resp = log_resp[None]
  return jnp.exp(jnp.moveaxis(log_resp, 1, 0).reshape(k, nb * b)[:, :n].T)


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "reg_covar",
                                              "max_iter", "tol"))
def _fit_and_leep(xs, keys, labels, *, num_classes, k, reg_covar, max_iter,
                  tol):
  def one(x, key):
    post = gmm_posteriors(x, key, k, reg_covar=reg_covar, max_iter=max_iter,
                          tol=tol)
    return leep_lib.leep_from_probs(post, labels, num_classes)
  return jax.vmap(one)(xs, keys)


def _resolve_k(num_components, n, c) -> int:
  if num_components is None:
    k = modelspider_components(n, c)
  elif callable(num_components):
    k = int(num_components(n, c))
  else:
    k = int(num_components)
  if not 1 <= k <= n:
    raise _common.BaselineError(
        f"N-LEEP needs 1 <= num_components <= N={n}, got {k}; change "
        "num_components.")
  return k


def _batched(xs, labels, num_classes, keys, *,
             num_components: int | Callable[[int, int], int] | None = None,
             variance: float = 0.8, reg_covar: float = 1e-6,
             max_iter: int = 100, tol: float = 1e-3):
  n = xs.shape[1]
  k = _resolve_k(num_components, n, num_classes)
  if not 0.0 < variance < 1.0:
    raise _common.BaselineError(f"variance must lie in (0, 1), got {variance}.")
  dtype = _common.float_dtype()
  xc, lam, v = _pca_spectra(jnp.asarray(xs, dtype))
  dims = pca_dims(np.asarray(lam), n, variance)
  d_max = int(dims.max())
  proj = jnp.einsum("mnd,mde->mne", xc, v[:, :, :d_max])
  keep = np.arange(d_max)[None, :] < dims[:, None]              # [M, d_max]
  proj = proj * jnp.asarray(keep, dtype)[:, None, :]
  return _fit_and_leep(proj, keys, jnp.asarray(labels, jnp.int32),
                       num_classes=num_classes, k=k,
                       reg_covar=float(reg_covar), max_iter=int(max_iter),
                       tol=float(tol))


KERNEL = _common.Kernel(core=None, prepare=None, needs_key=True,
                        batched=_batched)


def nleep(features, labels, *, key, num_components=None,
          variance: float = 0.8) -> jax.Array:
  """N-LEEP score of one model.

  Args:
    features: [N, D] penultimate features.
    labels: [N] integer class ids.
    key: PRNG key for the k-means++ seeding (required).
    num_components: K, an int or a callable (N, C) -> K; default Model
      Spider's rule `modelspider_components`.
    variance: PCA variance fraction to keep.

  Returns:
    [] LEEP of the GMM posteriors, higher = better.
  """
  return _common.score_one(KERNEL, features, labels, key=key, name="nleep",
                           num_components=num_components, variance=variance)
