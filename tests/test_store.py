"""FeatureStore format: round trip and clear errors for bad input."""

import json

import numpy as np
import pytest

from spider_jax.data.store import (FeatureStore, PTMInfo, StoreError,
                                   StoreWriter, read_ground_truth)

PTMS = [PTMInfo("a", 4, 3), PTMInfo("b", 6, 0)]


def make_pool(n=12, c=3, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % c
  return dict(labels=labels, generic=rng.normal(size=(n, 5)),
              features={"a": rng.normal(size=(n, 4)),
                        "b": rng.normal(size=(n, 6))})


def write(path, **pool_overrides):
  w = StoreWriter(path, encoder_name="enc", encoder_dim=5, ptms=PTMS)
  pool = make_pool()
  pool.update(pool_overrides)
  w.add_pool("p", **pool)
  w.add_task("t", pool="p", split=np.zeros(12, np.int8), role="target")
  w.set_ground_truth({"t": {"a": 80.0, "b": 70.5}})
  return w.close()


def test_round_trip(tmp_path):
  store = write(tmp_path / "s")
  assert store.ptm_names == ("a", "b") and store.ptm_dims == (4, 6)
  task = store.task("t")
  assert task.generic.shape == (12, 5) and task.num_classes == 3
  assert task.ptm_features("b").shape == (12, 6)
  np.testing.assert_allclose(store.ground_truth().row("t"), [80.0, 70.5])
  # A task over a subset of pool rows, non-contiguous labels remapped.
  w = StoreWriter(tmp_path / "s", encoder_name="enc", encoder_dim=5,
                  ptms=PTMS)
  assert w.has_pool("p")
  w.add_task("sub", pool="p", indices=np.array([1, 2, 4, 5, 7]),
             split=np.zeros(5, np.int8), role="train")
  w.set_ground_truth({"sub": {"a": 1.0, "b": 2.0}})
  store = w.close()
  sub = store.task("sub")
  assert sub.labels.tolist() == [0, 1, 0, 1, 0] and sub.num_classes == 2
  assert store.task_names("train") == ["sub"]


def test_nan_features_rejected(tmp_path):
  g = make_pool()["generic"]
  g[3, 1] = np.nan
  with pytest.raises(StoreError, match="NaN/Inf"):
    write(tmp_path / "s", generic=g)


def test_wrong_dims_rejected(tmp_path):
  f = make_pool()["features"]
  f["a"] = np.ones((12, 7))
  with pytest.raises(StoreError, match="expected 4-d features"):
    write(tmp_path / "s", features=f)
  store = write(tmp_path / "ok")
  meta = json.loads((store.path / "meta.json").read_text())
  meta["encoder"]["dim"] = 9
  (store.path / "meta.json").write_text(json.dumps(meta))
  with pytest.raises(StoreError, match="generic features are 5-d"):
    FeatureStore(store.path).task("t")


def test_bad_labels_rejected(tmp_path):
  w = StoreWriter(tmp_path / "s", encoder_name="enc", encoder_dim=5,
                  ptms=PTMS)
  w.add_pool("single", **dict(make_pool(), labels=np.zeros(12, int)))
  with pytest.raises(StoreError, match="at least 2 classes"):
    w.add_task("t", pool="single", split=np.zeros(12, np.int8), role="train")
  w.add_pool("p", **make_pool())
  split = np.zeros(12, np.int8)
  split[make_pool()["labels"] == 2] = 2  # Class 2 has no training rows.
  with pytest.raises(StoreError, match=r"class\(es\) \[2\] have no samples"):
    w.add_task("t", pool="p", split=split, role="train")
  with pytest.raises(StoreError, match="role must be one of"):
    w.add_task("t", pool="p", split=np.zeros(12, np.int8), role="test")


def test_incomplete_store_and_missing_ground_truth(tmp_path):
  with pytest.raises(StoreError, match="no meta.json"):
    FeatureStore(tmp_path)
  w = StoreWriter(tmp_path / "s", encoder_name="enc", encoder_dim=5,
                  ptms=PTMS)
  w.add_pool("p", **make_pool())
  w.add_task("t", pool="p", split=np.zeros(12, np.int8), role="target")
  w.set_ground_truth({"t": {"a": 1.0}})
  with pytest.raises(StoreError, match=r"ground truth missing for task t: "
                     r"PTMs \['b'\]"):
    w.close()
  assert not (tmp_path / "s" / "meta.json").exists()  # Nothing half-done.


def test_ground_truth_table_errors(tmp_path):
  p = tmp_path / "gt.csv"
  p.write_text("model,t1,t2\na,1.0,2.0\nb,3.0,\n")
  gt = read_ground_truth(p)
  with pytest.raises(StoreError, match="no row for PTM"):
    gt.row("t1", ["a", "c"])
  with pytest.raises(StoreError, match="no column for task 't3'"):
    gt.row("t3")
  with pytest.raises(StoreError, match="not finite for \\['b'\\]"):
    gt.row("t2")
  p.write_text("dataset,t1\n")
  with pytest.raises(StoreError, match="expected a header"):
    read_ground_truth(p)


def test_reads_the_official_reference_table():
  import pathlib
  ref = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / \
      "reference" / "zoo10_finetune_accuracy.csv"
  gt = read_ground_truth(ref)
  assert len(gt.models) == 10 and "SUN397" in gt.tasks
  assert gt.row("Aircraft")[gt.models.index("inception_v3")] == 88.8


def test_views_select_ptms_and_hide_pools(tmp_path):
  from spider_jax.train import select_ptms
  w = StoreWriter(tmp_path / "s", encoder_name="enc", encoder_dim=5,
                  ptms=PTMS, extra_meta={"ground_truth": {
                      "target_cell_source": {"t": {"a": "linear_probe",
                                                   "b": "finetune"}}}})
  w.add_pool("p", **make_pool())
  w.add_pool("q", **make_pool(seed=1))
  w.add_task("t", pool="p", split=np.zeros(12, np.int8), role="target")
  w.add_task("u", pool="q", split=np.zeros(12, np.int8), role="train")
  w.set_ground_truth({"t": {"a": 80.0, "b": 70.5},
                      "u": {"a": 60.0, "b": 65.0}})
  full = w.close()
  assert select_ptms(full, "all") is None
  assert select_ptms(full, "fine_tuned") == ["b"]
  assert select_ptms(full, " b , a") == ["b", "a"]
  view = FeatureStore(full.path, ptms=["b"], exclude_pools=["q"])
  assert view.ptm_names == ("b",) and view.ptm_dims == (6,)
  assert view.task_names() == ["t"] and view.task_names("train") == []
  np.testing.assert_allclose(
      view.ground_truth().row("t", view.ptm_names), [70.5])
  with pytest.raises(StoreError, match=r"unknown \['zz'\]"):
    FeatureStore(full.path, ptms=["b", "zz"])
  with pytest.raises(StoreError, match="exclude_pools names nope, which store"):
    FeatureStore(full.path, exclude_pools=["nope"])
  assert FeatureStore(full.path, exclude_tasks=["u"]).task_names() == ["t"]
  with pytest.raises(StoreError, match="exclude_tasks names nope, which store"):
    FeatureStore(full.path, exclude_tasks=["nope"])
  # Training and ranking hide tasks named in config.exclude_tasks.
  from configs.train import get_config
  from spider_jax.train import open_or_build_store
  config = get_config()
  config.store, config.exclude_tasks = str(full.path), " u ,"
  assert open_or_build_store(config, tmp_path / "w").task_names() == ["t"]
  config.exclude_tasks = "u,nope"
  with pytest.raises(StoreError, match="exclude_tasks names nope"):
    open_or_build_store(config, tmp_path / "w")
  with pytest.raises(ValueError, match="target_cell_source"):
    select_ptms(write(tmp_path / "plain"), "fine_tuned")


def test_generic_from_serves_a_ptms_features_as_the_generic_ones(tmp_path):
  store = write(tmp_path / "s")
  store.meta["seconds_per_sample"] = {"encoder": 1.0, "a": 2.0, "b": 3.0}
  (store.path / "meta.json").write_text(json.dumps(store.meta))
  view = FeatureStore(store.path, ptms=["a"], generic_from="b")
  assert (view.encoder_name, view.encoder_dim) == ("b", 6)
  task = view.task("t")
  np.testing.assert_array_equal(task.generic, store.task("t").ptm_features("b"))
  assert view.seconds_per_sample()["encoder"] == 3.0
  assert FeatureStore(store.path).seconds_per_sample()["encoder"] == 1.0
  own = FeatureStore(store.path, generic_from="enc")  # The store's encoder.
  assert (own.encoder_name, own.encoder_dim) == ("enc", 5)
  np.testing.assert_array_equal(own.task("t").generic, store.task("t").generic)
  with pytest.raises(StoreError, match=r"generic_from='zz'.*name one of them"):
    FeatureStore(store.path, generic_from="zz")
  # Training and ranking open their store with config.encoder.
  from configs.train import get_config
  from spider_jax.train import open_or_build_store
  config = get_config()
  config.store, config.encoder = str(store.path), "a"
  opened = open_or_build_store(config, tmp_path / "w")
  assert (opened.encoder_name, opened.encoder_dim) == ("a", 4)


def test_training_batch_rows_equal_the_full_batch_rows(small_store):
  # A process builds only its own rows of each step's batch; the random
  # draws cover the whole batch, so its rows are the full batch's rows.
  from spider_jax.data.sampler import TrainingSampler
  store = small_store
  sampler = TrainingSampler(store, store.task_names("train"), batch_size=8,
                            k_max=3, seed=0)
  for step in range(4):
    full = sampler.batch(step)
    assert set(full) == {"u", "u_mask", "weight", "gt", "h", "h_mask", "ptm"}
    for rows in (slice(0, 4), slice(4, 8), slice(2, 3)):
      part = sampler.batch(step, rows)
      for k, v in full.items():
        np.testing.assert_array_equal(part[k], v[rows], err_msg=k)
  assert full["h_mask"].any() or sampler.batch(1)["h_mask"].any()


def test_size_tokens_count_the_whole_train_split(small_store):
  # Training prototypes come from a random subset of each class's rows;
  # the size columns still count the task's whole train split, as scoring
  # the task does.
  from spider_jax import tokens
  from spider_jax.data.sampler import TrainingSampler, generic_arrays
  names = small_store.task_names("train")[:1]
  task = small_store.task(names[0])
  sampler = TrainingSampler(small_store, names, batch_size=1, k_max=0,
                            seed=0, min_keep=0.1,
                            task_token="prototype_size")
  sub = sampler.batch(0)["u"][0]
  full = generic_arrays([task], [None], sub.shape[0], small_store.encoder_dim,
                        "prototype_size")["u"][0]
  c, d = task.num_classes, small_store.encoder_dim
  counts = np.bincount(task.labels[task.mask("train")], minlength=c)
  np.testing.assert_allclose(sub[:c, d:], tokens.size_features(counts),
                             atol=1e-6)
  np.testing.assert_array_equal(sub[:c, d:], full[:c, d:])
  assert not np.allclose(sub[:c, :d], full[:c, :d])   # rows were subsampled


def test_training_batch_with_fewer_tasks_than_its_size(small_store):
  # Two tasks, batch 8: the batch wraps around the epoch's order 4 times.
  from spider_jax.data.sampler import TrainingSampler
  names = small_store.task_names("train")[:2]
  sampler = TrainingSampler(small_store, names, batch_size=8, k_max=0,
                            seed=0)
  assert sampler.steps_per_epoch == 1
  batch = sampler.batch(0)
  assert batch["u"].shape[0] == batch["gt"].shape[0] == 8
  gt = small_store.ground_truth()
  want = np.stack([gt.row(n, small_store.ptm_names) for n in names])
  for row in batch["gt"]:  # Every row is one of the two tasks.
    assert any(np.array_equal(row, w.astype(np.float32)) for w in want)
  np.testing.assert_array_equal(batch["gt"][:2], batch["gt"][2:4])


def test_process_rows_and_put_local_batch_on_one_process():
  from spider_jax import sharding
  mesh = sharding.data_mesh()
  assert sharding.process_rows(8, mesh) == slice(0, 8)
  x = np.arange(16.0).reshape(8, 2)
  got = sharding.put_local_batch({"x": x}, 8, mesh)["x"]
  np.testing.assert_array_equal(np.asarray(got), x)
  assert got.sharding == sharding.batch_sharded(mesh)
