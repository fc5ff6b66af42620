"""Scores of a trained ranker on the store's target tasks, written by
process 0 (see test_multihost.py::test_two_processes_equal_four_devices).

  exact_scores_check.py CHECKPOINT_DIR STORE OUT.npy [jax.distributed flags]

Loads the ranker (it scores the way its checkpoint was trained, e.g.
exact_chunk=1), scores every target task with re-ranking depth k = 2 over
all global devices, and saves the [T, M] float32 scores.
"""

import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from spider_jax.data.store import FeatureStore  # noqa: E402
from spider_jax.ranker import Ranker  # noqa: E402
from spider_jax.scoring import score_tasks  # noqa: E402


def main():
  ckpt, store, out = sys.argv[1:4]
  flags = dict(a[2:].split("=", 1) for a in sys.argv[4:])
  if flags:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(flags["coordinator_address"],
                               int(flags["num_processes"]),
                               int(flags["process_id"]))
  fs = FeatureStore(store)
  ranker = Ranker.load(ckpt)
  tasks = [fs.task(n) for n in fs.task_names("target")]
  scores = score_tasks(ranker.scorer, tasks, ranker.zoo, k=2)
  if jax.process_index() == 0:
    np.save(out, scores)
  if flags:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
