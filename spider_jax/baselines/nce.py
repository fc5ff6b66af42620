"""NCE (Tran et al., ICCV 2019): negative conditional entropy -H(Y | Z).

Z = argmax of the source probabilities (hard labels; the first maximum on
ties, as np.argmax). Matches thuml `NCE.py`, TLlib
`negative_conditional_entropy` and Model Spider `NCE.py`, including the
reference's 1e-20 inside the logarithm and its masking of empty source
classes. (pactran's `calculate_nce` is a *soft* variant; not this one.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spider_jax.baselines import _common


def _core(theta, aux, key, *, num_classes):
  del key
  n, s = theta.shape
  z = jnp.argmax(theta, axis=1)
  joint = jnp.zeros((s, num_classes), theta.dtype).at[z, aux["labels"]].add(
      1.0 / n)                                               # [S, C], O(N)
  p_z = jnp.sum(joint, axis=1)
  used = p_z > 0
  cond = joint / jnp.where(used, p_z, 1.0)[:, None] + 1e-20
  h_z = jnp.sum(-cond * jnp.log(cond), axis=1)
  return -jnp.sum(jnp.where(used, h_z * p_z, 0.0))


KERNEL = _common.Kernel(_core, _common.default_prepare, input="source_probs")


def nce(source_probs, labels, *, key=None) -> jax.Array:
  """NCE score of one model.

  Args:
    source_probs: [N, S] source-class probabilities (only the argmax is used).
    labels: [N] integer target labels.
    key: unused.

  Returns:
    [] -H(Y | Z), higher = better (<= 0).
  """
  return _common.score_one(KERNEL, source_probs, labels, key=key, name="nce")
