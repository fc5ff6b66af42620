"""Feature extraction (`registry.run_batched`) split over devices and
processes gives the one-device results.

* In this process: the same numbers as the pre-sharding host loop, one
  compilation per batch shape, cache entries released with their fn.
* 4 simulated CPU devices (subprocess) equal 1 device.
* 2 processes x 2 CPU devices (jax.distributed on localhost) equal 1 device,
  on every process.

Tiny NNX PTM (cnn_s) on 300 20x20 RGB images; features-only, (features,
probs) and (features, None) outputs, plus two host-loop fns (a
`jax.pure_callback` like the ONNX members, and plain numpy).
"""

import gc
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import extract_sharding_check as check
from conftest import free_port, run_processes
from spider_jax import sharding
from spider_jax.zoo import registry

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "extract_sharding_check.py"
# The layouts only change the batch each device sees; rows are independent.
ATOL = 1e-4
RUNNERS = check.RUNNERS


@pytest.fixture(scope="module")
def reference():
  """Every case through the pre-sharding loop, on one device."""
  return check.cases(run=check.legacy_run_batched)[0]


def assert_same(got, want):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=ATOL,
                               err_msg=k)


def env(devices):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def test_this_process_matches_host_loop(reference):
  calls = check.NUMPY_CALLS[0]
  got, layouts = check.cases()
  assert_same(got, reference)
  if jax.process_count() == 1:  # All batches here (see the 2-process test).
    assert check.NUMPY_CALLS[0] - calls == (5 + 1 + 1) + (10 + 1 + 1)
  n = jax.local_device_count()
  padded = sharding.pad_to_multiple(31, n)
  assert ["features", padded, n, True] in layouts
  assert ["both", 64, n, True] in layouts
  # The pure_callback (ONNX-like) and numpy fns stay on the host loop.
  assert ["callback", padded, n, False] in layouts
  assert ["numpy", padded, n, False] in layouts


def test_one_compile_per_batch_shape_and_cache_release():
  loaded = check.tiny_ptm()
  fn = loaded.features
  x = check.images()
  for n in (300, 200, 37):
    registry.run_batched(fn, x[:n], 32)
  (sharded,) = RUNNERS[fn].values()
  assert sharded.run._cache_size() == 1  # pylint: disable=protected-access
  registry.run_batched(fn, x, 48)  # A new batch shape: a second entry.
  assert len(RUNNERS[fn]) == 2
  # A fresh jax.jit of the same function shares the entry.
  pre = loaded.preprocess
  registry.run_batched(jax.jit(pre), x[:50], 16)
  registry.run_batched(jax.jit(pre), x[:70], 16)
  (pre_sharded,) = RUNNERS[pre].values()
  assert pre_sharded.run._cache_size() == 1  # pylint: disable=protected-access
  before = len(RUNNERS)
  del fn, loaded, sharded, pre, pre_sharded
  gc.collect()
  assert len(RUNNERS) <= before - 2


def test_four_devices_equal_one(tmp_path, reference):
  out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)],
                       env=env(4), capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  info = json.loads(out.stdout.strip().splitlines()[-1])
  assert info["devices"] == 4
  # Batches of 31 are padded to 32 (a multiple of 4) and split over 4
  # devices; the one-device run keeps 31.
  assert ["features", 32, 4, True] in info["layouts"]
  assert ["both", 64, 4, True] in info["layouts"]
  assert ["no_head", 32, 4, True] in info["layouts"]
  assert ["features", 31, 1, True] in info["layouts_one"]
  assert ["callback", 32, 4, False] in info["layouts"]
  one = dict(np.load(tmp_path / "one.npz"))
  four = dict(np.load(tmp_path / "all.npz"))
  assert_same(four, one)
  assert_same(one, reference)


def test_two_processes_equal_one_process(tmp_path, reference):
  port = free_port()
  for rc, stdout, stderr in run_processes(
      lambda i: [sys.executable, str(SCRIPT), str(tmp_path), str(port), "2",
                 str(i)], 2, env=env(2), timeout=120):
    assert rc == 0, stderr[-3000:]
    info = json.loads(stdout.strip().splitlines()[-1])
    assert info["local_devices"] == 2
    assert ["both", 32, 2, True] in info["layouts"]
    # Each process ran its own block of batches only: for batch sizes 64
    # and 31, 300 images = 5 and 10 batches -> 3 and 5 per process, plus
    # one (padding) batch for 5 and for 0 images; one process runs 5 + 10 +
    # 2 * 2 = 19.
    assert info["numpy_calls"] == (3 + 1 + 1) + (5 + 1 + 1), info
  for i in range(2):  # Every process gets the full result, in row order.
    assert_same(dict(np.load(tmp_path / f"process_{i}.npz")), reference)
