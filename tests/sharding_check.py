"""Run in a subprocess with 4 simulated CPU devices (see test_sharding.py).

Prints the max |difference| between 1-device and 4-device results of
(a) scoring with and without re-ranking slots and (b) one train step, in
the default batched mode and with exact_chunk=1 (fixed-order chunks).
"""

import json
import pathlib
import sys
import tempfile

import jax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import train as train_config  # noqa: E402
from spider_jax import sharding  # noqa: E402
from spider_jax.data.sampler import TrainingSampler  # noqa: E402
from spider_jax.data.synthetic import SyntheticSpec, write_synthetic_store  # noqa: E402
from spider_jax.scoring import Scorer, score_tasks  # noqa: E402
from spider_jax.train import build_model, make_train_step, zoo_of  # noqa: E402


def run(devices, store, cfg, exact_chunk=0):
  mesh = sharding.data_mesh(devices)
  zoo = zoo_of(store)
  rep = sharding.replicated(mesh)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(cfg, zoo, 0)))
  params = jax.jit(lambda: nnx.split(build_model(cfg, zoo, 0))[1],
                   out_shardings=rep)()
  tasks = [store.task(n) for n in store.task_names()]
  scorer = Scorer(graphdef, params, mesh=mesh, batch_size=8,
                  exact_chunk=exact_chunk)
  s0 = score_tasks(scorer, tasks, zoo, k=0)
  s2 = score_tasks(scorer, tasks, zoo, k=2)
  sampler = TrainingSampler(store, store.task_names("train"), batch_size=8,
                            k_max=2, seed=0)
  # SGD with lr 1: the parameter change is the gradient itself (Adam's first
  # step is sign(g) * lr, which flips on gradients that are ~0 either way).
  tx = optax.sgd(1.0)
  state = {"opt": jax.jit(tx.init, out_shardings=rep)(params),
           "step": jax.device_put(np.int32(0), rep)}
  step = make_train_step(graphdef, tx, mesh, exact_chunk)
  batch = sampler.batch(0)
  batch["ptm"][:, :2] = [[0, 1]] * 8  # Make sure slots are active.
  batch["h_mask"][:, :2, :3] = True
  before = [np.asarray(x) for x in jax.tree.leaves(params)]
  new_params, _, m = step(params, state, sharding.put_batch(batch, mesh),
                          jax.random.key(0))
  leaves = [np.asarray(x) - b for x, b in zip(jax.tree.leaves(new_params),
                                               before)]
  return s0, s2, float(m["loss"]), leaves


def main():
  assert jax.device_count() == 4, jax.devices()
  cfg = train_config.get_config("tiny")
  with tempfile.TemporaryDirectory() as tmp:
    store = write_synthetic_store(pathlib.Path(tmp) / "s", SyntheticSpec(
        num_ptms=5, num_train=16, num_val=2, num_target=6, seed=1))
    one = run(jax.devices()[:1], store, cfg)
    four = run(jax.devices(), store, cfg)
    exact = [run(d, store, cfg, exact_chunk=1)
             for d in (jax.devices()[:1], jax.devices()[:2], jax.devices())]
    # Without dropout (whose keys differ between the modes) the exact mode
    # computes the batched mode's loss and gradients up to rounding.
    no_drop = cfg.copy_and_resolve_references()
    no_drop.model.dropout = 0.0
    plain = [run(jax.devices()[:1], store, no_drop, exact_chunk=c)
             for c in (0, 1)]
    # 2-D (tasks x PTMs) meshes: the zoo split over 2 and 4 devices (5 PTMs
    # are padded to 6 and 8).
    zoo = zoo_of(store)
    graphdef, params = nnx.split(build_model(cfg, zoo, 0))
    tasks = [store.task(n) for n in store.task_names()]
    two_d = []
    for mp in (2, 4):
      scorer = Scorer(graphdef, params, batch_size=8, model_parallel=mp)
      two_d.append(np.abs(score_tasks(scorer, tasks, zoo, k=2) -
                          one[1]).max())
  out = {
      "scores_2d": float(max(two_d)),
      "scores_k0": float(np.abs(one[0] - four[0]).max()),
      "scores_k2": float(np.abs(one[1] - four[1]).max()),
      "loss": abs(one[2] - four[2]),
      "grads": max(float(np.abs(a - b).max()) for a, b in zip(one[3],
                                                               four[3])),
      # exact_chunk=1 on 2 and 4 devices against 1 device.
      "exact": max(
          max(float(np.abs(e[i] - exact[0][i]).max()) for i in (0, 1))
          + abs(e[2] - exact[0][2])
          + max(float(np.abs(a - b).max()) for a, b in zip(e[3], exact[0][3]))
          for e in exact[1:]),
      # exact mode computes the same quantities as the batched mode.
      "exact_vs_batched": max(
          float(np.abs(exact[0][1] - one[1]).max()),
          abs(plain[1][2] - plain[0][2]) / abs(plain[0][2]),
          max(float(np.abs(a - b).max()) for a, b in zip(plain[1][3],
                                                         plain[0][3]))),
  }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
