"""NCE (Tran et al., ICCV 2019): negative conditional entropy -H(Y | Z).

Z = argmax of the source probabilities (hard labels; the first maximum on
ties, as np.argmax). Matches thuml `NCE.py`, TLlib
`negative_conditional_entropy` and Model Spider `NCE.py`, including the
reference's 1e-20 inside the logarithm and its masking of empty source
classes. (pactran's `calculate_nce` is a *soft* variant; not this one.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spider_jax.baselines import _common


def first_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`np.argmax(x, axis=1)` (first maximum of each row) of non-negative rows.

  Arithmetic instead of XLA:CPU's argmax reduction (a scalar loop, ~20 ms
  for 5000 x 1000 float64 against ~2 ms here): with m the row max and
  r = 2^60 S / m, value_j = (x_j - m) r - j is exactly -j at a maximum and
  below -S elsewhere (a gap m - x_j > 0 is at least m 2^-54, so it scales
  to >= 64 S), so the row max of value is -(first maximum). An all-zero row
  gives 0, like numpy.

  Rows whose max lies in (0, `_common.MIN_PROB_ROW_MAX`), which the
  arithmetic cannot order, get r = NaN and come back not `ordered`. NaN
  and Inf entries are the caller's check: XLA:CPU's max reduction skips
  NaN at large sizes, so no flag computed from a row max can see them.
  The flag comes out of the same row max on purpose: using m outside it
  splits XLA:CPU's fused max-then-argmax into two passes (+1 ms at
  5000 x 1000), and a `jnp.where` inside it falls off the fast path (10x).

  Args:
    x: [N, S] finite and non-negative (the caller checks).

  Returns:
    (index [N] int32, ordered [N] bool); index is unspecified where
    ordered is False.
  """
  s = x.shape[1]
  lo = _common.MIN_PROB_ROW_MAX
  m = jnp.max(x, axis=1)
  # t > 0 exactly when 0 < m < lo (both factors lie in (0, 1] there; the
  # 2^900 keeps their product clear of underflow), else t = 0; sqrt(-t) is
  # then NaN or -0.
  t = (jnp.minimum(m, lo) * 2.0 ** 900) * (jnp.maximum(lo - m, 0.0)
                                           * 2.0 ** 900)
  r = (2.0 ** 60 * s) / jnp.maximum(m, lo) + jnp.sqrt(-t)
  cols = jax.lax.optimization_barrier(jnp.arange(s, dtype=x.dtype))
  v = jnp.max((x - m[:, None]) * r[:, None] - cols[None, :], axis=1)
  ordered = (v <= 0) & (v > -s)     # False for NaN and -inf (all-NaN rows)
  return (-jnp.where(ordered, v, 0.0)).astype(jnp.int32), ordered


def checked_first_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`first_argmax` of x and whether x is valid input to it.

  The check: a sum for NaN/Inf (XLA:CPU's max and min reductions skip NaN
  at these sizes, a sum cannot), a row min for negative values, and
  `first_argmax`'s ordered flag for row maxima in (0, MIN_PROB_ROW_MAX).

  Args:
    x: [N, S] source probabilities.

  Returns:
    (index [N] int32, valid [] bool); index is unspecified unless valid.
  """
  z, ordered = first_argmax(x)
  valid = (jnp.isfinite(jnp.sum(x)) & jnp.all(ordered)
           & jnp.all(jnp.min(x, axis=1) >= 0))
  return z, valid


def _core(theta, aux, key, *, num_classes):
  """NCE, or NaN when `checked_first_argmax` finds theta invalid."""
  del key
  n, s = theta.shape
  z, valid = checked_first_argmax(theta)
  joint = jnp.zeros((s, num_classes), theta.dtype).at[z, aux["labels"]].add(
      1.0 / n)                                               # [S, C], O(N)
  p_z = jnp.sum(joint, axis=1)
  used = p_z > 0
  cond = joint / jnp.where(used, p_z, 1.0)[:, None] + 1e-20
  h_z = jnp.sum(-cond * jnp.log(cond), axis=1)
  score = -jnp.sum(jnp.where(used, h_z * p_z, 0.0))
  return jnp.where(valid, score, jnp.nan)


KERNEL = _common.Kernel(_core, _common.default_prepare, input="source_probs",
                        checks_values=True)


def nce(source_probs, labels, *, key=None) -> jax.Array:
  """NCE score of one model.

  Args:
    source_probs: [N, S] source-class probabilities (only the argmax is used).
    labels: [N] integer target labels.
    key: unused.

  Returns:
    [] -H(Y | Z), higher = better (<= 0).
  """
  return _common.score_one(KERNEL, source_probs, labels, key=key, name="nce")
