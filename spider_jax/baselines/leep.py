"""LEEP (Nguyen et al., ICML 2020): log expected empirical prediction.

  P(y, z) = 1/N sum_{i: y_i = y} theta_z(x_i),  P(y | z) = P(y, z) / P(z),
  LEEP = 1/N sum_i log sum_z theta_z(x_i) P(y_i | z).

Matches thuml `LEEP.py` and TLlib `log_expected_empirical_prediction`
(no epsilons). Deviation: a source class z that no sample puts mass on
(P(z) = 0) makes the references return NaN (0/0); here its P(y | z) is set
to 0, which changes nothing else because theta_z(x_i) = 0 for every i. Model
Spider's copy adds 1e-10 epsilons (about 4e-9 different).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spider_jax.baselines import _common


def leep_from_probs(theta: jax.Array, labels: jax.Array,
                    num_classes: int) -> jax.Array:
  """LEEP of source probabilities against integer labels (traceable).

  Args:
    theta: [N, S] source-class probabilities (rows sum to 1).
    labels: [N] int labels in 0..C-1.
    num_classes: C.

  Returns:
    [] LEEP, higher = better (<= 0).
  """
  n = theta.shape[0]
  joint = jax.ops.segment_sum(theta, labels, num_classes) / n    # [C, S]
  p_z = jnp.sum(joint, axis=0, keepdims=True)
  cond = jnp.where(p_z > 0, joint / jnp.where(p_z > 0, p_z, 1.0), 0.0)
  # EEP_i = (theta P(y|z)^T)[i, y_i]: one [N, S] x [S, C] product (a gathered
  # [N, S] row-sum is ~4x slower on XLA:CPU).
  eep = jnp.take_along_axis(theta @ cond.T, labels[:, None], axis=1)[:, 0]
  tiny = jnp.finfo(theta.dtype).tiny
  return jnp.mean(jnp.log(jnp.maximum(eep, tiny)))


def _core(theta, aux, key, *, num_classes):
  del key
  return leep_from_probs(theta, aux["labels"], num_classes)


KERNEL = _common.Kernel(_core, _common.default_prepare, input="source_probs")


def leep(source_probs, labels, *, key=None) -> jax.Array:
  """LEEP score of one model.

  Args:
    source_probs: [N, S] softmax outputs of the model's source head.
    labels: [N] integer target labels (any values).
    key: unused.

  Returns:
    [] LEEP, higher = better.
  """
  return _common.score_one(KERNEL, source_probs, labels, key=key, name="leep")
