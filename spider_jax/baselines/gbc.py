"""GBC (Pandy et al., CVPR 2022): Gaussian Bhattacharyya coefficient.

  GBC = -sum_{i != j} exp(-D_B(c_i, c_j)),
  D_B = 1/8 dmu^T S^-1 dmu + 1/2 log(|S| / sqrt(|S_i| |S_j|)),  S = (S_i+S_j)/2,

on features reduced by PCA to `pca_dim` (64) dimensions. Three variants:

* `gbc` ("full", Model Spider `mptms/GBC.py`, used in its table): full
  per-class covariances (ddof = 1), `pinv(S)` and raw determinants with the
  reference's 1e-5 fudge terms, log(1e-5 + |det S| / (1e-5 + sqrt(1e-5 +
  det S_i det S_j))). S^-1 and |S| come from a Cholesky factor when every
  pair is well conditioned, else from eigh with numpy's pinv cutoff. The
  reference's exact PCA (`svd_solver='full'`) is
  reproduced; its unseeded randomized PCA (sklearn 'auto' for large inputs)
  is not.
* `gbc_diagonal` / `gbc_spherical` (google-research stable_transfer):
  per-class population variances floored at 1e-4; spherical uses their
  mean, and (as in the reference) its log term is *not* multiplied by the
  dimension.

The PCA projection is only defined up to a rotation of the top subspace,
which every variant is invariant to. Classes need >= 2 samples (the
reference asserts this) and min(N, D) >= pca_dim (the reference's PCA
raises otherwise); both raise a BaselineError here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spider_jax.baselines import _common


def pca_project(f: jax.Array, dim: int) -> jax.Array:
  """[N, D] -> [N, dim] centred features on the top-`dim` principal axes."""
  fc = _common.centered(f)
  _, v = jnp.linalg.eigh(fc.T @ fc)
  return fc @ v[:, ::-1][:, :dim]


def _class_stats(x, aux, ddof):
  xc = x[aux["index"]]                                        # [C, n_max, d]
  w = aux["mask"][..., None].astype(x.dtype)
  counts = aux["counts"]
  mu = jnp.sum(xc * w, axis=1) / counts[:, None]
  dev = (xc - mu[:, None, :]) * w
  return mu, dev, counts - ddof


def _pairs(num_classes):
  i, j = np.triu_indices(num_classes, 1)
  return jnp.asarray(i), jnp.asarray(j)


def _full_core(f, aux, key, *, num_classes, pca_dim):
  del key
  x = pca_project(f, pca_dim)
  mu, dev, denom = _class_stats(x, aux, 1)
  cov = jnp.einsum("cnd,cne->cde", dev, dev) / denom[:, None, None]
  det = jnp.linalg.det(cov)                                   # [C]
  i, j = _pairs(num_classes)

  dmu = mu[i] - mu[j]                                          # [P, d]
  s = 0.5 * (cov[i] + cov[j])                                 # [P, d, d]
  chol = jnp.linalg.cholesky(s)
  diag = jnp.diagonal(chol, axis1=1, axis2=2)
  well_posed = jnp.all(jnp.isfinite(diag)) & jnp.all(
      jnp.max(diag, axis=1) < 1e5 * jnp.min(diag, axis=1))   # cond < 1e10

  def by_cholesky(_):
    z = jax.scipy.linalg.solve_triangular(chol, dmu[..., None], lower=True)
    return jnp.sum(z[..., 0] ** 2, axis=1), jnp.prod(diag, axis=1) ** 2

  def by_pinv(_):          # numpy pinv(rcond=1e-15) semantics, rank-safe
    lam, v = jnp.linalg.eigh(s)
    keep = jnp.abs(lam) > 1e-15 * jnp.max(jnp.abs(lam), axis=1,
                                          keepdims=True)
    proj = jnp.einsum("pde,pd->pe", v, dmu)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
    return jnp.sum(proj * proj * inv, axis=1), jnp.prod(lam, axis=1)

  maha, det_s = jax.lax.cond(well_posed, by_cholesky, by_pinv, None)
  ratio = 1e-5 + jnp.abs(det_s) / (1e-5 + jnp.sqrt(1e-5 + det[i] * det[j]))
  terms = jnp.exp(-maha / 8.0 - 0.5 * jnp.log(ratio))
  return -2.0 * jnp.sum(terms)                   # D_B is symmetric in (i, j)


def _diag_core(f, aux, key, *, num_classes, pca_dim, spherical):
  del key
  x = pca_project(f, pca_dim)
  mu, dev, denom = _class_stats(x, aux, 0)
  var = jnp.maximum(jnp.sum(dev * dev, axis=1) / denom[:, None], 1e-4)
  if spherical:
    var = jnp.mean(var, axis=1, keepdims=True)                # [C, 1]
  i, j = _pairs(num_classes)
  avg = 0.5 * (var[i] + var[j])
  first = jnp.sum((mu[i] - mu[j]) ** 2 / avg, axis=1) / 8.0
  second = (jnp.sum(jnp.log(avg), axis=1)
            - 0.5 * jnp.sum(jnp.log(var[i]), axis=1)
            - 0.5 * jnp.sum(jnp.log(var[j]), axis=1))
  return -2.0 * jnp.sum(jnp.exp(-(first + 0.5 * second)))


def _prepare(labels, num_classes, *, pca_dim=64, min_count=2, **static):
  counts = np.bincount(labels, minlength=num_classes)
  if np.any(counts < min_count):
    small = np.flatnonzero(counts < min_count).tolist()
    raise _common.BaselineError(
        f"GBC needs >= {min_count} samples per class; remapped class(es) "
        f"{small[:10]} have fewer. Drop those classes or use another method.")
  if labels.shape[0] < pca_dim:
    raise _common.BaselineError(
        f"GBC reduces features with PCA({pca_dim}) and needs N >= {pca_dim} "
        f"samples, got N={labels.shape[0]}; pass a smaller pca_dim.")
  aux = _common.basic_aux(labels, num_classes)
  aux["index"], aux["mask"] = _common.class_table(labels, num_classes)
  return aux, {"num_classes": num_classes, "pca_dim": int(pca_dim), **static}


def _prepare_full(labels, num_classes, *, pca_dim=64):
  return _prepare(labels, num_classes, pca_dim=pca_dim, min_count=2)


def _prepare_diag(labels, num_classes, *, pca_dim=64):
  return _prepare(labels, num_classes, pca_dim=pca_dim, min_count=1,
                  spherical=False)


def _prepare_sph(labels, num_classes, *, pca_dim=64):
  return _prepare(labels, num_classes, pca_dim=pca_dim, min_count=1,
                  spherical=True)


def _check_dim(d, pca_dim=64):
  if d < pca_dim:
    raise _common.BaselineError(
        f"GBC reduces features with PCA({pca_dim}) but they are only {d}-d; "
        f"pass pca_dim <= {d}.")


FULL = _common.Kernel(_full_core, _prepare_full, check=_check_dim)
DIAGONAL = _common.Kernel(_diag_core, _prepare_diag, check=_check_dim)
SPHERICAL = _common.Kernel(_diag_core, _prepare_sph, check=_check_dim)


def gbc(features, labels, *, key=None, pca_dim: int = 64) -> jax.Array:
  """GBC with full covariances (Model Spider's variant).

  Args:
    features: [N, D] penultimate features, min(N, D) >= pca_dim.
    labels: [N] integer class ids, >= 2 samples per class.
    key: unused.
    pca_dim: PCA dimension.

  Returns:
    [] -sum of pairwise Bhattacharyya coefficients, higher = better (<= 0).
  """
  return _common.score_one(FULL, features, labels, key=key, name="gbc",
                           pca_dim=pca_dim)


def gbc_diagonal(features, labels, *, key=None,
                 pca_dim: int = 64) -> jax.Array:
  """GBC with diagonal Gaussians (stable_transfer). Shapes as `gbc`."""
  return _common.score_one(DIAGONAL, features, labels, key=key,
                           name="gbc_diagonal", pca_dim=pca_dim)


def gbc_spherical(features, labels, *, key=None,
                  pca_dim: int = 64) -> jax.Array:
  """GBC with spherical Gaussians (stable_transfer). Shapes as `gbc`."""
  return _common.score_one(SPHERICAL, features, labels, key=key,
                           name="gbc_spherical", pca_dim=pca_dim)
