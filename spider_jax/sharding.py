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


def process_rows(global_size: int, mesh: Mesh) -> slice:
  """The rows of a [global_size, ...] batch that this process's devices hold.

  The batch is split along axis 0 over "data" (`batch_sharded`); a process
  holds one contiguous block of it (the layout
  `jax.make_array_from_process_local_data` expects).

  Raises:
    ValueError: the mesh interleaves this process's devices with others'.
  """
  index = batch_sharded(mesh).addressable_devices_indices_map((global_size,))
  blocks = sorted({s[0].indices(global_size)[:2] for s in index.values()})
  lo, hi = blocks[0][0], blocks[-1][1]
  if sum(b - a for a, b in blocks) != hi - lo:
    raise ValueError(f"process {jax.process_index()} holds rows {blocks} of "
                     "the batch, not one block: order the mesh's devices by "
                     "process (jax.make_mesh does).")
  return slice(lo, hi)


def put_local_batch(local: dict, global_size: int, mesh: Mesh) -> dict:
  """Assembles a global batch from each process's own rows.

  Args:
    local: {name: [n, ...] host array}, this process's rows
      (`process_rows(global_size, mesh)`) of every leaf.
    global_size: B, the global batch size (divisible by the mesh size).
    mesh: the mesh; leaves are split along axis 0 over "data".

  Returns:
    {name: [B, ...] jax.Array} (`jax.make_array_from_process_local_data`).
  """
  sh = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(
      sh, np.asarray(v), (global_size,) + np.shape(v)[1:])
          for k, v in local.items()}


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Places a dict of host arrays, the same global batch on every process,
  on the mesh, split along axis 0 (each process contributes its rows).
  Leading axes must be divisible by the mesh size."""
  size = len(next(iter(batch.values())))
  rows = process_rows(size, mesh)
  return put_local_batch({k: np.asarray(v)[rows] for k, v in batch.items()},
                         size, mesh)


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
