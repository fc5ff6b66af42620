"""Python API: load a trained ranker and rank the zoo for your own task.

  ranker = Ranker.load("runs/default/checkpoints")
  result = ranker.rank(generic_features, labels)            # k = 0
  result = ranker.rank(generic_features, labels, k=3,
                       ptm_features=lambda name: extract(name, images))
  result.order   # PTM names, best first

With k > 0 only the k PTMs ranked best by the generic tokens are asked for
their features (one forward pass each), as in Model Spider's re-ranking.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Mapping

import numpy as np
from flax import nnx

from spider_jax import checkpoint
from spider_jax.data.store import validate_features, validate_labels
from spider_jax.model import FitnessTransformer, ModelConfig
from spider_jax.scoring import Scorer, ZooInfo, score_tasks


@dataclasses.dataclass
class InMemoryTask:
  """A task given as arrays (duck-types data.store.TaskData for scoring).

  Attributes:
    generic: [N, Dg] generic-encoder features; labels: [N] in 0..C-1.
    features_fn: PTM name -> [N, Dm] features (only needed when k > 0).
  """
  generic: np.ndarray
  labels: np.ndarray
  features_fn: Callable[[str], np.ndarray] | None = None
  name: str = "task"

  @property
  def num_classes(self) -> int:
    return int(self.labels.max()) + 1

  def mask(self, split: str) -> np.ndarray:
    del split  # Every given row is a training row.
    return np.ones(self.labels.shape, bool)

  def ptm_features(self, ptm: str) -> np.ndarray:
    if self.features_fn is None:
      raise ValueError(f"re-ranking needs the features of {ptm}: pass "
                       "ptm_features= (a dict or a function of the name).")
    return np.asarray(self.features_fn(ptm), np.float32)


@dataclasses.dataclass(frozen=True)
class RankResult:
  """Scores of every PTM for one task.

  Attributes:
    ptm_names: [M] names in zoo order; scores: [M] float, higher = better.
    order: names sorted best first.
    k: the re-ranking depth used.
  """
  ptm_names: tuple[str, ...]
  scores: np.ndarray
  order: tuple[str, ...]
  k: int


class Ranker:
  """A trained Model Spider ranker (parameters + zoo metadata)."""

  def __init__(self, graphdef, params, meta: dict, *, batch_size: int = 8,
               model_parallel: int = 1, exact_chunk: int | None = None):
    self.meta = meta
    if exact_chunk is None:  # As trained (see configs/train.py exact_chunk).
      exact_chunk = int(meta.get("config", {}).get("exact_chunk", 0))
    self.zoo = ZooInfo(tuple(meta["ptm_names"]), tuple(meta["ptm_dims"]),
                       int(meta["generic_dim"]),
                       meta["model"].get("task_token", "prototype"))
    self.scorer = Scorer(graphdef, params, batch_size=batch_size,
                         model_parallel=model_parallel,
                         exact_chunk=exact_chunk)

  @classmethod
  def load(cls, checkpoint_dir, step: int | None = None, *,
           batch_size: int = 8, model_parallel: int = 1,
           exact_chunk: int | None = None) -> "Ranker":
    """Loads the best (else latest) step of an orbax checkpoint directory.

    Args:
      checkpoint_dir: the directory `spider_jax.train` wrote.
      step: a specific step; default the best on validation, else latest.
      batch_size: tasks per compiled call.
      model_parallel: devices that split the zoo (2-D tasks x PTMs mesh).
      exact_chunk: tasks per fixed-shape scoring chunk (`Scorer`); None =
        the value the checkpoint was trained with.
    """
    step, meta = checkpoint.read_meta(pathlib.Path(checkpoint_dir), step)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_from_meta(
        meta)))
    params = checkpoint.restore_params(checkpoint_dir, abstract, step)
    return cls(graphdef, params, meta, batch_size=batch_size,
               model_parallel=model_parallel, exact_chunk=exact_chunk)

  @property
  def ptm_names(self) -> tuple[str, ...]:
    return self.zoo.ptm_names

  @property
  def encoder(self) -> str:
    """Name of the generic encoder whose features `rank` expects."""
    return str(self.meta.get("encoder", ""))

  @property
  def prior(self) -> np.ndarray:
    """[M] each PTM's mean rank over the training tasks (higher = better)."""
    return np.asarray(self.meta["prior"])

  def rank(self, generic_features, labels, *, k: int | None = None,
           ptm_features: Mapping[str, np.ndarray] | Callable | None = None
           ) -> RankResult:
    """Ranks the zoo for one task.

    Args:
      generic_features: [N, Dg] features of the task's images from the
        ranker's generic encoder (`self.encoder`).
      labels: [N] int class ids 0..C-1 (every class present, C >= 2).
      k: re-ranking depth; None = the depth chosen on validation tasks.
      ptm_features: PTM name -> [N, Dm] features, a dict or a function;
        needed only for k > 0, and only the top-k names are requested.

    Returns:
      A RankResult.
    """
    g = np.asarray(generic_features, np.float32)
    validate_features(g, dim=self.zoo.generic_dim, where="generic features")
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != g.shape[0]:
      raise ValueError(f"labels must be [N] with N = {g.shape[0]}, got "
                       f"{y.shape}.")
    validate_labels(y, int(y.max()) + 1 if y.size else 0, where="labels")
    k = int(self.meta.get("rerank_k", 0)) if k is None else int(k)
    fn = ptm_features
    if isinstance(ptm_features, Mapping):
      fn = ptm_features.__getitem__

    def checked(name):
      f = np.asarray(fn(name), np.float32)
      dim = self.zoo.ptm_dims[self.zoo.ptm_names.index(name)]
      validate_features(f, dim=dim, where=f"features of {name}")
      return f

    task = InMemoryTask(g, y.astype(np.int32), checked if fn else None)
    scores = score_tasks(self.scorer, [task], self.zoo, k=k)[0]
    order = tuple(self.zoo.ptm_names[i] for i in np.argsort(-scores,
                                                            kind="stable"))
    return RankResult(self.zoo.ptm_names, scores, order, k)


def model_from_meta(meta: dict) -> FitnessTransformer:
  """An (uninitialised-shape) model matching checkpoint metadata."""
  return FitnessTransformer(len(meta["ptm_names"]), int(meta["generic_dim"]),
                            meta["ptm_dims"], ModelConfig(**meta["model"]),
                            rngs=nnx.Rngs(params=0))

