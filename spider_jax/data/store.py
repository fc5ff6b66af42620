"""FeatureStore: the on-disk contract between feature extractors and the ranker.

Layout of a store directory (all arrays are plain `.npy`, memory-mapped on
read; every file is written to a temporary name and renamed into place, and
`meta.json` is written last, so a store without `meta.json` is incomplete):

  meta.json                       format, encoder, PTMs, pools, tasks
  ground_truth.csv                model,<task>,<task>,...  (one row per PTM)
  pools/<pool>/labels.npy         [N] int, class ids of the pool
  pools/<pool>/generic.npy        [N, Dg] float, generic-encoder features
  pools/<pool>/features/<ptm>.npy [N, Dm] float, that PTM's penultimate features
  pools/<pool>/source_probs/<ptm>.npy  [N, S] float, optional source softmax
  tasks/<task>/indices.npy        [n] int, rows of the pool (optional: all rows)
  tasks/<task>/split.npy          [n] int8, 0 = train, 1 = val, 2 = test

A *pool* holds features of a set of images; a *task* is a subset of a pool's
rows with a train/val/test split and a role: "train" (ranker training),
"val" (ranker validation: checkpoint selection and re-ranking depth) or
"target" (held-out evaluation). Task labels are the pool labels of its rows
remapped to 0..C-1 in increasing order of pool id.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pathlib
import tempfile
from typing import Iterable, Mapping, Sequence

import numpy as np

FORMAT = "spider_jax.feature_store"
VERSION = 1
ROLES = ("train", "val", "target")
SPLITS = {"train": 0, "val": 1, "test": 2}


class StoreError(ValueError):
  """A FeatureStore is malformed or does not fit what it is used with."""


# ----------------------------------------------------------------------------
# Atomic file helpers (the one place that writes store files).


def _atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_save_npy(path: os.PathLike, array: np.ndarray) -> None:
  """Writes `array` to `path` as .npy via a temporary file and a rename."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp",
                             suffix=".npy")
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, np.asarray(array), allow_pickle=False)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_text(path: os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` via a temporary file and a rename."""
  _atomic_write_bytes(pathlib.Path(path), text.encode("utf-8"))


def atomic_write_json(path: os.PathLike, obj) -> None:
  """Writes `obj` as indented JSON to `path` atomically."""
  atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


# ----------------------------------------------------------------------------
# Ground-truth tables.


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """A (task x PTM) table of accuracies, higher is better.

  Attributes:
    models: PTM names, the columns of `values`.
    tasks: task names, the rows of `values`.
    values: [T, M] float64, NaN where a cell is unknown.
  """
  models: tuple[str, ...]
  tasks: tuple[str, ...]
  values: np.ndarray

  def row(self, task: str, models: Sequence[str] | None = None) -> np.ndarray:
    """[M] accuracies of `task` in the order of `models` (default: table order).

    Raises:
      StoreError: when the task or a model is missing or a cell is unknown.
    """
    if task not in self.tasks:
      raise StoreError(
          f"ground truth has no column for task {task!r}; add it to the "
          f"ground-truth CSV (tasks present: {_short(self.tasks)}).")
    models = self.models if models is None else tuple(models)
    missing = [m for m in models if m not in self.models]
    if missing:
      raise StoreError(
          f"ground truth has no row for PTM(s) {missing}; add them to the "
          "ground-truth CSV.")
    idx = [self.models.index(m) for m in models]
    out = self.values[self.tasks.index(task), idx]
    if not np.all(np.isfinite(out)):
      bad = [m for m, v in zip(models, out) if not np.isfinite(v)]
      raise StoreError(
          f"ground truth for task {task!r} is empty or not finite for "
          f"{bad}; fill in those cells.")
    return out

  def to_csv(self) -> str:
    """The CSV text: header `model,<task>...`, one row per PTM."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", *self.tasks])
    for j, m in enumerate(self.models):
      w.writerow([m, *(_fmt(v) for v in self.values[:, j])])
    return buf.getvalue()


def _fmt(v: float) -> str:
  return "" if not np.isfinite(v) else repr(float(v))


def _short(names: Sequence[str], n: int = 8) -> str:
  names = list(names)
  return ", ".join(names[:n]) + (f", ... ({len(names)} in all)"
                                 if len(names) > n else "")


def read_ground_truth(path: os.PathLike) -> GroundTruth:
  """Reads a wide ground-truth CSV: header `model,<task>...`, a row per PTM.

  This is the format of `shared/reference/zoo10_finetune_accuracy.csv`.
  Empty cells are read as NaN (unknown).
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise StoreError(f"ground-truth table {path} does not exist.")
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  if not rows or len(rows[0]) < 2 or rows[0][0].strip().lower() != "model":
    raise StoreError(
        f"{path}: expected a header 'model,<task>,<task>,...' (one row per "
        "PTM, one column per task).")
  tasks = tuple(c.strip() for c in rows[0][1:])
  models, values = [], []
  for i, r in enumerate(rows[1:], start=2):
    if not r:
      continue
    if len(r) != len(rows[0]):
      raise StoreError(f"{path}:{i}: expected {len(rows[0])} cells, got "
                       f"{len(r)}.")
    models.append(r[0].strip())
    try:
      values.append([float(c) if c.strip() else np.nan for c in r[1:]])
    except ValueError as e:
      raise StoreError(f"{path}:{i}: non-numeric accuracy ({e}).") from None
  if len(set(models)) != len(models):
    raise StoreError(f"{path}: duplicate PTM rows.")
  return GroundTruth(tuple(models), tasks,
                     np.asarray(values, dtype=np.float64).T.reshape(
                         len(tasks), len(models)))


# ----------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass(frozen=True)
class PTMInfo:
  """Metadata of one PTM in the store.

  Attributes:
    name: unique name, used as file name and as checkpoint key.
    dim: Dm, the width of its penultimate features.
    num_source_classes: width of its source-class softmax, 0 if it has none.
  """
  name: str
  dim: int
  num_source_classes: int = 0


@dataclasses.dataclass(frozen=True)
class TaskData:
  """One task, loaded (generic features in memory, PTM features lazily).

  Attributes:
    name: task name.
    role: "train", "val" or "target".
    num_classes: C.
    generic: [n, Dg] float32 generic-encoder features.
    labels: [n] int32 in 0..C-1.
    split: [n] int8, 0 train / 1 val / 2 test.
  """
  name: str
  role: str
  num_classes: int
  generic: np.ndarray
  labels: np.ndarray
  split: np.ndarray
  _store: "FeatureStore" = dataclasses.field(repr=False, compare=False)
  _rows: np.ndarray | None = dataclasses.field(repr=False, compare=False)
  _pool: str = dataclasses.field(repr=False, compare=False, default="")

  def ptm_features(self, ptm: str) -> np.ndarray:
    """[n, Dm] float32 features of PTM `ptm` on this task's rows."""
    return self._store._pool_array(self._pool, f"features/{ptm}.npy",
                                   self._rows, what=f"features of {ptm}")

  def source_probs(self, ptm: str) -> np.ndarray:
    """[n, S] source-class probabilities of `ptm` (if the store has them)."""
    return self._store._pool_array(self._pool, f"source_probs/{ptm}.npy",
                                   self._rows, what=f"source probs of {ptm}",
                                   check_finite=True)

  def mask(self, split: str) -> np.ndarray:
    """[n] bool, rows of the named split ("train", "val" or "test")."""
    return self.split == SPLITS[split]


class FeatureStore:
  """Read access to a FeatureStore directory (see the module docstring)."""

  def __init__(self, path: os.PathLike, ptms: Sequence[str] | None = None,
               exclude_pools: Sequence[str] = (),
               exclude_tasks: Sequence[str] = (),
               generic_from: str = ""):
    """Opens the store at `path`.

    Args:
      path: the store directory.
      ptms: optional subset of the zoo to expose (a view: `ptm_names`,
        `ptm_dims` and everything built on them see only these PTMs, in
        store order). None = the whole zoo.
      exclude_pools: pools whose tasks the view hides (`task_names`).
      exclude_tasks: tasks the view hides (`task_names`).
      generic_from: a PTM of the store whose features the view serves as
        the generic features (`TaskData.generic`, `encoder_name`,
        `encoder_dim`, and `seconds_per_sample()["encoder"]` become that
        PTM's). "" or the store's encoder name = the store's own generic
        encoder.
    """
    self.path = pathlib.Path(path)
    meta_path = self.path / "meta.json"
    if not meta_path.exists():
      raise StoreError(
          f"{self.path} is not a FeatureStore (no meta.json). Build one with "
          "spider_jax.data.StoreWriter, or `python -m spider_jax.data.synthetic"
          f" --out={self.path}`; an interrupted write also leaves no meta.json.")
    try:
      meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
      raise StoreError(f"{meta_path} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
      raise StoreError(f"{meta_path}: expected format {FORMAT!r} version "
                       f"{VERSION}, got {meta.get('format')!r} "
                       f"{meta.get('version')!r}.")
    self.meta = meta
    self.encoder_name: str = meta["encoder"]["name"]
    self.encoder_dim: int = int(meta["encoder"]["dim"])
    self.ptms: tuple[PTMInfo, ...] = tuple(
        PTMInfo(p["name"], int(p["dim"]), int(p.get("num_source_classes", 0)))
        for p in meta["ptms"])
    self._generic_file = "generic.npy"
    if generic_from and generic_from != self.encoder_name:
      dims = {p.name: p.dim for p in self.ptms}
      if generic_from not in dims:
        raise StoreError(
            f"generic_from={generic_from!r}: store {self.path} has no such "
            f"PTM (it holds {_short(list(dims))}); name one of them, or \"\" "
            "for the store's own generic encoder "
            f"({meta['encoder']['name']}).")
      self.encoder_name, self.encoder_dim = generic_from, dims[generic_from]
      self._generic_file = f"features/{generic_from}.npy"
    if ptms is not None:
      unknown = sorted(set(ptms) - set(self.ptm_names))
      if unknown or not ptms:
        raise StoreError(
            f"PTM subset {list(ptms)!r} of store {self.path}: unknown "
            f"{unknown} (the store holds {_short(self.ptm_names)}); name "
            "PTMs of the store.")
      self.ptms = tuple(p for p in self.ptms if p.name in set(ptms))
    self.exclude_pools = self._known(exclude_pools, "pools")
    self.exclude_tasks = self._known(exclude_tasks, "tasks")
    self._gt: GroundTruth | None = None

  def _known(self, names: Sequence[str], kind: str) -> frozenset[str]:
    """`names` as a set, after checking the store holds every one."""
    unknown = sorted(set(names) - set(self.meta.get(kind, {})))
    if unknown:
      raise StoreError(f"exclude_{kind} names {_short(unknown)}, which store "
                       f"{self.path} does not hold ({kind}: "
                       f"{_short(self.meta.get(kind, {}))}).")
    return frozenset(names)

  @property
  def ptm_names(self) -> tuple[str, ...]:
    return tuple(p.name for p in self.ptms)

  @property
  def ptm_dims(self) -> tuple[int, ...]:
    return tuple(p.dim for p in self.ptms)

  def task_names(self, role: str | None = None) -> list[str]:
    """Names of tasks, optionally only those with `role`, in store order."""
    if role is not None and role not in ROLES:
      raise StoreError(f"unknown task role {role!r}; use one of {ROLES}.")
    return [n for n, t in self.meta["tasks"].items()
            if (role is None or t["role"] == role)
            and t["pool"] not in self.exclude_pools
            and n not in self.exclude_tasks]

  def ground_truth(self) -> GroundTruth:
    """The store's ground-truth table (cached)."""
    if self._gt is None:
      self._gt = read_ground_truth(self.path / "ground_truth.csv")
    return self._gt

  def seconds_per_sample(self) -> dict[str, float]:
    """Recorded forward-pass cost per image: {"encoder": s, <ptm>: s, ...}."""
    secs = dict(self.meta.get("seconds_per_sample", {}))
    if self._generic_file != "generic.npy" and self.encoder_name in secs:
      secs["encoder"] = secs[self.encoder_name]
    return secs

  def task(self, name: str) -> TaskData:
    """Loads task `name`, validating its arrays (see `validate_task`)."""
    if name not in self.meta["tasks"]:
      raise StoreError(f"store {self.path} has no task {name!r} (tasks: "
                       f"{_short(self.meta['tasks'])}).")
    info = self.meta["tasks"][name]
    pool = info["pool"]
    tdir = self.path / "tasks" / name
    rows = None
    if (tdir / "indices.npy").exists():
      rows = np.load(tdir / "indices.npy", allow_pickle=False)
    pool_labels = self._pool_array(pool, "labels.npy", rows, what="labels",
                                   check_finite=False)
    generic = self._pool_array(pool, self._generic_file, rows,
                               what="generic features")
    split = np.load(tdir / "split.npy", allow_pickle=False).astype(np.int8)
    if split.shape != pool_labels.shape:
      raise StoreError(f"task {name}: split has {split.shape[0]} rows but the "
                       f"task has {pool_labels.shape[0]}.")
    classes, labels = np.unique(pool_labels, return_inverse=True)
    num_classes = int(info["num_classes"])
    if classes.size != num_classes:
      raise StoreError(
          f"task {name}: meta.json says {num_classes} classes but its rows "
          f"hold {classes.size} distinct labels; every class needs samples.")
    data = TaskData(name, info["role"], num_classes, generic,
                    labels.astype(np.int32), split, self, rows, pool)
    if generic.shape[1] != self.encoder_dim:
      raise StoreError(
          f"task {name}: generic features are {generic.shape[1]}-d but "
          f"meta.json says the encoder {self.encoder_name} is "
          f"{self.encoder_dim}-d.")
    validate_labels(data.labels[data.mask("train")], num_classes,
                    where=f"task {name} (train split)")
    return data

  def _pool_array(self, pool: str, rel: str, rows, *, what: str,
                  check_finite: bool = True) -> np.ndarray:
    path = self.path / "pools" / pool / rel
    if not path.exists():
      raise StoreError(f"store {self.path}: {what} missing for pool {pool!r} "
                       f"({path}).")
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    arr = np.asarray(arr if rows is None else arr[rows])
    if check_finite and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
      n_bad = int(np.sum(~np.isfinite(arr)))
      raise StoreError(f"store {self.path}: {what} of pool {pool!r} contain "
                       f"{n_bad} NaN/Inf values; re-extract them.")
    if rel.startswith("features/"):
      ptm = rel[len("features/"):-len(".npy")]
      dim = dict(zip(self.ptm_names, self.ptm_dims)).get(ptm)
      if dim is not None and arr.shape[-1] != dim:
        raise StoreError(f"store {self.path}: {what} of pool {pool!r} are "
                         f"{arr.shape[-1]}-d but meta.json says {dim}-d.")
    return arr.astype(np.float32) if arr.dtype.kind == "f" else arr


def validate_labels(labels: np.ndarray, num_classes: int, *,
                    where: str = "labels") -> None:
  """Raises StoreError unless labels cover exactly 0..C-1 with C >= 2.

  Args:
    labels: [N] integer class ids.
    num_classes: C.
    where: a description used in the error message.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.dtype.kind not in "iu":
    raise StoreError(f"{where}: labels must be a 1-D integer array, got "
                     f"{labels.dtype} {labels.shape}.")
  if num_classes < 2:
    raise StoreError(f"{where}: a task needs at least 2 classes to be ranked, "
                     f"got {num_classes}.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise StoreError(f"{where}: labels must lie in [0, {num_classes}), got "
                     f"range [{labels.min()}, {labels.max()}]. Remap them with"
                     " np.unique(labels, return_inverse=True).")
  counts = np.bincount(labels, minlength=num_classes)
  if np.any(counts == 0):
    empty = np.flatnonzero(counts == 0).tolist()
    raise StoreError(f"{where}: class(es) {empty[:10]} have no samples; "
                     "drop them and remap the labels.")


def validate_features(features: np.ndarray, *, dim: int | None = None,
                      where: str = "features") -> None:
  """Raises StoreError for non-2-D, wrong-width or non-finite features."""
  features = np.asarray(features)
  if features.ndim != 2:
    raise StoreError(f"{where}: expected a 2-D [N, D] array, got shape "
                     f"{features.shape}.")
  if dim is not None and features.shape[1] != dim:
    raise StoreError(f"{where}: expected {dim}-d features, got "
                     f"{features.shape[1]}-d.")
  if not np.all(np.isfinite(features)):
    raise StoreError(f"{where}: {int(np.sum(~np.isfinite(features)))} NaN/Inf "
                     "values; fix the extractor (e.g. fp16 overflow) first.")


# ----------------------------------------------------------------------------
# Writing.


class StoreWriter:
  """Writes a FeatureStore. `meta.json` appears only on `close()`.

  Example (features from any framework, as numpy):

    w = StoreWriter(path, encoder_name="swin_b", encoder_dim=1024,
                    ptms=[PTMInfo("resnet50", 2048, 1000), ...])
    w.add_pool("cifar10", labels=y, generic=g, features={"resnet50": f},
               source_probs={"resnet50": p})
    w.add_task("cifar10", pool="cifar10", split=s, role="target")
    w.set_ground_truth({"cifar10": {"resnet50": 96.8, ...}})
    w.close()

  Re-opening an existing directory keeps its pools (resumable extraction):
  `has_pool(name)` tells what is already there.
  """

  def __init__(self, path: os.PathLike, *, encoder_name: str, encoder_dim: int,
               ptms: Iterable[PTMInfo], extra_meta: Mapping | None = None):
    self.path = pathlib.Path(path)
    self.ptms = tuple(ptms)
    names = [p.name for p in self.ptms]
    if len(set(names)) != len(names):
      raise StoreError(f"duplicate PTM names: {names}")
    for n in names:
      _check_name(n, "PTM")
    self.encoder_name, self.encoder_dim = encoder_name, int(encoder_dim)
    self.extra_meta = dict(extra_meta or {})
    self.pools: dict[str, dict] = {}
    self.tasks: dict[str, dict] = {}
    self.gt: dict[str, dict[str, float]] = {}
    self.seconds: dict[str, float] = {}
    meta_path = self.path / "meta.json"
    if meta_path.exists():  # Resume: keep finished pools/tasks.
      meta = json.loads(meta_path.read_text())
      self.pools.update(meta.get("pools", {}))
      self.tasks.update(meta.get("tasks", {}))
      self.seconds.update(meta.get("seconds_per_sample", {}))
      gt_path = self.path / "ground_truth.csv"
      if gt_path.exists():
        gt = read_ground_truth(gt_path)
        for i, t in enumerate(gt.tasks):
          self.gt[t] = {m: float(v) for m, v in zip(gt.models, gt.values[i])
                        if np.isfinite(v)}
      meta_path.unlink()  # The store is incomplete until close().

  def has_pool(self, name: str) -> bool:
    return name in self.pools

  def add_pool(self, name: str, *, labels: np.ndarray, generic: np.ndarray,
               features: Mapping[str, np.ndarray],
               source_probs: Mapping[str, np.ndarray] | None = None) -> None:
    """Adds a pool: [N] labels, [N, Dg] generic and {ptm: [N, Dm]} features.

    Every PTM of the store must have features; source probabilities are
    optional per PTM.
    """
    _check_name(name, "pool")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
      raise StoreError(f"pool {name}: labels must be a 1-D integer array.")
    n = labels.shape[0]
    validate_features(generic, dim=self.encoder_dim,
                      where=f"pool {name} generic features")
    _check_rows(generic, n, f"pool {name} generic features")
    missing = [p.name for p in self.ptms if p.name not in features]
    extra = sorted(set(features) - {p.name for p in self.ptms})
    if missing or extra:
      raise StoreError(f"pool {name}: features missing for {missing}, "
                       f"unknown PTMs {extra}.")
    for p in self.ptms:
      validate_features(features[p.name], dim=p.dim,
                        where=f"pool {name} features of {p.name}")
      _check_rows(features[p.name], n, f"pool {name} features of {p.name}")
    pdir = self.path / "pools" / name
    for p in self.ptms:
      atomic_save_npy(pdir / "features" / f"{p.name}.npy",
                      np.asarray(features[p.name], np.float32))
    for ptm, probs in (source_probs or {}).items():
      info = {q.name: q for q in self.ptms}.get(ptm)
      if info is None or not info.num_source_classes:
        raise StoreError(f"pool {name}: source probs given for {ptm}, which "
                         "is unknown or declares num_source_classes=0.")
      validate_features(probs, dim=info.num_source_classes,
                        where=f"pool {name} source probs of {ptm}")
      _check_rows(probs, n, f"pool {name} source probs of {ptm}")
      atomic_save_npy(pdir / "source_probs" / f"{ptm}.npy",
                      np.asarray(probs, np.float32))
    atomic_save_npy(pdir / "generic.npy", np.asarray(generic, np.float32))
    atomic_save_npy(pdir / "labels.npy", labels.astype(np.int64))
    self.pools[name] = {"num_samples": int(n),
                        "num_classes": int(np.unique(labels).size)}

  def add_task(self, name: str, *, pool: str, split: np.ndarray, role: str,
               indices: np.ndarray | None = None) -> None:
    """Adds a task over `pool` rows `indices` (all rows if None).

    Args:
      name: task name.
      pool: name of an added pool.
      split: [n] int, 0 train / 1 val / 2 test, one entry per task row.
      role: "train", "val" or "target".
      indices: [n] int row indices into the pool, or None for all rows.
    """
    _check_name(name, "task")
    if role not in ROLES:
      raise StoreError(f"task {name}: role must be one of {ROLES}, got "
                       f"{role!r}.")
    if pool not in self.pools:
      raise StoreError(f"task {name}: unknown pool {pool!r}; add_pool first.")
    labels = np.load(self.path / "pools" / pool / "labels.npy",
                     mmap_mode="r")
    if indices is not None:
      indices = np.asarray(indices, np.int64)
      if indices.ndim != 1 or (indices.size and (
          indices.min() < 0 or indices.max() >= labels.shape[0])):
        raise StoreError(f"task {name}: indices out of range for pool {pool}.")
      labels = labels[indices]
    split = np.asarray(split)
    if split.shape != labels.shape or not np.isin(split, (0, 1, 2)).all():
      raise StoreError(f"task {name}: split must be [n] with values in "
                       "{0, 1, 2}, one per task row.")
    classes, remapped = np.unique(labels, return_inverse=True)
    validate_labels(remapped[split == 0].astype(np.int64), classes.size,
                    where=f"task {name} (train split)")
    tdir = self.path / "tasks" / name
    if indices is not None:
      atomic_save_npy(tdir / "indices.npy", indices)
    elif (tdir / "indices.npy").exists():
      (tdir / "indices.npy").unlink()
    atomic_save_npy(tdir / "split.npy", split.astype(np.int8))
    self.tasks[name] = {"pool": pool, "role": role,
                        "num_classes": int(classes.size),
                        "num_samples": int(labels.shape[0])}

  def set_ground_truth(self, table: Mapping[str, Mapping[str, float]]) -> None:
    """Adds/overwrites ground truth: {task: {ptm: accuracy}}."""
    for task, row in table.items():
      self.gt.setdefault(task, {}).update(
          {m: float(v) for m, v in row.items()})

  def set_seconds_per_sample(self, seconds: Mapping[str, float]) -> None:
    """Records forward cost per image: {"encoder": s, <ptm>: s}."""
    self.seconds.update({k: float(v) for k, v in seconds.items()})

  def close(self) -> FeatureStore:
    """Validates completeness, writes ground_truth.csv then meta.json."""
    names = [p.name for p in self.ptms]
    for task in self.tasks:
      missing = [m for m in names if m not in self.gt.get(task, {})]
      if missing:
        raise StoreError(f"ground truth missing for task {task}: PTMs "
                         f"{missing}. Call set_ground_truth first.")
    tasks = list(self.tasks)
    values = np.array([[self.gt[t][m] for m in names] for t in tasks],
                      dtype=np.float64).reshape(len(tasks), len(names))
    atomic_write_text(self.path / "ground_truth.csv",
                      GroundTruth(tuple(names), tuple(tasks), values).to_csv())
    meta = {
        "format": FORMAT, "version": VERSION,
        "encoder": {"name": self.encoder_name, "dim": self.encoder_dim},
        "ptms": [dataclasses.asdict(p) for p in self.ptms],
        "pools": self.pools, "tasks": self.tasks,
        "seconds_per_sample": self.seconds,
        **self.extra_meta,
    }
    atomic_write_json(self.path / "meta.json", meta)
    return FeatureStore(self.path)


def _check_rows(a: np.ndarray, n: int, where: str) -> None:
  if np.asarray(a).shape[0] != n:
    raise StoreError(f"{where}: {np.asarray(a).shape[0]} rows, labels have "
                     f"{n}.")


def _check_name(name: str, what: str) -> None:
  if not name or "/" in name or name.startswith(".") or "," in name:
    raise StoreError(f"invalid {what} name {name!r}: use a non-empty name "
                     "without '/', ',' or a leading '.'.")
