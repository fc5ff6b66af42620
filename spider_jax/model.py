"""The fitness transformer of Model Spider, in Flax NNX.

Each PTM m has a learned token theta_m. A task is a set of tokens: its
projected class prototypes U (generic encoder) and, when re-ranking, the PTM's
own projected prototypes H_m. The official block scores a (task, PTM) pair by
letting theta_m attend over [theta_m, U, H_m] and reading out theta_m's row:

  x   = theta_m
  o   = softmax(mask(q(x) . k([x, U, H_m]) / sqrt(d_k))) v([x, U, H_m])
  x   = LayerNorm(x + Dropout(fc(o)))                     (post-LN, no FFN)
  s_m = Dense(LayerNorm(x))

Only theta_m's output row is ever read, so this module computes attention for
that single query and never materialises the L x L matrix: U is projected once
per task and shared by all PTMs, each pair costs O(L d + d^2). PTM tokens
never attend to each other; pairs are independent (vmap over PTMs and tasks).
The keys and values are linear in the tokens, so H_m is never projected to d:
logits are h . (W_h (W_k q)) and values ((p h) W_h) W_v, which is the same
number with Dm*d instead of Ph*Dm*d work per re-ranked pair.

`full_scores` is the literal per-PTM full-attention formulation (the official
code's), kept as the reference that tests and benchmarks compare against.

The `deep` options stack `num_layers` such query blocks (multi-head, FFN,
pre-LN on the query stream); task tokens are keys/values of every layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

NEG_INF = -1e9  # Official masked_fill value; -inf would NaN a fully padded row.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture options (see configs/ for the named variants).

  Attributes:
    dim: d, width of PTM tokens and projected task tokens (paper: 1024).
    num_layers: query blocks (paper: 1).
    num_heads: attention heads (paper: 1).
    mlp_ratio: FFN hidden = mlp_ratio * dim; 0 = no FFN (paper).
    pre_norm: pre-LN on the query stream instead of post-LN (paper: False).
    qkv_bias: biases on q/k/v projections (paper: False).
    dropout: dropout on attention probs and block outputs (paper: 0.1).
    ln_eps: LayerNorm epsilon (PyTorch default 1e-5).
    ptm_specific: build per-PTM projections for re-ranking tokens.
  """
  dim: int = 1024
  num_layers: int = 1
  num_heads: int = 1
  mlp_ratio: int = 0
  pre_norm: bool = False
  qkv_bias: bool = False
  dropout: float = 0.1
  ln_eps: float = 1e-5
  ptm_specific: bool = True


def _uniform(key, shape, bound):
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with PyTorch defaults (eps 1e-5)."""

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale + self.bias


class QueryBlock(nnx.Module):
  """One attention block whose only query is the PTM token."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h = cfg.dim, cfg.num_heads
    if d % h:
      raise ValueError(f"dim {d} is not divisible by num_heads {h}.")
    dh = d // h
    self.cfg = cfg
    std = math.sqrt(2.0 / (d + dh))  # Official: Normal(0, sqrt(2/(d+d_k))).
    self.wq = nnx.Param(std * jax.random.normal(rngs.params(), (d, h, dh)))
    self.wk = nnx.Param(std * jax.random.normal(rngs.params(), (d, h, dh)))
    self.wv = nnx.Param(std * jax.random.normal(rngs.params(), (d, h, dh)))
    if cfg.qkv_bias:
      self.bq = nnx.Param(jnp.zeros((h, dh)))
      self.bk = nnx.Param(jnp.zeros((h, dh)))
      self.bv = nnx.Param(jnp.zeros((h, dh)))
    # Official fc: xavier_normal weight, PyTorch default bias.
    self.wo = nnx.Param(math.sqrt(2.0 / (d + d)) *
                        jax.random.normal(rngs.params(), (h, dh, d)))
    self.bo = nnx.Param(_uniform(rngs.params(), (d,), 1 / math.sqrt(d)))
    self.ln_attn = LayerNorm(d, cfg.ln_eps)
    if cfg.mlp_ratio:
      hid = cfg.mlp_ratio * d
      self.w1 = nnx.Param(_uniform(rngs.params(), (d, hid), 1 / math.sqrt(d)))
      self.b1 = nnx.Param(jnp.zeros((hid,)))
      self.w2 = nnx.Param(_uniform(rngs.params(), (hid, d),
                                   1 / math.sqrt(hid)))
      self.b2 = nnx.Param(jnp.zeros((d,)))
      self.ln_mlp = LayerNorm(d, cfg.ln_eps)

  def __call__(self, x, u, u_mask, h=None, h_mask=None, h_w=None, h_b=None,
               rng=None):
    """Updates the query state of one (task, PTM) pair.

    Args:
      x: [d] query state (PTM token at the first block).
      u: [P, d] projected task tokens; u_mask: [P] bool.
      h: [Ph, Dm] raw PTM-specific prototypes or None; h_mask: [Ph] bool.
      h_w: [Dm, d], h_b: [d] that PTM's projection of h.
      rng: dropout key or None (deterministic).

    Returns:
      [d] new query state.
    """
    cfg = self.cfg
    xn = self.ln_attn(x) if cfg.pre_norm else x
    q = jnp.einsum("d,dhe->he", xn, self.wq[...])
    if cfg.qkv_bias:
      q = q + self.bq[...]
    r = jnp.einsum("dhe,he->hd", self.wk[...], q)  # k_j . q = tok_j . r
    temp = math.sqrt(q.shape[-1])
    # Logits: [self | U | H], per head.
    kb = (jnp.einsum("he,he->h", self.bk[...], q) if cfg.qkv_bias
          else jnp.zeros(q.shape[:1]))
    l_self = (xn @ r.T + kb)[:, None]
    l_u = jnp.where(u_mask[None, :],
                    jnp.einsum("pd,hd->hp", u, r) + jnp.reshape(kb, (-1, 1)),
                    NEG_INF)
    parts = [l_self, l_u]
    if h is not None:
      s = jnp.einsum("Dd,hd->hD", h_w, r)               # [heads, Dm]
      c = jnp.einsum("d,hd->h", h_b, r)[:, None]        # [heads, 1]
      l_h = jnp.einsum("pD,hD->hp", h, s) + c + kb[:, None]
      parts.append(jnp.where(h_mask[None, :], l_h, NEG_INF))
    logits = jnp.concatenate(parts, axis=-1) / temp
    p = jax.nn.softmax(logits, axis=-1)
    if rng is not None and cfg.dropout:
      rng, sub = jax.random.split(rng)
      p = _dropout(sub, p, cfg.dropout)
    # Weighted sum of tokens in d-space, then the value projection.
    t = p[:, :1] * xn[None, :] + jnp.einsum("hp,pd->hd", p[:, 1:1 + u.shape[0]],
                                            u)
    if h is not None:
      p_h = p[:, 1 + u.shape[0]:]
      t = t + jnp.einsum("hp,pD,Dd->hd", p_h, h, h_w) + \
          p_h.sum(-1, keepdims=True) * h_b[None, :]
    o = jnp.einsum("hd,dhe->he", t, self.wv[...])
    if cfg.qkv_bias:
      o = o + p.sum(-1)[:, None] * self.bv[...]
    o = jnp.einsum("he,hed->d", o, self.wo[...]) + self.bo[...]
    if rng is not None and cfg.dropout:
      rng, sub = jax.random.split(rng)
      o = _dropout(sub, o, cfg.dropout)
    x = x + o if cfg.pre_norm else self.ln_attn(x + o)
    if cfg.mlp_ratio:
      y = self.ln_mlp(x) if cfg.pre_norm else x
      y = jax.nn.gelu(y @ self.w1[...] + self.b1[...]) @ self.w2[...] + \
          self.b2[...]
      if rng is not None and cfg.dropout:
        y = _dropout(rng, y, cfg.dropout)
      x = x + y if cfg.pre_norm else self.ln_mlp(x + y)
    return x


def _dropout(key, x, rate):
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


class FitnessTransformer(nnx.Module):
  """Scores every (task, PTM) pair: [B tasks] x [M PTMs] -> [B, M]."""

  def __init__(self, num_ptms: int, generic_dim: int,
               ptm_dims: Sequence[int] | None, cfg: ModelConfig, *,
               rngs: nnx.Rngs):
    """Builds the model.

    Args:
      num_ptms: M, the zoo size.
      generic_dim: Dg, width of generic-encoder features.
      ptm_dims: [M] feature widths Dm of the PTMs (for re-ranking tokens);
        None disables PTM-specific tokens.
      cfg: architecture options.
      rngs: NNX rngs with a `params` stream.
    """
    d = cfg.dim
    self.cfg = cfg
    self.num_ptms = num_ptms
    self.ptm_tokens = nnx.Param(jax.random.normal(rngs.params(),
                                                  (num_ptms, d)))
    bound = 1 / math.sqrt(generic_dim)
    self.u_w = nnx.Param(_uniform(rngs.params(), (generic_dim, d), bound))
    self.u_b = nnx.Param(_uniform(rngs.params(), (d,), bound))
    self.ptm_dims = tuple(ptm_dims) if ptm_dims is not None else None
    if cfg.ptm_specific and ptm_dims is not None:
      dmax = max(ptm_dims)
      if len(ptm_dims) != num_ptms:
        raise ValueError(f"ptm_dims has {len(ptm_dims)} entries for "
                         f"{num_ptms} PTMs.")
      # One Linear(Dm, d) per PTM, stored zero-padded to Dmax rows so that a
      # [.., Dmax] zero-padded input gives exactly Linear(Dm, d).
      keys = jax.random.split(rngs.params(), 2 * num_ptms)
      rows = jnp.arange(dmax)[None, :, None] < jnp.asarray(ptm_dims)[:, None,
                                                                     None]
      bounds = 1 / jnp.sqrt(jnp.asarray(ptm_dims, jnp.float32))
      w = jax.vmap(lambda k, b: _uniform(k, (dmax, d), b))(keys[:num_ptms],
                                                           bounds)
      self.h_w = nnx.Param(jnp.where(rows, w, 0.0))
      self.h_b = nnx.Param(jax.vmap(lambda k, b: _uniform(k, (d,), b))(
          keys[num_ptms:], bounds))
    else:
      self.h_w = self.h_b = None
    self.blocks = nnx.List([QueryBlock(cfg, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.head_ln = LayerNorm(d, cfg.ln_eps)
    self.head_w = nnx.Param(_uniform(rngs.params(), (d, 1), 1 / math.sqrt(d)))
    self.head_b = nnx.Param(_uniform(rngs.params(), (1,), 1 / math.sqrt(d)))

  def project_tasks(self, u):
    """[B, P, Dg] generic prototypes -> [B, P, d] task tokens."""
    return u @ self.u_w[...] + self.u_b[...]

  def pair_score(self, theta, u, u_mask, h=None, h_mask=None, h_w=None,
                 h_b=None, rng=None):
    """Score of one pair: theta [d], u [P, d] projected -> scalar."""
    x = theta
    for i, block in enumerate(self.blocks):
      sub = None if rng is None else jax.random.fold_in(rng, i)
      x = block(x, u, u_mask, h, h_mask, h_w, h_b, sub)
    return (self.head_ln(x) @ self.head_w[...] + self.head_b[...])[0]

  def __call__(self, u, u_mask, slots=None, *, rng=None, slot_chunk: int = 8):
    """Scores all PTMs for a batch of tasks.

    Args:
      u: [B, P, Dg] padded generic class prototypes.
      u_mask: [B, P] bool, True for real prototypes.
      slots: optional re-ranking tokens, a dict with
        "h": [B, K, Ph, Dmax] PTM-specific prototypes (zero-padded features),
        "h_mask": [B, K, Ph] bool, "ptm": [B, K] int PTM index of each slot.
        A slot whose h_mask is all False is inactive.
      rng: dropout key; None = deterministic (eval).
      slot_chunk: slots processed together (memory/speed trade-off).

    Returns:
      [B, M] float32 scores, higher = better fit.
    """
    b, m = u.shape[0], self.num_ptms
    u, u_mask = jnp.asarray(u), jnp.asarray(u_mask)
    up = self.project_tasks(u)
    theta = self.ptm_tokens[...]
    if rng is not None:
      base_rng, slot_rng = jax.random.split(rng)
      pair_keys = jax.random.split(base_rng, b * m).reshape(b, m)
    else:
      pair_keys = None

    def one(theta_m, up_b, mask_b, key):
      return self.pair_score(theta_m, up_b, mask_b, rng=key)

    per_ptm = jax.vmap(one, in_axes=(0, None, None,
                                     0 if rng is not None else None))
    scores = jax.vmap(per_ptm, in_axes=(None, 0, 0,
                                        0 if rng is not None else None))(
                                            theta, up, u_mask, pair_keys)
    if slots is None:
      return scores
    if self.h_w is None:
      raise ValueError("this model was built without PTM-specific "
                       "projections (ptm_dims=None or ptm_specific=False); "
                       "it cannot re-rank.")
    h, h_mask, ptm = (jnp.asarray(slots[k]) for k in ("h", "h_mask", "ptm"))
    k = h.shape[1]
    flat_b = jnp.repeat(jnp.arange(b), k)
    flat_ptm = ptm.reshape(-1)
    slot_keys = (jax.random.split(slot_rng, b * k) if rng is not None
                 else jnp.zeros((b * k,), jnp.uint32))
    h_w, h_b = self.h_w[...], self.h_b[...]

    def slot_score(args):
      bi, mi, hs, hm, key = args
      return self.pair_score(theta[mi], up[bi], u_mask[bi], hs, hm, h_w[mi],
                             h_b[mi], key if rng is not None else None)

    slot_scores = jax.lax.map(
        slot_score, (flat_b, flat_ptm, h.reshape((b * k,) + h.shape[2:]),
                     h_mask.reshape(b * k, -1), slot_keys),
        batch_size=min(slot_chunk, b * k))
    active = h_mask.reshape(b * k, -1).any(-1)
    rows = jnp.where(active, flat_b, b)  # Inactive slots scatter nowhere.
    return scores.at[rows, flat_ptm].set(slot_scores, mode="drop")

  def full_scores(self, u, u_mask, slots=None):
    """Reference: the official full L x L formulation (eval mode only).

    Builds each PTM's sequence [theta_m, U, H_m], runs the block on every
    row, and reads row 0. Same inputs/outputs as `__call__`; for tests and
    benchmarks (O(M L^2 d) per task). Defined for one post-LN block: deeper
    or pre-LN stacks here are query-only (task tokens are neither normalised
    nor updated between blocks), which a full encoder is not.
    """
    if len(self.blocks) != 1 or self.cfg.pre_norm:
      raise ValueError("full_scores is the reference for one post-LN block "
                       "only.")
    b, m = u.shape[0], self.num_ptms
    d = self.cfg.dim
    u, u_mask = jnp.asarray(u), jnp.asarray(u_mask)
    up = self.project_tasks(u)
    theta = self.ptm_tokens[...]
    hp = None
    if slots is not None:
      # [B, M, Ph, d]: projected H for PTMs that have a slot, masked others.
      h, h_mask, ptm = (jnp.asarray(slots[k]) for k in ("h", "h_mask",
                                                          "ptm"))
      onehot = jax.nn.one_hot(ptm, m, dtype=h.dtype) * h_mask.any(-1)[..., None]
      hraw = jnp.einsum("bkm,bkpD->bmpD", onehot, h)
      hp = jnp.einsum("bmpD,mDd->bmpd", hraw, self.h_w[...]) + \
          self.h_b[...][None, :, None, :]
      hmask = jnp.einsum("bkm,bkp->bmp", onehot, h_mask.astype(h.dtype)) > 0
    seq = jnp.concatenate([jnp.broadcast_to(theta[None, :, None, :],
                                            (b, m, 1, d)),
                           jnp.broadcast_to(up[:, None], (b, m) + up.shape[1:])],
                          axis=2)
    mask = jnp.concatenate([jnp.ones((b, m, 1), bool),
                            jnp.broadcast_to(u_mask[:, None], (b, m,
                                                               u.shape[1]))],
                           axis=2)
    if hp is not None:
      seq = jnp.concatenate([seq, hp], axis=2)
      mask = jnp.concatenate([mask, hmask], axis=2)
    x = seq
    for blk in self.blocks:
      x = _full_block(blk, x, mask)
    return (self.head_ln(x[:, :, 0]) @ self.head_w[...] +
            self.head_b[...])[..., 0]


def _full_block(blk: QueryBlock, x, mask):
  """The block applied to every row of [B, M, L, d] sequences (reference)."""
  cfg = blk.cfg
  xn = blk.ln_attn(x) if cfg.pre_norm else x
  q = jnp.einsum("bmld,dhe->bmhle", xn, blk.wq[...])
  k = jnp.einsum("bmld,dhe->bmhle", xn, blk.wk[...])
  v = jnp.einsum("bmld,dhe->bmhle", xn, blk.wv[...])
  if cfg.qkv_bias:
    q = q + blk.bq[...][:, None]
    k = k + blk.bk[...][:, None]
    v = v + blk.bv[...][:, None]
  logits = jnp.einsum("bmhie,bmhje->bmhij", q, k) / math.sqrt(q.shape[-1])
  pair = mask[:, :, None, :, None] & mask[:, :, None, None, :]
  # Official mask: pad[i] OR pad[j] is filled; row 0 is never padded.
  logits = jnp.where(pair, logits, NEG_INF)
  p = jax.nn.softmax(logits, -1)
  o = jnp.einsum("bmhij,bmhje->bmhie", p, v)
  o = jnp.einsum("bmhle,hed->bmld", o, blk.wo[...]) + blk.bo[...]
  x = x + o if cfg.pre_norm else blk.ln_attn(x + o)
  if cfg.mlp_ratio:
    y = blk.ln_mlp(x) if cfg.pre_norm else x
    y = jax.nn.gelu(y @ blk.w1[...] + blk.b1[...]) @ blk.w2[...] + blk.b2[...]
    x = x + y if cfg.pre_norm else blk.ln_mlp(x + y)
  return x
