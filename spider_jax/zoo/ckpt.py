"""Orbax save/restore of zoo models: params pytree + JSON metadata.

Layout: an orbax `CheckpointManager` directory with one step (0) holding two
items, `params` (the `nnx.Param` state as a pure dict, `StandardSave`) and
`meta` (`JsonSave`). Orbax writes each step to a temporary directory and
renames it when complete, so a crash never leaves a half-written checkpoint.

The metadata must name the architecture (`arch`) and `num_classes`, which is
what `load_local` needs to rebuild the module before restoring into it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from spider_jax.zoo import archs

__all__ = ["save", "load_metadata", "load_local"]

_STEP = 0


def _manager(directory: str | os.PathLike[str], create: bool):
  # Zoo checkpoints are written and read by one process at a time (process
  # 0 trains the zoo; the others load it later): this process alone takes
  # part, with no barrier across the processes of a jax.distributed run.
  pid = jax.process_index()
  path = os.path.abspath(os.fspath(directory))
  if create:
    os.makedirs(path, exist_ok=True)
  return ocp.CheckpointManager(
      path,
      item_names=("params", "meta"),
      options=ocp.CheckpointManagerOptions(
          create=False,
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              primary_host=pid, active_processes={pid})))


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic,)):
    return x.item()
  return x


def save(directory: str | os.PathLike[str], model: nnx.Module,
         metadata: dict[str, Any]) -> None:
  """Saves `model`'s params and `metadata` (JSON-able) under `directory`.

  Raises:
    FileExistsError: a checkpoint already exists there.
  """
  with _manager(directory, create=True) as mngr:
    if mngr.latest_step() is not None:
      raise FileExistsError(f"checkpoint already exists in {directory}")
    # numpy leaves: orbax refuses single-device jax.Arrays in a
    # jax.distributed run (they are not global arrays).
    params = jax.tree.map(np.asarray,
                          nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    mngr.save(_STEP, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave(_jsonable(metadata))))
    mngr.wait_until_finished()


def load_metadata(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads only the JSON metadata of a checkpoint."""
  with _manager(directory, create=False) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    return dict(mngr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta)


def load_local(directory: str | os.PathLike[str]
               ) -> tuple[nnx.Module, dict[str, Any]]:
  """Rebuilds a local-arch model (`archs.build`) and restores its params.

  Returns:
    (model, metadata).
  """
  meta = load_metadata(directory)
  model = archs.build(meta["arch"], int(meta["num_classes"]),
                      jax.random.key(0))
  state = nnx.state(model, nnx.Param)
  # Restored as numpy (host-local, valid on any process), then put on this
  # process's default device.
  target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                        nnx.to_pure_dict(state))
  with _manager(directory, create=False) as mngr:
    params = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target))).params
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(model, state)
  return model, meta
