"""The one orbax wrapper: save, resume, restore for inference, zoo checks.

A checkpoint directory holds orbax steps; each step has three items:
"params" (the model's nnx.Param state), "train" ({"opt", "step"}) and "meta"
(JSON: PTM names and order, dims, encoder, model and run config, the prior
and the chosen re-ranking depth). Orbax commits a step atomically (it writes
to a temporary directory and renames), so a killed run leaves either a
complete step or none. The manager keeps the N latest steps plus the best
one on the validation metric.
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp

META_VERSION = 1
VAL_METRIC = "val_weighted_tau"


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt or does not fit the store."""


def manager(directory, *, keep_latest: int = 2,
            keep_best: int = 1) -> ocp.CheckpointManager:
  """An orbax CheckpointManager keeping `keep_latest` + `keep_best` steps."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(keep_latest),
      ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[VAL_METRIC], n=keep_best,
          keep_checkpoints_without_metrics=False),
  ])
  # best_fn makes orbax write each step's metrics to disk (without it they
  # live only in this manager's memory, and a new manager cannot tell which
  # step was best); which steps are kept is decided by the policy alone.
  opts = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                      best_fn=lambda m: m[VAL_METRIC],
                                      best_mode="max",
                                      enable_async_checkpointing=False)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(),
                               options=opts)


def save(mngr: ocp.CheckpointManager, step: int, params, train_state,
         meta: dict, val_metric: float | None) -> None:
  """Saves one step (blocking). `train_state` = {"opt": ..., "step": ...}."""
  metrics = None if val_metric is None else {VAL_METRIC: float(val_metric)}
  mngr.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      train=ocp.args.StandardSave(train_state),
      meta=ocp.args.JsonSave({"version": META_VERSION, **meta})),
            metrics=metrics, force=True)
  mngr.wait_until_finished()


def restore_train(mngr: ocp.CheckpointManager, abstract_params,
                  abstract_train) -> tuple[Any, Any, dict] | None:
  """(params, train_state, meta) of the latest step, or None if none."""
  step = mngr.latest_step()
  if step is None:
    return None
  try:
    r = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        train=ocp.args.StandardRestore(abstract_train),
        meta=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types for damaged files.
    raise CheckpointError(
        f"cannot restore step {step} from {mngr.directory}: {e}. Delete that "
        "step directory to resume from an earlier one.") from e
  return r.params, r.train, dict(r.meta)


def best_or_latest_step(mngr: ocp.CheckpointManager) -> int:
  """The step with the best validation metric, else the latest step."""
  steps = mngr.all_steps()
  if not steps:
    raise CheckpointError(
        f"no checkpoint in {mngr.directory}; train one with `python -m "
        "spider_jax.train --workdir=...` (or point --config.checkpoint at "
        "a directory that has one).")
  scored = [(s, (mngr.metrics(s) or {}).get(VAL_METRIC)) for s in steps]
  if all(v is None for _, v in scored):  # Written before metrics were.
    scored = [(s, mngr.restore(s, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta.get("val", {}).get("best"))
              for s in steps]
  scored = [(s, v) for s, v in scored if v is not None]
  return max(scored, key=lambda sv: (sv[1], sv[0]))[0] if scored else max(
      steps)


def read_meta(directory, step: int | None = None) -> tuple[int, dict]:
  """(step, meta dict) of a checkpoint directory (best step by default)."""
  directory = pathlib.Path(directory)
  if not directory.exists():
    raise CheckpointError(f"checkpoint directory {directory} does not exist.")
  with manager(directory) as mngr:
    step = best_or_latest_step(mngr) if step is None else step
    try:
      r = mngr.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f"checkpoint {directory} step {step} has no "
                            f"readable metadata: {e}") from e
  meta = dict(r.meta)
  if meta.get("version") != META_VERSION:
    raise CheckpointError(f"checkpoint {directory}: metadata version "
                          f"{meta.get('version')} != {META_VERSION}.")
  return step, meta


def restore_params(directory, abstract_params, step: int, sharding=None):
  """Restores only the model parameters of `step`, on any topology.

  Args:
    directory: the checkpoint directory.
    abstract_params: a tree of shapes/dtypes (e.g. from nnx.eval_shape).
    step: which step.
    sharding: where to put the arrays; default: replicated over all devices
      of this process's mesh (a checkpoint written on a pod restores on a
      laptop and vice versa).
  """
  if sharding is None:
    from spider_jax import sharding as sharding_lib
    sharding = sharding_lib.replicated(sharding_lib.data_mesh())
  abstract_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      abstract_params)
  with manager(directory) as mngr:
    try:
      r = mngr.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params)))
    except Exception as e:
      raise CheckpointError(f"cannot restore parameters of {directory} step "
                            f"{step}: {e}") from e
  return r.params


def check_zoo(meta: dict, ptm_names: Sequence[str],
              ptm_dims: Sequence[int], generic_dim: int,
              encoder: str = "") -> None:
  """Raises CheckpointError naming the difference if the zoos differ.

  `encoder` (the generic encoder's name; "" = not checked) must match the
  checkpoint's, when it records one.
  """
  ck_names, names = list(meta["ptm_names"]), list(ptm_names)
  if ck_names != names:
    missing = [n for n in ck_names if n not in names]
    extra = [n for n in names if n not in ck_names]
    detail = (f"missing from the store: {missing}; not in the checkpoint: "
              f"{extra}" if missing or extra else
              "same PTMs in a different order")
    raise CheckpointError(
        f"the checkpoint was trained on a different zoo ({detail}). Train a "
        "ranker on this zoo, or use the store it was trained with.")
  if list(meta["ptm_dims"]) != list(ptm_dims):
    diff = [(n, a, b) for n, a, b in zip(names, meta["ptm_dims"], ptm_dims)
            if a != b]
    raise CheckpointError(f"PTM feature dims differ (name, checkpoint, "
                          f"store): {diff}.")
  if int(meta["generic_dim"]) != int(generic_dim):
    raise CheckpointError(
        f"generic encoder dim differs: checkpoint {meta['generic_dim']}, "
        f"store {generic_dim} (encoder {meta.get('encoder')!r}).")
  if encoder and meta.get("encoder") and meta["encoder"] != encoder:
    raise CheckpointError(
        f"the checkpoint's task tokens come from generic encoder "
        f"{meta['encoder']!r}, but this run's come from {encoder!r}. Set "
        f"--config.encoder={meta['encoder']}, or train a ranker for this "
        "encoder.")
