"""Listwise ranking loss: Plackett-Luce / ListMLE (the official HierarchicalCE).

For one task with scores s [M] and ground-truth accuracies g [M], the
official loss sorts PTMs by g (descending) into pi and averages, over
B * (M - 1) terms,

  -s_pi(j) + log sum_{l >= j} exp(s_pi(l)),   j = 0 .. M-2.

Ties. The official code needs strict ranks and breaks ties arbitrarily, so
the loss then asks the model to separate PTMs that are equally good. Here a
PTM's competitors are itself and every PTM with strictly lower accuracy:

  term_i = -s_i + log sum_{l : l = i or g_l < g_i} exp(s_l).

Without ties this is exactly the official sum (the worst PTM's term is 0,
hence M - 1 terms); with ties it does not depend on how ties are ordered and
never rewards or penalises the order within a tied group. Ties are exact
equality of the accuracies given (round them first to merge near-ties).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def plackett_luce_terms(scores: jax.Array,
                        ground_truth: jax.Array) -> jax.Array:
  """Per-task Plackett-Luce negative log-likelihood, ties handled.

  Args:
    scores: [B, M] predicted scores.
    ground_truth: [B, M] accuracies, higher is better.

  Returns:
    [B] float32: the sum over each task's M terms (see module doc).
  """
  scores = scores.astype(jnp.float32)
  m = scores.shape[-1]
  g = ground_truth
  # competitors[b, i, l]: l competes with i at i's position.
  competitors = (g[:, None, :] < g[:, :, None]) | jnp.eye(m, dtype=bool)[None]
  lse = jax.nn.logsumexp(jnp.where(competitors, scores[:, None, :], -jnp.inf),
                         axis=-1)
  return jnp.sum(lse - scores, axis=-1)


def loss_denominator(weights: jax.Array, num_ptms: int) -> jax.Array:
  """[] sum(weights) * (M - 1), the normaliser of `plackett_luce_loss`."""
  return jnp.maximum(weights.sum(), 1.0) * max(num_ptms - 1, 1)


def plackett_luce_loss(scores: jax.Array, ground_truth: jax.Array,
                       weights: jax.Array | None = None) -> jax.Array:
  """Mean Plackett-Luce negative log-likelihood, ties handled (see module doc).

  Args:
    scores: [B, M] predicted scores.
    ground_truth: [B, M] accuracies, higher is better.
    weights: optional [B] per-task weights (0 drops a padded task).

  Returns:
    Scalar: sum of terms / (sum(weights) * (M - 1)).
  """
  per_task = plackett_luce_terms(scores, ground_truth)
  if weights is None:
    weights = jnp.ones(per_task.shape, jnp.float32)
  return jnp.sum(per_task * weights) / loss_denominator(weights,
                                                        scores.shape[-1])
