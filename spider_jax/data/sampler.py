"""Host-side batches of task tokens for training and scoring.

A batch is a dict of numpy arrays with static shapes (padded to buckets):

  u        [B, P, Dg]  float32  generic class prototypes
  u_mask   [B, P]      bool
  gt       [B, M]      float32  ground-truth accuracies (training only)
  weight   [B]         float32  1 for real tasks, 0 for padding tasks
  h        [B, K, Ph, Dmax]     PTM-specific prototypes (re-ranking slots)
  h_mask   [B, K, Ph]  bool     all False = inactive slot
  ptm      [B, K]      int32    PTM index of each slot

Training batches are a pure function of (seed, step): a restarted run sees
the same data in the same order.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from spider_jax import tokens as tok
from spider_jax.data.store import FeatureStore, TaskData


def slot_arrays(tasks: Sequence[TaskData | None], ptm_ids: np.ndarray,
                ptm_names: Sequence[str], ptm_dims: Sequence[int],
                rows: Sequence[np.ndarray | None], length: int) -> dict:
  """PTM-specific prototypes of chosen PTMs, as re-ranking slots.

  Args:
    tasks: B tasks (None = padding task, all slots inactive).
    ptm_ids: [B, K] int PTM indices; -1 = inactive slot.
    ptm_names: the zoo order; ptm_dims: their feature widths Dm.
    rows: per task, a boolean mask of the rows whose features make the
      prototypes (None = the train split).
    length: Ph, padded token count.

  Returns:
    {"h": [B, K, Ph, Dmax], "h_mask": [B, K, Ph], "ptm": [B, K]}.
  """
  b, k = ptm_ids.shape
  dmax = max(ptm_dims)
  h = np.zeros((b, k, length, dmax), np.float32)
  h_mask = np.zeros((b, k, length), bool)
  for i, task in enumerate(tasks):
    if task is None:
      continue
    sel = task.mask("train") if rows[i] is None else rows[i]
    for j, pid in enumerate(ptm_ids[i]):
      if pid < 0:
        continue
      feats = task.ptm_features(ptm_names[pid])[sel]
      protos = tok.class_prototypes(feats, task.labels[sel], task.num_classes)
      h[i, j, :task.num_classes, :protos.shape[1]] = protos
      h_mask[i, j, :task.num_classes] = True
  return {"h": h, "h_mask": h_mask,
          "ptm": np.maximum(ptm_ids, 0).astype(np.int32)}


def generic_arrays(tasks: Sequence[TaskData | None],
                   rows: Sequence[np.ndarray | None], length: int,
                   dim: int, task_token: str = "prototype") -> dict:
  """Task tokens of the generic features (`tokens.class_tokens`).

  `prototype_size` tokens count each task's whole train split, also when
  `rows` selects a subset of it.

  Returns:
    {"u": [B, P, token_dim(Dg, task_token)], "u_mask": [B, P],
     "weight": [B]}.
  """
  u = np.zeros((len(tasks), length, tok.token_dim(dim, task_token)),
               np.float32)
  u_mask = np.zeros((len(tasks), length), bool)
  weight = np.zeros((len(tasks),), np.float32)
  for i, task in enumerate(tasks):
    if task is None:
      continue
    train = task.mask("train")
    sel = train if rows[i] is None else rows[i]
    counts = (np.bincount(task.labels[train], minlength=task.num_classes)
              if task_token == "prototype_size" else None)
    u[i, :task.num_classes] = tok.class_tokens(
        task.generic[sel], task.labels[sel], task.num_classes,
        task_token=task_token, counts=counts)
    u_mask[i, :task.num_classes] = True
    weight[i] = 1.0
  return {"u": u, "u_mask": u_mask, "weight": weight}


class TrainingSampler:
  """Deterministic training batches from the store's "train" tasks.

  Each batch draws `batch_size` tasks (an epoch is a seeded permutation of
  the tasks), keeps a random fraction in [min_keep, 1] of each class's
  training rows (at least one; the official release likewise averages
  random 50-shot subsets), and draws one k ~ U{0..k_max} for the batch: each
  task then gets the own prototypes of k random distinct PTMs (official
  collate_fn). Ground truth comes from the store's table.
  """

  def __init__(self, store: FeatureStore, task_names: Sequence[str], *,
               batch_size: int, k_max: int, seed: int,
               min_keep: float = 0.5, task_token: str = "prototype"):
    if not task_names:
      raise ValueError("no training tasks: the store has no task with role "
                       "'train'.")
    self.store = store
    self.tasks = [store.task(n) for n in task_names]
    gt = store.ground_truth()
    self.gt = np.stack([gt.row(n, store.ptm_names) for n in task_names]
                       ).astype(np.float32)
    self.batch_size, self.seed, self.min_keep = batch_size, seed, min_keep
    self.task_token = task_token
    self.k_max = min(k_max, len(store.ptms))
    self.p_len = tok.bucket_size(max(t.num_classes for t in self.tasks))
    self.steps_per_epoch = max(1, math.ceil(len(self.tasks) / batch_size))

  def batch(self, step: int, rows: slice = slice(None)) -> dict:
    """The batch of global step `step` (a pure function of seed and step).

    Args:
      step: the global step.
      rows: which of its `batch_size` tasks to build (default all); a
        process builds only the rows its devices hold
        (`sharding.process_rows`). The random draws are made for the whole
        batch, so a slice equals the same rows of the full batch.

    Returns:
      The arrays of the module docstring for the selected rows.
    """
    epoch, i = divmod(step, self.steps_per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(
        len(self.tasks))
    idx = order[i * self.batch_size:(i + 1) * self.batch_size]
    if idx.size < self.batch_size:  # Last batch of an epoch: wrap around
      # (as often as needed when there are fewer tasks than batch_size).
      idx = np.concatenate([idx, np.resize(order, self.batch_size - idx.size)])
    rng = np.random.default_rng([self.seed, epoch, i, 1])
    tasks = [self.tasks[j] for j in idx]
    keep = [self._subsample(t, rng) for t in tasks]
    ids = None
    if self.k_max:
      k = int(rng.integers(0, self.k_max + 1))
      m = len(self.store.ptms)
      ids = -np.ones((len(tasks), self.k_max), np.int64)
      for b in range(len(tasks)):
        ids[b, :k] = rng.choice(m, size=k, replace=False)
    tasks, keep = tasks[rows], keep[rows]
    out = generic_arrays(tasks, keep, self.p_len, self.store.encoder_dim,
                         self.task_token)
    out["gt"] = self.gt[idx[rows]]
    if ids is not None:
      out.update(slot_arrays(tasks, ids[rows], self.store.ptm_names,
                             self.store.ptm_dims, keep, self.p_len))
    return out

  def _subsample(self, task: TaskData, rng) -> np.ndarray:
    train = task.mask("train")
    keep = np.zeros_like(train)
    for c in range(task.num_classes):
      rows = np.flatnonzero(train & (task.labels == c))
      n = max(1, int(np.ceil(rng.uniform(self.min_keep, 1.0) * rows.size)))
      keep[rng.choice(rows, size=n, replace=False)] = True
    return keep
