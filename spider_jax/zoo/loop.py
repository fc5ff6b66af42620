"""Shared, deterministic supervised training loop for NNX classifiers.

Used both to train the local zoo (`spider_jax.zoo.train`) and to fine-tune
PTMs (`spider_jax.zoo.finetune`). The model is split once into
`(graphdef, params, rest)`; the step is a plain `jax.jit` of a pure function
(`rest`, e.g. frozen BatchNorm statistics, is an input, never updated). The
learning rate is an argument of the step (`optax.inject_hyperparams`), so a
sweep over learning rates and the cosine schedule reuse one compilation.

Determinism: the only randomness is the per-epoch shuffle, drawn from
`jax.random.fold_in(key, epoch)`; with the same key, data and XLA build the
result is bit-identical on CPU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = ["Trainer", "cosine_lr"]


def cosine_lr(base_lr: float, step: int, total: int,
              warmup: int = 0) -> float:
  """Linear warmup then cosine decay to 0 (host-side, per step)."""
  if warmup and step < warmup:
    return base_lr * (step + 1) / warmup
  t = (step - warmup) / max(1, total - warmup)
  return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, t)))


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
  if len(x) == n:
    return x
  pad = np.zeros((n - len(x),) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad])


@dataclasses.dataclass
class Trainer:
  """Jitted train/eval steps for one model structure.

  Attributes:
    graphdef: NNX graph definition of the model (must have `logits`).
    weight_decay: AdamW decoupled weight decay.
    grad_clip: global-norm clip (None: off).
  """

  graphdef: nnx.GraphDef
  weight_decay: float = 1e-4
  grad_clip: float | None = 1.0

  def __post_init__(self):
    chain = [optax.clip_by_global_norm(self.grad_clip)] if self.grad_clip \
        else []
    self.tx = optax.chain(*chain, optax.inject_hyperparams(optax.adamw)(
        learning_rate=0.0, weight_decay=self.weight_decay))
    graphdef, tx = self.graphdef, self.tx

    def loss_fn(params, rest, x, y):
      model = nnx.merge(graphdef, params, rest)
      logits = model.logits(x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return jnp.mean(loss)

    def step(params, opt_state, rest, x, y, lr):
      loss, grads = jax.value_and_grad(loss_fn)(params, rest, x, y)
      opt_state[-1].hyperparams["learning_rate"] = jnp.asarray(
          lr, jnp.float32)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    def predict(params, rest, x):
      return jnp.argmax(nnx.merge(graphdef, params, rest).logits(x), -1)

    self._step = jax.jit(step, donate_argnums=(0, 1))
    self._predict = jax.jit(predict)

  def init_opt(self, params):
    return self.tx.init(params)

  def fit(self, params, rest, x: np.ndarray, y: np.ndarray, *,
          epochs: int, batch_size: int, lr: float, key: jax.Array,
          warmup_steps: int = 0, input_fn: Callable | None = None,
          log_fn: Callable[[int, float], None] | None = None):
    """Trains `params` with AdamW + cosine schedule.

    Args:
      params: `nnx.Param` state (a copy is made, the input is not donated).
      rest: the other state (e.g. BatchStat), fixed.
      x: [N, ...] training inputs (numpy, already preprocessed).
      y: [N] int labels.
      epochs: full passes; each drops the last N % batch_size samples of a
        fresh permutation so every step has a static shape.
      batch_size: capped at N.
      lr: peak learning rate.
      key: shuffle key; epoch e uses `fold_in(key, e)`.
      warmup_steps: linear warmup steps.
      input_fn: optional host-side transform of each batch of x.
      log_fn: called with (epoch, mean loss) after each epoch.

    Returns:
      (params, mean loss of the last epoch).
    """
    params = jax.tree.map(jnp.copy, params)
    opt_state = self.init_opt(params)
    n = len(x)
    bs = min(batch_size, n)
    steps_per_epoch = n // bs
    total = epochs * steps_per_epoch
    y = np.asarray(y, np.int32)
    t, last = 0, float("nan")
    for epoch in range(epochs):
      perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch),
                                               n))
      losses = []
      for i in range(steps_per_epoch):
        idx = perm[i * bs:(i + 1) * bs]
        xb = x[idx] if input_fn is None else input_fn(x[idx])
        params, opt_state, loss = self._step(
            params, opt_state, rest, xb, y[idx],
            cosine_lr(lr, t, total, warmup_steps))
        losses.append(loss)
        t += 1
      last = float(jnp.mean(jnp.stack(losses)))
      if log_fn is not None:
        log_fn(epoch, last)
    return params, last

  def predict(self, params, rest, x: np.ndarray, *,
              batch_size: int = 256) -> np.ndarray:
    """[N, ...] -> [N] argmax predictions (fixed-shape padded batches)."""
    out = []
    for i in range(0, len(x), batch_size):
      xb = x[i:i + batch_size]
      pred = self._predict(params, rest, _pad_to(xb, batch_size))
      out.append(np.asarray(pred)[:len(xb)])
    return np.concatenate(out) if out else np.zeros((0,), np.int32)

  def accuracy(self, params, rest, x: np.ndarray, y: np.ndarray, **kw
               ) -> float:
    return float(np.mean(self.predict(params, rest, x, **kw)
                         == np.asarray(y)))
