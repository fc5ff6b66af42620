"""Linear-probe accuracy: softmax regression on frozen features.

The rows are split once (by `key`) into a fit part and a held-out part
(`holdout` fraction, at least one row). Features are standardised with
the fit part's statistics. For every L2 strength in `l2_grid` a softmax
regression min_W,b CE(X W + b, y) + l2/2 |W|^2 is fitted with
`optax.lbfgs` for at most `steps` iterations, stopping early with
scipy L-BFGS-B's default tests (max |gradient| <= 1e-5, or a relative
decrease of the loss <= 1e7 * float64 eps). The strengths are fitted one
after the other (`lax.map`): vmapping them makes XLA broadcast X once per
strength in every matrix product, which measured 3x slower on CPU. The
score is the best held-out accuracy over the grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spider_jax.baselines import _common

DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


_GTOL = 1e-5                        # scipy L-BFGS-B `pgtol` default
_FTOL = 1e7 * float(np.finfo(np.float64).eps)   # scipy `factr` default


def _fit_softmax(x, y1h, l2, steps):
  """L-BFGS fit of an L2-regularised softmax regression; ((W, b), steps)."""
  d, c = x.shape[1], y1h.shape[1]

  def loss(params):
    w, b = params
    logits = x @ w + b
    ce = -jnp.mean(jnp.sum(y1h * jax.nn.log_softmax(logits), axis=1))
    return ce + 0.5 * l2 * jnp.sum(w * w)

  params = (jnp.zeros((d, c), x.dtype), jnp.zeros((c,), x.dtype))
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def cond(carry):
    i, _, _, done = carry
    return (i < steps) & ~done

  def step(carry):
    i, params, state, _ = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                value_fn=loss)
    params = optax.apply_updates(params, updates)
    new_value = optax.tree_utils.tree_get(state, "value")
    new_grad = optax.tree_utils.tree_get(state, "grad")
    gmax = optax.tree_utils.tree_max(
        jax.tree.map(jnp.abs, new_grad))
    scale = jnp.maximum(jnp.maximum(jnp.abs(value), jnp.abs(new_value)), 1.0)
    done = (gmax <= _GTOL) | ((value - new_value) <= _FTOL * scale)
    return i + 1, params, state, done

  i, params, _, _ = jax.lax.while_loop(
      cond, step, (0, params, opt.init(params), False))
  return params, i


def _core(f, aux, key, *, num_classes, n_fit, l2_grid, steps):
  perm = jax.random.permutation(key, f.shape[0])
  x = f[perm]
  y = _common.onehot(aux["labels"][perm], num_classes, f.dtype)
  xf, yf, xv, yv = x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:]
  mu = jnp.mean(xf, axis=0)
  sd = jnp.std(xf, axis=0)
  sd = jnp.where(sd > 0, sd, 1.0)
  xf, xv = (xf - mu) / sd, (xv - mu) / sd

  def acc(l2):
    (w, b), _ = _fit_softmax(xf, yf, l2, steps)
    pred = jnp.argmax(xv @ w + b, axis=1)
    return jnp.mean((pred == jnp.argmax(yv, axis=1)).astype(f.dtype))

  return jnp.max(jax.lax.map(acc, jnp.asarray(l2_grid, f.dtype)))


def _prepare(labels, num_classes, *, holdout=0.2, l2_grid=DEFAULT_L2_GRID,
             steps=100):
  n = labels.shape[0]
  n_val = max(1, int(round(holdout * n)))
  if n - n_val < 2:
    raise _common.BaselineError(f"linear probe needs >= 3 rows, got N={n}.")
  return _common.basic_aux(labels, num_classes), {
      "num_classes": num_classes, "n_fit": n - n_val,
      "l2_grid": tuple(float(v) for v in l2_grid), "steps": int(steps)}


KERNEL = _common.Kernel(_core, _prepare, needs_key=True)


def linear_probe(features, labels, *, key, holdout: float = 0.2,
                 l2_grid=DEFAULT_L2_GRID, steps: int = 100) -> jax.Array:
  """Held-out accuracy of an L2-regularised softmax regression.

  Args:
    features: [N, D] penultimate features.
    labels: [N] integer class ids.
    key: PRNG key for the fit/held-out split (required).
    holdout: held-out fraction.
    l2_grid: L2 strengths tried (the best is reported).
    steps: maximum L-BFGS iterations per strength.

  Returns:
    [] best held-out accuracy in [0, 1], higher = better.
  """
  return _common.score_one(KERNEL, features, labels, key=key,
                           name="linear_probe", holdout=holdout,
                           l2_grid=tuple(l2_grid), steps=steps)
