"""Shared fixtures: a small synthetic FeatureStore and a trained ranker."""

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `configs` is a top-level package.

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import rank as rank_config  # noqa: E402
from spider_jax import checkpoint  # noqa: E402
from spider_jax.data.synthetic import SyntheticSpec, write_synthetic_store  # noqa: E402
from spider_jax.ranker import model_from_meta  # noqa: E402


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
