"""Shared fixtures: a small synthetic FeatureStore and a trained ranker."""

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `configs` is a top-level package.

from configs import rank as rank_config  # noqa: E402
from spider_jax.data.synthetic import SyntheticSpec, write_synthetic_store  # noqa: E402


@pytest.fixture(scope="session")
def small_store(tmp_path_factory):
  """A small synthetic store (6 PTMs) for unit tests."""
  spec = SyntheticSpec(num_ptms=6, num_train=24, num_val=6, num_target=6,
                       seed=3)
  return write_synthetic_store(tmp_path_factory.mktemp("store") / "s", spec)


@pytest.fixture(scope="session")
def tiny_config():
  """configs/rank.py:tiny, unlocked for tests to edit."""
  return rank_config.get_config("tiny")
