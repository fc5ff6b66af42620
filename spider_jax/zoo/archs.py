"""Small Flax NNX architectures for the locally trained part of the zoo.

Every architecture takes uint8 (or 0..255 float) images [B, 28, 28, 1] and
exposes `features(x) -> [B, feature_dim]` and `logits(x) -> [B, num_classes]`
(a linear head on the features). None uses BatchNorm or dropout, so the
forward pass is a pure function of the `nnx.Param`s (no mutable state, no
RNG at call time), which keeps training and fine-tuning simple and
deterministic.

Architectures (`ARCHS`):
  cnn_s     3 conv (16-32-64, strides 1-2-2), flatten, dense  D = 128
  cnn_w     3 conv (32-64-128, strides 1-2-2), flatten, dense D = 256
  resnet_s  conv stem + 3 stages of 1 basic block (GroupNorm), D = 128
  mlp       784-256-128                                     D = 128
  vit_t     4x4 patches (49 tokens), d=64, 2 pre-LN blocks, mean pool, D = 64
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ARCHS", "INPUT_SHAPE", "build", "to_float"]

INPUT_SHAPE = (28, 28, 1)


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 in [-1, 1]."""
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


class _Classifier(nnx.Module):
  """Shared `logits`/`__call__` on top of a subclass's `features`."""

  feature_dim: int
  num_classes: int

  def _init_head(self, feature_dim: int, num_classes: int, rngs: nnx.Rngs):
    self.feature_dim = feature_dim
    self.num_classes = num_classes
    self.head = nnx.Linear(feature_dim, num_classes, rngs=rngs)

  def features(self, images: jax.Array) -> jax.Array:
    raise NotImplementedError

  def logits(self, images: jax.Array) -> jax.Array:
    """images: [B, 28, 28, 1] uint8 -> [B, num_classes]."""
    return self.head(self.features(images))

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.logits(images)


class ConvNet(_Classifier):
  """Plain CNN: 3x3 convs with ReLU, flatten, dense feature layer."""

  def __init__(self, num_classes: int, widths=(16, 32, 64),
               strides=(1, 2, 2), feature_dim: int = 128, *,
               rngs: nnx.Rngs):
    convs, cin, side = [], INPUT_SHAPE[-1], INPUT_SHAPE[0]
    for w, s in zip(widths, strides):
      convs.append(nnx.Conv(cin, w, (3, 3), strides=s, padding="SAME",
                            rngs=rngs))
      cin, side = w, -(-side // s)
    self.convs = nnx.List(convs)
    self.dense = nnx.Linear(side * side * cin, feature_dim, rngs=rngs)
    self._init_head(feature_dim, num_classes, rngs)

  def features(self, images: jax.Array) -> jax.Array:
    """images: [B, 28, 28, 1] uint8 -> [B, feature_dim]."""
    h = to_float(images)
    for conv in self.convs:
      h = jax.nn.relu(conv(h))
    return jax.nn.relu(self.dense(h.reshape(h.shape[0], -1)))


class _BasicBlock(nnx.Module):
  """Pre-activation basic residual block with GroupNorm."""

  def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.GroupNorm(cin, num_groups=min(8, cin), rngs=rngs)
    self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding="SAME",
                          rngs=rngs)
    self.norm2 = nnx.GroupNorm(cout, num_groups=min(8, cout), rngs=rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), padding="SAME", rngs=rngs)
    self.has_proj = stride != 1 or cin != cout
    if self.has_proj:
      self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, cin] -> [B, H/stride, W/stride, cout]."""
    h = jax.nn.relu(self.norm1(x))
    skip = self.proj(h) if self.has_proj else x
    h = self.conv1(h)
    h = self.conv2(jax.nn.relu(self.norm2(h)))
    return skip + h


class ResNetS(_Classifier):
  """Small pre-activation ResNet: stem 32, stages 32/64/128 (strides 1/2/2)."""

  def __init__(self, num_classes: int, widths=(32, 64, 128),
               strides=(1, 2, 2), *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(INPUT_SHAPE[-1], widths[0], (3, 3), strides=2,
                         padding="SAME", rngs=rngs)
    blocks, cin = [], widths[0]
    for w, s in zip(widths, strides):
      blocks.append(_BasicBlock(cin, w, s, rngs=rngs))
      cin = w
    self.blocks = nnx.List(blocks)
    self.norm = nnx.GroupNorm(cin, num_groups=8, rngs=rngs)
    self._init_head(cin, num_classes, rngs)

  def features(self, images: jax.Array) -> jax.Array:
    """images: [B, 28, 28, 1] uint8 -> [B, 128]."""
    h = self.stem(to_float(images))
    for blk in self.blocks:
      h = blk(h)
    return jnp.mean(jax.nn.relu(self.norm(h)), axis=(1, 2))


class MLP(_Classifier):
  """Flatten -> 256 -> 128, ReLU."""

  def __init__(self, num_classes: int, widths=(256, 128), *,
               rngs: nnx.Rngs):
    layers, cin = [], INPUT_SHAPE[0] * INPUT_SHAPE[1] * INPUT_SHAPE[2]
    for w in widths:
      layers.append(nnx.Linear(cin, w, rngs=rngs))
      cin = w
    self.layers = nnx.List(layers)
    self._init_head(cin, num_classes, rngs)

  def features(self, images: jax.Array) -> jax.Array:
    """images: [B, 28, 28, 1] uint8 -> [B, 128]."""
    h = to_float(images).reshape(images.shape[0], -1)
    for layer in self.layers:
      h = jax.nn.relu(layer(h))
    return h


class _EncoderBlock(nnx.Module):
  """Pre-LN transformer block (MHSA + GELU MLP)."""

  def __init__(self, dim: int, heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, mlp_dim, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, L, D] -> [B, L, D]."""
    x = x + self.attn(self.ln1(x))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))


class ViTTiny(_Classifier):
  """Tiny ViT: 4x4 patches (7x7 = 49 tokens), learned pos-emb, mean pool."""

  def __init__(self, num_classes: int, dim: int = 64, depth: int = 2,
               heads: int = 4, patch: int = 4, *, rngs: nnx.Rngs):
    self.patch = patch
    self.embed = nnx.Conv(INPUT_SHAPE[-1], dim, (patch, patch),
                          strides=patch, padding="VALID", rngs=rngs)
    n = (INPUT_SHAPE[0] // patch) * (INPUT_SHAPE[1] // patch)
    self.pos = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (1, n, dim), jnp.float32))
    self.blocks = nnx.List([_EncoderBlock(dim, heads, 2 * dim, rngs=rngs)
                            for _ in range(depth)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self._init_head(dim, num_classes, rngs)

  def features(self, images: jax.Array) -> jax.Array:
    """images: [B, 28, 28, 1] uint8 -> [B, dim]."""
    h = self.embed(to_float(images))
    h = h.reshape(h.shape[0], -1, h.shape[-1]) + self.pos[...]
    for blk in self.blocks:
      h = blk(h)
    return jnp.mean(self.ln(h), axis=1)


ARCHS: dict[str, Callable[..., _Classifier]] = {
    "cnn_s": lambda c, rngs: ConvNet(c, (16, 32, 64), feature_dim=128,
                                     rngs=rngs),
    "cnn_w": lambda c, rngs: ConvNet(c, (32, 64, 128), feature_dim=256,
                                     rngs=rngs),
    "resnet_s": lambda c, rngs: ResNetS(c, rngs=rngs),
    "mlp": lambda c, rngs: MLP(c, rngs=rngs),
    "vit_t": lambda c, rngs: ViTTiny(c, rngs=rngs),
}


def build(arch: str, num_classes: int, key: jax.Array) -> _Classifier:
  """Builds a freshly initialised architecture.

  Args:
    arch: a key of `ARCHS`.
    num_classes: width of the classification head.
    key: a `jax.random.key` for the initialisation.

  Returns:
    The module (`features` -> [B, D], `logits` -> [B, num_classes]).
  """
  if arch not in ARCHS:
    raise ValueError(f"unknown arch {arch!r}; have {sorted(ARCHS)}")
  return ARCHS[arch](num_classes, nnx.Rngs(params=key))
