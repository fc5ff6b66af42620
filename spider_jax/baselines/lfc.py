"""LFC (Deshpande et al. 2021, "linearized framework"), Model Spider `LFC`.

Centred-kernel alignment between K_x = F F^T and K_y (+1 same class, -1
otherwise), each centred by subtracting its scalar global mean:
LFC = <Kx~, Ky~>_F / (|Kx~| |Ky~|). Computed in O(N D^2) without the N x N
kernels, using s = sum_i f_i, s_c = sum_{i in c} f_i:

  <Kx, Ky> = 2 sum_c |s_c|^2 - |s|^2,  m_x = |s|^2/N^2,
  m_y = (2 sum_c n_c^2 - N^2)/N^2,  |Kx|^2 = |F^T F|_F^2,  |Ky|^2 = N^2.

Deviations: no random 45,000-row subsample (the identity needs none), and
the label kernel is exact rather than float32 (<= 1e-7 relative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spider_jax.baselines import _common


def _core(f, aux, key, *, num_classes):
  del key
  n, d = f.shape
  nn = float(n) * float(n)
  s = jnp.sum(f, axis=0)
  sc = jax.ops.segment_sum(f, aux["labels"], num_classes)     # [C, D]
  kxky = 2.0 * jnp.sum(sc * sc) - jnp.sum(s * s)
  mx = jnp.sum(s * s) / nn
  my = (2.0 * jnp.sum(aux["counts"] ** 2) - nn) / nn
  gram = f @ f.T if n < d else f.T @ f
  kx2 = jnp.sum(gram * gram)
  num = kxky - nn * mx * my
  den = jnp.sqrt((kx2 - nn * mx * mx) * (nn - nn * my * my))
  return num / den


KERNEL = _common.Kernel(_core, _common.default_prepare)


def lfc(features, labels, *, key=None) -> jax.Array:
  """LFC of one model.

  Args:
    features: [N, D] penultimate features.
    labels: [N] integer class ids.
    key: unused.

  Returns:
    [] kernel alignment in [-1, 1], higher = better.
  """
  return _common.score_one(KERNEL, features, labels, key=key, name="lfc")
