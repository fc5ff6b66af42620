"""benchmarks/pool_cv.py and benchmarks/seed_ensemble.py end to end on a
small synthetic store."""

import json
import pathlib
import subprocess
import sys

import numpy as np

from spider_jax import checkpoint, metrics
from spider_jax.data.builders import related_pools
from spider_jax.data.store import FeatureStore

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from pool_cv import fold_tasks, training_tasks  # noqa: E402  pylint: disable=g-import-not-at-top


def test_pool_cv_holds_out_each_pool(tmp_path):
  cmd = [sys.executable, str(REPO / "benchmarks" / "pool_cv.py"),
         "--config=configs/rank.py:synthetic_tiny",
         "--config.synthetic.num_train=3", "--config.epochs=2", "--seeds=0",
         f"--workdir={tmp_path}"]
  first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                         check=True)
  assert "all held-out tasks" in first.stdout
  assert "training the ranker" in first.stderr
  out = json.loads((tmp_path / "pool_cv.json").read_text())
  store = FeatureStore(tmp_path / "store")
  train = store.task_names("train")
  assert out["pools"] == sorted({store.meta["tasks"][n]["pool"]
                                 for n in train}) and len(out["pools"]) == 3
  gt = store.ground_truth()
  steps = {}
  for pool in out["pools"]:
    taus = out["spider"]["0"][pool]
    held = [n for n in train if store.meta["tasks"][n]["pool"] == pool]
    assert sorted(taus) == held and np.isfinite(list(taus.values())).all()
    # The fold ranker trained on the other pools only: its constant prior
    # is theirs, and its prior row in the output scores exactly that.
    fold = tmp_path / pool / "seed_0" / "checkpoints"
    step, meta = checkpoint.read_meta(fold)
    steps[pool] = step
    rest = [n for n in train if n not in held]
    want = metrics.constant_prior(np.stack([gt.row(n, store.ptm_names)
                                            for n in rest]))
    np.testing.assert_allclose(meta["prior"], want, rtol=1e-6)
    for n in held:
      assert out["prior"]["0"][pool][n] == metrics.weighted_tau(
          gt.row(n, store.ptm_names), np.asarray(meta["prior"]))
  # A rerun reuses every fold's checkpoint and gives the same figures.
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                         check=True)
  assert "training the ranker" not in again.stderr
  assert json.loads((tmp_path / "pool_cv.json").read_text()) == out
  for pool, step in steps.items():
    assert checkpoint.read_meta(tmp_path / pool / "seed_0" /
                                "checkpoints")[0] == step
  # --hold_out: only the named pools are folds (reusing the cached one).
  one = out["pools"][0]
  subprocess.run(cmd + [f"--hold_out={one}"], cwd=REPO, capture_output=True,
                 text=True, check=True)
  only = json.loads((tmp_path / "pool_cv.json").read_text())
  assert only["pools"] == [one]
  assert only["spider"]["0"][one] == out["spider"]["0"][one]
  # The pools a view leaves out still count for --score_related; the
  # tasks it hides one by one do not.
  view = FeatureStore(tmp_path / "store", exclude_pools=[one],
                      exclude_tasks=[train[-1]])
  pool_of = {n: store.meta["tasks"][n]["pool"] for n in train}
  assert training_tasks(view) == {n: p for n, p in pool_of.items()
                                  if n != train[-1]}
  bad = subprocess.run(cmd + ["--hold_out=no_such_pool"], cwd=REPO,
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "no_such_pool" in bad.stderr


def test_related_pools_are_held_out_together():
  pools = ["font_arabic_ranker", "font_arabic_ranker_thick_strokes",
           "font_latin_lower_ranker", "font_latin_lower_ranker_low_resolution",
           "font_arabic_ranker_x"]
  assert related_pools("font_arabic_ranker", pools) == [
      "font_arabic_ranker", "font_arabic_ranker_thick_strokes"]
  assert related_pools("font_latin_lower_ranker_low_resolution",
                               pools) == [
      "font_latin_lower_ranker", "font_latin_lower_ranker_low_resolution"]
  assert related_pools("font_thai_ranker", pools) == []


def test_fold_scores_degraded_copies_only_with_score_related():
  pool_of = {"t0": "font_arabic_ranker", "t1": "font_thai_ranker",
             "t2": "font_arabic_ranker_thick_strokes", "t3": "font_arabic_ranker"}
  assert fold_tasks("font_arabic_ranker", pool_of, False) == (
      ["t0", "t3"], ("font_arabic_ranker_thick_strokes",))
  assert fold_tasks("font_arabic_ranker", pool_of, True) == (
      ["t0", "t2", "t3"], ("font_arabic_ranker_thick_strokes",))
  assert fold_tasks("font_thai_ranker", pool_of, True) == (["t1"], ())


def test_seed_ensemble_benchmark(tmp_path):
  """benchmarks/seed_ensemble.py: one ensemble of 2 seeds on the synthetic
  store; its figure is the mean z-scored ranking of the two rankers."""
  cmd = [sys.executable, str(REPO / "benchmarks" / "seed_ensemble.py"),
         "--config=configs/rank.py:synthetic_tiny",
         "--config.synthetic.num_train=3", "--config.epochs=2",
         "--seeds=0,1", "--size=2", f"--workdir={tmp_path}"]
  first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "ensembles of 2" in first.stdout
  out = json.loads((tmp_path / "seed_ensemble.json").read_text())
  reports = [json.loads((tmp_path / f"seed_{s}" / "rank" / "results.json")
                        .read_text()) for s in (0, 1)]  # Targets, ranked last.
  truth = [np.array(reports[0]["ground_truth"][n])
           for n in reports[0]["tasks"]]
  scores = [np.array(r["scores"][f"spider(k={r['k']})"]) for r in reports]
  mean_z = (metrics.zscore(scores[0]) + metrics.zscore(scores[1])) / 2
  want = np.mean([metrics.weighted_tau(t, s) for t, s in zip(truth, mean_z)])
  assert np.isclose(out["target"]["ensembles"][0], want)
  for i, r in enumerate(reports):
    assert np.isclose(out["target"]["single"][i],
                      r["mean"][f"spider(k={r['k']})"]["weighted_tau"])
  assert len(out["val"]["single"]) == 2
  assert out["val"]["se"] is None  # One ensemble: no spread to estimate.
  # Blends with the prior: alpha = 1 is the ranker, alpha = 0 the prior;
  # the targets use the alpha each seed chose on the validation tasks.
  blend = out["target"]["prior_blend"]
  assert blend["alphas"][0] == 0.0 and blend["alphas"][-1] == 1.0
  assert blend["alpha"] == out["val"]["prior_blend"]["alpha"]
  for i, r in enumerate(reports):
    assert np.isclose(blend["wtau"][i][-1], out["target"]["single"][i])
    assert np.isclose(blend["wtau"][i][0],
                      r["mean"]["prior"]["weighted_tau"])
    assert np.isclose(blend["chosen"][i], blend["wtau"][i][
        blend["alphas"].index(blend["alpha"][i])])
    half = (metrics.zscore(scores[i]) + metrics.zscore(r["scores"]["prior"])
            ) / 2
    assert np.isclose(blend["wtau"][i][5], np.mean(
        [metrics.weighted_tau(t, s) for t, s in zip(truth, half)]))
  val_blend = out["val"]["prior_blend"]
  for i in range(2):  # The chosen alpha is the best on validation.
    assert val_blend["chosen"][i] == max(val_blend["wtau"][i])
  assert len(val_blend["loo_gain"]) == 2
  assert np.all(np.isfinite(val_blend["loo_gain"]))
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                         check=True)
  assert "training the ranker" not in again.stderr
  assert json.loads((tmp_path / "seed_ensemble.json").read_text()) == out
  bad = subprocess.run(cmd[:-3] + ["--seeds=0,1,2", "--size=2",
                                   f"--workdir={tmp_path}"], cwd=REPO,
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "--size=2" in bad.stderr


def test_prior_blend_choice_and_leave_one_out_gain():
  """seed_ensemble.best_alpha breaks ties towards the ranker (alpha = 1) and
  leave_one_out_gain scores each task with the alpha the others chose (run
  in a subprocess: the benchmark defines absl flags that pool_cv's share)."""
  code = """
import numpy as np, seed_ensemble as se
w = np.zeros((11, 3))
assert se.best_alpha(w) == 10
w[10] = 0.5
w[5] = [0.9, 0.2, 0.9]
assert se.best_alpha(w) == 5
# Without task 1, alpha 0.5 wins (0.9 > 0.5); without task 0 or 2 it wins
# too (0.55 > 0.5): the tasks score 0.9, 0.2, 0.9, i.e. 2/3 against 0.5.
assert np.isclose(se.leave_one_out_gain(w), 2 / 3 - 0.5)
w[5] = [0.9, 0.2, 0.2]  # Now only leaving out task 1 or 2 picks 0.5.
assert np.isclose(se.leave_one_out_gain(w), (0.5 + 0.2 + 0.2) / 3 - 0.5)
print("ok")
"""
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO / "benchmarks",
                        capture_output=True, text=True)
  assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
