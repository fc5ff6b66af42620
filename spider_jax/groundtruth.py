r"""Ground truth of the offline benchmark: linear probe and fine-tuning.

  python -m spider_jax.groundtruth --config=configs/bench.py:full
  python -m spider_jax.groundtruth --config=configs/bench.py:tiny \
      --config.results_dir=/tmp/bench_tiny

Stages (all cached / resumable; rerun the same command to continue):
  1. pools (TFDS cache), 2. zoo training (orbax, config-hashed),
  3. feature extraction into the FeatureStore (spider_jax.zoo.extract),
  4. linear-probe accuracy of every PTM on every task (softmax regression,
     L2 grid chosen on val, test accuracy; `vmap` over padded task batches
     and over the L2 grid), 5. fine-tuned accuracy of every fine-tunable PTM
     on every target (all weights, small lr grid chosen on val, test
     accuracy, fixed seed), one cell at a time, appended to
     `finetune_cells.csv` as it finishes; with `finetune.val_tasks` /
     `finetune.train_tasks` the same for those validation / training tasks
     (their ground truth becomes fine-tuned accuracy once all their cells
     are done).

On several processes (jax.distributed), `run(..., all_processes=True)` is
called by every process: process 0 builds the pools and trains the zoo
first (the others then load them from the cache), every process extracts
its share of the batches (`extract.extract_store(across_processes=True)`),
and process 0 alone writes the store and computes stages 4-5; the others
return the store path once the features are written. A shared filesystem
is assumed (cache and results directories).

Accuracies are in percent. The store's ground_truth.csv holds fine-tune
accuracy for target cells of fine-tunable PTMs, linear-probe accuracy for
target cells of feature-only PTMs (Open-NSFW) and of PTMs listed in
`config.finetune.skip`, and linear-probe accuracy for every train/val task
(approximated performance, as in the paper) except those fine-tuned with
`finetune.val_tasks` / `train_tasks` (listed in meta.json,
`ground_truth.finetuned_tasks`). Until the fine-tune stage has
finished, targets carry linear-probe accuracy and meta.json says so
(`ground_truth.status`).

Files in `config.results_dir`:
  finetune_cells.csv        one row per (task, PTM): accuracy, lr, per-lr
                            val/test accuracy, wall time, sizes, seed
  finetune_accuracy.csv     targets x PTMs (fine-tune, %)
  finetune_seconds.csv      targets x PTMs (wall time per cell, s)
  finetune_tasks_accuracy.csv  fine-tuned validation/training tasks x PTMs
  linear_probe_targets.csv  targets x PTMs (linear probe, %)
  linear_probe_tasks.csv    train/val tasks x PTMs (linear probe, %)
  ground_truth_targets.csv  targets x PTMs as written to the store, and
                            ground_truth_source.csv (finetune|linear_probe)
  config.json, summary.json config, seeds, hashes, counts, stage times, best
                            PTM per target, constant-prior tau, agreement
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from spider_jax import metrics
from spider_jax import sharding
from spider_jax.data import store as store_lib
from spider_jax.zoo import extract
from spider_jax.zoo import finetune as finetune_lib

__all__ = ["probe_batch", "linear_probe_tasks", "finetune_cell",
           "run_finetune", "run", "summarize", "agreement",
           "subsample_stratified", "task_images", "finetuned_tasks"]

N_BUCKETS = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


# ----------------------------------------------------------------------------
# Linear probe, batched over tasks.


@functools.partial(jax.jit, static_argnames=("steps",))
def _probe_batch(x_tr, y_tr, m_tr, x_ev, y_ev, s_ev, cmask, l2s, lr,
                 steps: int):
  """Masked softmax regression for T tasks x G L2 strengths.

  Args:
    x_tr: [T, Ntr, D] standardised train features (padding rows: 0).
    y_tr: [T, Ntr] labels; m_tr: [T, Ntr] 1 for real rows.
    x_ev: [T, Nev, D]; y_ev: [T, Nev]; s_ev: [T, Nev] 1 val, 2 test, -1 pad.
    cmask: [T, C] True for classes of the task.
    l2s: [G]. lr: peak Adam lr (cosine-decayed over `steps`).

  Returns:
    (val acc [T, G], test acc [T, G]).
  """
  c = cmask.shape[-1]

  def task(x, y, m, xe, ye, se, cm):
    neg = jnp.where(cm, 0.0, -1e9)

    def fit(l2):
      return finetune_lib.probe_fit(x, y, l2, c, steps, lr, row_mask=m,
                                    class_bias=neg)

    w, b = jax.vmap(fit)(l2s)
    logits = jnp.einsum("nd,gdc->gnc", xe, w) + b[:, None] + neg
    ok = (jnp.argmax(logits, -1) == ye[None]).astype(jnp.float32)

    def acc(k):
      sel = (se == k).astype(jnp.float32)
      return jnp.sum(ok * sel, -1) / jnp.maximum(jnp.sum(sel), 1.0)

    return acc(1), acc(2)

  return jax.vmap(task)(x_tr, y_tr, m_tr, x_ev, y_ev, s_ev, cmask)


def _bucket(n: int) -> int:
  for b in N_BUCKETS:
    if n <= b:
      return b
  return int(math.ceil(n / 1024) * 1024)


def _standardise(f_tr: np.ndarray):
  mu = f_tr.mean(0)
  sd = f_tr.std(0)
  sd = np.maximum(sd, 1e-2 * float(sd.mean()) + 1e-12)
  return lambda f: (np.asarray(f, np.float32) - mu) / sd


def probe_batch(items: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                l2_grid: Sequence[float], *, steps: int = 300,
                lr: float = 0.01, tasks_per_batch: int = 16
                ) -> list[dict[str, Any]]:
  """Linear probe of many tasks (same feature width), vmapped in batches.

  Same estimator as `spider_jax.zoo.finetune.linear_probe` (standardised
  features with floored stds, zero init, full-batch Adam with cosine decay,
  L2 picked on val, first maximum wins), with padded rows and classes masked
  out, so a task's result does not depend on its batch-mates.

  Args:
    items: [(features [n, D], labels [n] in 0..C-1, split [n] 0/1/2)].
    l2_grid: L2 strengths.
    steps, lr: optimiser settings.
    tasks_per_batch: tasks per vmapped call (the last batch is padded).

  Returns:
    One dict per item: test_acc, val_acc (at the chosen L2), best_l2 (in
    percent for accuracies).
  """
  prepared = []
  for f, y, s in items:
    f = np.asarray(f, np.float32)
    y = np.asarray(y, np.int32)
    s = np.asarray(s)
    tr = s == 0
    norm = _standardise(f[tr])
    prepared.append((norm(f[tr]), y[tr], norm(f[~tr]), y[~tr], s[~tr],
                     int(y.max()) + 1))
  order = sorted(range(len(prepared)), key=lambda i: (
      _cpad(prepared[i][5]), len(prepared[i][1]), len(prepared[i][3])))
  l2s = jnp.asarray(l2_grid, jnp.float32)
  out: list[dict[str, Any] | None] = [None] * len(prepared)
  for k in range(0, len(order), tasks_per_batch):
    idx = order[k:k + tasks_per_batch]
    ntr = _bucket(max(len(prepared[i][1]) for i in idx))
    nev = _bucket(max(len(prepared[i][3]) for i in idx))
    c = max(_cpad(prepared[i][5]) for i in idx)
    d = prepared[idx[0]][0].shape[1]
    t = tasks_per_batch
    x_tr = np.zeros((t, ntr, d), np.float32)
    y_tr = np.zeros((t, ntr), np.int32)
    m_tr = np.zeros((t, ntr), np.float32)
    x_ev = np.zeros((t, nev, d), np.float32)
    y_ev = np.zeros((t, nev), np.int32)
    s_ev = np.full((t, nev), -1, np.int32)
    cm = np.zeros((t, c), bool)
    for j, i in enumerate(idx):
      a, ya, b, yb, sb, nc = prepared[i]
      x_tr[j, :len(ya)], y_tr[j, :len(ya)], m_tr[j, :len(ya)] = a, ya, 1
      x_ev[j, :len(yb)], y_ev[j, :len(yb)], s_ev[j, :len(yb)] = b, yb, sb
      cm[j, :nc] = True
    va, te = _probe_batch(x_tr, y_tr, m_tr, x_ev, y_ev, s_ev, cm, l2s,
                          float(lr), steps=int(steps))
    va, te = np.asarray(va), np.asarray(te)
    for j, i in enumerate(idx):
      best = int(np.argmax(va[j]))
      out[i] = {"test_acc": 100.0 * float(te[j, best]),
                "val_acc": 100.0 * float(va[j, best]),
                "best_l2": float(l2_grid[best])}
  return out  # type: ignore[return-value]


def _cpad(c: int) -> int:
  return int(math.ceil(c / 4) * 4)


def linear_probe_tasks(store: store_lib.FeatureStore, ptm: str,
                       tasks: Sequence[str], cfg) -> list[dict[str, Any]]:
  """Linear probe of `ptm` on `tasks` of a store (see `probe_batch`)."""
  items = []
  for name in tasks:
    t = store.task(name)
    items.append((t.ptm_features(ptm), t.labels, t.split))
  return probe_batch(items, tuple(cfg.probe.l2_grid), steps=cfg.probe.steps,
                     lr=cfg.probe.lr,
                     tasks_per_batch=cfg.probe.tasks_per_batch)


# ----------------------------------------------------------------------------
# Fine-tuning.


def subsample_stratified(labels: np.ndarray, max_total: int, seed: int
                         ) -> np.ndarray:
  """Sorted row indices: at most `max_total` rows, classes kept balanced.

  0 or a cap >= len(labels) keeps everything. Every class keeps at least one
  row; the order within a class is a seeded permutation.
  """
  n = len(labels)
  if not max_total or max_total >= n:
    return np.arange(n)
  classes = np.unique(labels)
  per = max(1, max_total // len(classes))
  rng = np.random.default_rng(seed)
  keep = []
  for c in classes:
    rows = np.flatnonzero(labels == c)
    keep.append(rows[rng.permutation(len(rows))[:per]])
  return np.sort(np.concatenate(keep))


def finetune_settings(cfg, spec) -> dict[str, Any]:
  """lrs / epochs / max_train for a PTM (EfficientNets get the `big_` ones)."""
  f = cfg.finetune
  big = spec.family == "efficientnet_lite"
  return {"lrs": tuple(float(v) for v in (f.big_lrs if big else
                                          f.local_lrs)),
          "epochs": int(f.big_epochs if big else f.local_epochs),
          "max_train": int(f.big_max_train if big else f.local_max_train),
          "batch_size": int(f.batch_size), "seed": int(f.seed)}


def finetune_cell(loaded, pool, settings: Mapping[str, Any]
                  ) -> dict[str, Any]:
  """Fine-tunes one PTM on one target pool; accuracies in percent."""
  tr, va, te = (pool.split == k for k in (0, 1, 2))
  rows = np.flatnonzero(tr)[subsample_stratified(
      pool.labels[tr], settings["max_train"], settings["seed"])]
  y = pool.labels.astype(np.int32)
  res = finetune_lib.finetune(
      loaded, pool.images[rows], y[rows], pool.images[va], y[va],
      pool.images[te], y[te], lrs=settings["lrs"],
      epochs=settings["epochs"], seed=settings["seed"],
      batch_size=settings["batch_size"], num_classes=pool.num_classes)
  return {
      "test_acc": 100.0 * res["test_acc"], "best_lr": res["best_lr"],
      "val_acc_per_lr": {str(k): 100.0 * v for k, v in res["val_acc"].items()},
      "test_acc_per_lr": {str(k): 100.0 * v
                          for k, v in res["test_acc_per_lr"].items()},
      "seconds": res["seconds"], "num_train": int(len(rows)),
      "num_val": int(va.sum()), "num_test": int(te.sum())}


CELL_FIELDS = ("target", "ptm", "test_acc", "best_lr", "val_acc_per_lr",
               "test_acc_per_lr", "seconds", "lrs", "epochs", "max_train",
               "num_train", "num_val", "num_test", "batch_size", "seed",
               "cell_hash")


def _read_cells(path: pathlib.Path) -> dict[tuple[str, str, str], dict]:
  """{(task, ptm, cell hash): row} of a finetune_cells.csv.

  Keyed by hash too: one table can hold cells of different builds under
  the same task name (e.g. the extra and the large tasks both number on
  from the sampled ones), and each build uses its own.
  """
  if not path.exists():
    return {}
  with open(path, newline="") as f:
    return {(r["target"], r["ptm"], r["cell_hash"]): r
            for r in csv.DictReader(f)}


def _append_cell(path: pathlib.Path, row: Mapping[str, Any]) -> None:
  new = not path.exists()
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a", newline="") as f:
    w = csv.DictWriter(f, fieldnames=CELL_FIELDS, lineterminator="\n")
    if new:
      w.writeheader()
    w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list, tuple))
                    else v) for k, v in row.items()})
    f.flush()
    os.fsync(f.fileno())


def probe_key(cfg, pools, zoo: Mapping[str, dict], name: str) -> str:
  """Cache key of PTM `name`'s linear-probe results on the config's tasks."""
  # Not extract.task_pools: this order is part of the key (committed probe
  # caches match it), so extra pools are appended at the end.
  used = (list(cfg.pools.train) + list(cfg.pools.val)
          + list(cfg.pools.targets) + list(cfg.pools.get("extra_train", ()))
          + list(cfg.pools.get("extra_val", ())))
  return extract.hash_json({
      "pools": [(n, extract.pool_hash(pools[n])) for n in used],
      "ptm": zoo[name]["config_hash"] if name in zoo else name,
      "image_size": cfg.zoo.image_size, "tasks": extract.tasks_key(cfg),
      "probe": cfg.probe.to_dict(), "v": extract.CODE_VERSION})[:12]


def seed_caches(results: pathlib.Path, source: str, *,
                log: Callable[[str], None] = print) -> None:
  """Copies the fine-tune cells and the probe cache of a finished run.

  `source` (config `ground_truth_from`, "" = none) is a results directory
  such as the committed results/bench/full; a relative path is resolved
  from the current directory, then from the repository root. Copied
  entries are used only where their hashes match this build (cell hash,
  probe key); the rest is recomputed (probe) or reported missing (cells).
  """
  if not source:
    return
  src = pathlib.Path(source)
  if not src.is_absolute() and not src.exists():
    src = pathlib.Path(__file__).resolve().parents[1] / source
  if not src.is_dir():
    log(f"ground_truth_from: {source} not found; computing everything.")
    return
  for fname in ("finetune_cells.csv", "linear_probe_all.json"):
    if (src / fname).exists() and not (results / fname).exists():
      store_lib.atomic_write_text(results / fname, (src / fname).read_text())
      log(f"ground truth: seeded {results / fname} from {src}")


def cell_hash(cfg, zoo_hash: str, pool_sha: str, settings) -> str:
  return hashlib.sha256(json.dumps(
      {"zoo": zoo_hash, "pool": pool_sha, "settings": settings,
       "image_size": cfg.zoo.image_size}, sort_keys=True).encode()
                        ).hexdigest()[:12]


def _run_cell(loaded, task: str, images, settings, h: str,
              log: Callable[[str], None]) -> dict[str, Any]:
  """One fine-tune cell as a finetune_cells.csv row."""
  r = finetune_cell(loaded, images, settings)
  log(f"finetune: {task} x {loaded.spec.name}: {r['test_acc']:.1f}% "
      f"(lr {r['best_lr']}, {r['seconds']:.1f}s)")
  return {"target": task, "ptm": loaded.spec.name, **r,
          "lrs": settings["lrs"], "epochs": settings["epochs"],
          "max_train": settings["max_train"],
          "batch_size": settings["batch_size"], "seed": settings["seed"],
          "cell_hash": h}


@dataclasses.dataclass(frozen=True)
class TaskImages:
  """What `finetune_cell` reads of a pool, for one task.

  Attributes:
    images: [n, 28, 28, 1] uint8; labels: [n] int in 0..C-1 (pool ids
    remapped in increasing order, as the FeatureStore does); split: [n]
    int8, 0 train / 1 val / 2 test; num_classes: C.
  """
  images: np.ndarray
  labels: np.ndarray
  split: np.ndarray
  num_classes: int


def task_images(pool, rows: np.ndarray) -> TaskImages:
  """The images of a sampled task (`rows` of `pool`)."""
  classes, labels = np.unique(pool.labels[rows], return_inverse=True)
  return TaskImages(pool.images[rows], labels.astype(np.int64),
                    pool.split[rows], int(classes.size))


def task_hash(pool_sha: str, rows: np.ndarray) -> str:
  """Content hash of a sampled task: its pool's hash and its rows."""
  return extract.hash_json({
      "pool": pool_sha,
      "rows": hashlib.sha256(np.asarray(rows, np.int64).tobytes()
                             ).hexdigest()})[:12]


def finetuned_tasks(cfg, tasks: Sequence[extract.Task]
                    ) -> list[extract.Task]:
  """Validation and training tasks whose ground truth is fine-tuned too.

  Config `finetune.val_tasks` (every validation task) and
  `finetune.train_tasks` (the first N training tasks of `pools.train`),
  both restricted to the pools of `finetune.task_pools` (() = every pool;
  the tasks of `pools.extra_val` are not), `finetune.extra_train_tasks`
  (the first N training tasks of `pools.extra_train`: its sampled ones,
  then its large ones) and
  `finetune.large_train_tasks` (the first N large training tasks of
  `finetune.task_pools`); validation first. `train_tasks` counts the
  sampled tasks only.
  """
  f = cfg.finetune
  pools = tuple(f.get("task_pools", ()))
  extra = set(cfg.pools.get("extra_train", ()))
  extra_val = set(cfg.pools.get("extra_val", ()))
  ok = lambda t: not pools or t.pool in pools
  val = [t for t in tasks if t.role == "val" and (ok(t) or t.pool in extra_val)
         ] if f.get("val_tasks", False) else []
  train = [t for t in tasks if t.role == "train" and ok(t) and not t.large
           and t.pool not in extra][:int(f.get("train_tasks", 0))]
  train += [t for t in tasks if t.role == "train" and t.pool in extra
            ][:int(f.get("extra_train_tasks", 0))]
  train += [t for t in tasks if t.role == "train" and ok(t) and t.large
            ][:int(f.get("large_train_tasks", 0))]
  return val + train


def run_finetune(cfg, pools, reg, zoo, results_dir: pathlib.Path, *,
                 cells: Sequence[tuple[str, str]] | None = None,
                 tasks: Sequence[extract.Task] = (),
                 deadline: float | None = None,
                 log: Callable[[str], None] = print) -> dict[tuple, dict]:
  """Fine-tunes every (target, fine-tunable PTM) cell not yet in the table.

  Cells are appended to `results_dir/finetune_cells.csv` as they finish
  (column `target` holds the task name); a cell already there with the
  same cell hash is skipped. Order: targets PTM-major, by
  `cfg.finetune.order`, then `tasks` task-major (so a run stopped early
  leaves whole tasks), validation tasks first, by class count. With `cfg.finetune.enabled` False nothing is
  computed: only the cells already in the table are returned.

  Args:
    cells: restrict the targets to these (target, ptm) pairs.
    tasks: validation / training tasks to fine-tune too (`finetuned_tasks`).
    deadline: time.time() after which no new cell starts.

  Returns:
    {(task, ptm): row} of all finished cells (old and new).
  """
  path = results_dir / "finetune_cells.csv"
  done = _read_cells(path)
  ptms = [n for n, s in reg.items() if s.fine_tunable
          and n not in tuple(cfg.finetune.skip)]
  # `finetune.order` lists PTM names or families, earliest first (cheap
  # architectures interleaved over pretraining sources, so a run stopped
  # early still has whole columns for every source); the rest come last.
  order = list(cfg.finetune.get("order", ()))

  def rank(n):
    for i, key in enumerate(order):
      if key in (n, reg[n].family):
        return i
    return len(order)

  ptms.sort(key=rank)
  expected = {}  # (target, ptm) -> the cell hash of this build.
  for name in ptms:
    spec = reg[name]
    settings = finetune_settings(cfg, spec)
    zh = zoo[name]["config_hash"] if name in zoo else spec.weight_group
    todo = []
    for target in cfg.pools.targets:
      if cells is not None and (target, name) not in cells:
        continue
      h = cell_hash(cfg, zh, extract.pool_hash(pools[target]), settings)
      expected[(target, name)] = h
      if (target, name, h) in done:
        continue
      todo.append((target, h))
    past_deadline = deadline is not None and time.time() > deadline
    if not todo or not cfg.finetune.enabled or past_deadline:
      continue
    loaded = spec.load()
    for target, h in todo:
      if deadline is not None and time.time() > deadline:
        log(f"finetune: deadline reached before {target} x {name}")
        break
      _append_cell(path, _run_cell(loaded, target, pools[target], settings,
                                   h, log))
  loaded_ptms = {}
  pool_sha = {p: extract.pool_hash(pools[p]) for p in {t.pool for t in tasks}}
  views = [(task, task_images(pools[task.pool], task.rows)) for task in tasks]
  # Validation tasks first; tasks with the same class count next to each
  # other, so each PTM's compiled steps (finetune._trainer) are reused.
  views.sort(key=lambda tv: (tv[0].role != "val", tv[1].num_classes))
  for task, view in views:
    sha = task_hash(pool_sha[task.pool], task.rows)
    for name in ptms:
      spec = reg[name]
      settings = finetune_settings(cfg, spec)
      zh = zoo[name]["config_hash"] if name in zoo else spec.weight_group
      h = cell_hash(cfg, zh, sha, settings)
      expected[(task.name, name)] = h
      if (task.name, name, h) in done:
        continue
      if not cfg.finetune.enabled or (deadline is not None
                                      and time.time() > deadline):
        continue
      if name not in loaded_ptms:
        loaded_ptms[name] = spec.load()
      _append_cell(path, _run_cell(loaded_ptms[name], task.name, view,
                                   settings, h, log))
  return {(t, p): row for (t, p, h), row in _read_cells(path).items()
          if expected.get((t, p)) == h}


# ----------------------------------------------------------------------------
# Tables and summary.


def _write_wide(path: pathlib.Path, rows: Sequence[str],
                cols: Sequence[str], get: Callable[[str, str], Any],
                corner: str = "target") -> None:
  lines = [",".join([corner, *cols])]
  for r in rows:
    vals = []
    for c in cols:
      v = get(r, c)
      vals.append("" if v is None or (isinstance(v, float) and not
                                       np.isfinite(v)) else f"{v:.6g}")
    lines.append(",".join([r, *vals]))
  store_lib.atomic_write_text(path, "\n".join(lines) + "\n")


def _meaningfulness(gt_targets, lp_train, ptms) -> dict[str, Any]:
  """Best PTM per target, how often each is best, the prior's tau."""
  targets = list(gt_targets)
  best = {t: max(ptms, key=lambda m: gt_targets[t][m]) for t in targets}
  counts: dict[str, int] = {}
  for m in best.values():
    counts[m] = counts.get(m, 0) + 1
  train_rows = np.array([[lp_train[t][m] for m in ptms] for t in lp_train])
  prior = metrics.constant_prior(train_rows)
  taus = {t: metrics.weighted_tau(np.array([gt_targets[t][m] for m in ptms]),
                                  prior) for t in targets}
  return {
      "ptms": list(ptms),
      "best_ptm_per_target": {t: {"ptm": best[t],
                                  "acc": gt_targets[t][best[t]]}
                              for t in targets},
      "times_best": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
      "max_times_best": max(counts.values()) if counts else 0,
      "no_ptm_best_on_more_than_half": (max(counts.values()) <= len(targets)
                                        / 2) if counts else True,
      "constant_prior": dict(zip(ptms, map(float, prior))),
      "constant_prior_weighted_tau": {
          "per_target": taus, "mean": float(np.mean(list(taus.values())))
          if taus else float("nan")},
  }


def summarize(gt_targets: Mapping[str, Mapping[str, float]],
              lp_targets: Mapping[str, Mapping[str, float]],
              lp_train: Mapping[str, Mapping[str, float]],
              ptms: Sequence[str],
              ft_ptms: Sequence[str]) -> dict[str, Any]:
  """Best PTM per target, constant-prior tau, fine-tune/probe agreement.

  The same figures restricted to the fine-tuned PTMs (the zoo that
  `python -m spider_jax.rank` ranks, `ptms=fine_tuned`) are under
  "fine_tuned_zoo".
  """
  out = _meaningfulness(gt_targets, lp_train, ptms)
  out["fine_tuned_zoo"] = _meaningfulness(
      gt_targets, lp_train, [m for m in ptms if m in ft_ptms])
  return {**out, "finetune_vs_probe": agreement(gt_targets, lp_targets,
                                                ft_ptms)}


def agreement(ft: Mapping[str, Mapping[str, float]],
              probe: Mapping[str, Mapping[str, float]],
              ft_ptms: Sequence[str]) -> dict[str, Any]:
  """How well probe accuracy ranks the PTMs as fine-tuning does, per task.

  Args:
    ft: {task: {ptm: fine-tuned accuracy}}; probe: the same for the probe.
    ft_ptms: the fine-tuned PTMs (tasks with fewer than 3 are skipped).

  Returns:
    per_target {task: weighted tau (fine-tune as truth), Spearman, same
    best PTM}, their means, the same-best count and the task count.
  """
  agree = {}
  for t in ft:
    ms = [m for m in ft_ptms if m in ft[t]]
    if len(ms) >= 3:
      a = np.array([ft[t][m] for m in ms])
      b = np.array([probe[t][m] for m in ms])
      agree[t] = {"weighted_tau": metrics.weighted_tau(a, b),
                  "spearman": float(scipy.stats.spearmanr(a, b).statistic),
                  "same_best": bool(ms[int(np.argmax(a))]
                                    == ms[int(np.argmax(b))])}
  mean = lambda xs: float(np.mean(xs)) if len(xs) else float("nan")
  return {"per_target": agree,
          "mean_weighted_tau": mean([v["weighted_tau"]
                                     for v in agree.values()]),
          "mean_spearman": mean([v["spearman"] for v in agree.values()]),
          "same_best": sum(v["same_best"] for v in agree.values()),
          "targets": len(agree)}


# ----------------------------------------------------------------------------
# The whole pipeline.


def _main_first(fn: Callable[[], Any], split: bool, name: str) -> Any:
  """fn() on process 0, then (from its caches) on the others if `split`."""
  if not split:
    return fn()
  main = jax.process_index() == 0
  out = fn() if main else None
  sharding.barrier(name)
  return out if main else fn()


def run(cfg, *, deadline: float | None = None,
        log: Callable[[str], None] = print,
        all_processes: bool = False) -> dict[str, Any]:
  """Builds the benchmark of `cfg` end to end (see the module docstring).

  Args:
    cfg: a configs/bench.py config.
    deadline: time.time() after which no new fine-tune cell starts.
    log: progress messages.
    all_processes: every process calls `run` and feature extraction is
      split over them (module docstring); otherwise only one process may
      call it.

  Returns:
    The summary dict (also written to `results_dir/summary.json`); on
    processes other than 0 with `all_processes`, only {"store": path}.
  """
  split = all_processes and jax.process_count() > 1
  main = jax.process_index() == 0 or not split
  results = pathlib.Path(cfg.results_dir)
  if main:
    results.mkdir(parents=True, exist_ok=True)
    seed_caches(results, cfg.get("ground_truth_from", ""), log=log)
  times: dict[str, float] = {}
  t0 = time.perf_counter()
  pools = _main_first(lambda: extract.build_pools(cfg), split, "bench_pools")
  times["pools_s"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  zoo = _main_first(lambda: extract.build_zoo(cfg, pools, log=log), split,
                    "bench_zoo")
  times["zoo_s"] = time.perf_counter() - t0
  times["zoo_train_s_per_ptm"] = {n: z.get("train_seconds")
                                  for n, z in zoo.items()}
  reg = extract.build_registry(cfg, zoo)
  ptms = list(reg)

  t0 = time.perf_counter()
  path = extract.store_path(cfg, pools, zoo)
  ex = extract.extract_store(cfg, pools, reg, path, log=log,
                             across_processes=split)
  times["extract_s"] = time.perf_counter() - t0
  if not main:
    return {"store": str(path)}
  tasks = extract.task_list(cfg, pools)
  task_names = [t.name for t in tasks]
  fs = store_lib.FeatureStore(path)
  if set(fs.task_names()) != set(task_names):
    # Tasks with ground truth pending (empty cells) until it is computed.
    w = extract.open_writer(path, cfg, reg,
                            _gt_meta(cfg, reg, "pending"))
    extract.add_tasks(w, tasks, pools)
    w.set_ground_truth({t: {m: float("nan") for m in ptms}
                        for t in task_names})
    fs = w.close()

  # --- Linear probe of every PTM on every task (cached per PTM, keyed by
  # everything that PTM's results depend on).
  t0 = time.perf_counter()
  lp_path = results / "linear_probe_all.json"
  lp_cache = json.loads(lp_path.read_text()) if lp_path.exists() else {}
  lp_cache = {k: dict(lp_cache.get(k, {})) for k in ("keys", "ptms",
                                                     "seconds")}
  for name in ptms:
    key = probe_key(cfg, pools, zoo, name)
    if lp_cache["keys"].get(name) == key and set(
        lp_cache["ptms"].get(name, ())) >= set(task_names):
      continue
    t1 = time.perf_counter()
    res = linear_probe_tasks(fs, name, task_names, cfg)
    lp_cache["ptms"][name] = {t: r["test_acc"]
                              for t, r in zip(task_names, res)}
    lp_cache["seconds"][name] = time.perf_counter() - t1
    lp_cache["keys"][name] = key
    store_lib.atomic_write_json(lp_path, lp_cache)
    log(f"probe: {name} on {len(task_names)} tasks in "
        f"{lp_cache['seconds'][name]:.1f}s")
  times["linear_probe_s"] = time.perf_counter() - t0
  times["linear_probe_s_per_ptm"] = lp_cache["seconds"]
  lp = {t: {m: lp_cache["ptms"][m][t] for m in ptms} for t in task_names}
  targets = list(cfg.pools.targets)
  train_val = [t.name for t in tasks if t.role != "target"]
  _write_wide(results / "linear_probe_targets.csv", targets, ptms,
              lambda t, m: lp[t][m])
  _write_wide(results / "linear_probe_tasks.csv", train_val, ptms,
              lambda t, m: lp[t][m], corner="task")

  # Interim store, linear probe everywhere, while fine-tuning runs; only
  # for new tasks: a store that has a fine-tune ground truth keeps it. (A
  # store that extraction reopened, e.g. to add a pool, has no status.)
  if fs.meta.get("ground_truth", {}).get("status", "pending") == "pending":
    _write_ground_truth(path, cfg, reg, _gt_meta(
        cfg, reg, "linear_probe (fine-tune pending)"), lp)

  # --- Fine-tuning of targets.
  t0 = time.perf_counter()
  extra = finetuned_tasks(cfg, tasks)
  cells = run_finetune(cfg, pools, reg, zoo, results, tasks=extra,
                       deadline=deadline, log=log)
  times["finetune_s_this_run"] = time.perf_counter() - t0
  ft_ptms = [n for n, s in reg.items() if s.fine_tunable
             and n not in tuple(cfg.finetune.skip)]
  ft = {t: {m: float(cells[(t, m)]["test_acc"]) for m in ft_ptms
            if (t, m) in cells} for t in targets}
  ft_secs = {(t, m): float(r["seconds"]) for (t, m), r in cells.items()}
  _write_wide(results / "finetune_accuracy.csv", targets, ft_ptms,
              lambda t, m: ft[t].get(m))
  _write_wide(results / "finetune_seconds.csv", targets, ft_ptms,
              lambda t, m: ft_secs.get((t, m)))
  missing = [(t, m) for t in targets for m in ft_ptms if m not in ft[t]]
  gt_t = {t: {m: (ft[t][m] if m in ft[t] else lp[t][m]) for m in ptms}
          for t in targets}
  source = {t: {m: ("finetune" if m in ft[t] else "linear_probe")
                for m in ptms} for t in targets}
  _write_wide(results / "ground_truth_targets.csv", targets, ptms,
              lambda t, m: gt_t[t][m])
  lines = [",".join(["target", *ptms])] + [
      ",".join([t, *(source[t][m] for m in ptms)]) for t in targets]
  store_lib.atomic_write_text(results / "ground_truth_source.csv",
                              "\n".join(lines) + "\n")
  # Validation / training tasks: fine-tuned accuracy once every
  # fine-tunable PTM's cell of the task is done, the probe until then.
  ft_tasks = {t.name: {m: float(cells[(t.name, m)]["test_acc"])
                       for m in ft_ptms} for t in extra
              if all((t.name, m) in cells for m in ft_ptms)}
  gt_tasks = {t: {m: row.get(m, lp[t][m]) for m in ptms}
              for t, row in ft_tasks.items()}
  _write_wide(results / "finetune_tasks_accuracy.csv", list(ft_tasks),
              ft_ptms, lambda t, m: ft_tasks[t][m], corner="task")
  pending = [t.name for t in extra if t.name not in ft_tasks]
  status = ("complete" if not missing else
            f"partial: {len(missing)} fine-tune cells missing, linear probe "
            "used there")
  if pending:
    status += (f"; {len(pending)} of {len(extra)} validation/training tasks "
               "to fine-tune still pending (linear probe until then)")
  fs = _write_ground_truth(path, cfg, reg, _gt_meta(
      cfg, reg, status, source=source, finetuned=list(ft_tasks)),
                           {**lp, **gt_t, **gt_tasks})
  times["finetune_s_total_cells"] = float(sum(ft_secs.values()))

  summ = summarize(gt_t, {t: lp[t] for t in targets},
                   {t.name: lp[t.name] for t in tasks if t.role == "train"},
                   ptms, [m for m in ft_ptms])
  summ["finetuned_tasks_vs_probe"] = agreement(ft_tasks, lp, ft_ptms)
  summary = {
      "variant": cfg.variant, "store": str(path),
      "counts": {"ptms": len(ptms), "fine_tunable": len(ft_ptms),
                 "feature_only": [n for n, s in reg.items()
                                  if not s.fine_tunable],
                 "targets": len(targets),
                 "train_tasks": len(fs.task_names("train")),
                 "val_tasks": len(fs.task_names("val")),
                 "pools_extracted": len(fs.meta["pools"])},
      "ground_truth_status": status,
      "finetune_cells_missing": [list(c) for c in missing],
      "times": times,
      "extract": {k: v for k, v in ex.items() if k != "extracted"},
      "seconds_per_sample": fs.seconds_per_sample(),
      "zoo_source_accuracy": {n: z.get("accuracy") for n, z in zoo.items()},
      **summ,
  }
  store_lib.atomic_write_json(results / "summary.json", summary)
  store_lib.atomic_write_json(results / "config.json", {
      "config": json.loads(cfg.to_json()),
      "store": str(path), "store_hash": extract.store_hash(cfg, pools, zoo),
      "pool_sha256": {n: extract.pool_hash(pools[n]) for n in
                      extract.task_pools(cfg)},
      "zoo": {n: {k: z[k] for k in ("config_hash",)} for n, z in zoo.items()},
      "seeds": {"pools": cfg.seed, "zoo": cfg.zoo.seed,
                "tasks": cfg.tasks.seed, "val_tasks": cfg.tasks.seed + 1,
                "finetune": cfg.finetune.seed},
      "finetune_settings": {n: finetune_settings(cfg, reg[n])
                            for n in ft_ptms},
      "registry": {n: s.describe() for n, s in reg.items()},
      "jax_version": jax.__version__,
  })
  return summary


def _write_ground_truth(path: pathlib.Path, cfg, reg, meta: dict,
                        gt: Mapping[str, Mapping[str, float]]
                        ) -> store_lib.FeatureStore:
  """Writes `meta` (`_gt_meta`) and the ground truth `gt` ({task: {PTM:
  accuracy}}, every task) into the store at `path`, unless it holds exactly
  them already: a cached rerun leaves a shared store untouched (a rewrite
  hides its meta.json from other readers for a moment)."""
  fs = store_lib.FeatureStore(path)
  old = fs.ground_truth()
  if (set(old.tasks) == set(gt)
      and all(fs.meta.get(k) == json.loads(json.dumps(v))
              for k, v in meta.items())
      and np.array_equal(old.values, [[gt[t][m] for m in old.models]
                                      for t in old.tasks], equal_nan=True)):
    return fs
  w = extract.open_writer(path, cfg, reg, meta)
  w.set_ground_truth(gt)
  return w.close()


def _gt_meta(cfg, reg, status: str, source=None,
             finetuned: Sequence[str] = ()) -> dict:
  return {"ground_truth": {
      "status": status, "units": "accuracy, percent",
      "targets": "fine-tuned test accuracy (lr chosen on val) for "
                 "fine-tunable PTMs; linear probe for feature-only PTMs "
                 f"({[n for n, s in reg.items() if not s.fine_tunable]}) "
                 f"and skipped ones ({list(cfg.finetune.skip)})",
      "train_val_tasks": "linear-probe test accuracy (L2 chosen on val), "
                         "except the tasks of `finetuned_tasks`: fine-tuned "
                         "as the targets are",
      "finetuned_tasks": list(finetuned),
      "target_cell_source": source or {}},
      "benchmark": {"variant": cfg.variant}}


def main(argv):  # pragma: no cover - exercised via the CLI
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from spider_jax import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  cli.initialize_runtime()
  cfg = flags.FLAGS.config
  deadline = None
  if flags.FLAGS.stop_after_s:
    deadline = time.time() + flags.FLAGS.stop_after_s
  main_process = jax.process_index() == 0
  # On several processes (--distributed) all of them extract features
  # together; process 0 alone probes, fine-tunes and writes.
  summary = run(cfg, deadline=deadline,
                log=print if main_process else (lambda m: None),
                all_processes=jax.process_count() > 1)
  sharding.barrier("groundtruth_done")
  if main_process:
    print(json.dumps({k: summary[k] for k in (
        "counts", "ground_truth_status", "times", "best_ptm_per_target",
        "times_best", "constant_prior_weighted_tau", "finetune_vs_probe",
        "finetuned_tasks_vs_probe")},
                     indent=1, default=str))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from spider_jax import cli  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Benchmark config.",
                                  lock_config=True)
  absl_flags.DEFINE_integer("stop_after_s", 0, "Start no new fine-tune cell "
                            "after this many seconds (0: no limit); rerun "
                            "the same command to finish the rest.")
  cli.define_distributed_flags()
  absl_flags.mark_flags_as_required(["config"])
  app.run(main)
