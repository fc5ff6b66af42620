"""Reference rows that use no features: a task-agnostic prior and chance.

* `prior_scores`: the same score vector for every task, e.g. each PTM's mean
  rank over the training tasks (model_spider_official.md 5.2: this constant
  predictor reaches a mean weighted tau of 0.778 on the 10-PTM zoo).
* `random_scores`: i.i.d. uniform scores from an explicit PRNG key.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np

from spider_jax.baselines import _common


def mean_training_rank(rankings: Mapping[str, Sequence[float]]) -> np.ndarray:
  """[M] mean over training tasks of per-task ranks (higher = better).

  Args:
    rankings: {task: [M] ranks or accuracies in one zoo order}.

  Returns:
    [M] float64 mean.
  """
  if not rankings:
    raise _common.BaselineError("mean_training_rank needs at least one task.")
  rows = [np.asarray(r, np.float64) for r in rankings.values()]
  if len({r.shape for r in rows}) != 1 or rows[0].ndim != 1:
    raise _common.BaselineError("every training ranking must be a [M] vector "
                                "in the same zoo order.")
  return np.mean(np.stack(rows), axis=0)


def prior_scores(prior, ptm_names: Sequence[str] | None = None,
                 prior_names: Sequence[str] | None = None) -> np.ndarray:
  """The constant prior as scores of `ptm_names`.

  Args:
    prior: [M] vector, or {ptm: value}.
    ptm_names: PTMs to score (required with a mapping, or to reorder).
    prior_names: names of the entries of a [M] `prior` vector.

  Returns:
    [len(ptm_names)] float64 scores.
  """
  if isinstance(prior, Mapping):
    if ptm_names is None:
      raise _common.BaselineError("a {ptm: value} prior needs ptm_names.")
    missing = [m for m in ptm_names if m not in prior]
    if missing:
      raise _common.BaselineError(f"the prior has no value for {missing}.")
    return np.asarray([prior[m] for m in ptm_names], np.float64)
  vec = np.asarray(prior, np.float64)
  if vec.ndim != 1:
    raise _common.BaselineError(f"prior must be a [M] vector, got {vec.shape}.")
  if prior_names is not None and ptm_names is not None:
    return prior_scores(dict(zip(prior_names, vec)), ptm_names)
  if ptm_names is not None and len(ptm_names) != vec.size:
    raise _common.BaselineError(f"prior has {vec.size} entries for "
                                f"{len(ptm_names)} PTMs; pass prior_names.")
  return vec


def random_scores(key: jax.Array, num_models: int) -> np.ndarray:
  """[M] uniform scores in [0, 1) drawn from `key`."""
  if key is None:
    raise _common.BaselineError("random needs an explicit PRNG key.")
  return np.asarray(jax.random.uniform(key, (num_models,)), np.float64)
