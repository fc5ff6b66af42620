r"""Train one local-zoo architecture on one source dataset and save it.

Library use (arrays in, model + metrics out):

  model, info = train_arrays("cnn_s", images, labels, epochs=5, seed=0)
  ckpt.save(workdir, model, info)

CLI (absl flags + ml_collections config, see `configs/zoo.py`):

  python -m spider_jax.zoo.train --config=configs/zoo.py:arch=cnn_s \
      --workdir=/tmp/zoo/cnn_s@sklearn_digits --config.epochs=5

Sources are resolved by `load_source(name)`: `sklearn_digits` (scikit-learn's
bundled 8x8 digits upsampled to 28x28) or a pretraining pool of
`spider_jax.data.builders` (e.g. `font_latin_upper_pretrain`, or without the
`_pretrain` suffix), read from the cached TFDS sources.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from spider_jax.zoo import archs
from spider_jax.zoo import ckpt
from spider_jax.zoo import loop

__all__ = ["sklearn_digits", "load_source", "split_holdout", "train_arrays",
           "train_and_save"]


def sklearn_digits(size: int = 28) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled digits as uint8 [1797, size, size, 1] + labels.

  The 8x8 images (values 0..16) are scaled to 0..255 and resized bilinearly
  with PIL.
  """
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ModuleNotFoundError(
        "sklearn_digits needs the PyPI package scikit-learn") from e
  from PIL import Image  # pylint: disable=g-import-not-at-top
  d = datasets.load_digits()
  imgs = (d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  out = np.stack([np.asarray(Image.fromarray(im).resize(
      (size, size), Image.BILINEAR)) for im in imgs])
  return out[..., None], d.target.astype(np.int32)


def load_source(name: str) -> tuple[np.ndarray, np.ndarray]:
  """Source dataset by name -> (uint8 [N, 28, 28, 1], int labels [N])."""
  if name == "sklearn_digits":
    return sklearn_digits()
  from spider_jax.data import builders  # pylint: disable=g-import-not-at-top
  pools = builders.benchmark_pools(roles=("pretrain",))  # cached TFDS pools
  pool = pools.get(name) or pools.get(f"{name}_pretrain")
  if pool is None:
    raise ValueError(f"unknown source {name!r}; use sklearn_digits or a "
                     f"pretraining pool: {sorted(pools)}")
  return pool.images, pool.labels.astype(np.int32)


def split_holdout(images: np.ndarray, labels: np.ndarray, fraction: float,
                  key: jax.Array):
  """Deterministic random split -> (x_train, y_train, x_hold, y_hold)."""
  n = len(images)
  perm = np.asarray(jax.random.permutation(key, n))
  k = int(round(n * fraction))
  hold, train = perm[:k], perm[k:]
  return images[train], labels[train], images[hold], labels[hold]


def train_arrays(arch: str, images: np.ndarray, labels: np.ndarray, *,
                 num_classes: int | None = None, epochs: int = 5,
                 batch_size: int = 128, lr: float = 3e-3,
                 weight_decay: float = 1e-4, warmup_steps: int = 20,
                 seed: int = 0, holdout_fraction: float = 0.1,
                 eval_images: np.ndarray | None = None,
                 eval_labels: np.ndarray | None = None,
                 source: str = "arrays", verbose: bool = False
                 ) -> tuple[nnx.Module, dict[str, Any]]:
  """Trains `arch` from scratch on arrays.

  Args:
    arch: a key of `archs.ARCHS`.
    images: uint8 [N, 28, 28, 1].
    labels: int [N] in [0, num_classes).
    num_classes: head width; default max(label) + 1.
    epochs, batch_size, lr, weight_decay, warmup_steps: AdamW + cosine.
    seed: the single source of randomness: `key = jax.random.key(seed)`,
      split into init / holdout-split / shuffle keys.
    holdout_fraction: part of the data held out for the reported accuracy
      when `eval_images` is not given (0 disables it).
    eval_images, eval_labels: optional explicit evaluation set.
    source: name recorded in the metadata.
    verbose: print the loss per epoch.

  Returns:
    (model, metadata dict: arch, source, input spec, feature_dim,
     num_classes, seed, accuracy, train/eval sizes, hyperparameters,
     seconds).
  """
  images = np.asarray(images)
  labels = np.asarray(labels, np.int32)
  if images.dtype != np.uint8 or images.shape[1:] != archs.INPUT_SHAPE:
    raise ValueError(f"expected uint8 [N, 28, 28, 1], got {images.dtype} "
                     f"{images.shape}")
  num_classes = int(num_classes or labels.max() + 1)
  key = jax.random.key(seed)
  k_init, k_split, k_shuffle = jax.random.split(key, 3)
  if eval_images is None and holdout_fraction > 0:
    x_tr, y_tr, x_ev, y_ev = split_holdout(images, labels, holdout_fraction,
                                           k_split)
  else:
    x_tr, y_tr = images, labels
    x_ev = None if eval_images is None else np.asarray(eval_images)
    y_ev = None if eval_labels is None else np.asarray(eval_labels, np.int32)
  model = archs.build(arch, num_classes, k_init)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  trainer = loop.Trainer(graphdef, weight_decay=weight_decay)
  log = (lambda e, l: print(f"epoch {e}: loss {l:.4f}")) if verbose else None
  t0 = time.perf_counter()
  params, last_loss = trainer.fit(
      params, rest, x_tr, y_tr, epochs=epochs, batch_size=batch_size, lr=lr,
      key=k_shuffle, warmup_steps=warmup_steps, log_fn=log)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - t0
  acc = (trainer.accuracy(params, rest, x_ev, y_ev)
         if x_ev is not None and len(x_ev) else None)
  train_acc = trainer.accuracy(params, rest, x_tr, y_tr)
  model = nnx.merge(graphdef, params, rest)
  meta = {
      "arch": arch,
      "source": source,
      "input": {"height": 28, "width": 28, "channels": 1, "dtype": "uint8",
                "normalisation": "x / 127.5 - 1"},
      "feature_dim": int(model.feature_dim),
      "feature_tap": "features (penultimate, before the linear head)",
      "num_classes": num_classes,
      "seed": seed,
      "accuracy": acc,
      "accuracy_split": ("explicit eval set" if eval_images is not None
                         else f"holdout {holdout_fraction}"),
      "train_accuracy": train_acc,
      "final_train_loss": last_loss,
      "num_train": int(len(x_tr)),
      "num_eval": 0 if x_ev is None else int(len(x_ev)),
      "epochs": epochs, "batch_size": batch_size, "lr": lr,
      "weight_decay": weight_decay, "optimizer": "adamw+cosine",
      "train_seconds": seconds,
      "jax_version": jax.__version__,
  }
  return model, meta


def train_and_save(config, workdir: str, images: np.ndarray | None = None,
                   labels: np.ndarray | None = None) -> dict[str, Any]:
  """Trains per `config` (see configs/zoo.py) and saves under `workdir`."""
  if images is None:
    images, labels = load_source(config.source)
  model, meta = train_arrays(
      config.arch, images, labels, num_classes=config.get("num_classes"),
      epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
      weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
      seed=config.seed, holdout_fraction=config.holdout_fraction,
      source=config.source, verbose=True)
  ckpt.save(workdir, model, meta)
  return meta


def _write_json_atomic(path: str, obj) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def main(argv):  # pragma: no cover - exercised via the CLI
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  meta = train_and_save(config, os.path.join(workdir, "checkpoint"))
  _write_json_atomic(os.path.join(workdir, "config.json"),
                     json.loads(config.to_json()))
  print(json.dumps(meta, indent=2, sort_keys=True))

if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Zoo training config.",
                                  lock_config=True)
  absl_flags.DEFINE_string("workdir", None, "Output directory.")
  absl_flags.mark_flags_as_required(["config", "workdir"])
  jax.config.config_with_absl()
  app.run(main)
