"""Shared fixtures: a small synthetic FeatureStore and a trained ranker;
helpers to run several processes on localhost."""

import atexit
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `configs` is a top-level package.

# Many tests (and the subprocesses they start, which inherit the
# environment) compile the same small programs: share them through JAX's
# persistent compilation cache, fresh for each session and removed at its
# end. Set before jax is imported; a JAX_COMPILATION_CACHE_DIR already set
# is used as is (and kept).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _xla_cache = tempfile.mkdtemp(prefix="spider_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import rank as rank_config  # noqa: E402
from spider_jax import checkpoint  # noqa: E402
from spider_jax.data.synthetic import SyntheticSpec, write_synthetic_store  # noqa: E402
from spider_jax.ranker import model_from_meta  # noqa: E402


def free_port() -> int:
  """A free TCP port on localhost (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(argv_of, n: int, *, env: dict, timeout: float,
                  cwd=None) -> list[tuple[int, str, str]]:
  """Runs `argv_of(i)` for i < n side by side; kills any left at the end.

  Returns:
    [(returncode, stdout, stderr)] in process order.
  """
  procs = [subprocess.Popen(argv_of(i), cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(n)]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def latest_params(workdir):
  """(step, [numpy leaves]) of the latest checkpoint in WORKDIR/checkpoints."""
  path = pathlib.Path(workdir) / "checkpoints"
  with checkpoint.manager(path) as mngr:
    step = mngr.latest_step()
  _, meta = checkpoint.read_meta(path, step)
  _, abstract = nnx.split(nnx.eval_shape(lambda: model_from_meta(meta)))
  leaves = jax.tree.leaves(checkpoint.restore_params(path, abstract, step))
  return step, [np.asarray(x) for x in leaves]


@pytest.fixture(scope="session")
def small_store(tmp_path_factory):
  """A small synthetic store (6 PTMs) for unit tests."""
  spec = SyntheticSpec(num_ptms=6, num_train=24, num_val=6, num_target=6,
                       seed=3)
  return write_synthetic_store(tmp_path_factory.mktemp("store") / "s", spec)


@pytest.fixture(scope="session")
def tiny_config():
  """configs/rank.py:synthetic_tiny, unlocked for tests to edit."""
  return rank_config.get_config("synthetic_tiny")
