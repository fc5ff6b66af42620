"""Sharded `registry.run_batched` on a tiny NNX PTM (see
test_extract_sharding.py).

Imported by the test for `cases()` and `legacy_run_batched`; run as a
script (in a subprocess, because the device count is fixed when jax starts):

  extract_sharding_check.py OUT_DIR
      (XLA_FLAGS=--xla_force_host_platform_device_count=4) writes
      OUT_DIR/one.npz (one device) and OUT_DIR/all.npz (every local device)
      and prints a JSON line describing the layouts used.
  extract_sharding_check.py OUT_DIR PORT NUM_PROCESSES PROCESS_ID
      joins a jax.distributed run on localhost and writes
      OUT_DIR/process_<PROCESS_ID>.npz (each process's gathered results).
"""

import json
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from spider_jax.zoo import archs  # noqa: E402
from spider_jax.zoo import extract  # noqa: E402
from spider_jax.zoo import registry  # noqa: E402

# pylint: disable=protected-access
RUNNERS = registry._RUNNERS  # fn -> {(batch shape, ...): runner | None}
NNX_FNS, RESIZE = registry._nnx_fns, registry._resize
# pylint: enable=protected-access

NUM_IMAGES = 300  # Not a multiple of any batch size below.
BATCH_SIZES = (64, 31)  # 31: rounded up to a multiple of the device count.


def images(n=NUM_IMAGES, seed=0):
  """Tiny RGB images (resized to 28x28 gray inside the PTM's fns)."""
  return np.random.default_rng(seed).integers(0, 256, (n, 20, 20, 3),
                                              dtype=np.uint8)


def tiny_ptm(head=True) -> registry.LoadedPTM:
  """A randomly initialised cnn_s wrapped like a local zoo member."""
  model = archs.build("cnn_s", 10, jax.random.key(0))

  def preprocess(x):
    return RESIZE(registry.to_gray(x), 28, "linear")

  f, p = NNX_FNS(model, preprocess, head=True)
  spec = registry.PTMSpec(
      name="tiny", family="cnn_s", source="random", input_size=28,
      input_channels=1, normalisation="test", feature_dim=128,
      feature_tap="features", head_classes=10 if head else None,
      fine_tunable=False, weights="random", weight_group="tiny",
      loader=lambda: None)
  return registry.LoadedPTM(spec, f, p if head else None, preprocess, model)


def _host_callback_fn(x):
  """Like the ONNX members: a `jax.pure_callback` on the host."""
  def host(a):
    a = np.asarray(a, np.float32).reshape(len(a), -1)
    return a[:, :7] * 0.5 + a.mean(1, keepdims=True)
  return jax.pure_callback(
      host, jax.ShapeDtypeStruct((x.shape[0], 7), np.float32), x,
      vmap_method="sequential")


NUMPY_CALLS = [0]  # Batches `_numpy_fn` ran on (this process's share).


def _numpy_fn(x):
  """Not a JAX function at all."""
  a = np.asarray(x, np.float32).reshape(len(x), -1)
  NUMPY_CALLS[0] += 1
  return a[:, 3:8] - a.std(1, keepdims=True), None


def fns() -> dict:
  """name -> fn, as extract.py and bench.py build them."""
  loaded = tiny_ptm()
  return {
      "features": loaded.features,
      "both": extract.features_and_probs(loaded),  # (features, probs)
      "no_head": extract.features_and_probs(tiny_ptm(head=False)),
      "callback": _host_callback_fn,
      "numpy": _numpy_fn,
  }


def cases(run=registry.run_batched, **kw) -> tuple[dict, list]:
  """(flat name -> result of every fn, batch size and image count; the
  layouts `run_batched` chose)."""
  x = images()
  out = {}
  fn_map = fns()
  for name, fn in fn_map.items():
    for bs in BATCH_SIZES:
      for n in (NUM_IMAGES, 5, 0):  # 5 and 0: fewer rows than devices*bs.
        res = run(fn, x[:n], bs, **kw)
        leaves = res if isinstance(res, tuple) else (res,)
        for i, leaf in enumerate(leaves):
          key = f"{name}/bs{bs}/n{n}/{i}"
          if leaf is None:
            out[key + "_none"] = np.zeros(0)
          else:
            assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32
            assert len(leaf) == n, (key, leaf.shape)
            out[key] = leaf
  return out, layouts(fn_map)


def legacy_run_batched(fn, images_, batch_size):
  """run_batched before sharding: one device, host loop."""
  outs = []
  for i in range(0, len(images_), batch_size):
    xb = images_[i:i + batch_size]
    n = len(xb)
    if n < batch_size:
      xb = np.concatenate([xb, np.zeros((batch_size - n,) + xb.shape[1:],
                                        xb.dtype)])
    outs.append(jax.tree.map(lambda a, n=n: np.asarray(a, np.float32)[:n],
                             fn(xb)))
  if not outs:  # The old loop had no output for 0 images.
    return run_batched_empty(fn, images_, batch_size)
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


def run_batched_empty(fn, images_, batch_size):
  zeros = np.zeros((batch_size,) + images_.shape[1:], images_.dtype)
  return jax.tree.map(lambda a: np.asarray(a, np.float32)[:0], fn(zeros))


def layouts(fn_map) -> list:
  """[name, padded batch, devices, sharded (else host loop)] per cached
  runner of the fns."""
  return sorted([name, k[0][0], len(k[2]), v is not None]
                for name, fn in fn_map.items()
                for k, v in RUNNERS.get(getattr(fn, "__wrapped__", fn),
                                        {}).items())


def main():
  out_dir = pathlib.Path(sys.argv[1])
  if len(sys.argv) > 2:
    port, count, pid = map(int, sys.argv[2:5])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=count, process_id=pid)
    assert jax.process_count() == count
    res, lay = cases(across_processes=True)
    np.savez(out_dir / f"process_{pid}.npz", **res)
    print(json.dumps({"process": pid, "layouts": lay,
                      "numpy_calls": NUMPY_CALLS[0],
                      "local_devices": jax.local_device_count()}))
    jax.distributed.shutdown()
    return
  one, lay_one = cases(devices=jax.local_devices()[:1])
  np.savez(out_dir / "one.npz", **one)
  every, lay = cases()
  np.savez(out_dir / "all.npz", **every)
  print(json.dumps({"devices": jax.local_device_count(),
                    "layouts_one": lay_one, "layouts": lay}))


if __name__ == "__main__":
  main()
