"""The `:tiny` benchmark built by several processes (see
test_extract_groundtruth.py::
test_two_processes_build_then_groundtruth_and_rank_cli).

  bench_multihost_check.py OUT_DIR PORT NUM_PROCESSES PROCESS_ID SEED_FROM

joins a jax.distributed run on localhost, builds configs/bench.py:tiny into
OUT_DIR/cache and OUT_DIR/results with `groundtruth.run(all_processes=True)`
(ground-truth caches seeded from SEED_FROM, a results dir of an earlier
build) and prints a JSON line: the summary's keys, the store path and how
many extraction calls were split over the processes.
"""

import json
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import bench as bench_config  # noqa: E402
from spider_jax import groundtruth  # noqa: E402
from spider_jax import sharding  # noqa: E402
from spider_jax.zoo import extract  # noqa: E402

SPLIT_CALLS = [0]


def main():
  out = pathlib.Path(sys.argv[1])
  port, count, pid = map(int, sys.argv[2:5])
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=count, process_id=pid)
  run_batched = extract.registry_lib.run_batched

  def counting(*args, across_processes=False, **kw):
    SPLIT_CALLS[0] += bool(across_processes)
    return run_batched(*args, across_processes=across_processes, **kw)

  extract.registry_lib.run_batched = counting
  cfg = bench_config.get_config("tiny")
  cfg.cache_dir = str(out / "cache")
  cfg.results_dir = str(out / "results")
  cfg.ground_truth_from = sys.argv[5]
  summary = groundtruth.run(cfg, log=lambda m: None, all_processes=True)
  sharding.barrier("bench_multihost_check")
  print(json.dumps({"process": pid, "keys": sorted(summary),
                    "store": summary["store"],
                    "split_calls": SPLIT_CALLS[0]}))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
