"""Ranking metrics: weighted Kendall tau (official protocol), rel@k, regret.

All functions take one task at a time: `ground_truth` and `scores` are `[M]`
vectors over the same zoo order, higher is better for both.
"""

from __future__ import annotations

import numpy as np
import scipy.stats


def weighted_tau(ground_truth, scores) -> float:
  """Weighted Kendall tau, the Model Spider protocol.

  `scipy.stats.weightedtau(ground_truth, scores, rank=None)`: the hyperbolic
  weights come from the decreasing lexicographic order of (ground truth,
  score), so mistakes among the truly best models cost most.

  Args:
    ground_truth: [M] accuracies (or any higher-is-better quantity).
    scores: [M] predicted scores, higher = predicted better.

  Returns:
    The statistic, NaN when either vector is constant.
  """
  gt = np.asarray(ground_truth, dtype=np.float64)
  sc = np.asarray(scores, dtype=np.float64)
  if gt.shape != sc.shape or gt.ndim != 1:
    raise ValueError(
        f"weighted_tau needs two [M] vectors of equal length, got {gt.shape}"
        f" and {sc.shape}.")
  if not (np.all(np.isfinite(gt)) and np.all(np.isfinite(sc))):
    raise ValueError("weighted_tau got NaN or Inf; score every model with a "
                     "finite number.")
  return float(scipy.stats.weightedtau(gt, sc, rank=None).statistic)


def rel_at_k(ground_truth, scores, k: int = 1) -> float:
  """Best ground truth among the top-k by score, divided by the best overall.

  Args:
    ground_truth: [M] accuracies (positive, higher is better).
    scores: [M] predicted scores.
    k: how many top-scored models to consider.

  Returns:
    A number in (0, 1] for positive accuracies; 1 means the best model is in
    the predicted top-k.
  """
  gt = np.asarray(ground_truth, dtype=np.float64)
  top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
  return float(gt[top].max() / gt.max())


def top1_regret(ground_truth, scores) -> float:
  """Accuracy lost by picking the top-scored model: max(gt) - gt[argmax(score)].

  Args:
    ground_truth: [M] accuracies.
    scores: [M] predicted scores.

  Returns:
    A non-negative number in the units of `ground_truth` (0 = best picked).
  """
  gt = np.asarray(ground_truth, dtype=np.float64)
  best = int(np.argmax(np.asarray(scores, dtype=np.float64)))
  return float(gt.max() - gt[best])


def ranks_from_scores(scores) -> np.ndarray:
  """Integer ranks, 0 = highest score (ties broken by zoo order).

  Args:
    scores: [M] scores.

  Returns:
    [M] int array, a permutation of 0..M-1.
  """
  order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
  ranks = np.empty_like(order)
  ranks[order] = np.arange(order.size)
  return ranks


def zscore(scores) -> np.ndarray:
  """[T, M] scores standardised per task (row) over the M PTMs."""
  s = np.asarray(scores, np.float64)
  return (s - s.mean(1, keepdims=True)) / np.maximum(s.std(1, keepdims=True),
                                                     1e-12)


def task_metrics(ground_truth, scores) -> dict[str, float]:
  """All per-task metrics as a dict: weighted_tau, rel@1, rel@3, regret@1."""
  return {
      "weighted_tau": weighted_tau(ground_truth, scores),
      "rel@1": rel_at_k(ground_truth, scores, 1),
      "rel@3": rel_at_k(ground_truth, scores, 3),
      "regret@1": top1_regret(ground_truth, scores),
  }


def paired_difference(values, reference) -> dict[str, float | None]:
  """Mean of values - reference over paired items, with its standard error.

  Args:
    values, reference: [T] per-task figures of two methods on the same tasks.

  Returns:
    {"mean": mean difference, "se": std(ddof=1) / sqrt(T), None if T < 2}.
  """
  d = np.asarray(values, np.float64) - np.asarray(reference, np.float64)
  se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else None
  return {"mean": float(d.mean()), "se": se}


def constant_prior(ground_truth_rows) -> np.ndarray:
  """Each PTM's mean rank over tasks: the task-agnostic "average ranking".

  Args:
    ground_truth_rows: [T, M] accuracies of T (training) tasks.

  Returns:
    [M] mean rank, 1 = worst ... M = best (ties get their average rank), so
    higher = better, usable directly as a score.
  """
  g = np.asarray(ground_truth_rows, dtype=np.float64)
  return scipy.stats.rankdata(g, axis=1).mean(axis=0)
