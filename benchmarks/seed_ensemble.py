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

It also blends each single ranker with its constant prior (shrinkage
towards the prior): alpha * z(ranker) + (1 - alpha) * z(prior), alpha in
0, 0.1, ..., 1 (1 = the ranker). Per seed, alpha is chosen on the
validation tasks (ties: the larger alpha) and applied to the targets; the
out-of-sample gain on validation is leave-one-task-out (alpha chosen on the
other tasks, scored on the left-out one) minus alpha = 1.
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


ALPHAS = np.round(np.linspace(0.0, 1.0, 11), 1)


def prior_blend(scores: np.ndarray, prior: np.ndarray, truth: np.ndarray
                ) -> np.ndarray:
  """[A, T] weighted tau of alpha * z(scores) + (1 - alpha) * z(prior) for
  each alpha of ALPHAS; scores, prior, truth: [T, M]."""
  z, zp = metrics.zscore(scores), metrics.zscore(prior)
  return np.array([[metrics.weighted_tau(g, s) for g, s in
                    zip(truth, a * z + (1 - a) * zp)] for a in ALPHAS])


def best_alpha(wtau: np.ndarray) -> int:
  """Index of the alpha with the highest mean over tasks of [A, T] wtau;
  ties go to the larger alpha (nearer the ranker)."""
  m = wtau.mean(1)
  return int(np.flatnonzero(np.isclose(m, m.max()))[-1])


def leave_one_out_gain(wtau: np.ndarray) -> float:
  """Mean over tasks t of wtau[alpha chosen without t, t] minus the mean
  at alpha = 1; wtau: [A, T]."""
  loo = [wtau[best_alpha(np.delete(wtau, t, axis=1)), t]
         for t in range(wtau.shape[1])]
  return float(np.mean(loo) - wtau[-1].mean())


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
  alpha = {}  # seed -> index of the alpha chosen on the validation tasks
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
    prior_scores = np.array(report["scores"]["prior"])
    blend = {s: prior_blend(scores[s], prior_scores, truth) for s in seeds}
    if role == "val":
      alpha = {s: best_alpha(blend[s]) for s in seeds}
    chosen = np.array([blend[s][alpha[s]].mean() for s in seeds])
    out[role]["prior_blend"] = {
        "alphas": ALPHAS.tolist(),
        "wtau": [blend[s].mean(1).tolist() for s in seeds],
        "alpha": [float(ALPHAS[alpha[s]]) for s in seeds],
        "chosen": chosen.tolist()}
    print("  blend with the prior, alpha chosen on val per seed: " +
          " ".join(f"{ALPHAS[alpha[s]]:.1f}" for s in seeds) +
          f"; mean {chosen.mean():.4f} (alpha = 1: {single.mean():.4f})")
    if role == "val":
      gain = np.array([leave_one_out_gain(blend[s]) for s in seeds])
      out[role]["prior_blend"]["loo_gain"] = gain.tolist()
      print("  its leave-one-task-out gain over alpha = 1: " +
            " ".join(f"{g:+.4f}" for g in gain) + f"  (mean {gain.mean():+.4f}"
            + (f", SE {gain.std(ddof=1) / np.sqrt(len(gain)):.4f})"
               if len(gain) > 1 else ")"))
  if jax.process_index() == 0:
    atomic_write_json(workdir / "seed_ensemble.json", out)


if __name__ == "__main__":
  cli.define_flags("rank.py")
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
