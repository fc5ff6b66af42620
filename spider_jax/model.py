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
that single query and never materialises the L x L matrix. Keys and values
are linear in the tokens, so the logits are tok . (W_k q) and the values
(p tok) W_v W_o: U is projected (and, for zoos larger than P, passed through
W_v and W_o) once per task and shared by all PTMs, and in the first block the query
terms are per PTM, so scoring a task is two [M, d] x [d, P] products plus
O(M d^2) per-PTM work, batched over tasks and PTMs (no loop over the zoo;
PTM tokens never attend to each other). H_m is never projected to d either:
logits are h . (W_h r) and values ((p h) W_h) W_v W_o, which is Dm*d instead
of Ph*Dm*d work per re-ranked pair; re-ranked pairs join the softmax of their
(task, PTM) pair through a log-sum-exp merge.

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

from spider_jax import tokens

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
    task_token: what a generic task token holds (`tokens.TASK_TOKENS`):
      "prototype" (paper), "prototype_spread" (prototype and per-class
      spread, 2 Dg wide) or "prototype_centered" (prototype minus the
      task's mean prototype).
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
  task_token: str = "prototype"


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

  def __call__(self, x, up, u_mask, slots=None, rng=None):
    """Updates the query state of every (task, PTM) pair.

    Args:
      x: [M, d] query states shared by all tasks (the PTM tokens, first
        block) or [B, M, d] per pair.
      up: [B, P, d] projected task tokens; u_mask: [B, P] bool.
      slots: None or the flattened re-ranking slots of the batch: "h"
        [S, Ph, Dmax], "h_mask" [S, Ph], "b" [S] task index, "m" [S] PTM
        index, "row" [S] task index or B for inactive slots, "h_w"
        [M, Dmax, d], "h_b" [M, d] (S = B * K).
      rng: dropout key or None (deterministic).

    Returns:
      [B, M, d] new query states.
    """
    cfg = self.cfg
    b, p_len, d = up.shape
    m = x.shape[-2]
    heads, dh = self.wq.shape[1], self.wq.shape[2]
    temp = math.sqrt(dh)
    shared = x.ndim == 2  # Same query for every task: per-PTM work only.
    xn = self.ln_attn(x) if cfg.pre_norm else x
    q = jnp.einsum("...d,dhe->...he", xn, self.wq[...])
    if cfg.qkv_bias:
      q = q + self.bq[...]
    # k_j . q = tok_j . r + bk . q, so logits need r = W_k q, never keys.
    r = jnp.einsum("dhe,...he->...hd", self.wk[...], q)       # [.., M, H, d]
    kb = (jnp.einsum("he,...he->...h", self.bk[...], q) if cfg.qkv_bias
          else jnp.zeros(q.shape[:-1]))                      # [.., M, H]
    l_self = jnp.broadcast_to(
        (jnp.einsum("...hd,...d->...h", r, xn) + kb) / temp, (b, m, heads))
    l_u = jnp.einsum("mhd,bpd->bmhp" if shared else "bmhd,bpd->bmhp", r, up)
    l_u = jnp.where(u_mask[:, None, None, :],
                    (l_u + kb[..., None]) / temp, NEG_INF)    # [B, M, H, P]
    lse = jnp.logaddexp(l_self, jax.nn.logsumexp(l_u, axis=-1))
    if slots is not None:
      sb, sm, rows = slots["b"], slots["m"], slots["row"]
      r_s = r[sm] if shared else r[sb, sm]                   # [S, H, d]
      kb_s = kb[sm] if shared else kb[sb, sm]                # [S, H]
      h_w, h_b = slots["h_w"], slots["h_b"]

      n_slots = sm.shape[0]
      # Few (task, PTM) pairs (training zoos): dense per-pair products beat
      # gathering a [Dmax, d] matrix per slot. Large zoos: gather per slot.
      dense = b * m <= 4 * n_slots
      chunk = min(8, n_slots)
      if shared:  # r depends on the PTM only: s = W_h r once per PTM.
        s_vec = jnp.einsum("mDd,mhd->mhD", h_w, r)[sm]          # [S, H, Dmax]
        c_vec = jnp.einsum("md,mhd->mh", h_b, r)[sm]             # [S, H]
        l_h = jnp.einsum("spD,shD->shp", slots["h"], s_vec) + c_vec[..., None]
      else:
        def slot_logits(args):
          h, mi, rs = args
          s_vec = jnp.einsum("Dd,hd->hD", h_w[mi], rs)           # [H, Dmax]
          return jnp.einsum("pD,hD->hp", h, s_vec) + (h_b[mi] @ rs.T)[:, None]

        l_h = jax.lax.map(slot_logits, (slots["h"], sm, r_s), batch_size=chunk)
      l_h = jnp.where(slots["h_mask"][:, None, :],
                      (l_h + kb_s[..., None]) / temp, NEG_INF)  # [S, H, Ph]
      total = jnp.logaddexp(lse[sb, sm], jax.nn.logsumexp(l_h, axis=-1))
      lse = lse.at[rows, sm].set(total, mode="drop")
      p_h = jnp.exp(l_h - total[..., None])
    p_self = jnp.exp(l_self - lse)                            # [B, M, H]
    p_u = jnp.exp(l_u - lse[..., None])                       # [B, M, H, P]
    if rng is not None and cfg.dropout:
      k1, k2, k3, rng = jax.random.split(rng, 4)
      p_self = _dropout(k1, p_self, cfg.dropout)
      p_u = _dropout(k2, p_u, cfg.dropout)
      if slots is not None:
        p_h = _dropout(k3, p_h, cfg.dropout)
    wv, wo = self.wv[...], self.wo[...]
    # Values: tokens through W_v, then W_o. Task tokens are shared by all
    # PTMs: pass them through W_v (and W_o) once per task when the zoo is
    # larger than the token set, else weight them first (per pair).
    if m > p_len * heads:
      uvo = jnp.einsum("bhpe,hed->bhpd",
                       jnp.einsum("bpd,dhe->bhpe", up, wv), wo)
      o = jnp.einsum("bmhp,bhpd->bmd", p_u, uvo)
    elif m > p_len:
      uv = jnp.einsum("bpd,dhe->bhpe", up, wv)
      o = jnp.einsum("bmhe,hed->bmd",
                     jnp.einsum("bmhp,bhpe->bmhe", p_u, uv), wo)
    else:
      t = jnp.einsum("bmhp,bpd->bmhd", p_u, up)
      o = jnp.einsum("bmhe,hed->bmd",
                     jnp.einsum("bmhd,dhe->bmhe", t, wv), wo)
    xvo = jnp.einsum("...he,hed->...hd",
                     jnp.einsum("...d,dhe->...he", xn, wv), wo)  # [.., M, H, d]
    o = o + jnp.einsum("bmh,mhd->bmd" if shared else "bmh,bmhd->bmd", p_self,
                       xvo)
    if cfg.qkv_bias:
      psum = p_self + p_u.sum(-1)
      if slots is not None:
        psum = psum.at[rows, sm].add(p_h.sum(-1), mode="drop")
      o = o + jnp.einsum("bmh,hd->bmd", psum,
                         jnp.einsum("he,hed->hd", self.bv[...], wo))
    if slots is not None:
      t = jnp.einsum("shp,spD->shD", p_h, slots["h"])           # [S, H, Dmax]
      t_b = p_h.sum(-1)                                          # [S, H]
      if dense:  # Scatter to [B, M] pairs, then one product with all W_h.
        t_all = jnp.zeros((b, m) + t.shape[1:], t.dtype).at[rows, sm].set(
            t, mode="drop")
        tb_all = jnp.zeros((b, m, heads), t.dtype).at[rows, sm].set(
            t_b, mode="drop")
        th = jnp.einsum("bmhD,mDd->bmhd", t_all, h_w) + \
            tb_all[..., None] * h_b[None, :, None, :]
        o = o + jnp.einsum("bmhe,hed->bmd",
                           jnp.einsum("bmhd,dhe->bmhe", th, wv), wo)
      else:
        def slot_values(args):
          ts, tbs, mi = args
          th = ts @ h_w[mi] + tbs[:, None] * h_b[mi]                # [H, d]
          return jnp.einsum("he,hed->d", jnp.einsum("hd,dhe->he", th, wv),
                            wo)

        o_s = jax.lax.map(slot_values, (t, t_b, sm), batch_size=chunk)
        o = o.at[rows, sm].add(o_s, mode="drop")
    o = o + self.bo[...]
    if rng is not None and cfg.dropout:
      rng, sub = jax.random.split(rng)
      o = _dropout(sub, o, cfg.dropout)
    x = jnp.broadcast_to(x, (b, m, d))
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
    in_dim = tokens.token_dim(generic_dim, cfg.task_token)
    bound = 1 / math.sqrt(in_dim)
    self.u_w = nnx.Param(_uniform(rngs.params(), (in_dim, d), bound))
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

  def __call__(self, u, u_mask, slots=None, *, rng=None):
    """Scores all PTMs for a batch of tasks.

    Args:
      u: [B, P, Dg] padded generic class prototypes.
      u_mask: [B, P] bool, True for real prototypes.
      slots: optional re-ranking tokens, a dict with
        "h": [B, K, Ph, Dmax] PTM-specific prototypes (zero-padded features),
        "h_mask": [B, K, Ph] bool, "ptm": [B, K] int PTM index of each slot.
        A slot whose h_mask is all False is inactive; the PTMs of a task's
        active slots must be distinct.
      rng: dropout key; None = deterministic (eval).

    Returns:
      [B, M] float32 scores, higher = better fit.
    """
    u, u_mask = jnp.asarray(u), jnp.asarray(u_mask)
    b = u.shape[0]
    up = self.project_tasks(u)
    flat = None
    if slots is not None:
      if self.h_w is None:
        raise ValueError("this model was built without PTM-specific "
                         "projections (ptm_dims=None or ptm_specific=False); "
                         "it cannot re-rank.")
      h, h_mask, ptm = (jnp.asarray(slots[k]) for k in ("h", "h_mask", "ptm"))
      k = h.shape[1]
      sb = jnp.repeat(jnp.arange(b), k)
      active = h_mask.reshape(b * k, -1).any(-1)
      flat = {"h": h.reshape((b * k,) + h.shape[2:]),
              "h_mask": h_mask.reshape(b * k, -1), "b": sb,
              "m": ptm.reshape(-1),
              "row": jnp.where(active, sb, b),  # Inactive: scatter nowhere.
              "h_w": self.h_w[...], "h_b": self.h_b[...]}
    x = self.ptm_tokens[...]                                   # [M, d]
    for i, block in enumerate(self.blocks):
      sub = None if rng is None else jax.random.fold_in(rng, i)
      x = block(x, up, u_mask, flat, sub)
    return (self.head_ln(x) @ self.head_w[...] + self.head_b[...])[..., 0]

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
