"""Zoo building and jit-batched feature extraction into a FeatureStore.

Stages (each cached, so rerunning a finished build is cheap):

  build_pools(cfg)        the benchmark pools the config names (TFDS cache)
  build_zoo(cfg, pools)   trains the local PTMs on their pretraining pools;
                          a checkpoint dir `<cache>/zoo/<arch>@<src>-<hash>`
                          whose metadata carries the same config hash is
                          reused, anything else there is retrained
  build_registry(...)     EfficientNet-Lite / Open-NSFW / local PTM specs
  extract_store(...)      every PTM (+ the generic encoder) over every pool
                          into `<cache>/stores/bench_<variant>_<hash>/`, one
                          pool at a time: after each pool the store is closed
                          (meta.json lists the finished pools), so an
                          interrupted run resumes at the next pool
  add_tasks(...)          targets (role "target", fixed pool splits),
                          sampled training tasks ("train") and validation
                          tasks ("val", from pools kept aside)

The store directory name is a content hash of the store-relevant config,
the pools' content (images, labels, splits) and the zoo checkpoints' config
hashes, so a changed input lands in a new store instead of a stale one.
Ground truth is added by `spider_jax.groundtruth`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from spider_jax import sharding
from spider_jax.data import builders
from spider_jax.data import store as store_lib
from spider_jax.zoo import ckpt
from spider_jax.zoo import onnx_adapter
from spider_jax.zoo import registry as registry_lib
from spider_jax.zoo import train as train_lib

__all__ = ["CODE_VERSION", "build_pools", "pool_hash", "build_zoo",
           "build_registry", "store_path", "extract_store", "add_tasks",
           "task_list", "features_and_probs", "short_source"]

CODE_VERSION = "1"  # Bump when extraction output changes for the same input.
_LOG = logging.getLogger(__name__)


def hash_json(obj) -> str:
  """sha256 hex digest of `obj` as sorted-key JSON."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()
                        ).hexdigest()


def _tqdm(*a, **k):
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return a[0] if a else None
  return tqdm(*a, **k)


# ----------------------------------------------------------------------------
# Pools.


def build_pools(cfg) -> dict[str, builders.Pool]:
  """The pools the config uses: pretrain sources, train, val and targets."""
  sources = sorted({n.split("@", 1)[1] for n in cfg.zoo.local})
  want = set(sources) | set(task_pools(cfg))
  specs = [s for s in builders.pool_specs(cfg.scale) if s.name in want]
  missing = want - {s.name for s in specs}
  if missing:
    raise ValueError(f"config names unknown pools {sorted(missing)}; known: "
                     f"{[s.name for s in builders.pool_specs(1.0)]}")
  return builders.benchmark_pools(seed=cfg.seed, scale=cfg.scale,
                                  cache_dir=cfg.cache_dir, specs=specs)


def task_pools(cfg) -> list[str]:
  """Pools with tasks: targets, training, validation, extra training and
  extra validation."""
  return list(dict.fromkeys(
      list(cfg.pools.targets) + list(cfg.pools.train) + list(cfg.pools.val)
      + list(cfg.pools.get("extra_train", ()))
      + list(cfg.pools.get("extra_val", ()))))


def tasks_key(cfg) -> dict:
  """cfg.tasks for cache keys (without `num_extra_train` / `num_extra_val`
  / `num_large_extra_train` / `num_large_extra_val` when 0 (nor
  `large_extra_min_classes` while both are), nor the
  `num_large_*` fields and `large_min_classes` while there
  are no large tasks, so stores and probes built before those fields
  existed keep their keys)."""
  t = cfg.tasks.to_dict()
  for field in ("num_extra_train", "num_extra_val", "num_large_extra_train",
                "num_large_extra_val"):
    if not t.get(field):
      t.pop(field, None)
  if not (t.get("num_large_extra_train") or t.get("num_large_extra_val")):
    t.pop("large_extra_min_classes", None)
  if any(t.get(f"num_extra_{r}") and t.get(f"num_large_{r}")
         for r in ("train", "val")):
    t["numbering"] = "large_before_extra"  # Names changed for these only.
  if not (t.get("num_large_train") or t.get("num_large_val")):
    for field in ("num_large_train", "num_large_val", "large_min_classes"):
      t.pop(field, None)
  return t


def pool_hash(pool: builders.Pool) -> str:
  """sha256 of a pool's images, labels and split."""
  h = hashlib.sha256()
  for a in (pool.images, pool.labels.astype(np.int64),
            pool.split.astype(np.int8)):
    h.update(str(a.shape).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


# ----------------------------------------------------------------------------
# Zoo.


def short_source(pool_name: str) -> str:
  """"font_latin_upper_pretrain" -> "font_latin_upper"."""
  return pool_name[:-len("_pretrain")] if pool_name.endswith(
      "_pretrain") else pool_name


def _zoo_config_hash(cfg, arch: str, pool: builders.Pool) -> str:
  z = cfg.zoo
  return hash_json({"arch": arch, "pool": pool.name, "pool_hash": pool_hash(pool),
                "epochs": z.epochs, "batch_size": z.batch_size, "lr": z.lr,
                "weight_decay": z.weight_decay,
                "warmup_steps": z.warmup_steps, "seed": z.seed,
                "train_code": train_lib.__name__, "v": CODE_VERSION})[:12]


def build_zoo(cfg, pools: Mapping[str, builders.Pool], *,
              log: Callable[[str], None] = print) -> dict[str, dict]:
  """Trains (or reuses) every local PTM of `cfg.zoo.local`.

  Each "<arch>@<pretrain pool>" is trained on the pool's train+val split and
  evaluated on its test split, with `cfg.zoo` hyperparameters and seed.

  Returns:
    {ptm name: {"dir", "config_hash", "trained" (bool), "seconds",
    "accuracy"}}.
  """
  root = pathlib.Path(cfg.cache_dir) / "zoo"
  out = {}
  for entry in cfg.zoo.local:
    arch, src = entry.split("@", 1)
    pool = pools[src]
    h = _zoo_config_hash(cfg, arch, pool)
    name = f"{arch}@{short_source(src)}"
    d = root / f"{name}-{h}"
    if d.exists():
      try:
        meta = ckpt.load_metadata(d)
        if meta.get("config_hash") == h:
          out[name] = {"dir": str(d), "config_hash": h, "trained": False,
                       "seconds": 0.0, "accuracy": meta.get("accuracy"),
                       "train_seconds": meta.get("train_seconds")}
          continue
      except Exception as e:  # pylint: disable=broad-except
        log(f"zoo: {d} is unreadable ({e}); retraining")
      shutil.rmtree(d)
    t0 = time.perf_counter()
    tr = pool.split != 2
    model, meta = train_lib.train_arrays(
        arch, pool.images[tr], pool.labels[tr].astype(np.int32),
        num_classes=pool.num_classes, epochs=cfg.zoo.epochs,
        batch_size=cfg.zoo.batch_size, lr=cfg.zoo.lr,
        weight_decay=cfg.zoo.weight_decay,
        warmup_steps=cfg.zoo.warmup_steps, seed=cfg.zoo.seed,
        eval_images=pool.images[~tr],
        eval_labels=pool.labels[~tr].astype(np.int32),
        source=short_source(src))
    meta["config_hash"] = h
    meta["pretrain_pool"] = src
    meta["pretrain_pool_sha256"] = pool_hash(pool)
    ckpt.save(d, model, meta)
    secs = time.perf_counter() - t0
    log(f"zoo: trained {name} in {secs:.1f}s, source test acc "
        f"{meta['accuracy']:.3f}")
    out[name] = {"dir": str(d), "config_hash": h, "trained": True,
                 "seconds": secs, "accuracy": meta["accuracy"],
                 "train_seconds": meta["train_seconds"]}
  return out


def build_registry(cfg, zoo: Mapping[str, dict]
                   ) -> dict[str, registry_lib.PTMSpec]:
  """name -> PTMSpec for the configured zoo (EfficientNets, NSFW, local)."""
  reg = registry_lib.default_registry(
      image_size=cfg.zoo.image_size, local_dirs=(),
      efficientnet_variants=tuple(cfg.zoo.efficientnet),
      include_open_nsfw=bool(cfg.zoo.open_nsfw))
  for name, z in zoo.items():
    reg[name] = registry_lib.local_spec(z["dir"], name=name)
  return reg


def _encoder_spec(cfg) -> registry_lib.PTMSpec:
  if not cfg.generic_encoder.startswith("efficientnet_"):
    raise ValueError(f"generic encoder {cfg.generic_encoder!r}: only "
                     "efficientnet_lite{0,1,2} are supported.")
  return registry_lib.efficientnet_spec(
      cfg.generic_encoder[len("efficientnet_"):], cfg.zoo.image_size)


# ----------------------------------------------------------------------------
# Extraction.


def features_and_probs(loaded: registry_lib.LoadedPTM
                       ) -> Callable[[np.ndarray], tuple]:
  """One forward pass giving (features [B, D], source probs [B, S] | None).

  NNX members apply their source head to the tapped features (so one pass
  gives both); Open-NSFW runs its ONNX graph once with both outputs.
  """
  spec = loaded.spec
  if loaded.model is not None:
    graphdef, state = nnx.split(loaded.model)
    pre = loaded.preprocess
    has_head = spec.head_classes is not None

    @jax.jit
    def both(state, images):
      m = nnx.merge(graphdef, state)
      f = m.features(pre(images))
      if not has_head:
        return f, None
      head = m.head if hasattr(m, "head") else m.fc
      return f, jax.nn.softmax(head(f), axis=-1)

    return lambda x: both(state, x)
  if spec.name == "open_nsfw":
    tap = onnx_adapter.OnnxTap(onnx_adapter.open_nsfw_path(),
                               onnx_adapter.OPEN_NSFW_TAP)
    fn = tap.as_jax_fn(spec.feature_dim, extra_output=tap.output_names[1],
                       extra_dim=spec.head_classes)
    return lambda x: fn(onnx_adapter.open_nsfw_preprocess(x))
  probs = loaded.probs
  return lambda x: (loaded.features(x), None if probs is None else probs(x))


def store_hash(cfg, pools: Mapping[str, builders.Pool],
               zoo: Mapping[str, dict]) -> str:
  """Content hash of everything the store's features and tasks depend on."""
  key = {
      "pools": {n: pool_hash(pools[n]) for n in task_pools(cfg)},
      "zoo": {n: z["config_hash"] for n, z in zoo.items()},
      "efficientnet": list(cfg.zoo.efficientnet),
      "open_nsfw": bool(cfg.zoo.open_nsfw), "image_size": cfg.zoo.image_size,
      "encoder": cfg.generic_encoder, "tasks": tasks_key(cfg),
      "v": CODE_VERSION}
  f = cfg.get("finetune")
  if f is not None and (f.get("val_tasks") or f.get("train_tasks")
                        or f.get("extra_train_tasks")
                        or f.get("large_train_tasks")):
    # Its ground truth differs from the probe-only store's (same features).
    key["finetuned_tasks"] = {"val": bool(f.val_tasks),
                              "train": int(f.train_tasks),
                              "pools": list(f.get("task_pools", ()))}
    if f.get("extra_train_tasks"):
      key["finetuned_tasks"]["extra_train"] = int(f.extra_train_tasks)
    if f.get("large_train_tasks"):
      key["finetuned_tasks"]["large_train"] = int(f.large_train_tasks)
  return hash_json(key)[:12]


def store_path(cfg, pools, zoo) -> pathlib.Path:
  return (pathlib.Path(cfg.cache_dir) / "stores"
          / f"bench_{cfg.variant}_{store_hash(cfg, pools, zoo)}")


def _ptm_infos(reg) -> list[store_lib.PTMInfo]:
  return [store_lib.PTMInfo(n, s.feature_dim, s.head_classes or 0)
          for n, s in reg.items()]


def _finished_pools(path: pathlib.Path, key: str = "pools") -> dict:
  meta = path / "meta.json"
  return dict(json.loads(meta.read_text()).get(key, {})) if meta.exists() \
      else {}


def open_writer(path, cfg, reg, extra_meta: Mapping | None = None
                ) -> store_lib.StoreWriter:
  enc = _encoder_spec(cfg)
  path = pathlib.Path(path)
  meta_path, gt_path = path / "meta.json", path / "ground_truth.csv"
  if meta_path.exists() and gt_path.exists() and not json.loads(
      meta_path.read_text()).get("tasks"):
    gt_path.unlink()  # A pools-only store has a header-only table.
  w = store_lib.StoreWriter(
      path, encoder_name=enc.name, encoder_dim=enc.feature_dim,
      ptms=_ptm_infos(reg), extra_meta=extra_meta)
  # Tasks whose ground truth is still pending (empty cells) stay pending.
  for t in w.tasks:
    row = w.gt.setdefault(t, {})
    for p in w.ptms:
      row.setdefault(p.name, float("nan"))
  return w


def measure_seconds_per_sample(cfg, reg, images: np.ndarray,
                               shared: Sequence[str], n: int = 256
                               ) -> dict[str, float]:
  """Forward seconds per image of every PTM on `n` images, after compiling."""
  out = {}
  for name, spec in reg.items():
    loaded = spec.load()
    fn = features_and_probs(loaded)
    bs = (cfg.extract.onnx_batch_size if loaded.model is None
          else cfg.extract.batch_size)
    x = images[:max(n, bs)]
    registry_lib.run_batched(fn, x[:bs], bs)
    t0 = time.perf_counter()
    registry_lib.run_batched(fn, x, bs)
    out[name] = (time.perf_counter() - t0) / len(x)
  if shared:
    out["encoder"] = out[shared[0]]
  else:
    out["encoder"] = measure_seconds_per_sample(
        cfg, {"encoder": _encoder_spec(cfg)}, images, (), n)["encoder"]
  return out


def extract_store(cfg, pools: Mapping[str, builders.Pool],
                  reg: Mapping[str, registry_lib.PTMSpec],
                  path: os.PathLike, *, extra_meta: Mapping | None = None,
                  log: Callable[[str], None] = print,
                  across_processes: bool = False) -> dict[str, Any]:
  """Extracts every PTM and the generic encoder over the config's pools.

  Resumable: pools already in the store (its meta.json) are skipped; the
  store is closed after each pool. Per-PTM seconds per sample (forward pass
  after compilation, features and source probs together) are recorded with
  `set_seconds_per_sample`.

  With `across_processes` (jax.distributed), every process must make this
  call: the batches of every (pool, model) are split over the processes
  (`registry.run_batched(across_processes=True)`), process 0 decides which
  pools are left and alone writes the store, and all return once it is
  written (a shared filesystem is assumed, as for the store everywhere).

  Returns:
    dict(extracted=[pools], skipped=[pools], seconds, seconds_per_sample,
    encoder_shares_weights_with=[...]).
  """
  path = pathlib.Path(path)
  names = task_pools(cfg)
  # Finished pools are those in meta.json. The writer is opened (which
  # removes meta.json until it is closed again) only around each add_pool,
  # so a crash while a pool is being extracted loses only that pool.
  enc = _encoder_spec(cfg)
  # The generic encoder reuses a zoo member's features when the weights and
  # the input pipeline are identical (the default: efficientnet_lite0).
  shared = [n for n, s in reg.items() if s.weight_group == enc.weight_group
            and s.input_size == enc.input_size
            and s.normalisation == enc.normalisation]
  split = across_processes and jax.process_count() > 1
  writer = not split or jax.process_index() == 0
  done = _finished_pools(path)
  is_done = np.array([n in done for n in names])
  if split:  # Process 0's view of the store decides (one plan for all).
    from jax.experimental import multihost_utils
    is_done = np.asarray(multihost_utils.broadcast_one_to_all(is_done))
  todo = [n for n, d in zip(names, is_done) if not d]
  skipped = [n for n, d in zip(names, is_done) if d]
  t_start = time.perf_counter()
  if not todo:
    have = _finished_pools(path, "seconds_per_sample")
    if writer and set(reg) - set(have):  # e.g. meta.json was rebuilt
      w = open_writer(path, cfg, reg, extra_meta)
      w.set_seconds_per_sample(measure_seconds_per_sample(
          cfg, reg, pools[names[0]].images, shared))
      w.close()
    if split:  # The others wait for process 0's writes.
      sharding.barrier("extract_store_done")
    return {"extracted": [], "skipped": skipped, "seconds": 0.0,
            "seconds_per_sample": _finished_pools(path, "seconds_per_sample"),
            "encoder_shares_weights_with": shared}
  members = list(reg.items())
  if not shared:
    members.append(("__encoder__", enc))
  # Load every model once and compile it on one batch (pool-major loop
  # below, so a finished pool is saved before the next one starts).
  fns, bss, t_run, n_run = {}, {}, {}, {}
  for mname, spec in _tqdm(members, desc="load+compile", unit="ptm",
                           disable=not writer):
    loaded = spec.load()
    fns[mname] = features_and_probs(loaded)
    bss[mname] = (cfg.extract.onnx_batch_size if loaded.model is None
                  else cfg.extract.batch_size)
    registry_lib.run_batched(fns[mname],
                             pools[todo[0]].images[:bss[mname]], bss[mname],
                             across_processes=split)
    t_run[mname], n_run[mname] = 0.0, 0
  enc_key = shared[0] if shared else "__encoder__"
  total = sum(len(pools[n].labels) for n in todo) * len(members)
  bar = _tqdm(total=total, desc="extract", unit="img", disable=not writer)
  for pname in todo:
    pool = pools[pname]
    feats, probs = {}, {}
    for mname, spec in members:
      t0 = time.perf_counter()
      f, p = registry_lib.run_batched(fns[mname], pool.images, bss[mname],
                                      across_processes=split)
      t_run[mname] += time.perf_counter() - t0
      n_run[mname] += len(pool.images)
      feats[mname] = f
      if p is not None and spec.head_classes and mname in reg:
        probs[mname] = p
      if bar is not None:
        bar.update(len(pool.images))
        bar.set_postfix_str(f"{pname} {mname}")
    secs = {("encoder" if k == "__encoder__" else k): t_run[k] / n_run[k]
            for k in t_run}
    secs["encoder"] = t_run[enc_key] / n_run[enc_key]
    if writer:
      w = open_writer(path, cfg, reg, extra_meta)
      w.add_pool(pname, labels=pool.labels.astype(np.int64),
                 generic=feats[enc_key],
                 features={n: feats[n] for n in reg}, source_probs=probs)
      w.set_seconds_per_sample(secs)
      w.close()  # meta.json now lists this pool: resumable from here.
  if bar is not None:
    bar.close()
  if split:  # The store is complete for every process.
    sharding.barrier("extract_store_done")
  log(f"extract: {len(todo)} pools x {len(members)} models in "
      f"{time.perf_counter() - t_start:.1f}s ({len(skipped)} skipped)")
  return {"extracted": todo, "skipped": skipped,
          "seconds": time.perf_counter() - t_start,
          "seconds_per_sample": secs,
          "encoder_shares_weights_with": shared}


# ----------------------------------------------------------------------------
# Tasks.


@dataclasses.dataclass(frozen=True)
class Task:
  """A task of the benchmark: pool rows (None: all), a role, and whether it
  is a large one (`tasks.num_large_<role>`)."""
  name: str
  pool: str
  role: str
  rows: np.ndarray | None
  large: bool = False


def task_list(cfg, pools: Mapping[str, builders.Pool]) -> list[Task]:
  """Targets (whole pools), then sampled training and validation tasks.

  Training tasks: `tasks.num_train` from `pools.train` (seed tasks.seed),
  validation tasks: `tasks.num_val` from `pools.val` (seed tasks.seed + 1).
  Then, numbered on in this order: the large ones, `tasks.num_large_<role>`
  tasks of whole classes (every row of `tasks.large_min_classes` or more
  classes) from `pools.<role>` (seeds tasks.seed + 4 and + 5), as large as
  the targets; `tasks.num_extra_<role>` sampled tasks from
  `pools.extra_<role>` (seeds tasks.seed + 2 and + 3); and
  `tasks.num_large_extra_<role>` large tasks (`large_extra_min_classes` or
  more classes) of `pools.extra_<role>`. Each group is drawn apart, so adding
  one leaves every task before it, and its cached cells (keyed by task
  name), as it was; a group after it is renamed.
  """
  t = cfg.tasks
  kw = dict(min_classes=t.min_classes, max_classes=t.max_classes,
            min_per_class=t.min_per_class, max_per_class=t.max_per_class)
  out = [Task(n, n, "target", None) for n in cfg.pools.targets]
  for role, seed in (("train", t.seed), ("val", t.seed + 1)):
    num = t.num_train if role == "train" else t.num_val
    own = {n: pools[n] for n in cfg.pools[role]}
    base = builders.sample_training_tasks(own, num, seed, **kw) if num else []
    num_large = int(t.get(f"num_large_{role}", 0))
    large = builders.sample_training_tasks(  # Up to all of a pool's classes.
        own, num_large, seed + 4, min_classes=t.large_min_classes,
        max_classes=max((p.num_classes for p in own.values()), default=0),
        whole_classes=True) if num_large else []
    extra = _extra_tasks(cfg, pools, role, kw)
    large_extra = _large_extra_tasks(cfg, pools, role)
    numbered = [(p, r, is_large) for group, is_large in (
        (base, False), (large, True), (extra, False), (large_extra, True))
                for p, r in group]
    width = 4 if role == "train" else 3
    out += [Task(f"{role}_{i:0{width}d}", p, role, r, is_large)
            for i, (p, r, is_large) in enumerate(numbered)]
  return out


def _large_extra_tasks(cfg, pools, role: str
                       ) -> list[tuple[str, np.ndarray]]:
  """(pool, rows) of the `tasks.num_large_extra_<role>` tasks of whole
  classes (`tasks.large_extra_min_classes` or more) of `pools.extra_<role>`
  (role "val": seed tasks.seed + 6; "train": + 7); numbered last."""
  t = cfg.tasks
  num = int(t.get(f"num_large_extra_{role}", 0))
  if not num:
    return []
  extra = list(cfg.pools.get(f"extra_{role}", ()))
  if not extra:
    raise ValueError(f"tasks.num_large_extra_{role}={num} needs "
                     f"pools.extra_{role} to name at least one pool; fix "
                     f"pools.extra_{role}.")
  own = {n: pools[n] for n in extra}
  return builders.sample_training_tasks(
      own, num, t.seed + (6 if role == "val" else 7),
      min_classes=t.large_extra_min_classes,
      max_classes=max(p.num_classes for p in own.values()),
      whole_classes=True)


def _extra_tasks(cfg, pools, role: str, kw) -> list[tuple[str, np.ndarray]]:
  """(pool, rows) of the `tasks.num_extra_<role>` tasks of
  `pools.extra_<role>` (role "train": seed tasks.seed + 2; "val": + 3)."""
  num = int(cfg.tasks.get(f"num_extra_{role}", 0))
  if not num:
    return []
  field = f"pools.extra_{role}"
  extra = list(cfg.pools.get(f"extra_{role}", ()))
  other = [p for f in ("train", "val", "targets", "extra_train", "extra_val")
           if f"pools.{f}" != field for p in cfg.pools.get(f, ())]
  overlap = set(extra) & set(other)
  if overlap or not extra:
    raise ValueError(
        f"tasks.num_extra_{role}={num} needs {field} to name pools that are "
        f"in no other pool list (got {extra}; also listed elsewhere: "
        f"{sorted(overlap)}); fix {field}.")
  return builders.sample_training_tasks(
      {n: pools[n] for n in extra}, num,
      cfg.tasks.seed + (2 if role == "train" else 3), **kw)


def add_tasks(writer: store_lib.StoreWriter, tasks: Sequence[Task],
              pools: Mapping[str, builders.Pool]) -> None:
  """Adds tasks with their pools' fixed splits to an open writer."""
  for task in tasks:
    split = pools[task.pool].split
    writer.add_task(task.name, pool=task.pool, role=task.role,
                    split=split if task.rows is None else split[task.rows],
                    indices=task.rows)
