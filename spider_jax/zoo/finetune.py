"""Ground-truth transfer measures: full fine-tuning and linear probing.

`finetune` trains all weights of a PTM's backbone plus a new linear head
(AdamW + cosine schedule, one jitted step reused across the learning-rate
grid), picks the learning rate with the best validation accuracy and reports
the test accuracy of that run. EfficientNet BatchNorm statistics stay frozen
(see `efficientnet_lite`).

`linear_probe` fits softmax regression on frozen features: features are
standardised with training statistics, then full-batch Adam runs for a fixed
number of steps (cosine-decayed learning rate, so the fit settles)
for every L2 strength at once (`jax.vmap` over the grid); the
strength with the best validation accuracy gives the test accuracy.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from spider_jax.zoo import loop
from spider_jax.zoo import registry as registry_lib

__all__ = ["FineTuneNet", "TRAINABLE", "finetune", "linear_probe",
           "linear_probe_report"]


class FineTuneNet(nnx.Module):
  """A PTM backbone (anything with `features`) plus a new linear head."""

  def __init__(self, backbone: nnx.Module, feature_dim: int,
               num_classes: int, *, rngs: nnx.Rngs):
    self.backbone = backbone
    self.new_head = nnx.Linear(feature_dim, num_classes, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    return self.backbone.features(x)

  def logits(self, x: jax.Array) -> jax.Array:
    """x: preprocessed [B, ...] -> [B, num_classes]."""
    return self.new_head(self.backbone.features(x))


# Trained in `finetune`: every Param except the PTM's own source-class head
# (`fc` for EfficientNet, `head` for local archs), which the loss never uses.
TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.Any(nnx.PathContains("fc"),
                                               nnx.PathContains("head"))))


@functools.lru_cache(maxsize=32)
def _trainer(graphdef: nnx.GraphDef, weight_decay: float) -> loop.Trainer:
  """One Trainer (jitted steps) per model structure and weight decay.

  GraphDefs compare structurally, so fine-tuning the same PTM with the same
  head width on another task reuses the compiled steps (median
  EfficientNet-Lite cell in results/bench/default/finetune_cells.csv: 23 s
  on the validation tasks, whose head widths are mostly new, 17 s on the
  training tasks, whose widths mostly repeat).
  Callers order their work to reuse recent entries. Evicted entries'
  executables stay mapped until `release_compiled_code` clears them.
  """
  return loop.Trainer(graphdef, weight_decay=weight_decay)


def _memory_maps() -> tuple[int, int] | None:
  """(memory maps this process holds, the kernel's limit); None off Linux."""
  try:
    with open("/proc/self/maps", "rb") as f:
      used = sum(1 for _ in f)
    with open("/proc/sys/vm/max_map_count") as f:
      return used, int(f.read())
  except (OSError, ValueError):
    return None


def release_compiled_code(fraction: float = 0.5) -> bool:
  """Drops every compiled JAX executable once memory maps near the limit.

  An executable stays mapped after its jitted function is gone (also when
  `_trainer` evicts one) until `jax.clear_caches()`. Fine-tuning the
  default benchmark's training tasks failed with "LLVM compilation error:
  Cannot allocate memory" after 115 cells, at Linux's default limit of
  65,530 maps (measured). Above `fraction` of the limit this clears JAX's
  caches and `_trainer`'s, so later cells recompile.

  Returns:
    True if it cleared.
  """
  maps = _memory_maps()
  if maps is None or maps[0] < fraction * maps[1]:
    return False
  _trainer.cache_clear()
  jax.clear_caches()
  return True


def _preprocess_all(pre, images: np.ndarray, batch_size: int = 256
                    ) -> np.ndarray:
  return registry_lib.extract_features(jax.jit(pre), images, batch_size)


def finetune(ptm: registry_lib.PTMSpec | registry_lib.LoadedPTM,
             train_images: np.ndarray, train_labels: np.ndarray,
             val_images: np.ndarray, val_labels: np.ndarray,
             test_images: np.ndarray, test_labels: np.ndarray,
             lrs: Sequence[float] = (1e-3, 3e-4), epochs: int = 5,
             seed: int = 0, *, batch_size: int = 64,
             weight_decay: float = 1e-4, warmup_steps: int = 10,
             num_classes: int | None = None) -> dict[str, Any]:
  """Fine-tunes all weights of `ptm` with a new head, per learning rate.

  It first calls `release_compiled_code()`, which clears JAX's compilation
  caches (process-wide) once the process holds half the kernel's memory-map
  limit, so that callers looping over many cells (spider_jax.groundtruth,
  spider_jax.zoo.bench) do not crash.

  Args:
    ptm: a spec (loaded here) or an already loaded PTM; must be
      `fine_tunable`.
    train_images, val_images, test_images: uint8 [N, H, W, C] (converted by
      the PTM's preprocessing, e.g. 28x28 gray -> 64 px RGB).
    train_labels, val_labels, test_labels: int [N].
    lrs: learning-rate grid (peak of the cosine schedule).
    epochs: epochs per learning rate.
    seed: head init key and shuffle key (same shuffle for every lr).
    batch_size: training batch size.
    weight_decay: AdamW weight decay.
    warmup_steps: linear warmup.
    num_classes: default max label + 1 over all splits.

  Returns:
    dict(test_acc: test accuracy at the lr with the best val accuracy,
    best_lr, val_acc: {lr: acc}, test_acc_per_lr: {lr: acc},
    seconds: total wall time incl. loading/preprocessing/compiling,
    seconds_per_lr: {lr: training seconds}, ptm: name, num_train, epochs).
  """
  t_start = time.perf_counter()
  release_compiled_code()
  loaded = ptm.load() if isinstance(ptm, registry_lib.PTMSpec) else ptm
  spec = loaded.spec
  if not spec.fine_tunable or loaded.model is None:
    raise ValueError(f"{spec.name} is feature-only; use linear_probe")
  ys = [np.asarray(v, np.int32) for v in (train_labels, val_labels,
                                          test_labels)]
  num_classes = int(num_classes or max(int(y.max()) for y in ys) + 1)
  x_tr, x_va, x_te = (_preprocess_all(loaded.preprocess, np.asarray(x))
                      for x in (train_images, val_images, test_images))
  key = jax.random.key(seed)
  k_head, k_shuffle = jax.random.split(key)
  net = FineTuneNet(loaded.model, spec.feature_dim, num_classes,
                    rngs=nnx.Rngs(params=k_head))
  graphdef, params0, rest = nnx.split(net, TRAINABLE, ...)
  trainer = _trainer(graphdef, float(weight_decay))
  val_acc, test_acc, secs = {}, {}, {}
  for lr in lrs:
    t0 = time.perf_counter()
    params, _ = trainer.fit(params0, rest, x_tr, ys[0], epochs=epochs,
                            batch_size=batch_size, lr=lr, key=k_shuffle,
                            warmup_steps=warmup_steps)
    jax.block_until_ready(params)
    secs[lr] = time.perf_counter() - t0
    val_acc[lr] = trainer.accuracy(params, rest, x_va, ys[1])
    test_acc[lr] = trainer.accuracy(params, rest, x_te, ys[2])
  best = max(lrs, key=lambda lr: (val_acc[lr], -list(lrs).index(lr)))
  return {
      "ptm": spec.name, "test_acc": test_acc[best], "best_lr": best,
      "val_acc": val_acc, "test_acc_per_lr": test_acc,
      "seconds": time.perf_counter() - t_start, "seconds_per_lr": secs,
      "num_train": int(len(x_tr)), "epochs": epochs,
      "batch_size": batch_size,
  }


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def probe_fit(x, y, l2, num_classes: int, steps: int, lr: float,
              row_mask=None, class_bias=None):
  """Softmax regression for one L2 strength: x [N, D], y [N] -> (W, b).

  Full-batch Adam, lr cosine-decayed over `steps`, zero init. Optional
  `row_mask` [N] (1 = real row; padding rows are ignored) and `class_bias`
  [C] (-1e9 for classes a padded task does not have) let padded tasks be
  fitted in one vmapped batch (groundtruth.probe_batch).
  """
  d = x.shape[1]
  params = (jnp.zeros((d, num_classes)), jnp.zeros((num_classes,)))
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
  m = jnp.ones(x.shape[:1]) if row_mask is None else row_mask
  bias = 0.0 if class_bias is None else class_bias
  n = jnp.maximum(jnp.sum(m), 1.0)

  def loss_fn(p):
    w, b = p
    ce = optax.softmax_cross_entropy_with_integer_labels(x @ w + b + bias, y)
    return jnp.sum(ce * m) / n + 0.5 * l2 * jnp.sum(w * w)

  def body(carry, _):
    p, s = carry
    g = jax.grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None,
                                length=steps)
  return params


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _probe_grid(x_tr, y_tr, x_va, y_va, x_te, y_te, l2s, num_classes: int,
                steps: int, lr: float):
  fit = jax.vmap(lambda l2: probe_fit(x_tr, y_tr, l2, num_classes, steps,
                                       lr))
  w, b = fit(l2s)                                    # [G, D, C], [G, C]

  def acc(x, y):
    pred = jnp.argmax(jnp.einsum("nd,gdc->gnc", x, w) + b[:, None], -1)
    return jnp.mean(pred == y[None], axis=1)         # [G]

  return acc(x_va, y_va), acc(x_te, y_te)


def linear_probe_report(features_train, y_train, features_val, y_val,
                        features_test, y_test,
                        l2_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1,
                                                    1.0),
                        *, steps: int = 300, lr: float = 0.01,
                        num_classes: int | None = None) -> dict[str, Any]:
  """Like `linear_probe` but returns per-L2 val/test accuracies too."""
  f_tr = np.asarray(features_train, np.float32)
  mu = f_tr.mean(0)
  sd = f_tr.std(0)
  # Floor tiny stds (dead/constant units) so they cannot amplify noise.
  sd = np.maximum(sd, 1e-2 * float(sd.mean()) + 1e-12)
  norm = lambda f: (np.asarray(f, np.float32) - mu) / sd
  ys = [np.asarray(y, np.int32) for y in (y_train, y_val, y_test)]
  num_classes = int(num_classes or max(int(y.max()) for y in ys) + 1)
  va, te = _probe_grid(norm(f_tr), ys[0], norm(features_val), ys[1],
                       norm(features_test), ys[2],
                       jnp.asarray(l2_grid, jnp.float32),
                       num_classes=num_classes, steps=steps, lr=lr)
  va, te = np.asarray(va), np.asarray(te)
  best = int(np.argmax(va))                 # first max: smallest index wins
  return {"test_acc": float(te[best]), "best_l2": float(l2_grid[best]),
          "val_acc": dict(zip(map(float, l2_grid), map(float, va))),
          "test_acc_per_l2": dict(zip(map(float, l2_grid), map(float, te)))}


def linear_probe(features_train, y_train, features_val, y_val, features_test,
                 y_test, l2_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1,
                                                     1.0),
                 **kwargs) -> float:
  """Softmax-regression probe on frozen features; L2 selected on val.

  Args:
    features_train, features_val, features_test: [N, D] features.
    y_train, y_val, y_test: [N] int labels.
    l2_grid: L2 strengths (penalty 0.5 * l2 * ||W||^2 on standardised
      features), all fitted at once with `vmap`.
    **kwargs: `steps` (300 full-batch Adam steps), `lr` (0.01, peak),
      `num_classes`.

  Returns:
    Test accuracy of the L2 strength with the best validation accuracy.
  """
  return linear_probe_report(features_train, y_train, features_val, y_val,
                             features_test, y_test, l2_grid,
                             **kwargs)["test_acc"]
