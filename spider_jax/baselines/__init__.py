"""Transferability baselines (the peers Model Spider is compared with), in JAX.

Every method is a pure function `(features | source_probs, labels, *,
key=None) -> []` score, higher = predicted to transfer better, living in the
submodule of the same name (`spider_jax.baselines.logme.logme`, ...).
`METHODS` maps a method name to its `MethodSpec`; `score(name, x, y)` calls
one; `score_zoo` scores every PTM of a FeatureStore task with one compiled
call per group of equal-shaped models.

Precision: the functions compute in float64 only when the caller enabled it
(`with jax.enable_x64(True): ...`, or `jax.config.update("jax_enable_x64",
True)` in an entry point); they never change `jax.config` themselves. The
reference values are float64; float32 is not accurate enough for LogME,
H-score or GBC (Gram eigenvalues carry ~1e-7 sigma_max^2 of noise).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from spider_jax.baselines import _common
from spider_jax.baselines import gbc as _gbc
from spider_jax.baselines import hscore as _hscore
from spider_jax.baselines import knn as _knn
from spider_jax.baselines import leep as _leep
from spider_jax.baselines import lfc as _lfc
from spider_jax.baselines import linear_probe as _linear_probe
from spider_jax.baselines import logme as _logme
from spider_jax.baselines import nce as _nce
from spider_jax.baselines import nleep as _nleep
from spider_jax.baselines import pactran as _pactran
from spider_jax.baselines import reference as _reference
from spider_jax.baselines import sfda as _sfda
from spider_jax.baselines import transrate as _transrate
from spider_jax.baselines._common import BaselineError

mean_training_rank = _reference.mean_training_rank
prior_scores = _reference.prior_scores
random_scores = _reference.random_scores


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A registered baseline.

  Attributes:
    fn: the per-model function (see the module docstring), or for the
      reference rows `prior_scores` / `random_scores`.
    kernel: its jittable kernel (None for the reference rows).
    needs_source_probs: True if it scores source-class probabilities [N, S]
      instead of features [N, D].
    needs_key: True if it is randomised and needs an explicit PRNG key.
    description: one line.
  """
  fn: Callable
  kernel: _common.Kernel | None
  needs_source_probs: bool
  needs_key: bool
  description: str


def _spec(fn, kernel, description):
  return MethodSpec(fn, kernel, kernel.input == "source_probs",
                    kernel.needs_key, description)


METHODS: dict[str, MethodSpec] = {
    "logme": _spec(_logme.logme, _logme.FAST,
                   "LogME, fast fixed point, full-D evidence (thuml)"),
    "logme_icml": _spec(_logme.logme_icml, _logme.ICML,
                        "LogME, ICML 2021 algorithm (thuml _fit_icml)"),
    "leep": _spec(_leep.leep, _leep.KERNEL, "LEEP on source probabilities"),
    "nce": _spec(_nce.nce, _nce.KERNEL, "NCE with hard (argmax) source labels"),
    "nleep": _spec(_nleep.nleep, _nleep.KERNEL,
                   "N-LEEP: PCA 80% + GMM (EM in JAX) + LEEP"),
    "hscore": _spec(_hscore.hscore, _hscore.HSCORE, "H-score, pinv covariance"),
    "hscore_regularized": _spec(_hscore.hscore_regularized,
                                _hscore.HSCORE_REGULARIZED,
                                "H-score with Ledoit-Wolf shrinkage (TLlib)"),
    "gbc": _spec(_gbc.gbc, _gbc.FULL,
                 "GBC, PCA 64, full covariances (Model Spider)"),
    "gbc_diagonal": _spec(_gbc.gbc_diagonal, _gbc.DIAGONAL,
                          "GBC, PCA 64, diagonal Gaussians (stable_transfer)"),
    "gbc_spherical": _spec(_gbc.gbc_spherical, _gbc.SPHERICAL,
                           "GBC, PCA 64, spherical Gaussians "
                           "(stable_transfer)"),
    "transrate": _spec(_transrate.transrate, _transrate.KERNEL,
                       "TransRate, eps=1e-4, unweighted class mean (TLlib)"),
    "sfda": _spec(_sfda.sfda, _sfda.KERNEL, "SFDA (TencentARC)"),
    "pactran_dirichlet": _spec(_pactran.pactran_dirichlet, _pactran.KERNEL,
                               "-PACTran-Dirichlet, alpha=1 (Model Spider)"),
    "lfc": _spec(_lfc.lfc, _lfc.KERNEL, "LFC kernel alignment, O(N D^2) form"),
    "knn_loo": _spec(_knn.knn_loo, _knn.KERNEL,
                     "leave-one-out k-NN accuracy, cosine, k=5"),
    "linear_probe": _spec(_linear_probe.linear_probe, _linear_probe.KERNEL,
                          "held-out softmax-regression accuracy, L2 grid"),
    "prior": MethodSpec(prior_scores, None, False, False,
                        "constant task-agnostic prior (e.g. mean training "
                        "rank)"),
    "random": MethodSpec(random_scores, None, False, True,
                         "uniform random scores from a PRNG key"),
}


def _load(task, ptm: str, rows: np.ndarray, source_probs: bool, method: str):
  try:
    arr = task.source_probs(ptm) if source_probs else task.ptm_features(ptm)
  except (ValueError, OSError) as e:  # StoreError is a ValueError.
    what = "source-class probabilities" if source_probs else "features"
    raise BaselineError(
        f"method {method!r} needs {what} of PTM {ptm!r}, which the store "
        f"cannot provide ({e}). Re-extract the store with source_probs for "
        f"{ptm}, or use a feature-only method.") from None
  return np.asarray(arr[rows], np.float64)


def score_zoo(method: str, task, ptm_names: Sequence[str], *, key=None,
              split: str = "train", max_models_per_call: int = 8,
              prior=None, prior_names: Sequence[str] | None = None,
              **options) -> np.ndarray:
  """Scores every PTM of a zoo on one FeatureStore task.

  PTMs whose inputs have the same width are stacked and scored by one
  vmapped, jitted call (at most `max_models_per_call` at a time, to bound
  memory); each other width is its own compiled call. Randomised methods use
  `jax.random.fold_in(key, j)` for the j-th PTM of `ptm_names`, so scores do
  not depend on the grouping: `score_zoo(...)[j]` equals
  `METHODS[method].fn(x_j, y, key=fold_in(key, j))`.

  Args:
    method: a key of `METHODS`.
    task: a `spider_jax.data.TaskData` (labels, split, ptm_features,
      source_probs).
    ptm_names: the M PTMs to score, in output order.
    key: PRNG key, required for randomised methods.
    split: which rows to score ("train", as Model Spider does).
    max_models_per_call: models per vmapped call.
    prior: for method "prior", a [M] vector or {ptm: value}.
    prior_names: names of the entries of a [M] `prior` vector.
    **options: method options (e.g. `k=10` for knn_loo).

  Returns:
    [M] float64 scores, higher = better.

  Raises:
    BaselineError: unknown method, missing key / prior / source probs.
  """
  if method not in METHODS:
    raise BaselineError(f"unknown method {method!r}; choose from "
                        f"{sorted(METHODS)}.")
  spec = METHODS[method]
  ptm_names = list(ptm_names)
  if not ptm_names:
    raise BaselineError("score_zoo needs at least one PTM name.")
  if spec.needs_key and key is None:
    raise BaselineError(f"{method} is randomised: pass an explicit PRNG key,"
                        " e.g. key=jax.random.key(0).")
  if method == "prior":
    if prior is None:
      raise BaselineError("method 'prior' needs prior=[M] vector or "
                          "{ptm: value} (e.g. mean_training_rank(...)).")
    return prior_scores(prior, ptm_names, prior_names)
  if method == "random":
    return random_scores(key, len(ptm_names))
  rows = task.mask(split)
  if not np.any(rows):
    raise BaselineError(f"task {task.name!r} has no {split!r} rows.")
  labels = np.asarray(task.labels)[rows]
  kernel = spec.kernel
  inputs = [_load(task, m, rows, spec.needs_source_probs, method)
            for m in ptm_names]
  groups: dict[int, list[int]] = {}
  for j, x in enumerate(inputs):
    groups.setdefault(x.shape[1], []).append(j)
  out = np.empty(len(ptm_names), np.float64)
  for idx in groups.values():
    for start in range(0, len(idx), max_models_per_call):
      chunk = idx[start:start + max_models_per_call]
      keys = None
      if spec.needs_key:
        keys = jax.numpy.stack([jax.random.fold_in(key, j) for j in chunk])
      scores = _common.score_many(kernel, np.stack([inputs[j] for j in chunk]),
                                  labels, keys=keys, name=method, **options)
      out[chunk] = np.asarray(scores, np.float64)
  return out


def score(method: str, x, labels, *, key=None, **options):
  """`METHODS[method].fn(x, labels, key=key, **options)` for one model.

  Args:
    method: a key of `METHODS` other than "prior" / "random".
    x: [N, D] features, or [N, S] source probabilities when
      `METHODS[method].needs_source_probs`.
    labels: [N] integer class ids.
    key: PRNG key for randomised methods.
    **options: method options.

  Returns:
    [] score, higher = better.
  """
  if method not in METHODS or METHODS[method].kernel is None:
    raise BaselineError(f"unknown per-model method {method!r}; choose from "
                        f"{sorted(m for m, s in METHODS.items() if s.kernel)}"
                        ".")
  return METHODS[method].fn(x, labels, key=key, **options)


__all__ = ["BaselineError", "METHODS", "MethodSpec", "score", "score_zoo",
           "mean_training_rank", "prior_scores", "random_scores"]
