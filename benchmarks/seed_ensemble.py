"""Seed ensembles of a ranker setting against its single rankers.

  python benchmarks/seed_ensemble.py --workdir=/tmp/ens            # the default
  python benchmarks/seed_ensemble.py --workdir=/tmp/ens --seeds=0,1,2,3,4,5 \\
      --size=2 --config.model.dim=32                                # a setting

Trains (or reuses) one ranker of configs/rank.py:default plus the --config
overrides per seed, in WORKDIR/seed_<s>, and ranks the validation and the
target tasks with each (`spider_jax.rank.rank`, at the depth each ranker
chose on the validation tasks). Consecutive groups of --size seeds form the
ensembles: an ensemble scores a (task, PTM) pair with the mean of its
members' scores, each standardised per task over the zoo. It prints mean
weighted tau per seed, per ensemble and of the constant prior, for both
roles, with the difference of the ensembles' mean and the single rankers'
mean and its SE (sqrt(sd_ens^2 / n_ens + sd_single^2 / n_single)), and
writes WORKDIR/seed_ensemble.json. A rerun only rescores.
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
from spider_jax import cli, metrics, rank as rank_lib  # noqa: E402
from spider_jax.data.store import atomic_write_json  # noqa: E402
from spider_jax.train import mean_weighted_tau  # noqa: E402

flags.DEFINE_list("seeds", [str(s) for s in range(9)], "Training seeds, in "
                  "ensemble order.")
flags.DEFINE_integer("size", 3, "Rankers per ensemble (consecutive seeds).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.initialize_runtime()
  config, workdir = flags.FLAGS.config, pathlib.Path(flags.FLAGS.workdir)
  seeds, size = [int(s) for s in flags.FLAGS.seeds], flags.FLAGS.size
  if size < 2 or len(seeds) % size:
    raise app.UsageError(f"--size={size} must be >= 2 and divide the "
                         f"{len(seeds)} seeds of --seeds.")
  groups = [seeds[i:i + size] for i in range(0, len(seeds), size)]
  out = {"seeds": seeds, "size": size}
  for role in ("val", "target"):
    scores, ks = {}, {}
    for seed in seeds:
      cfg = copy.deepcopy(config)
      cfg.seed = seed
      cfg.rank.tasks = role
      cfg.rank.methods = "spider,prior"
      cfg.rank.plots = False
      report = rank_lib.rank(cfg, workdir / f"seed_{seed}")
      ks[seed] = report["k"]
      scores[seed] = np.array(report["scores"][f"spider(k={report['k']})"])
    # Tasks, ground truth and prior are the same in every seed's report.
    truth = np.array([report["ground_truth"][n] for n in report["tasks"]])
    prior = report["mean"]["prior"]["weighted_tau"]
    single = np.array([mean_weighted_tau(scores[s], truth) for s in seeds])
    ens = np.array([mean_weighted_tau(np.mean(
        [metrics.zscore(scores[s]) for s in g], 0), truth) for g in groups])
    se = float(np.sqrt(ens.var(ddof=1) / len(ens) + single.var(ddof=1) /
                       len(single))) if len(ens) > 1 else None  # No spread.
    out[role] = {"k": ks, "single": single.tolist(),
                 "ensembles": ens.tolist(), "prior": prior,
                 "difference": float(ens.mean() - single.mean()), "se": se}
    print(f"\n{role} ({len(truth)} tasks): mean weighted tau")
    print("  single rankers, seeds " + ", ".join(map(str, seeds)) + ": " +
          " ".join(f"{v:.3f}" for v in single) + f"  (mean {single.mean():.4f};"
          f" k chosen {[ks[s] for s in seeds]})")
    print(f"  ensembles of {size}: " + " ".join(f"{v:.3f}" for v in ens) +
          f"  (mean {ens.mean():.4f})")
    print(f"  ensembles - single: {ens.mean() - single.mean():+.4f} "
          f"(SE {se if se is None else round(se, 4)}); constant prior "
          f"{prior:.3f}")
  if jax.process_index() == 0:
    atomic_write_json(workdir / "seed_ensemble.json", out)


if __name__ == "__main__":
  cli.define_flags("rank.py")
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
