r"""Offline benchmark config: zoo, pools, tasks, extraction and ground truth.

  python -m spider_jax.groundtruth --config=configs/bench.py:full
  python -m spider_jax.groundtruth --config=configs/bench.py:tiny \
      --config.results_dir=/tmp/bench_tiny

Variants:
  tiny  CI: pools at scale 0.03, 2 local PTMs (mlp@fashion_0_4,
        cnn_s@font_latin_upper) + EfficientNet-Lite0 at 32 px (also the
        generic encoder), 3 targets, 20 training + 4 validation tasks;
        fine-tunes the local PTMs only (Lite0 target cells use the linear
        probe, recorded as such). Builds in about a minute on 2 cores.
  default  the zoo that `python -m spider_jax.rank` ranks: `full` without
        Open-NSFW (19 fine-tunable PTMs; skipping its 224-px ONNX
        extraction saves about 2/3 of the extraction time), plus fine-tuned
        ground truth for the 24 validation tasks and the first 90 training
        tasks of the pools that are not source-side. It computes no
        fine-tune cell itself: cells come from the committed
        results/bench/default (`ground_truth_from`) where their cell hashes
        match this build, the linear probe (also seeded from there) where
        they do not, and the report says which.
  full  4 local archs (cnn_s, cnn_w, resnet_s, mlp) x 4 pretraining sources
        (Fashion-MNIST 0-4, Animal-MNIST source classes, font Latin upper,
        font Cyrillic upper) = 16 local PTMs + EfficientNet-Lite0/1/2 (64 px)
        + Open-NSFW (feature-only) = 20 PTMs; the 10 target pools; 300
        training tasks from 9 ranker pools and 48 validation tasks from 2
        pools kept aside (font_tamil_ranker, animal_src_ranker).

The cache dir is `$SPIDER_JAX_CACHE` (default ~/.cache/spider_jax); trained
zoo checkpoints go to `<cache>/zoo/`, FeatureStores to `<cache>/stores/`.
"""

import os

import ml_collections

from spider_jax.data import fonts

TARGETS_FULL = (
    "font_digits_target", "font_greek_upper_target", "font_armenian_target",
    "font_georgian_target", "font_hebrew_target", "font_math_arrows_target",
    "mnist5k", "sklearn_digits", "fashion_5_9", "animal_heldout")
TRAIN_POOLS_FULL = (
    "font_latin_upper_ranker", "font_latin_lower_ranker",
    "font_cyrillic_lower_ranker", "font_greek_lower_ranker",
    "font_arabic_ranker", "font_thai_ranker", "font_devanagari_ranker",
    "font_bengali_ranker", "fashion_0_4_ranker")
VAL_POOLS_FULL = ("font_tamil_ranker", "animal_src_ranker")
# Ranker pools whose classes are some PTMs' own pretraining classes (other
# images or fonts of them). Their tasks teach "a PTM is best on its own
# classes", which never holds on the targets (all classes are new to every
# PTM), so the ranker leaves them out (configs/rank.py; measured:
# docs/what_we_tried.md) and the default benchmark fine-tunes no task of them.
SOURCE_SIDE_POOLS = ("font_latin_upper_ranker", "fashion_0_4_ranker",
                     "animal_src_ranker")
# Pools whose validation / training tasks `default` fine-tunes.
FINETUNED_TASK_POOLS = tuple(p for p in TRAIN_POOLS_FULL + VAL_POOLS_FULL
                             if p not in SOURCE_SIDE_POOLS)
# Font pools degraded towards the natural targets (sklearn-digit-like low
# resolution, MNIST-like thick strokes): candidates for pools.extra_train.
DEGRADED_POOLS = ("font_latin_lower_ranker_low_resolution",
                  "font_greek_lower_ranker_low_resolution",
                  "font_cyrillic_lower_ranker_thick_strokes",
                  "font_arabic_ranker_thick_strokes")
# The validation pool degraded the same two ways: candidates for
# pools.extra_val, so that validation tasks are as varied as the targets.
DEGRADED_VAL_POOLS = ("font_tamil_ranker_low_resolution",
                      "font_tamil_ranker_thick_strokes")
# Natural photos (CIFAR-10's test batch, grey, 28 px; `bash
# launch/install_data.sh --cifar10`), a domain that no PTM and no other pool
# has: a candidate for pools.extra_val (docs/what_we_tried.md).
CIFAR10_VAL_POOLS = ("cifar10_ranker",)
# Other CIFAR-10 photos (training batch 1), same classes: a candidate for
# pools.extra_train (large tasks: tasks.num_large_extra_train).
CIFAR10_TRAIN_POOLS = ("cifar10_train_ranker",)
# Glyphs of ten scripts that no other pool, PTM or target uses (Ethiopic,
# Sinhala, ..., geometric shapes; fonts.EXTRA_SCRIPTS), in the ranker
# group's fonts: candidates for pools.extra_train (more training domains).
EXTRA_SCRIPT_POOLS = tuple(f"font_{s}_ranker" for s in fonts.EXTRA_SCRIPTS)
SOURCES_FULL = ("fashion_0_4_pretrain", "animal_src_pretrain",
                "font_latin_upper_pretrain", "font_cyrillic_upper_pretrain")


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  """Returns the benchmark config of `variant` ("tiny", "default", "full")."""
  if variant not in ("tiny", "default", "full"):
    raise ValueError(f"unknown variant {variant!r}; use tiny, default or "
                     "full.")
  c = ml_collections.ConfigDict()
  c.variant = variant
  # A results directory of an earlier run whose fine-tune cells and probe
  # cache seed this run's (used where their hashes match); "" = none.
  c.ground_truth_from = ("results/bench/default" if variant == "default"
                         else "")
  real = variant in ("default", "full")
  c.seed = 0                       # pools (font rendering, rows) and tasks
  c.cache_dir = os.environ.get("SPIDER_JAX_CACHE",
                               os.path.expanduser("~/.cache/spider_jax"))
  c.results_dir = os.path.join("results", "bench", variant)
  c.scale = 1.0 if real else 0.03

  # --- Pools.
  c.pools = ml_collections.ConfigDict()
  if real:
    c.pools.targets = TARGETS_FULL
    c.pools.train = TRAIN_POOLS_FULL
    c.pools.val = VAL_POOLS_FULL
  else:
    c.pools.targets = ("font_digits_target", "mnist5k", "fashion_5_9")
    c.pools.train = ("font_latin_lower_ranker", "fashion_0_4_ranker",
                     "animal_src_ranker")
    c.pools.val = ("font_greek_lower_ranker",)
  # More training pools whose tasks are drawn apart from the others
  # (`tasks.num_extra_train` of them; adding some leaves every other task as
  # it was), e.g. DEGRADED_POOLS.
  c.pools.extra_train = ()
  # The same for validation tasks (`tasks.num_extra_val`), e.g.
  # DEGRADED_VAL_POOLS; `finetune.val_tasks` fine-tunes them too.
  c.pools.extra_val = ()

  # --- Zoo.
  c.zoo = ml_collections.ConfigDict()
  if real:
    c.zoo.local = [f"{a}@{s}" for s in SOURCES_FULL
                   for a in ("cnn_s", "cnn_w", "resnet_s", "mlp")]
    c.zoo.efficientnet = ("lite0", "lite1", "lite2")
    c.zoo.open_nsfw = variant == "full"
    c.zoo.image_size = 64           # EfficientNet input side
    c.zoo.epochs = 5
  else:
    c.zoo.local = ["mlp@fashion_0_4_pretrain", "cnn_s@font_latin_upper_pretrain"]
    c.zoo.efficientnet = ("lite0",)
    c.zoo.open_nsfw = False
    c.zoo.image_size = 32
    c.zoo.epochs = 3
  c.zoo.batch_size = 128
  c.zoo.lr = 3e-3
  c.zoo.weight_decay = 1e-4
  c.zoo.warmup_steps = 20
  c.zoo.seed = 0
  c.generic_encoder = "efficientnet_lite0"

  # --- Tasks.
  c.tasks = ml_collections.ConfigDict()
  c.tasks.num_train = 300 if real else 20
  c.tasks.num_val = 48 if real else 4
  c.tasks.num_extra_train = 0      # tasks from pools.extra_train
  c.tasks.num_extra_val = 0        # tasks from pools.extra_val
  # Large tasks, as large as the targets: every row of
  # large_min_classes..all classes of a pool of pools.train / pools.val
  # (the sampled ones hold at most 36 training images per class and 20
  # classes; the targets 750-1200 training images).
  c.tasks.num_large_train = 0
  c.tasks.num_large_val = 0
  c.tasks.large_min_classes = 12
  # Large tasks of pools.extra_train / extra_val too (numbered last), of
  # large_extra_min_classes..all classes, e.g. of CIFAR10_TRAIN_POOLS /
  # CIFAR10_VAL_POOLS.
  c.tasks.num_large_extra_train = 0
  c.tasks.num_large_extra_val = 0
  c.tasks.large_extra_min_classes = 5
  c.tasks.seed = 0
  c.tasks.min_classes = 2
  c.tasks.max_classes = 20
  c.tasks.min_per_class = 10
  c.tasks.max_per_class = 60

  # --- Extraction.
  c.extract = ml_collections.ConfigDict()
  c.extract.batch_size = 128
  c.extract.onnx_batch_size = 32

  # --- Linear probe (ground truth of train/val tasks; second target table).
  c.probe = ml_collections.ConfigDict()
  # Cheaper than finetune.linear_probe's defaults (300 steps, 5 L2 values):
  # 4 zoo members have 1024-1280-d features and every task is probed by
  # every PTM (measured: ~1 s per task for a 1280-d PTM on 2 busy cores).
  c.probe.l2_grid = (1e-3, 1e-2, 1e-1, 1.0)
  c.probe.steps = 150
  c.probe.lr = 0.01
  c.probe.tasks_per_batch = 16      # tasks vmapped together (padded)

  # --- Fine-tuning (ground truth of targets).
  c.finetune = ml_collections.ConfigDict()
  c.finetune.seed = 0
  c.finetune.batch_size = 64 if real else 16
  c.finetune.local_lrs = (3e-3, 1e-3)
  c.finetune.local_epochs = 5 if real else 4
  c.finetune.local_max_train = 0     # 0: the whole train split
  c.finetune.big_lrs = (1e-3, 3e-4)  # EfficientNet-Lite
  c.finetune.big_epochs = 3
  c.finetune.big_max_train = 450     # stratified subset of the train split
  # PTMs whose target cells use the linear probe instead of fine-tuning
  # (besides the feature-only ones, which cannot be fine-tuned).
  c.finetune.skip = () if real else ("efficientnet_lite0",)
  c.finetune.enabled = variant != "default"
  # Validation / training tasks fine-tuned too (same protocol as the
  # targets; their ground truth becomes fine-tuned accuracy once all their
  # cells are done): every validation task, the first N training tasks,
  # both only from `task_pools` (() = every pool). A store with any of them
  # gets its own cache key. `default` has the 24 validation tasks and the
  # first 90 training tasks of FINETUNED_TASK_POOLS (cells committed in
  # results/bench/default; 2,166 cells, 141 min of cell time on 2 cores:
  # docs/what_we_tried.md).
  c.finetune.val_tasks = variant == "default"
  c.finetune.train_tasks = 90 if variant == "default" else 0
  c.finetune.task_pools = FINETUNED_TASK_POOLS if variant == "default" else ()
  # The first N tasks of pools.extra_train are fine-tuned too. The
  # committed results/bench/default also holds the cells of the first 40
  # tasks of DEGRADED_POOLS (760 cells, 53 min of cell time), which
  # `default` does not use, and those of the 50 training tasks that
  # train_tasks=140 adds (950 cells, 81 min; both: docs/what_we_tried.md),
  # and those of the 16 large training and 6 large validation tasks of
  # tasks.num_large_train=24, num_large_val=12, large_train_tasks=16 (418
  # cells, 85 min), and those of the 11 further large Tamil validation tasks
  # that num_large_val=36 adds (209 cells, 35 min), and those of the 18
  # CIFAR-10 validation tasks (val_084-val_101) that pools.extra_val=
  # CIFAR10_VAL_POOLS, num_extra_val=12, num_large_extra_val=6 add to that
  # (342 cells, 37 min), and those of the 12 large CIFAR-10 training tasks
  # (train_0324-train_0335) that pools.extra_train=CIFAR10_TRAIN_POOLS,
  # num_large_extra_train=12, extra_train_tasks=12 add to that (228 cells,
  # 40 min), and those of the 40 training tasks of EXTRA_SCRIPT_POOLS
  # (train_0300-train_0339 of the default's tasks plus pools.extra_train=
  # EXTRA_SCRIPT_POOLS, num_extra_train=40, extra_train_tasks=40: 760
  # cells, 66 min; docs/what_we_tried.md).
  c.finetune.extra_train_tasks = 0
  # The first N large training tasks of `task_pools` are fine-tuned too
  # (large validation tasks are validation tasks: `val_tasks`).
  c.finetune.large_train_tasks = 0
  # Cell order (PTM names or families, earliest first; the rest last).
  c.finetune.order = ("mlp", "cnn_s", "efficientnet_lite0", "resnet_s",
                      "cnn_w", "efficientnet_lite1", "efficientnet_lite2")
  return c
