"""End to end on the synthetic store: train, preempt, resume, rank, reload."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from spider_jax import checkpoint, rank as rank_lib
from spider_jax.data.synthetic import SyntheticSpec, write_synthetic_store
from spider_jax.ranker import Ranker
from spider_jax.scoring import Scorer, score_depths, score_tasks
from spider_jax.train import train

from conftest import latest_params

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_config):
  """Trains tiny twice: once preempted + resumed, once straight through."""
  root = tmp_path_factory.mktemp("runs")
  cfg = tiny_config
  store = root / "store"
  write_synthetic_store(store, SyntheticSpec(
      seed=cfg.synthetic.seed, num_train=cfg.synthetic.num_train))
  cfg.store = str(store)
  interrupted, straight = root / "interrupted", root / "straight"
  with cfg.unlocked():
    cfg.stop_after_steps = 100  # Not an epoch boundary: loses some steps.
  first = train(cfg, interrupted)
  with cfg.unlocked():
    cfg.stop_after_steps = -1
  resumed = train(cfg, interrupted)
  train(cfg, straight)
  return cfg, interrupted, straight, first, resumed


def test_preempted_run_resumes_to_the_same_parameters(run):
  cfg, interrupted, straight, first, resumed = run
  assert first["steps"] == 100 and resumed["steps"] == resumed["total_steps"]
  step_a, a = latest_params(interrupted)
  step_b, b = latest_params(straight)
  assert step_a == step_b == resumed["total_steps"]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  lines = (interrupted / "metrics.jsonl").read_text().splitlines()
  assert any('"val_weighted_tau"' in line for line in lines)


def test_ranker_learns_the_planted_ranking(run):
  cfg, interrupted, *_ = run
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.rank.methods = "spider,prior,random,nce"
  report = rank_lib.rank(cfg, interrupted)
  assert set(report["methods"]) == {f"spider(k={report['k']})",
                                    "spider(k=0)", "prior", "random", "nce"}
  for m in report["methods"]:
    assert np.isfinite(report["mean"][m]["weighted_tau"])
    assert report["seconds_per_task"][m]["total"] >= 0
  spider = report["mean"][f"spider(k={report['k']})"]["weighted_tau"]
  prior = report["mean"]["prior"]["weighted_tau"]
  assert spider > 0.8, report["mean"]
  assert prior < 0.5, report["mean"]
  for name in ("results.json", "results.md", "rankings.csv", "metrics.csv",
               "wtau_per_task.png", "wtau_vs_time.png",
               "predicted_vs_true.png"):
    assert (interrupted / "rank" / name).stat().st_size > 0
  text = rank_lib.format_report(report)
  assert "prior" in text and "regret" in text and "vs prior (SE)" in text
  # Each method's paired difference from the prior, in JSON and results.md.
  wtau = lambda m: [report["metrics"][m][t]["weighted_tau"]
                    for t in report["tasks"]]
  for m in report["methods"]:
    d = np.subtract(wtau(m), wtau("prior"))
    np.testing.assert_allclose(report["vs_prior"][m]["mean"], d.mean())
    np.testing.assert_allclose(report["vs_prior"][m]["se"],
                               d.std(ddof=1) / np.sqrt(d.size))
  assert report["vs_prior"]["prior"] == {"mean": 0.0, "se": 0.0}
  md = (interrupted / "rank" / "results.md").read_text()
  assert "wtau - prior (SE)" in md
  spider = f"spider(k={report['k']})"
  assert f"{report['vs_prior'][spider]['mean']:+.3f}" in md
  again = rank_lib.rank(cfg, interrupted)  # Reuses the checkpoint.
  assert again["scores"] == report["scores"]
  with cfg.unlocked():                     # No prior row: no such column.
    cfg.rank.methods = "spider,random"
  no_prior = rank_lib.rank(cfg, interrupted)
  assert no_prior["vs_prior"] == {}
  assert "vs prior" not in rank_lib.format_report(no_prior)
  assert "wtau - prior" not in (interrupted / "rank" / "results.md").read_text()
  with cfg.unlocked():
    cfg.rank.methods = "spider,logmee"
  with pytest.raises(ValueError, match="unknown method.*logmee"):
    rank_lib.rank(cfg, interrupted)


def test_python_api_matches_store_scoring(run):
  cfg, interrupted, *_ = run
  from spider_jax.data.store import FeatureStore
  store = FeatureStore(cfg.store)
  ranker = Ranker.load(interrupted / "checkpoints")
  task = store.task(store.task_names("target")[0])
  train_rows = task.mask("train")
  feats = {n: task.ptm_features(n)[train_rows] for n in store.ptm_names}
  asked = []

  def features(name):
    asked.append(name)
    return feats[name]

  res = ranker.rank(task.generic[train_rows], task.labels[train_rows], k=2,
                    ptm_features=features)
  want = score_tasks(ranker.scorer, [task], ranker.zoo, k=2)[0]
  np.testing.assert_allclose(res.scores, want, rtol=1e-6)
  assert len(asked) == 2 and set(asked) == set(res.order[:2]) | set(asked)
  assert res.order[0] == store.ptm_names[int(np.argmax(res.scores))]
  with pytest.raises(ValueError, match="at least 2 classes"):
    ranker.rank(task.generic[:3], np.zeros(3, int))
  with pytest.raises(ValueError, match="NaN/Inf"):
    ranker.rank(np.full_like(task.generic, np.nan), task.labels)
  with pytest.raises(ValueError, match="expected 32-d"):
    ranker.rank(task.generic[:, :5], task.labels)


def test_zoo_mismatch_and_bad_checkpoints(run, tmp_path):
  cfg, interrupted, *_ = run
  other = write_synthetic_store(tmp_path / "other", SyntheticSpec(
      num_ptms=5, num_train=4, num_val=1, num_target=1))
  c2 = cfg.copy_and_resolve_references()
  with c2.unlocked():
    c2.store = str(other.path)
    c2.rank.checkpoint = str(interrupted / "checkpoints")
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"missing from the store: \['ptm05'"):
    rank_lib.rank(c2, tmp_path / "w")
  ranker = Ranker.load(interrupted / "checkpoints")
  assert ranker.encoder == "synthetic_generic"
  meta = ranker.meta
  with pytest.raises(checkpoint.CheckpointError,
                     match="from generic encoder 'synthetic_generic'.*"
                     "--config.encoder=synthetic_generic"):
    checkpoint.check_zoo(meta, meta["ptm_names"], meta["ptm_dims"],
                         meta["generic_dim"], "ptm03")
  checkpoint.check_zoo(meta, meta["ptm_names"], meta["ptm_dims"],
                       meta["generic_dim"], "synthetic_generic")
  with c2.unlocked():
    c2.rank.checkpoint = str(tmp_path / "nowhere")
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    rank_lib.rank(c2, tmp_path / "w")
  broken = tmp_path / "broken"
  shutil.copytree(interrupted / "checkpoints", broken)
  for f in broken.rglob("*"):
    if f.is_file() and "params" in f.parts and f.suffix != ".json" and \
        f.stat().st_size > 1000:
      f.write_bytes(b"\0" * 16)
  with pytest.raises(checkpoint.CheckpointError, match="cannot restore"):
    Ranker.load(broken)
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
    Ranker.load(tmp_path)


def test_one_compile_per_bucket(small_store):
  from spider_jax.train import build_model, zoo_of
  from configs import train as train_config
  cfg = train_config.get_config("tiny")
  zoo = zoo_of(small_store)
  graphdef, params = nnx.split(build_model(cfg, zoo, 0))
  scorer = Scorer(graphdef, params, batch_size=4)
  tasks = [small_store.task(n) for n in small_store.task_names()]
  buckets = {max(8, t.num_classes) > 8 for t in tasks}
  score_tasks(scorer, tasks, zoo, k=0)
  assert scorer.trace_count == len(buckets)
  score_tasks(scorer, tasks[::-1], zoo, k=0)
  assert scorer.trace_count == len(buckets)
  score_tasks(scorer, tasks, zoo, k=2)
  assert scorer.trace_count == 2 * len(buckets)


def test_score_depths_matches_score_tasks_with_one_compile_per_bucket(
    small_store):
  """Validation's shared pass over depths gives score_tasks' scores at each
  depth, with one compile per bucket for all depths > 0 (not per depth)."""
  from spider_jax.train import build_model, zoo_of
  from configs import train as train_config
  cfg = train_config.get_config("tiny")
  zoo = zoo_of(small_store)
  graphdef, params = nnx.split(build_model(cfg, zoo, 0))
  tasks = [small_store.task(n) for n in small_store.task_names()]
  buckets = {max(8, t.num_classes) > 8 for t in tasks}
  depths = [0, 1, 2, 3]
  scorer = Scorer(graphdef, params, batch_size=4)
  got = score_depths(scorer, tasks, zoo, depths)
  assert got.shape == (len(depths), len(tasks), len(zoo.ptm_names))
  assert scorer.trace_count == 2 * len(buckets)  # Stage 1 + all depths > 0.
  for k, scores in zip(depths, got):
    want = score_tasks(Scorer(graphdef, params, batch_size=4), tasks, zoo,
                       k=k)
    np.testing.assert_allclose(scores, want, rtol=0, atol=1e-5)
  for shallow, deep in zip(got, got[1:]):  # Each depth re-ranks more.
    assert np.abs(shallow - deep).max() > 1e-4


def test_unknown_config_key_is_an_error(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "spider_jax.rank", "--config.no_such_key=1",
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
      timeout=120)
  assert out.returncode != 0
  assert "no_such_key" in out.stderr
  assert not any(tmp_path.iterdir())  # Nothing written.


def test_ptm_tokens_from_features(small_store):
  """The "features" PTM-token init: deterministic, finite, unit-variance
  principal coordinates, blind to the scale of a PTM's features."""
  from spider_jax.train import ptm_feature_tokens
  a = ptm_feature_tokens(small_store, 16, seed=0, num_images=64)
  b = ptm_feature_tokens(small_store, 16, seed=0, num_images=64)
  m = len(small_store.ptm_names)
  assert a.shape == (m, 16) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert np.all(np.isfinite(a))
  np.testing.assert_allclose(a[:, :m - 1].std(0), 1.0, rtol=1e-5)
  # The descriptor of a PTM is what it finds alike: rescaling its features
  # (cosine similarity is scale-free) leaves its coordinates unchanged.
  class Scaled:
    def __init__(self, store):
      self._s = store
    def __getattr__(self, k):
      return getattr(self._s, k)
    def task(self, name):
      t = self._s.task(name)
      class T:
        labels = t.labels
        def ptm_features(self, p, t=t):
          return 3.0 * t.ptm_features(p)
      return T()
  c = ptm_feature_tokens(Scaled(small_store), 16, seed=0, num_images=64)
  np.testing.assert_allclose(c[:, :m - 1], a[:, :m - 1], atol=1e-4)


def test_prototype_spread_tokens_train_and_reload(small_store, tiny_config,
                                                  tmp_path):
  """task_token="prototype_spread" trains, is saved in the checkpoint meta
  and is what a reloaded Ranker feeds its model."""
  cfg = tiny_config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.store = str(small_store.path)
    cfg.epochs = 2
    cfg.model.task_token = "prototype_spread"
  train(cfg, tmp_path)
  ranker = Ranker.load(tmp_path / "checkpoints")
  assert ranker.zoo.task_token == "prototype_spread"
  task = small_store.task(small_store.task_names("target")[0])
  rows = task.mask("train")
  res = ranker.rank(task.generic[rows], task.labels[rows], k=0)
  np.testing.assert_allclose(
      res.scores, score_tasks(ranker.scorer, [task], ranker.zoo, k=0)[0],
      rtol=1e-6)
  assert np.all(np.isfinite(res.scores))


def test_loss_options_train_and_bad_values_fail_first(small_store,
                                                      tiny_config, tmp_path):
  """loss_weighting / loss_tie_margin reach the loss: a run with both
  logs finite losses that differ from the official loss's from the first
  step; a bad value is refused before anything is written."""
  losses = {}
  for name, weighting, margin in (("official", "uniform", 0.0),
                                  ("options", "hyperbolic", 2.0)):
    cfg = tiny_config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.store = str(small_store.path)
      cfg.epochs = 1
      cfg.loss_weighting, cfg.loss_tie_margin = weighting, margin
    train(cfg, tmp_path / name)
    log = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    losses[name] = [json.loads(l)["loss"] for l in log if '"loss"' in l]
  assert np.all(np.isfinite(losses["options"]))
  assert losses["options"][0] != losses["official"][0]
  for weighting, margin in (("linear", 0.0), ("uniform", -1.0)):
    cfg = tiny_config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.store = str(small_store.path)
      cfg.loss_weighting, cfg.loss_tie_margin = weighting, margin
    with pytest.raises(ValueError, match="loss_tie_margin"):
      train(cfg, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_best_step_survives_a_new_manager(tmp_path):
  """The validation metric is written to disk, so a new manager (e.g.
  Ranker.load in another process) finds the best step, not the latest."""
  import jax.numpy as jnp
  from spider_jax import checkpoint
  with checkpoint.manager(tmp_path, keep_latest=2) as mngr:
    for step, val in [(1, 0.5), (2, 0.9), (3, 0.4), (4, 0.3), (5, 0.2)]:
      checkpoint.save(mngr, step, {"a": jnp.ones(2)},
                      {"step": jnp.int32(step)}, {"x": step}, val)
  with checkpoint.manager(tmp_path) as mngr:
    assert mngr.all_steps() == [2, 4, 5]   # 2 latest + the best.
    assert checkpoint.best_or_latest_step(mngr) == 2
  assert checkpoint.read_meta(tmp_path)[0] == 2
