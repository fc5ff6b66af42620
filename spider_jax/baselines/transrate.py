"""TransRate (Huang et al., ICML 2022), TLlib `transrate(F, y, eps=1e-4)`.

  R(Z) = 1/2 logdet(I + Z^T Z / (n eps)),  Z = F - mean(F),
  TrR = R(Z) - 1/C sum_c R(Z_c)         (unweighted class mean, TLlib)

where Z_c are class c's rows of the globally centred Z with n = n_c. The
per-class terms use Sylvester's identity on rows gathered into a padded
[C, n_max, D] block (zero rows leave the determinant unchanged), so the
cost is O(C n_max min(n_max, D)^2) rather than C masked D x D Grams.
(The official Long-Kai/TransRate code L2-normalises rows and weights
classes by n_c/n; that variant is not this one.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spider_jax.baselines import _common


def _logdet_eye_plus(z, scale):
  """logdet(I + scale z^T z) via the smaller Gram matrix. z: [..., n, D]."""
  n, d = z.shape[-2:]
  if n <= d:
    g = z @ jnp.swapaxes(z, -1, -2)
    eye = jnp.eye(n, dtype=z.dtype)
  else:
    g = jnp.swapaxes(z, -1, -2) @ z
    eye = jnp.eye(d, dtype=z.dtype)
  return jnp.linalg.slogdet(eye + scale[..., None, None] * g)[1]


def _core(f, aux, key, *, num_classes, eps):
  del key
  n = f.shape[0]
  z = _common.centered(f)
  r_all = 0.5 * _logdet_eye_plus(z, jnp.asarray(1.0 / (n * eps), f.dtype))
  zc = z[aux["index"]] * aux["mask"][..., None]               # [C, n_max, D]
  r_cls = 0.5 * _logdet_eye_plus(zc, 1.0 / (aux["counts"] * eps))
  return r_all - jnp.sum(r_cls) / num_classes


def _prepare(labels, num_classes, *, eps=1e-4):
  aux = _common.basic_aux(labels, num_classes)
  aux["index"], aux["mask"] = _common.class_table(labels, num_classes)
  return aux, {"num_classes": num_classes, "eps": float(eps)}


KERNEL = _common.Kernel(_core, _prepare)


def transrate(features, labels, *, key=None, eps: float = 1e-4) -> jax.Array:
  """TransRate of one model (TLlib definition).

  Args:
    features: [N, D] penultimate features.
    labels: [N] integer class ids.
    key: unused.
    eps: distortion (the paper's eps^2).

  Returns:
    [] coding-rate difference, higher = better.
  """
  return _common.score_one(KERNEL, features, labels, key=key,
                           name="transrate", eps=eps)
