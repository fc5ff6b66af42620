"""Ranking configs: `python -m spider_jax.rank --config=configs/rank.py:VARIANT`.

The training section is configs/train.py's; `rank` adds:
  checkpoint  a checkpoint directory; "" = WORKDIR/checkpoints, trained
              first if it holds no checkpoint.
  k           re-ranking depth; -1 = the depth chosen on validation tasks.
  tasks       which tasks to rank: "target" (default), "val" or "all".
  methods     rows of the report: spider (the ranker), prior (each PTM's
              mean rank over the training tasks), random, and any baseline
              of spider_jax.baselines.METHODS (logme, leep, nce, nleep,
              hscore, ...), each with its time per task including the
              network passes it needs (recorded in the store).
  model_parallel  devices that split the zoo (2-D tasks x PTMs mesh), for
              zoos too large for one device.
"""

import ml_collections

from configs import train


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  """Training config of `variant` plus the `rank` section."""
  c = train.get_config(variant)
  c.rank = ml_collections.ConfigDict(dict(
      checkpoint="", k=-1, tasks="target", methods="spider,prior,random",
      model_parallel=1))
  return c
