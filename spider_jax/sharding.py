"""Device mesh and shardings: one code path from 1 CPU device to a pod.

Data parallelism over a 1-D mesh named "data": batches (tasks) are split
along their first axis, parameters and optimizer state are replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh ("data",) over `devices` (default: all global devices)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(AxisType.Auto,))


def zoo_mesh(model_parallel: int, devices=None) -> Mesh:
  """A 2-D mesh ("data", "model"): tasks x PTMs, for zoos too big for one
  device. `model_parallel` devices share each task's zoo."""
  devices = jax.devices() if devices is None else list(devices)
  if model_parallel < 1 or len(devices) % model_parallel:
    raise ValueError(f"model_parallel={model_parallel} must divide the "
                     f"{len(devices)} devices.")
  return jax.make_mesh((len(devices) // model_parallel, model_parallel),
                       ("data", "model"), devices=devices,
                       axis_types=(AxisType.Auto, AxisType.Auto))


# Parameters with one row per PTM: split over the "model" axis of a zoo mesh.
PER_PTM_PARAMS = ("ptm_tokens", "h_w", "h_b")


def param_shardings(params, mesh: Mesh):
  """Per-leaf shardings: per-PTM tables split over "model" (if the mesh has
  that axis), everything else replicated."""
  def one(path, _):
    name = jax.tree_util.keystr(path)
    if "model" in mesh.axis_names and any(f"'{n}'" in name
                                          for n in PER_PTM_PARAMS):
      return NamedSharding(mesh, P("model"))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, params)


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over "data"."""
  return NamedSharding(mesh, P("data"))


def pad_to_multiple(n: int, multiple: int) -> int:
  """Smallest m >= n divisible by `multiple`."""
  return -(-n // multiple) * multiple


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Places a dict of host arrays on the mesh, split along axis 0.

  Every process holds the same global batch (batches are a function of the
  step) and contributes the rows of its own devices, so this works on one
  host and on many. Leading axes must be divisible by the mesh size.
  """
  sh = batch_sharded(mesh)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx])
  return out


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (a collective)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def barrier(name: str) -> None:
  """Waits until every process reaches this point (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def local_data_mesh(devices=None) -> Mesh:
  """A 1-D ("data",) mesh over this process's devices (default: all local
  devices), in the given order. Computations on it involve no other process
  and no collectives (pure data parallelism), so the physical topology does
  not matter."""
  devices = jax.local_devices() if devices is None else list(devices)
  return Mesh(np.array(devices), ("data",), axis_types=(AxisType.Auto,))


def gather_rows(tree):
  """Concatenates every process's leaves along axis 0, in process order.

  A collective: every process must call it, with leaves of the same shapes
  and dtypes, and every process gets the full numpy result. Identity (numpy
  leaves) on one process.
  """
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
