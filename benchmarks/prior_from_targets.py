"""How far a constant ranking gets when it comes from fine-tuned rankings.

  python benchmarks/prior_from_targets.py [RESULTS_DIR]   # results/bench/full

For each target, the "average ranking" prior is built from the fine-tuned
ground truth of the *other* targets (leave one out) and scored on it with
the official weighted tau, over the PTMs whose every target cell was
fine-tuned (`ground_truth_source.csv`; as `--config.ptms=fine_tuned` in
`spider_jax.rank`). Model Spider's own prior comes from the probe
ground truth of the ranker-training tasks (0.486 on these targets); the
difference shows how much of the gap is the training tasks' ground truth.
An analysis, not a method: it uses target ground truth, which no reported
row may do.
"""

from __future__ import annotations

import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from spider_jax import metrics  # noqa: E402


def main():
  results = sys.argv[1] if len(sys.argv) > 1 else "results/bench/full"
  path = os.path.join(results, "ground_truth_targets.csv")
  with open(path) as f:
    rows = list(csv.DictReader(f))
  with open(os.path.join(results, "ground_truth_source.csv")) as f:
    how = list(csv.DictReader(f))
  ptms = [k for k in rows[0] if k != "target"
          and all(h[k] == "finetune" for h in how)]
  acc = np.array([[float(r[p]) for p in ptms] for r in rows])
  print(f"# {path}: {len(rows)} targets x {len(ptms)} PTMs")
  print("| target | weighted tau of the leave-one-out prior |")
  print("|---|---|")
  taus = []
  for i, r in enumerate(rows):
    prior = metrics.constant_prior(np.delete(acc, i, axis=0))
    taus.append(metrics.weighted_tau(acc[i], prior))
    print(f"| {r['target']} | {taus[-1]:.3f} |")
  print(f"| mean | {np.mean(taus):.3f} |")


if __name__ == "__main__":
  main()
