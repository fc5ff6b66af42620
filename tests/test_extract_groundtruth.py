"""The `:tiny` offline benchmark: zoo, extraction, store, ground truth.

Builds configs/bench.py:tiny end to end into a temporary cache (pools,
2 local PTMs, EfficientNet-Lite0 at 32 px, 3 targets, 20 + 4 sampled tasks),
then checks the store, resumability, the linear probe and that fine-tune
cells reproduce.
"""

import csv
import json
import os
import pathlib
import sys

import numpy as np
import pytest

from conftest import free_port, run_processes
from configs import bench as bench_config
from spider_jax import groundtruth
from spider_jax.data import FeatureStore
from spider_jax.zoo import extract
from spider_jax.zoo import finetune as finetune_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("bench")
  cfg = bench_config.get_config("tiny")
  cfg.cache_dir = str(root / "cache")
  cfg.results_dir = str(root / "results")
  summary = groundtruth.run(cfg, log=lambda s: None)
  return cfg, summary


def test_tiny_store_is_valid(tiny):
  cfg, summary = tiny
  store = FeatureStore(summary["store"])
  pools = extract.build_pools(cfg)
  zoo = extract.build_zoo(cfg, pools, log=lambda s: None)
  reg = extract.build_registry(cfg, zoo)
  assert list(store.ptm_names) == list(reg)
  assert len(reg) == 3
  assert store.encoder_name == "efficientnet_lite0"
  assert store.encoder_dim == 1280
  assert len(store.task_names("target")) == 3
  assert len(store.task_names("train")) == cfg.tasks.num_train
  assert len(store.task_names("val")) == cfg.tasks.num_val
  gt = store.ground_truth()
  for name in store.task_names():
    t = store.task(name)
    assert t.generic.shape == (len(t.labels), 1280)
    for ptm in store.ptm_names:
      f = t.ptm_features(ptm)
      assert f.shape == (len(t.labels), reg[ptm].feature_dim)
      p = t.source_probs(ptm)
      assert p.shape == (len(t.labels), reg[ptm].head_classes)
      np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-4)
    assert np.all(np.isfinite(gt.row(name)))
  sps = store.seconds_per_sample()
  assert set(sps) == set(reg) | {"encoder"}
  assert all(v > 0 for v in sps.values())
  assert store.meta["ground_truth"]["status"] == "complete"
  # Feature-only / skipped PTMs fall back to the linear probe, and say so.
  src = store.meta["ground_truth"]["target_cell_source"]
  assert src["mnist5k"]["efficientnet_lite0"] == "linear_probe"
  assert src["mnist5k"]["mlp@fashion_0_4"] == "finetune"
  # Generic features are the zoo member's (shared weights, same input).
  t = store.task("mnist5k")
  np.testing.assert_array_equal(t.generic, t.ptm_features("efficientnet_lite0"))


def test_probs_match_registry(tiny):
  cfg, summary = tiny
  store = FeatureStore(summary["store"])
  pools = extract.build_pools(cfg)
  zoo = extract.build_zoo(cfg, pools, log=lambda s: None)
  reg = extract.build_registry(cfg, zoo)
  x = pools["mnist5k"].images[:8]
  for name in ("cnn_s@font_latin_upper", "efficientnet_lite0"):
    loaded = reg[name].load()
    np.testing.assert_allclose(
        store.task("mnist5k").source_probs(name)[:8],
        np.asarray(loaded.probs(x)), atol=1e-4)
    np.testing.assert_allclose(
        store.task("mnist5k").ptm_features(name)[:8],
        np.asarray(loaded.features(x)), atol=1e-3, rtol=1e-3)


def test_resumable(tiny):
  cfg, summary = tiny
  path = pathlib.Path(summary["store"])
  cells = pathlib.Path(cfg.results_dir) / "finetune_cells.csv"
  n_cells = len(cells.read_text().splitlines())
  before = FeatureStore(path).task("fashion_5_9").ptm_features(
      "mlp@fashion_0_4")
  files = sorted((p, p.stat().st_mtime_ns) for p in path.rglob("*"))
  # A second full run skips everything and leaves the store untouched.
  again = groundtruth.run(cfg, log=lambda s: None)
  assert again["extract"]["skipped"] and not again["extract"].get("extracted")
  assert len(cells.read_text().splitlines()) == n_cells
  assert sorted((p, p.stat().st_mtime_ns) for p in path.rglob("*")) == files
  assert again["ground_truth_status"] == summary["ground_truth_status"]
  # A run interrupted after some pools redoes only the missing pool.
  meta = json.loads((path / "meta.json").read_text())
  meta["pools"].pop("fashion_5_9")
  (path / "meta.json").write_text(json.dumps(meta))
  pools = extract.build_pools(cfg)
  zoo = extract.build_zoo(cfg, pools, log=lambda s: None)
  assert not any(z["trained"] for z in zoo.values())
  reg = extract.build_registry(cfg, zoo)
  ex = extract.extract_store(cfg, pools, reg, path, log=lambda s: None)
  assert ex["extracted"] == ["fashion_5_9"]
  after = FeatureStore(path).task("fashion_5_9").ptm_features(
      "mlp@fashion_0_4")
  np.testing.assert_allclose(before, after, atol=1e-5)
  assert FeatureStore(path).task_names("train")  # tasks and GT kept


def test_linear_probe_beats_chance(tiny):
  cfg, summary = tiny
  store = FeatureStore(summary["store"])
  gt = store.ground_truth()
  for ptm in store.ptm_names:
    accs, chance = [], []
    for name in store.task_names("train") + store.task_names("val"):
      accs.append(gt.row(name, [ptm])[0])
      chance.append(100.0 / store.task(name).num_classes)
    assert np.mean(accs) > np.mean(chance) + 10, ptm


def test_batched_probe_matches_single(tiny):
  cfg, summary = tiny
  store = FeatureStore(summary["store"])
  names = store.task_names("train")[:3]
  items, singles = [], []
  for name in names:
    t = store.task(name)
    f = t.ptm_features("cnn_s@font_latin_upper")
    items.append((f, t.labels, t.split))
    m = [t.mask(s) for s in ("train", "val", "test")]
    singles.append(100 * finetune_lib.linear_probe(
        f[m[0]], t.labels[m[0]], f[m[1]], t.labels[m[1]], f[m[2]],
        t.labels[m[2]], tuple(cfg.probe.l2_grid), steps=cfg.probe.steps,
        lr=cfg.probe.lr, num_classes=t.num_classes))
  batched = groundtruth.probe_batch(items, tuple(cfg.probe.l2_grid),
                                    steps=cfg.probe.steps, lr=cfg.probe.lr,
                                    tasks_per_batch=4)
  for b, s in zip(batched, singles):
    assert abs(b["test_acc"] - s) <= 1.0 + 1e-6


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_finetune_cells_reproduce(tiny):
  cfg, _ = tiny
  rows = _rows(pathlib.Path(cfg.results_dir) / "finetune_cells.csv")
  pools = extract.build_pools(cfg)
  zoo = extract.build_zoo(cfg, pools, log=lambda s: None)
  reg = extract.build_registry(cfg, zoo)
  for r in rows[:2]:
    spec = reg[r["ptm"]]
    res = groundtruth.finetune_cell(spec.load(), pools[r["target"]],
                                    groundtruth.finetune_settings(cfg, spec))
    assert abs(res["test_acc"] - float(r["test_acc"])) <= 1.0


def test_finetuned_validation_and_training_tasks(tiny, tmp_path):
  """finetune.val_tasks / train_tasks: those tasks' ground truth becomes
  fine-tuned accuracy, in a store of their own, and the ranker's
  `ground_truth` option restricts it to them."""
  cfg, plain = tiny
  c = cfg.copy_and_resolve_references()
  with c.unlocked():
    c.results_dir = str(tmp_path / "results")
    c.finetune.val_tasks = True
    c.finetune.train_tasks = 2
  summary = groundtruth.run(c, log=lambda s: None)
  assert summary["store"] != plain["store"]  # other ground truth, other key
  store = FeatureStore(summary["store"])
  tuned = store.meta["ground_truth"]["finetuned_tasks"]
  assert tuned == store.task_names("val") + store.task_names("train")[:2]
  results = pathlib.Path(c.results_dir)
  cells = {(r["target"], r["ptm"]): float(r["test_acc"])
           for r in _rows(results / "finetune_cells.csv")}
  probe = {r["task"]: r for r in _rows(results / "linear_probe_tasks.csv")}
  gt = store.ground_truth()
  differs = False
  for task in store.task_names("val") + store.task_names("train"):
    row = dict(zip(store.ptm_names, gt.row(task, store.ptm_names)))
    for m, v in row.items():  # (Lite0 is probed: finetune.skip of :tiny)
      if task in tuned and m not in c.finetune.skip:
        assert v == pytest.approx(cells[(task, m)], abs=1e-6)
        differs |= abs(v - float(probe[task][m])) > 1e-6
      else:
        assert v == pytest.approx(float(probe[task][m]), rel=1e-5)
  assert differs, "fine-tuned and probe ground truth agree everywhere"
  # A cell reproduces from the task's own images.
  pools = extract.build_pools(c)
  zoo = extract.build_zoo(c, pools, log=lambda s: None)
  reg = extract.build_registry(c, zoo)
  task = next(t for t in extract.task_list(c, pools) if t.name == tuned[-1])
  res = groundtruth.finetune_cell(
      reg["mlp@fashion_0_4"].load(),
      groundtruth.task_images(pools[task.pool], task.rows),
      groundtruth.finetune_settings(c, reg["mlp@fashion_0_4"]))
  assert res["test_acc"] == pytest.approx(
      cells[(task.name, "mlp@fashion_0_4")], abs=1.0)
  # A rerun computes nothing new.
  n = len(_rows(results / "finetune_cells.csv"))
  groundtruth.run(c, log=lambda s: None)
  assert len(_rows(results / "finetune_cells.csv")) == n
  # Another build whose training tasks have the same names but other rows
  # (tasks.seed + 1) adds its cells beside these, and each build keeps
  # using its own: rerunning the first computes nothing.
  other = c.copy_and_resolve_references()
  with other.unlocked():
    other.tasks.seed = cfg.tasks.seed + 1
    other.finetune.val_tasks = False
  groundtruth.run(other, log=lambda s: None)
  rows = _rows(results / "finetune_cells.csv")
  assert len(rows) == n + 2 * 2                 # 2 tasks x mlp, cnn_s
  assert len({r["cell_hash"] for r in rows
              if (r["target"], r["ptm"]) == (tuned[-1], "mlp@fashion_0_4")
              }) == 2
  again = groundtruth.run(c, log=lambda s: None)
  assert len(_rows(results / "finetune_cells.csv")) == n + 4
  np.testing.assert_array_equal(
      FeatureStore(again["store"]).ground_truth().row(tuned[-1],
                                                      store.ptm_names),
      gt.row(tuned[-1], store.ptm_names))
  # The ranker's view: only the fine-tuned training/validation tasks.
  from configs import train as train_config  # pylint: disable=g-import-not-at-top
  from spider_jax.train import open_or_build_store  # pylint: disable=g-import-not-at-top
  t = train_config.get_config("tiny")
  assert t.ground_truth == "auto"
  t.store = summary["store"]
  for mode in ("auto", "finetuned"):
    t.ground_truth = mode
    view = open_or_build_store(t, tmp_path)
    assert view.task_names("train") == tuned[-2:]
    assert view.task_names("val") == store.task_names("val")
    assert view.task_names("target") == store.task_names("target")
  t.ground_truth = "any"
  assert open_or_build_store(t, tmp_path).task_names() == store.task_names()
  t.store = plain["store"]  # No fine-tuned task: auto uses them all.
  t.ground_truth = "auto"
  assert len(open_or_build_store(t, tmp_path).task_names("train")) == 20
  t.ground_truth = "finetuned"
  with pytest.raises(ValueError, match="no fine-tuned training or valid"):
    open_or_build_store(t, tmp_path)
  t.ground_truth = "fine"
  with pytest.raises(ValueError, match="use any, finetuned or auto"):
    open_or_build_store(t, tmp_path)


def _task_key(t):
  """What identifies a task: name, pool, role and rows."""
  return (t.name, t.pool, t.role,
          None if t.rows is None else tuple(t.rows.tolist()))


def test_extra_training_pools_leave_the_other_tasks_unchanged(tiny):
  """pools.extra_train / tasks.num_extra_train add training tasks after the
  others, which keep their pools and rows (so their cached cells stay
  valid); unused, the new fields change no cache key."""
  cfg, _ = tiny
  c = cfg.copy_and_resolve_references()
  extra = "font_latin_lower_ranker_low_resolution"
  with c.unlocked():
    c.pools.extra_train = (extra,)
    c.tasks.num_extra_train = 5
    c.finetune.train_tasks = 2
    c.finetune.extra_train_tasks = 3
    c.finetune.val_tasks = True
  pools = extract.build_pools(c)
  base, more = extract.task_list(cfg, pools), extract.task_list(c, pools)
  before = [_task_key(b) for b in base]
  seen = set(before)
  added = [t for t in more if _task_key(t) not in seen]
  assert [_task_key(t) for t in more if _task_key(t) in seen] == before
  assert [t.name for t in added] == [f"train_{cfg.tasks.num_train + i:04d}"
                                     for i in range(5)]
  assert {t.pool for t in added} == {extra} and all(t.role == "train"
                                                    for t in added)
  tuned = groundtruth.finetuned_tasks(c, more)
  names = lambda ts: [t.name for t in ts]
  assert names(tuned) == (names(t for t in base if t.role == "val")
                          + names(t for t in base if t.role == "train")[:2]
                          + names(added)[:3])
  _check_keys(cfg, c, pools, [("pools", "extra_train"),
                              ("tasks", "num_extra_train"),
                              ("finetune", "extra_train_tasks")])
  with c.unlocked():
    c.pools.extra_train = ("font_latin_lower_ranker",)  # also in pools.train
  with pytest.raises(ValueError, match="fix pools.extra_train"):
    extract.task_list(c, pools)


def test_large_tasks_hold_whole_classes_and_leave_the_others_unchanged(tiny):
  """tasks.num_large_train / num_large_val add tasks of whole classes after
  the others; finetune.large_train_tasks fine-tunes the first N of them in
  finetune.task_pools; unused, the new fields change no cache key."""
  cfg, _ = tiny
  c = cfg.copy_and_resolve_references()
  with c.unlocked():
    c.tasks.num_large_train = 4
    c.tasks.num_large_val = 2
    c.tasks.large_min_classes = 3
    c.finetune.train_tasks = 2
    c.finetune.large_train_tasks = 2
    c.finetune.val_tasks = True
    c.finetune.task_pools = ("font_latin_lower_ranker",
                             "font_greek_lower_ranker")
  pools = extract.build_pools(c)
  base, more = extract.task_list(cfg, pools), extract.task_list(c, pools)
  before = [_task_key(b) for b in base]
  assert [_task_key(t) for t in more if not t.large] == before
  large = [t for t in more if t.large]
  assert [t.name for t in large] == (
      [f"train_{cfg.tasks.num_train + i:04d}" for i in range(4)]
      + [f"val_{cfg.tasks.num_val + i:03d}" for i in range(2)])
  for t in large:
    pool = pools[t.pool]
    classes = np.unique(pool.labels[t.rows])
    assert len(classes) >= min(3, pool.num_classes)
    np.testing.assert_array_equal(              # every row of those classes
        t.rows, np.flatnonzero(np.isin(pool.labels, classes)))
    assert t.pool in c.pools[t.role]
  tuned = groundtruth.finetuned_tasks(c, more)
  ok = lambda t: t.pool in c.finetune.task_pools
  names = lambda ts: [t.name for t in ts]
  assert names(tuned) == (
      names(t for t in more if t.role == "val" and ok(t))
      + names(t for t in base if t.role == "train" and ok(t))[:2]
      + names(t for t in large if t.role == "train" and ok(t))[:2])
  _check_keys(cfg, c, pools, [("tasks", "num_large_train"),
                              ("tasks", "num_large_val"),
                              ("tasks", "large_min_classes"),
                              ("finetune", "large_train_tasks")])


def _check_keys(cfg, changed, pools, fields):
  """New config `fields` ((section, key)) at their defaults leave the store
  and probe keys of `cfg` as they were without them; `changed` has others."""
  zoo = extract.build_zoo(cfg, pools, log=lambda s: None)
  old = cfg.copy_and_resolve_references()
  with old.unlocked():
    for section, key in fields:
      del old[section][key]
  assert extract.store_hash(old, pools, zoo) == extract.store_hash(
      cfg, pools, zoo)
  name = next(iter(zoo))
  assert groundtruth.probe_key(old, pools, zoo, name) == groundtruth.probe_key(
      cfg, pools, zoo, name)
  assert extract.store_hash(changed, pools, zoo) != extract.store_hash(
      cfg, pools, zoo)


def test_extra_validation_pools_leave_the_other_tasks_unchanged(tiny):
  """pools.extra_val / tasks.num_extra_val add validation tasks after the
  others, fine-tuned with them (whatever finetune.task_pools says)."""
  cfg, _ = tiny
  c = cfg.copy_and_resolve_references()
  extra = "font_greek_lower_ranker_low_resolution"
  with c.unlocked():
    c.pools.extra_val = (extra,)
    c.tasks.num_extra_val = 3
    c.finetune.val_tasks = True
    c.finetune.task_pools = tuple(cfg.pools.val)
  pools = extract.build_pools(c)
  base, more = extract.task_list(cfg, pools), extract.task_list(c, pools)
  assert ([_task_key(t) for t in more[:len(base)]]
          == [_task_key(t) for t in base])
  added = more[len(base):]
  assert [(t.name, t.pool, t.role) for t in added] == [
      (f"val_{cfg.tasks.num_val + i:03d}", extra, "val") for i in range(3)]
  assert [t.name for t in groundtruth.finetuned_tasks(c, more)] == [
      t.name for t in more if t.role == "val"]
  _check_keys(cfg, c, pools, [("pools", "extra_val"),
                              ("tasks", "num_extra_val")])
  with c.unlocked():
    c.pools.extra_val = tuple(cfg.pools.val)  # also in pools.val
  with pytest.raises(ValueError, match="fix pools.extra_val"):
    extract.task_list(c, pools)


@pytest.mark.parametrize("role", ["val", "train"])
def test_large_extra_tasks_come_last_with_whole_classes(tiny, role):
  """Large tasks, then pools.extra_<role>'s sampled tasks, then
  tasks.num_large_extra_<role> tasks of its whole classes: adding the extra
  ones renames no other task; they are fine-tuned as validation tasks /
  by finetune.extra_train_tasks (sampled first); unused, the new fields
  change no cache key."""
  cfg, _ = tiny
  extra = "font_greek_lower_ranker_low_resolution"
  plain = cfg.copy_and_resolve_references()
  with plain.unlocked():
    plain.tasks[f"num_large_{role}"] = 2
    plain.tasks.large_min_classes = 3
    plain.finetune.val_tasks = True
    plain.finetune.train_tasks = 2
  c = plain.copy_and_resolve_references()
  with c.unlocked():
    c.pools[f"extra_{role}"] = (extra,)
    c.tasks[f"num_extra_{role}"] = 2
    c.tasks[f"num_large_extra_{role}"] = 3
    c.tasks.large_extra_min_classes = 4
    c.finetune.extra_train_tasks = 4
  pools = extract.build_pools(c)
  base, more = extract.task_list(plain, pools), extract.task_list(c, pools)
  other = lambda ts: [_task_key(t) for t in ts if t.role != role]
  assert other(more) == other(base)
  own = [t for t in base if t.role == role]
  assert [t.large for t in own][-2:] == [True, True]
  more_own = [t for t in more if t.role == role]
  assert [_task_key(t) for t in more_own[:len(own)]] == [
      _task_key(t) for t in own]
  added = more_own[len(own):]
  first = cfg.tasks[f"num_{role}"] + 2
  width = 4 if role == "train" else 3
  assert [(t.name, t.pool, t.role, t.large) for t in added] == [
      (f"{role}_{first + i:0{width}d}", extra, role, i >= 2)
      for i in range(5)]
  pool = pools[extra]
  for t in added[2:]:
    classes = np.unique(pool.labels[t.rows])
    assert len(classes) >= 4
    np.testing.assert_array_equal(
        t.rows, np.flatnonzero(np.isin(pool.labels, classes)))
  names = lambda ts: [t.name for t in ts]
  assert names(groundtruth.finetuned_tasks(c, more)) == (
      names(t for t in more if t.role == "val")
      + names(t for t in base if t.role == "train")[:2]
      + (names(added)[:4] if role == "train" else []))
  _check_keys(cfg, c, pools, [("tasks", f"num_large_extra_{role}"),
                              ("tasks", "large_extra_min_classes")])
  with c.unlocked():
    c.pools[f"extra_{role}"] = ()
    c.tasks[f"num_extra_{role}"] = 0
  with pytest.raises(ValueError, match=f"fix pools.extra_{role}"):
    extract.task_list(c, pools)


def test_committed_full_table_reproduces():
  """Recomputes committed full-benchmark cells of the cheapest PTM (mlp),
  training that zoo member first when the cache does not hold it."""
  path = REPO / "results" / "bench" / "full" / "finetune_cells.csv"
  assert path.exists(), f"missing committed table {path}"
  cfg = bench_config.get_config("full")
  rows = [r for r in _rows(path) if r["ptm"].startswith("mlp@")][:2]
  assert rows, "the committed table has no mlp cells"
  pools = extract.build_pools(cfg)
  from spider_jax.zoo import registry  # pylint: disable=g-import-not-at-top
  for r in rows:
    src = r["ptm"].split("@", 1)[1]
    c = cfg.copy_and_resolve_references()
    with c.unlocked():
      c.zoo.local = [f"mlp@{src}_pretrain"]
    zoo = extract.build_zoo(c, pools, log=lambda s: None)
    entry = zoo[r["ptm"]]
    spec = registry.local_spec(pathlib.Path(entry["dir"]), name=r["ptm"])
    settings = groundtruth.finetune_settings(cfg, spec)
    assert groundtruth.cell_hash(
        cfg, entry["config_hash"], extract.pool_hash(pools[r["target"]]),
        settings) == r["cell_hash"], "the committed cell used other settings"
    res = groundtruth.finetune_cell(spec.load(), pools[r["target"]], settings)
    assert abs(res["test_acc"] - float(r["test_acc"])) <= 1.0, r


def assert_same_store(path, reference):
  """The stores at `path` and `reference` hold the same tasks, labels,
  features (to 1e-4) and target ground truth."""
  two, one = FeatureStore(path), FeatureStore(reference)
  assert two.task_names() == one.task_names()
  for name in one.task_names():
    a, b = two.task(name), one.task(name)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.generic, b.generic, rtol=1e-5, atol=1e-4)
    for ptm in one.ptm_names:
      np.testing.assert_allclose(a.ptm_features(ptm), b.ptm_features(ptm),
                                 rtol=1e-5, atol=1e-4, err_msg=ptm)
  np.testing.assert_allclose(
      [two.ground_truth().row(n) for n in one.task_names("target")],
      [one.ground_truth().row(n) for n in one.task_names("target")])


def run_cli_on_two_processes(argv: list[str]) -> list[str]:
  """Runs `argv` as processes 0 and 1 of a localhost jax.distributed job
  (CPU), asserts both exit 0, and returns their stdouts."""
  argv = argv + [f"--coordinator_address=127.0.0.1:{free_port()}",
                 "--num_processes=2"]
  out = []
  for rc, stdout, stderr in run_processes(
      lambda i: argv + [f"--process_id={i}"], 2, timeout=600, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu")):
    assert rc == 0, stderr[-3000:]
    out.append(stdout)
  return out


def test_two_processes_build_then_groundtruth_and_rank_cli(tiny, tmp_path):
  """On 2 processes (jax.distributed on localhost):
  `groundtruth.run(all_processes=True)` builds the `:tiny` benchmark from an
  empty cache (extraction split over both, process 0 writes) and the store
  equals the one-process build; `python -m spider_jax.groundtruth` then
  reuses that store and process 0 alone prints the summary;
  `python -m spider_jax.rank` reuses it too, trains and ranks, and process 0
  writes the report. (One test: each 2-process build takes ~40 s.)"""
  cfg, summary = tiny
  port = free_port()
  info = []
  for rc, stdout, stderr in run_processes(
      lambda i: [sys.executable, str(REPO / "tests" /
                                     "bench_multihost_check.py"),
                 str(tmp_path), str(port), "2", str(i), cfg.results_dir],
      2, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600):
    assert rc == 0, stderr[-3000:]
    info.append(json.loads(stdout.strip().splitlines()[-1]))
  assert info[0]["store"] == info[1]["store"]
  assert "counts" in info[0]["keys"] and info[1]["keys"] == ["store"]
  assert info[0]["split_calls"] > 0 and info[1]["split_calls"] > 0
  cache = tmp_path / "cache"
  stores = list((cache / "stores").iterdir())
  assert [p.name for p in stores] == [pathlib.Path(summary["store"]).name]
  assert str(stores[0]) == info[0]["store"]
  assert_same_store(stores[0], summary["store"])
  store_files = sorted((p.name, p.stat().st_mtime_ns)
                       for p in stores[0].rglob("*"))

  out = run_cli_on_two_processes([
      sys.executable, "-m", "spider_jax.groundtruth",
      "--config=configs/bench.py:tiny", f"--config.cache_dir={cache}",
      f"--config.results_dir={tmp_path / 'results'}",
      f"--config.ground_truth_from={cfg.results_dir}"])
  printed = json.loads(out[0][out[0].index("\n{") + 1:])
  assert printed["ground_truth_status"] == summary["ground_truth_status"]
  assert "ground_truth_status" not in out[1]   # Only gloo's connect line.

  run_cli_on_two_processes([
      sys.executable, "-m", "spider_jax.rank",
      "--config=configs/rank.py:tiny", f"--config.bench.cache_dir={cache}",
      f"--config.bench.ground_truth_from={cfg.results_dir}",
      "--config.rank.methods=spider,prior,nce",
      "--config.rank.plots=False", f"--workdir={tmp_path / 'run'}"])
  report = json.loads((tmp_path / "run" / "rank" / "results.json")
                      .read_text())
  assert {"spider(k=0)", "prior", "nce"} <= set(report["methods"])
  assert report["ground_truth_status"] == "complete"
  for m in report["methods"]:
    assert np.isfinite(report["mean"][m]["weighted_tau"]), m
  assert list((cache / "stores").iterdir()) == stores  # Reused, unchanged.
  assert sorted((p.name, p.stat().st_mtime_ns)
                for p in stores[0].rglob("*")) == store_files


def test_rank_tiny_end_to_end(tiny, tmp_path):
  """`rank --config=configs/rank.py:tiny`: every method, files, cache reuse."""
  from configs import rank as rank_config
  from spider_jax import rank as rank_lib
  cfg_b, _ = tiny
  cfg = rank_config.get_config("tiny")
  cfg.bench.cache_dir = cfg_b.cache_dir          # The fixture's build.
  cfg.bench.ground_truth_from = cfg_b.results_dir
  report = rank_lib.rank(cfg, tmp_path)
  k = report["k"]
  expected = ({"spider(k=0)", f"spider(k={k})"}
              | set(rank_config.DEFAULT_METHODS.split(",")) - {"spider"})
  assert set(report["methods"]) == expected
  assert report["ground_truth_status"] == "complete"
  assert len(report["tasks"]) == 3 and len(report["ptm_names"]) == 3
  for m in report["methods"]:
    for key in ("weighted_tau", "rel@1", "regret@1"):
      assert np.isfinite(report["mean"][m][key]), (m, key)
    assert np.all(np.isfinite(report["scores"][m])), m
    assert report["seconds_per_task"][m]["total"] >= 0
  # Baselines are charged every PTM's forward pass, Model Spider k=0 only
  # the generic encoder's.
  assert (report["seconds_per_task"]["logme"]["forward"]
          > report["seconds_per_task"]["spider(k=0)"]["forward"])
  out = tmp_path / "rank"
  for name in ("results.json", "results.md", "rankings.csv", "metrics.csv",
               "wtau_per_task.png", "wtau_vs_time.png",
               "predicted_vs_true.png"):
    assert (out / name).stat().st_size > 0, name
  md = (out / "results.md").read_text()
  assert all(f"| {m} |" in md for m in report["methods"])
  assert "wtau - prior (SE)" in md and set(report["vs_prior"]) == expected
  # Rerun: no retraining, baselines from the cache, the same rankings.
  ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  log_size = (tmp_path / "metrics.jsonl").stat().st_size
  again = rank_lib.rank(cfg, tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ckpts
  assert (tmp_path / "metrics.jsonl").stat().st_size == log_size
  assert again["scores"] == report["scores"]
  assert again["seconds_per_task"]["logme"] == report["seconds_per_task"][
      "logme"]  # From the cache, not re-measured.
