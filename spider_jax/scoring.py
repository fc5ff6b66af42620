"""Batched, sharded scoring of every PTM for many tasks, and re-ranking.

`score` is the pure function; `Scorer` jit-compiles it once per padding
bucket, splits task batches over the devices of a mesh and gathers the
scores; `score_tasks` runs the two-stage Model Spider inference (generic
tokens for all PTMs, then the top-k PTMs' own tokens), and `score_depths`
runs it at several depths k at once (as validation does).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spider_jax import sharding
from spider_jax import tokens as tok
from spider_jax.data.sampler import generic_arrays, slot_arrays
from spider_jax.data.store import TaskData


def score(graphdef, params, u, u_mask, slots=None):
  """Pure scoring: [B, P, Dg] prototypes (+ optional slots) -> [B, M].

  Args:
    graphdef, params: from `nnx.split(FitnessTransformer(...))`.
    u: [B, P, Dg] padded generic prototypes; u_mask: [B, P] bool.
    slots: optional {"h": [B, K, Ph, Dmax], "h_mask": [B, K, Ph],
      "ptm": [B, K]} re-ranking tokens (see FitnessTransformer.__call__).

  Returns:
    [B, M] scores (eval mode, no dropout), higher = better.
  """
  return nnx.merge(graphdef, params)(u, u_mask, slots)


def batch_slots(batch: dict) -> dict | None:
  """The re-ranking slots {"h", "h_mask", "ptm"} of a batch, or None."""
  return ({k: batch[k] for k in ("h", "h_mask", "ptm")}
          if "h" in batch else None)


def split_chunks(batch: dict, chunk: int) -> dict:
  """[B, ...] leaves -> [B / chunk, chunk, ...] (for `lax.map` over chunks)."""
  return jax.tree.map(
      lambda x: x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:]), batch)


class Scorer:
  """Jit-compiled, device-sharded scoring with static shapes.

  Tasks are padded to `batch_size` (a multiple of the data-parallel size)
  and their prototypes to `tokens.bucket_size(C)`, so there is one compile
  per (bucket, k) pair. `trace_count` counts compiles (for tests).

  With `model_parallel` > 1 the mesh is 2-D (tasks x PTMs): the per-PTM
  tables (tokens, re-ranking projections) are split over `model_parallel`
  devices, so a zoo of 10^4-10^5 PTMs need not fit on one device; the zoo is
  padded with dummy PTMs to a multiple of it (their scores are dropped) and
  scores are gathered on every host.

  With `exact_chunk` = n > 0 each device scores its tasks n at a time
  (`lax.map` over chunks of n), so every task's scores are the same floats
  on any number of devices or hosts (per-device batch must be a multiple
  of n). 0 scores a device's whole batch at once (faster; layouts then
  agree to rounding, ~1e-7).
  """

  def __init__(self, graphdef, params, *, mesh=None, batch_size: int = 16,
               model_parallel: int = 1, exact_chunk: int = 0):
    if mesh is None:
      mesh = (sharding.data_mesh() if model_parallel == 1 else
              sharding.zoo_mesh(model_parallel))
    self.mesh = mesh
    data_size = mesh.shape["data"]
    self.model_size = mesh.shape.get("model", 1)
    self.batch_size = sharding.pad_to_multiple(
        batch_size, data_size * max(exact_chunk, 1))
    self.graphdef = graphdef
    self.set_params(params)
    self.trace_count = 0

    def _score(params, batch):
      self.trace_count += 1  # Runs at trace time only.

      def run(b):
        return score(graphdef, params, b["u"], b["u_mask"], batch_slots(b))

      if not exact_chunk:
        return run(batch)
      out = jax.lax.map(run, split_chunks(batch, exact_chunk))
      return out.reshape((batch["u"].shape[0], -1))

    self._jit = jax.jit(_score,
                        out_shardings=sharding.replicated(self.mesh))

  def set_params(self, params) -> None:
    """Swaps in new parameters (same structure: no recompile)."""
    self.num_ptms = params["ptm_tokens"].shape[0]
    pad = sharding.pad_to_multiple(self.num_ptms, self.model_size) - \
        self.num_ptms
    if pad:
      def pad_rows(path, x):
        name = jax.tree_util.keystr(path)
        if any(f"'{n}'" in name for n in sharding.PER_PTM_PARAMS):
          return jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:],
                                               x.dtype)])
        return x
      params = jax.tree_util.tree_map_with_path(pad_rows, params)
    self.params = jax.device_put(params, sharding.param_shardings(params,
                                                                  self.mesh))

  def __call__(self, batch: dict) -> np.ndarray:
    """Scores a host batch (leading axis = batch_size) -> [B, M] numpy."""
    out = self._jit(self.params, sharding.put_batch(batch, self.mesh))
    return np.asarray(out)[:, :self.num_ptms]


def _groups(tasks: Sequence[TaskData], batch_size: int):
  """Yields (bucket, [task indices]) chunks of at most batch_size tasks."""
  by_bucket: dict[int, list[int]] = {}
  for i, t in enumerate(tasks):
    by_bucket.setdefault(tok.bucket_size(t.num_classes), []).append(i)
  for bucket, idx in sorted(by_bucket.items()):
    for s in range(0, len(idx), batch_size):
      yield bucket, idx[s:s + batch_size]


@dataclasses.dataclass(frozen=True)
class ZooInfo:
  """The zoo as the scorer sees it: names, feature widths, generic width,
  and the kind of task token the model reads (`tokens.TASK_TOKENS`)."""
  ptm_names: tuple[str, ...]
  ptm_dims: tuple[int, ...]
  generic_dim: int
  task_token: str = "prototype"


def score_tasks(scorer: Scorer, tasks: Sequence[TaskData], zoo: ZooInfo, *,
                k: int = 0) -> np.ndarray:
  """Scores every PTM for every task, re-ranking the top-k.

  Stage 1 scores all M PTMs from the generic prototypes of each task's
  training split. If k > 0, the k best PTMs of each task then get their own
  prototypes (from their features on the same rows) appended to their
  sequences and all PTMs are rescored (the others are unchanged).

  Args:
    scorer: a Scorer for the model.
    tasks: T tasks.
    zoo: the zoo order (must match the model's PTM tokens).
    k: re-ranking depth, 0 = generic tokens only.

  Returns:
    [T, M] float32 scores.
  """
  return score_depths(scorer, tasks, zoo, [k])[0]


def score_depths(scorer: Scorer, tasks: Sequence[TaskData], zoo: ZooInfo,
                 depths: Sequence[int]) -> np.ndarray:
  """`score_tasks` at several re-ranking depths, sharing the work.

  Stage 1 runs once, and the re-ranking slots of the deepest depth are
  built once (each task's top-K PTMs, K = max(depths)); a shallower depth
  k switches off the slots past k. So every depth > 0 runs the same shapes:
  one compile per bucket for all of them, where `score_tasks` compiles
  once per (bucket, k). Scores agree with `score_tasks` to float rounding.

  Args:
    scorer, tasks, zoo: as for `score_tasks`.
    depths: D re-ranking depths (0 = generic tokens only).

  Returns:
    [D, T, M] float32 scores, in the order of `depths`.
  """
  m = len(zoo.ptm_names)
  depths = [min(k, m) for k in depths]
  deepest = max(depths, default=0)
  out = np.zeros((len(depths), len(tasks), m), np.float32)
  bs = scorer.batch_size
  for bucket, idx in _groups(tasks, bs):
    group = [tasks[i] for i in idx] + [None] * (bs - len(idx))
    rows = [None] * bs
    batch = generic_arrays(group, rows, bucket, zoo.generic_dim,
                           zoo.task_token)
    del batch["weight"]
    base = scorer(batch)
    if deepest:
      top = np.argsort(-base, axis=1, kind="stable")[:, :deepest]
      top[len(idx):] = -1
      slots = slot_arrays(group, top, zoo.ptm_names, zoo.ptm_dims, rows,
                          bucket)
    for d, k in enumerate(depths):
      scores = base
      if k:
        on = np.arange(deepest) < k                            # [K]
        scores = scorer({**batch, "h": slots["h"],
                         "h_mask": slots["h_mask"] & on[None, :, None],
                         "ptm": np.where(on[None, :], slots["ptm"], 0)})
      out[d, idx] = scores[:len(idx)]
  return out
