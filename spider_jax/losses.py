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
equality of the accuracies given, unless a tie margin is set (below).

Near-ties. `tie_margin` > 0 treats accuracies closer than the margin as
tied: l competes with i only if g_l < g_i - tie_margin (accuracies measured
on few test images order most neighbouring PTMs by noise).

Weighting. `weighting="hyperbolic"` weights term_i by 1 / (1 + r_i), r_i =
the number of PTMs with higher accuracy (by more than the tie margin; 0 =
the best), the weigher scipy's `weightedtau` (the evaluation metric)
applies to ranks, rescaled so a task's M weights sum to M (position-aware
ListMLE: mistakes at the top of the ranking cost more). "uniform"
(default) is the official loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

WEIGHTINGS = ("uniform", "hyperbolic")


def plackett_luce_terms(scores: jax.Array, ground_truth: jax.Array,
                        weighting: str = "uniform",
                        tie_margin: float = 0.0) -> jax.Array:
  """Per-task Plackett-Luce negative log-likelihood, ties handled.

  Args:
    scores: [B, M] predicted scores.
    ground_truth: [B, M] accuracies, higher is better.
    weighting: "uniform" (official) or "hyperbolic" (see module doc).
    tie_margin: accuracy gap (ground-truth units) below which two PTMs
      count as tied; 0 = exact ties only.

  Returns:
    [B] float32: the (weighted) sum over each task's M terms.
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown loss weighting {weighting!r}; use one of "
                     f"{WEIGHTINGS}.")
  scores = scores.astype(jnp.float32)
  m = scores.shape[-1]
  g = ground_truth
  # competitors[b, i, l]: l competes with i at i's position.
  competitors = ((g[:, None, :] < g[:, :, None] - tie_margin) |
                 jnp.eye(m, dtype=bool)[None])
  lse = jax.nn.logsumexp(jnp.where(competitors, scores[:, None, :], -jnp.inf),
                         axis=-1)
  terms = lse - scores
  if weighting == "hyperbolic":
    better = jnp.sum(g[:, None, :] > g[:, :, None] + tie_margin,
                     axis=-1)                                  # [B, M] r_i
    w = 1.0 / (1.0 + better.astype(jnp.float32))
    terms = terms * w * (m / jnp.sum(w, axis=-1, keepdims=True))
  return jnp.sum(terms, axis=-1)


def loss_denominator(weights: jax.Array, num_ptms: int) -> jax.Array:
  """[] sum(weights) * (M - 1), the normaliser of `plackett_luce_loss`."""
  return jnp.maximum(weights.sum(), 1.0) * max(num_ptms - 1, 1)


def plackett_luce_loss(scores: jax.Array, ground_truth: jax.Array,
                       weights: jax.Array | None = None,
                       weighting: str = "uniform",
                       tie_margin: float = 0.0) -> jax.Array:
  """Mean Plackett-Luce negative log-likelihood, ties handled (see module doc).

  Args:
    scores: [B, M] predicted scores.
    ground_truth: [B, M] accuracies, higher is better.
    weights: optional [B] per-task weights (0 drops a padded task).
    weighting: per-position weights of the terms, "uniform" (official) or
      "hyperbolic".
    tie_margin: accuracy gap below which PTMs count as tied (0 = exact).

  Returns:
    Scalar: sum of terms / (sum(weights) * (M - 1)).
  """
  per_task = plackett_luce_terms(scores, ground_truth, weighting, tie_margin)
  if weights is None:
    weights = jnp.ones(per_task.shape, jnp.float32)
  return jnp.sum(per_task * weights) / loss_denominator(weights,
                                                        scores.shape[-1])
