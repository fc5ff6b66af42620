"""Milliseconds per train step: the default batched step vs exact_chunk.

  python benchmarks/bench_train_step.py                 # default and paper
  python benchmarks/bench_train_step.py --variants=default --chunks=0,1

One device, the synthetic store (160 training tasks), the configs of
configs/train.py. Each (variant, exact_chunk) pair warms up on 10 batches
(compiling every padding bucket they touch), then times 20 more; the pairs
run in the order given, then the first one again, so drift on a shared
machine shows as a difference between its two rows.
"""

import argparse
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from configs import train as train_config
from spider_jax import sharding
from spider_jax.data.sampler import TrainingSampler
from spider_jax.data.store import FeatureStore
from spider_jax.data.synthetic import SyntheticSpec, write_synthetic_store
from spider_jax.train import (build_model, make_optimizer, make_train_step,
                              zoo_of)

WARMUP, TIMED = 10, 20


def ms_per_step(store, variant: str, chunk: int) -> float:
  cfg = train_config.get_config(variant)
  mesh = sharding.data_mesh()
  rep = sharding.replicated(mesh)
  zoo = zoo_of(store)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(cfg, zoo, 0)))
  params = jax.jit(lambda: nnx.split(build_model(cfg, zoo, 0))[1],
                   out_shardings=rep)()
  sampler = TrainingSampler(store, store.task_names("train"),
                            batch_size=cfg.batch_size, k_max=cfg.k_max,
                            seed=0, min_keep=cfg.min_keep)
  tx = make_optimizer(cfg, sampler.steps_per_epoch)
  state = {"opt": jax.jit(tx.init, out_shardings=rep)(params),
           "step": jax.device_put(jnp.zeros((), jnp.int32), rep)}
  step = make_train_step(graphdef, tx, mesh, chunk)
  key = jax.random.key(0)
  batches = [sharding.put_batch(sampler.batch(s), mesh)
             for s in range(WARMUP + TIMED)]
  for b in batches[:WARMUP]:
    params, state, _ = step(params, state, b, key)
  jax.block_until_ready(params)
  t = time.perf_counter()
  for b in batches[WARMUP:]:
    params, state, _ = step(params, state, b, key)
  jax.block_until_ready(params)
  return (time.perf_counter() - t) / TIMED * 1e3


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variants", default="default,paper")
  ap.add_argument("--chunks", default="0,1,4,16",
                  help="exact_chunk values (0 = default batched step); "
                       "each must divide the variant's batch size")
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "store"
    write_synthetic_store(path, SyntheticSpec(num_train=160))
    store = FeatureStore(path)
    print(f"# jax {jax.__version__}, {jax.devices()[0].platform}, "
          f"1 device", flush=True)
    print("| ranker | batch | exact_chunk | ms / step |")
    print("|---|---|---|---|")
    for variant in args.variants.split(","):
      batch = train_config.get_config(variant).batch_size
      chunks = [int(c) for c in args.chunks.split(",")
                if int(c) == 0 or batch % int(c) == 0]
      for chunk in chunks + chunks[:1]:
        print(f"| {variant} | {batch} | {chunk} | "
              f"{ms_per_step(store, variant, chunk):.1f} |", flush=True)


if __name__ == "__main__":
  main()
