"""Ranking configs: `python -m spider_jax.rank --config=configs/rank.py:VARIANT`.

Variants (ranker training config of configs/train.py, and the data):
  default   the offline benchmark's fine-tuned zoo (configs/bench.py:default:
            16 local PTMs + EfficientNet-Lite0/1/2 = 19 PTMs, 10 targets,
            300 training and 48 validation tasks, of which the ranker uses
            the 90 training and 24 validation tasks with fine-tuned ground
            truth), ranked against the committed fine-tune ground truth
            (results/bench/default); the `default` ranker at d = 16 (chosen
            on the validation tasks: docs/what_we_tried.md).
  tiny      CI: configs/bench.py:tiny (3 PTMs, 3 targets, 20 training
            tasks) and the `tiny` ranker.
  full      configs/bench.py:full (the default benchmark plus the
            feature-only Open-NSFW, which only the linear-probe table
            scores; the zoo ranked on the targets is still the fine-tuned
            one, `ptms=fine_tuned`).
  paper, deep   the default benchmark with the paper / deep ranker.
  synthetic, synthetic_tiny   the built-in synthetic store (no data
            packages needed) with the default / tiny ranker.

The training section is configs/train.py's; `rank` adds:
  checkpoint  a checkpoint directory; "" = WORKDIR/checkpoints, trained
              first if it holds no checkpoint.
  k           re-ranking depth; -1 = the depth chosen on validation tasks.
  tasks       which tasks to rank: "target" (default), "val" or "all".
  methods     rows of the report: spider (the ranker), prior (each PTM's
              mean rank over the training tasks), random, and any baseline
              of spider_jax.baselines.METHODS (logme, leep, nce, nleep,
              hscore, ...), each with its time per task including the
              network passes it needs (recorded in the store).
  model_parallel  devices that split the zoo (2-D tasks x PTMs mesh), for
              zoos too large for one device.
  plots       write the PNG plots beside the report.
"""

import ml_collections

from configs import bench
from configs import train

# variant: (ranker variant of configs/train.py, configs/bench.py variant).
VARIANTS = {
    "default": ("default", "default"),
    "tiny": ("tiny", "tiny"),
    "full": ("default", "full"),
    "paper": ("paper", "default"),
    "deep": ("deep", "default"),
    "synthetic": ("default", ""),
    "synthetic_tiny": ("tiny", ""),
}


# Baselines of the default report: every method of spider_jax.baselines
# whose cost on the 10 targets x 19 PTMs stays in minutes on 2 CPU cores
# (nleep, gbc and linear_probe are left to --config.rank.methods).
DEFAULT_METHODS = ("spider,prior,random,logme,logme_icml,leep,nce,hscore,"
                   "hscore_regularized,gbc_diagonal,gbc_spherical,transrate,"
                   "sfda,pactran_dirichlet,lfc,knn_loo")


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  """Training config of `variant` plus the `rank` section."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; use one of "
                     f"{', '.join(VARIANTS)}.")
  model_variant, bench_variant = VARIANTS[variant]
  c = train.get_config(model_variant)
  c.variant = variant
  if variant == "default":
    # Mean weighted tau on its 24 validation tasks (3 seeds): d = 8 0.813,
    # 16 0.837, 32 0.834, 64 0.833 (docs/what_we_tried.md).
    c.model.dim = 16
  if bench_variant:
    c.bench = bench.get_config(bench_variant)
    c.ptms = "all" if bench_variant == "tiny" else "fine_tuned"
    if bench_variant != "tiny":
      c.exclude_pools = ",".join(bench.SOURCE_SIDE_POOLS)
  c.rank = ml_collections.ConfigDict(dict(
      checkpoint="", k=-1, tasks="target",
      methods=(DEFAULT_METHODS if bench_variant else "spider,prior,random"),
      model_parallel=1, plots=True))
  return c
