r"""Config for training one local-zoo model (`python -m spider_jax.zoo.train`).

Variants via the config-file argument, e.g.

  python -m spider_jax.zoo.train \
      --config=configs/zoo.py:arch=resnet_s,source=sklearn_digits \
      --workdir=/tmp/zoo/resnet_s@sklearn_digits --config.epochs=10

Measured on 2 CPU cores (sklearn digits, 1617 train images, 5 epochs):
see spider_jax/zoo/README_SECTION.md.
"""

import ml_collections


def _parse(arg: str | None) -> dict[str, str]:
  out = {}
  for part in (arg or "").split(","):
    if part:
      k, _, v = part.partition("=")
      out[k.strip()] = v.strip()
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the training config; `arg` = "arch=...,source=..."."""
  a = _parse(arg)
  config = ml_collections.ConfigDict()
  config.arch = a.get("arch", "cnn_s")  # cnn_s|cnn_w|resnet_s|mlp|vit_t
  config.source = a.get("source", "sklearn_digits")
  config.num_classes = ml_collections.config_dict.placeholder(int)
  config.epochs = 10
  config.batch_size = 128
  config.lr = 3e-3
  config.weight_decay = 1e-4
  config.warmup_steps = 20
  config.seed = int(a.get("seed", 0))
  config.holdout_fraction = 0.1
  return config
