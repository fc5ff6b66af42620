"""Validation over every re-ranking depth: per-depth scoring vs `score_depths`.

  python benchmarks/bench_validation.py --config.k_max=19   # default store
  python benchmarks/bench_validation.py --config=configs/rank.py:paper

Training validates the ranker at every depth k = 0..k_max after each epoch
(`train.validate`). This times one such validation on the store's "val"
tasks both ways, with a fresh untrained ranker and a fresh Scorer each (so
each pays its own compiles): the per-depth way (`score_tasks` once per k,
one compile per (bucket, k)) and `score_depths` (one stage-1 pass, the
deepest slots built once, one compile per bucket for every k > 0). Prints
first-call seconds (compiles included), the median of 3 later calls, the
compile counts, and the largest score and weighted-tau differences.
"""

import os
import pathlib
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from spider_jax import cli  # noqa: E402
from spider_jax import train as train_lib  # noqa: E402
from spider_jax.scoring import Scorer, score_depths, score_tasks  # noqa: E402


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.initialize_runtime()
  config = flags.FLAGS.config
  store = train_lib.open_or_build_store(config,
                                        pathlib.Path(flags.FLAGS.workdir))
  zoo = train_lib.zoo_of(store, config.model.task_token)
  if not store.task_names("val"):
    raise SystemExit(f"store {store.path} has no validation tasks.")
  tasks, gt = train_lib.validation_tasks(store)
  depths = list(range(min(config.k_max, len(store.ptms)) + 1))
  graphdef, params = nnx.split(train_lib.build_model(config, zoo, 0))

  def per_depth(scorer):
    return np.stack([score_tasks(scorer, tasks, zoo, k=k) for k in depths])

  def shared(scorer):
    return score_depths(scorer, tasks, zoo, depths)

  results = {}
  for name, fn in (("per depth (score_tasks)", per_depth),
                   ("score_depths", shared)):
    scorer = Scorer(graphdef, params, batch_size=config.eval_batch_size)
    t = time.perf_counter()
    scores = fn(scorer)
    first = time.perf_counter() - t
    later = []
    for _ in range(3):
      t = time.perf_counter()
      fn(scorer)
      later.append(time.perf_counter() - t)
    taus = [train_lib.mean_weighted_tau(s, gt) for s in scores]
    results[name] = (first, statistics.median(later), scorer.trace_count,
                     scores, taus)

  print(f"store {store.path}: {len(tasks)} val tasks, {len(store.ptms)} PTMs, "
        f"depths 0..{depths[-1]}, d = {config.model.dim}")
  print("| method | first call s (compiles) | later call s (median of 3) "
        "| compiles |")
  print("|---|---|---|---|")
  for name, (first, later, traces, _, _) in results.items():
    print(f"| {name} | {first:.2f} | {later:.2f} | {traces} |")
  (f0, l0, *_, s0, t0), (f1, l1, *_, s1, t1) = results.values()
  print(f"speed-up: first call {f0 / f1:.1f}x, later calls {l0 / l1:.1f}x")
  print(f"max |score difference| {np.max(np.abs(s0 - s1)):.2e}; "
        f"max |weighted tau difference| over depths "
        f"{np.max(np.abs(np.subtract(t0, t1))):.2e}")


if __name__ == "__main__":
  cli.define_flags("rank.py")
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
