"""Leave-one-pool-out validation of a ranker setting on its training tasks.

  python benchmarks/pool_cv.py --workdir=/tmp/cv                 # the default
  python benchmarks/pool_cv.py --workdir=/tmp/cv_deep \\
      --config.model.num_layers=2 --config.model.num_heads=4 \\
      --config.model.mlp_ratio=4 --config.model.pre_norm=True   # a setting

The validation tasks of the default benchmark all come from one pool (Tamil
glyphs). This gives a second, larger estimate of how a ranker setting
(configs/rank.py:default plus the --config overrides) does on a pool it never
saw: for every pool of the ranker's training tasks and every seed, it trains
the ranker without that pool's tasks and scores them (at the re-ranking
depth chosen on the validation tasks, or --k), next to the constant prior of
the same training tasks and blends of the two (z(ranker) + w z(prior),
--prior_weights). It prints mean weighted tau per pool and over all held-out
tasks, per seed, and writes WORKDIR/pool_cv.json (pool_cv_k<K>.json with
--k, pool_cv_related.json with --score_related). Fold runs are kept in
WORKDIR/<pool>/seed_<s>, so a rerun only rescores. Targets are never read.

A fold also leaves out the pools made from the held-out one (the same glyphs
degraded, e.g. font_arabic_ranker_thick_strokes for font_arabic_ranker, and
the other way round); with --score_related it scores their training tasks
too (so a ranker that has such pools and one that leaves them out are
judged on the same tasks). --hold_out limits the folds to some pools, e.g.
the 7 pools of the default store when extra pools are added to its training
tasks:

  python benchmarks/pool_cv.py --workdir=/tmp/cv_ext40 \
      --config.store=<a store with extra training pools> \
      --hold_out=font_arabic_ranker,font_bengali_ranker,...
"""

from __future__ import annotations

import copy
import os
import pathlib
import sys

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from spider_jax import checkpoint, cli, metrics  # noqa: E402
from spider_jax.rank import resolve_checkpoint  # noqa: E402
from spider_jax.ranker import Ranker  # noqa: E402
from spider_jax.scoring import score_tasks  # noqa: E402
from spider_jax.data.builders import related_pools  # noqa: E402
from spider_jax.data.store import atomic_write_json  # noqa: E402
from spider_jax.train import open_or_build_store  # noqa: E402

flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
flags.DEFINE_integer("k", -1, "Re-ranking depth; -1 = each fold ranker's "
                     "depth chosen on the validation tasks.")
flags.DEFINE_list("prior_weights", ["0", "0.5", "1", "2", "4"],
                  "Also score z(ranker) + w * z(prior) for each w (z = "
                  "standardised over the zoo; w = 0 is the ranker alone).")
flags.DEFINE_list("hold_out", [], "Pools to hold out, one fold each; empty = "
                  "every pool of the training tasks.")
flags.DEFINE_bool("score_related", False, "A fold also scores the training "
                  "tasks of the held-out pool's degraded copies (which it "
                  "leaves out of training either way).")


def training_tasks(store) -> dict[str, str]:
  """{task: pool} of the view's training tasks, also those of the pools it
  leaves out (their degraded copies are scored with --score_related); tasks
  it hides one by one (e.g. without fine-tuned ground truth) stay out."""
  return {n: t["pool"] for n, t in store.meta["tasks"].items()
          if t["role"] == "train" and n not in store.exclude_tasks}


def fold_tasks(pool: str, pool_of: dict[str, str], score_related: bool
               ) -> tuple[list[str], tuple[str, ...]]:
  """The tasks a fold scores and the other pools it leaves out.

  Args:
    pool: the held-out pool.
    pool_of: training task name -> its pool (every training task of the
      store, also those of pools the ranker leaves out).
    score_related: also score the tasks of `pool`'s degraded copies.

  Returns:
    (task names, in `pool_of` order; the related pools, besides `pool`).
  """
  related = tuple(q for q in related_pools(pool, sorted(set(pool_of.values())))
                  if q != pool)
  scored = {pool, *related} if score_related else {pool}
  return [n for n, p in pool_of.items() if p in scored], related


def fold_scores(config, workdir: pathlib.Path, store, pool: str,
                names: list[str], seed: int, k: int = -1,
                also_exclude: tuple[str, ...] = ()
                ) -> tuple[np.ndarray, np.ndarray]:
  """Trains (or reuses) the fold ranker without `pool`; scores its tasks.

  Args:
    names: the T tasks to score (`fold_tasks`).
    also_exclude: more pools the fold ranker leaves out.

  Returns:
    (ranker scores [T, M], prior scores [T, M]).
  """
  c = copy.deepcopy(config)
  c.store = str(store.path)
  c.seed = seed
  c.exclude_pools = ",".join(dict.fromkeys(
      p.strip() for p in (*config.exclude_pools.split(","), pool,
                          *also_exclude) if p.strip()))
  fold = workdir / pool / f"seed_{seed}"
  fold_store = open_or_build_store(c, fold)
  ranker = Ranker.load(resolve_checkpoint(c, fold, fold_store),
                       batch_size=c.eval_batch_size)
  checkpoint.check_zoo(ranker.meta, store.ptm_names, store.ptm_dims,
                       store.encoder_dim, store.encoder_name)
  scores = score_tasks(ranker.scorer, [store.task(n) for n in names],
                       ranker.zoo, k=int(ranker.meta.get("rerank_k", 0))
                       if k < 0 else k)
  return np.asarray(scores), np.tile(ranker.prior, (len(names), 1))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.initialize_runtime()
  config, workdir = flags.FLAGS.config, pathlib.Path(flags.FLAGS.workdir)
  seeds = [int(s) for s in flags.FLAGS.seeds]
  weights = [float(w) for w in flags.FLAGS.prior_weights]
  store = open_or_build_store(config, workdir)
  gt = store.ground_truth()
  pool_of = {n: store.meta["tasks"][n]["pool"]
             for n in store.task_names("train")}
  every = sorted(set(pool_of.values()))
  every_train = training_tasks(store)
  pools = sorted(flags.FLAGS.hold_out) or every
  if set(pools) - set(every):
    raise app.UsageError(f"--hold_out names pools without training tasks: "
                         f"{sorted(set(pools) - set(every))}; they have: "
                         f"{every}")
  out = {"store": str(store.path), "pools": pools, "seeds": seeds,
         "spider": {}, "prior": {}}
  for seed in seeds:
    for pool in pools:
      names, related = fold_tasks(pool, every_train,
                                  flags.FLAGS.score_related)
      spider, prior = fold_scores(config, workdir, store, pool, names, seed,
                                  flags.FLAGS.k, related)
      blends = {f"spider+{w:g}*prior":
                metrics.zscore(spider) + w * metrics.zscore(prior)
                for w in weights if w}
      for method, s in (("spider", spider), ("prior", prior),
                        *blends.items()):
        out.setdefault(method, {}).setdefault(str(seed), {})[pool] = {
            n: metrics.weighted_tau(gt.row(n, store.ptm_names), s[i])
            for i, n in enumerate(names)}
  print(f"\nleave-one-pool-out mean weighted tau ({store.path}):")
  print(f"{'pool':32s} {'tasks':>5s} " + " ".join(
      f"seed {s:<3d}" for s in seeds) + "   prior")
  for pool in pools:
    row = [np.mean(list(out["spider"][str(s)][pool].values())) for s in seeds]
    pr = np.mean(list(out["prior"][str(seeds[0])][pool].values()))
    n = len(out["spider"][str(seeds[0])][pool])
    print(f"{pool:32s} {n:5d} " + " ".join(f"{v:8.3f}" for v in row) +
          f"   {pr:.3f}")
  methods = [m for m in out if m not in ("store", "pools", "seeds")]
  overall = {m: [float(np.mean([v for p in pools for v in
                                out[m][str(s)][p].values()]))
                 for s in seeds] for m in methods}
  out["mean"] = overall
  print(f"{'all held-out tasks':32s} "
        f"{sum(len(out['spider'][str(seeds[0])][p]) for p in pools):5d} " +
        " ".join(f"{v:8.3f}" for v in overall["spider"]) +
        f"   {overall['prior'][0]:.3f}")
  print("\nmean over all held-out tasks, per seed (mean over seeds, SE):")
  for m in methods:
    v = overall[m]
    se = np.std(v, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    print(f"{m:32s} " + " ".join(f"{x:.3f}" for x in v) +
          f"   ({np.mean(v):.4f}, SE {se:.4f})")
  if jax.process_index() == 0:
    k = flags.FLAGS.k
    name = "pool_cv" + (f"_k{k}" if k >= 0 else "") + (
        "_related" if flags.FLAGS.score_related else "")
    atomic_write_json(workdir / f"{name}.json", out)


if __name__ == "__main__":
  cli.define_flags("rank.py")
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
