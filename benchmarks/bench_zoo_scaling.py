"""Scoring cost and per-device memory as the zoo grows, on 1 and 4 devices.

  python benchmarks/bench_zoo_scaling.py            # spawns one process per
                                                    # device count (CPU:
                                                    # simulated devices)

Paper dims (B = 16 tasks, 397 prototypes of 3072-d -> d = 1024, k = 0);
M = 10 ... 10,000 PTMs. On 4 devices the zoo is split over a 2-D mesh
(1 x 4: every device holds a quarter of the PTM tokens). Prints seconds per
batch, pairs/s and the compiled program's memory per device (arguments +
outputs + temporaries, from XLA's memory analysis). On a CPU the simulated
devices share the same 2 cores, so time does not fall with more devices;
memory per device does.
"""

import json
import os
import subprocess
import sys
import time

ZOO_SIZES = (10, 100, 1000, 10000)


def child(devices: int) -> None:
  import jax
  import numpy as np
  from flax import nnx

  from spider_jax import sharding
  from spider_jax.model import FitnessTransformer, ModelConfig
  from spider_jax.scoring import Scorer

  rng = np.random.default_rng(0)
  b, p_len, n_real, dg = 16, 512, 397, 3072
  batch = {"u": np.zeros((b, p_len, dg), np.float32),
           "u_mask": np.arange(p_len)[None].repeat(b, 0) < n_real}
  batch["u"][:, :n_real] = rng.normal(size=(b, n_real, dg)) / np.sqrt(dg)
  rows = []
  for m in ZOO_SIZES:
    net = FitnessTransformer(m, dg, None, ModelConfig(dim=1024,
                                                      ptm_specific=False),
                             rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(net)
    scorer = Scorer(graphdef, params, batch_size=b, model_parallel=devices)
    placed = sharding.put_batch(batch, scorer.mesh)
    compiled = scorer._jit.lower(scorer.params, placed).compile()
    mem = compiled.memory_analysis()
    per_device = sum(getattr(mem, f"{k}_size_in_bytes", 0)
                     for k in ("argument", "output", "temp"))
    scorer(batch)  # Warm up.
    best = float("inf")
    for _ in range(2):
      t = time.perf_counter()
      scorer(batch)
      best = min(best, time.perf_counter() - t)
    rows.append({"devices": devices, "M": m, "seconds": best,
                 "pairs_per_s": b * m / best,
                 "mib_per_device": per_device / 2**20})
  print(json.dumps(rows))


def main():
  if len(sys.argv) > 1 and sys.argv[1] == "--child":
    child(int(sys.argv[2]))
    return
  rows = []
  for n in (1, 4):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    out = subprocess.run([sys.executable, __file__, "--child", str(n)],
                         env=env, capture_output=True, text=True, check=True)
    rows += json.loads(out.stdout.strip().splitlines()[-1])
  print("| devices | M | s / batch of 16 tasks | pairs/s | MiB per device |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['devices']} | {r['M']:,} | {r['seconds']:.3f} | "
          f"{r['pairs_per_s']:,.0f} | {r['mib_per_device']:,.0f} |")


if __name__ == "__main__":
  main()
