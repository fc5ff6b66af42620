"""Training configs for the Model Spider ranker.

  python -m spider_jax.train --config=configs/train.py:VARIANT --workdir=DIR
  python -m spider_jax.train --config=configs/train.py:paper \
      --config.store=/path/to/store --workdir=runs/paper

Variants:
  default  the built-in synthetic store (generated in the workdir when
           config.store is empty; 320 training tasks), a d=64 ranker.
  tiny     a smaller synthetic run for CI and tests (160 training tasks,
           d=64).
  paper    the official configuration (model_spider_official.md section 9):
           d = 1024, one single-head post-LN block without FFN, dropout 0.1,
           Adam 2.5e-4 with per-epoch cosine decay to 5e-6, batch 16,
           30 epochs, k ~ U{0..10} re-ranking tokens during training.
  deep     paper optimiser, 2 pre-LN query blocks with 4 heads and FFN x4.
"""

import ml_collections


def model_config(variant: str) -> ml_collections.ConfigDict:
  """The `model` section (fields of spider_jax.model.ModelConfig)."""
  m = ml_collections.ConfigDict(dict(
      dim=1024, num_layers=1, num_heads=1, mlp_ratio=0, pre_norm=False,
      qkv_bias=False, dropout=0.1, ln_eps=1e-5, ptm_specific=True,
      task_token="prototype"))
  if variant in ("default", "tiny"):
    m.dim = 64
  if variant == "deep":
    m.update(num_layers=2, num_heads=4, mlp_ratio=4, pre_norm=True)
  return m


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  """Returns the training config of `variant` (see the module docstring)."""
  if variant not in ("default", "tiny", "paper", "deep"):
    raise ValueError(f"unknown variant {variant!r}; use default, tiny, paper "
                     "or deep.")
  c = ml_collections.ConfigDict()
  c.variant = variant
  # A FeatureStore directory; "" = the benchmark below, if any, else the
  # synthetic store generated in the workdir.
  c.store = ""
  # The offline benchmark (configs/bench.py) to build or reuse; variant ""
  # = none. configs/rank.py sets it for its benchmark variants.
  c.bench = ml_collections.ConfigDict({"variant": ""})
  # Which PTMs of the store form the zoo: "all", "fine_tuned" (those whose
  # target ground truth is fine-tuned accuracy) or "name,name,...".
  c.ptms = "all"
  # Pools whose tasks are left out of training, validation and ranking
  # ("pool,pool,..."; "" = none).
  c.exclude_pools = ""
  # Training/validation tasks left out by name ("task,task,..."; "" = none),
  # e.g. to train on a store's other tasks only.
  c.exclude_tasks = ""
  # Which training/validation tasks the ranker uses, by their ground truth:
  # "finetuned" (only those whose ground truth is fine-tuned accuracy, as
  # listed by a store built with finetune.val_tasks / train_tasks, see
  # configs/bench.py; an error if the store lists none), "any" (every
  # task), or "auto" ("finetuned" if the store lists any, else "any").
  # The targets are unaffected.
  c.ground_truth = "auto"
  # PTM-token initialisation: "normal" (N(0, 1), official) or "features"
  # (from each PTM's own features on training images; train.py
  # ptm_feature_tokens).
  c.ptm_init = "normal"
  # Features that make the task tokens: "" (or its name) = the store's
  # generic encoder, or the name of a PTM of the store, whose stored
  # features then serve as the generic features (its forward pass is what
  # a new task costs).
  c.encoder = ""
  c.synthetic = ml_collections.ConfigDict(dict(seed=0, num_train=160))
  c.seed = 0
  c.model = model_config(variant)
  c.batch_size = 16
  c.epochs = 30
  c.lr = 2.5e-4
  c.lr_min = 5e-6
  c.k_max = 10           # Training draws k ~ U{0..k_max} per batch.
  c.min_keep = 0.5       # Each class keeps a random fraction >= this.
  # Position weights of the ranking loss (spider_jax.losses): "uniform"
  # (official) or "hyperbolic" (1 / (1 + rank), the metric's weigher).
  c.loss_weighting = "uniform"
  # Accuracy gap (ground-truth units, e.g. points) below which the loss
  # leaves two PTMs unordered; 0 = exact ties only (official).
  c.loss_tie_margin = 0.0
  c.keep_latest = 2      # Checkpoints: N latest + the best on validation.
  c.eval_batch_size = 16
  c.stop_after_steps = -1  # > 0: stop early (simulates a preemption).
  # > 0: loss, gradients and validation scores are computed this many tasks
  # at a time and summed in a fixed order (train.exact_loss_and_grad), so a
  # run gives the same floats on any device layout; needs batch_size /
  # devices to be a multiple. 0 = one batched pass (faster; layouts agree
  # to rounding).
  c.exact_chunk = 0
  if variant == "default":
    c.synthetic.num_train = 320
    c.epochs = 60
    c.lr = 3e-3
    c.k_max = 2
    c.batch_size = 8
    c.eval_batch_size = 8
  if variant == "tiny":
    c.synthetic.num_train = 160
    c.epochs = 40
    c.lr = 2e-3
    c.k_max = 2
    c.batch_size = 8
    c.eval_batch_size = 8
  return c
