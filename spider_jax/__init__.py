"""spider_jax: Model Spider (NeurIPS 2023) in JAX/Flax.

Public API:
  task_tokens(features, labels, num_classes) -> (tokens [P, Dg], mask [P])
  score(graphdef, params, u, u_mask, slots=None) -> [B, M]
  Ranker.load(checkpoint_dir).rank(features, labels) -> RankResult
  FeatureStore / StoreWriter / PTMInfo: the on-disk feature format.
"""

from spider_jax.data.store import FeatureStore, PTMInfo, StoreWriter
from spider_jax.model import FitnessTransformer, ModelConfig
from spider_jax.ranker import Ranker, RankResult
from spider_jax.scoring import score
from spider_jax.tokens import class_prototypes, task_tokens

__all__ = [
    "FeatureStore", "FitnessTransformer", "ModelConfig", "PTMInfo",
    "RankResult", "Ranker", "StoreWriter", "class_prototypes", "score",
    "task_tokens",
]
