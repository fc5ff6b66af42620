r"""Prints the offline benchmark's figures as markdown (from its results dir).

  python benchmarks/zoo_build.py --results=results/bench/full

Reads `summary.json`, `ground_truth_targets.csv`, `ground_truth_source.csv`,
`finetune_accuracy.csv`, `finetune_seconds.csv` and
`linear_probe_targets.csv` written by `python -m spider_jax.groundtruth`.
"""

import argparse
import csv
import json
import pathlib


def _table(path):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  return rows[0][1:], {r[0]: dict(zip(rows[0][1:], r[1:])) for r in rows[1:]}


def _short(t):
  return t.replace("_target", "").replace("font_", "f_")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--results", default="results/bench/full")
  a = ap.parse_args()
  r = pathlib.Path(a.results)
  s = json.loads((r / "summary.json").read_text())
  print("## counts\n```\n" + json.dumps(s["counts"], indent=1) + "\n```")
  print(f"ground truth status: {s['ground_truth_status']}\n")
  t = s["times"]
  print("## stage times (s)")
  for k in ("pools_s", "zoo_s", "extract_s", "linear_probe_s",
            "finetune_s_this_run", "finetune_s_total_cells"):
    print(f"- {k}: {t.get(k, float('nan')):.1f}")
  zoo = t.get("zoo_train_s_per_ptm", {})
  print(f"- zoo training, sum over {len(zoo)} local PTMs: "
        f"{sum(v or 0 for v in zoo.values()):.1f}")
  print("\n## seconds per sample (ms)")
  print(", ".join(f"{k} {1e3 * v:.3f}" for k, v in
                  s["seconds_per_sample"].items()))
  for name in ("ground_truth_targets", "finetune_accuracy",
               "linear_probe_targets"):
    cols, tab = _table(r / f"{name}.csv")
    print(f"\n## {name} (%)\n")
    print("| PTM | " + " | ".join(_short(x) for x in tab) + " |")
    print("|---" * (len(tab) + 1) + "|")
    for c in cols:
      print(f"| {c} | " + " | ".join(
          (f"{float(tab[x][c]):.1f}" if tab[x][c] else "–") for x in tab)
            + " |")
  cols, tab = _table(r / "finetune_seconds.csv")
  print("\n## fine-tune wall time per cell (s), sum per PTM\n")
  for c in cols:
    v = [float(tab[x][c]) for x in tab if tab[x][c]]
    if v:
      print(f"- {c}: {len(v)} cells, {sum(v):.0f} s, mean {sum(v)/len(v):.1f}")
  print("\n## best PTM per target")
  for k, v in s["best_ptm_per_target"].items():
    print(f"- {k}: {v['ptm']} ({v['acc']:.1f})")
  print(f"\ntimes best: {s['times_best']}; no PTM best on more than half: "
        f"{s['no_ptm_best_on_more_than_half']}")
  cp = s["constant_prior_weighted_tau"]
  print(f"\nconstant prior weighted tau on targets: mean {cp['mean']:.3f}; "
        + ", ".join(f"{_short(k)} {v:.3f}" for k, v in
                    cp["per_target"].items()))
  fp = s["finetune_vs_probe"]
  print(f"\nfine-tune vs linear probe (fine-tuned PTMs): mean weighted tau "
        f"{fp['mean_weighted_tau']:.3f}, mean Spearman "
        f"{fp['mean_spearman']:.3f}, same best on {fp['same_best']}/"
        f"{fp['targets']} targets")
  for k, v in fp["per_target"].items():
    print(f"- {_short(k)}: tau {v['weighted_tau']:.3f}, rho "
          f"{v['spearman']:.3f}, same best {v['same_best']}")


if __name__ == "__main__":
  main()
