"""Training the ranker: `python -m spider_jax.train --workdir=DIR`.

The loop is a pure, jit-compiled, donated train step over (params,
train_state, batch, key), data parallel over all devices of a 1-D mesh.
Batches and dropout keys are functions of (seed, step), so a run restarted
from its latest checkpoint continues exactly as if it had never stopped.
Each epoch ends with a validation pass (mean weighted tau on the "val"
tasks at every re-ranking depth 0..k_max; the best depth is recorded) and a
checkpoint. Per-step metrics go to WORKDIR/metrics.jsonl.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm import tqdm

from spider_jax import checkpoint, metrics, sharding
from spider_jax.data.sampler import TrainingSampler
from spider_jax.data.store import FeatureStore
from spider_jax.data.synthetic import SyntheticSpec, write_synthetic_store
from spider_jax.losses import (WEIGHTINGS, loss_denominator,
                               plackett_luce_loss, plackett_luce_terms)
from spider_jax.model import FitnessTransformer, ModelConfig
from spider_jax.scoring import (Scorer, ZooInfo, batch_slots,
                                score_depths, split_chunks)


def open_or_build_store(config: ml_collections.ConfigDict,
                        workdir: pathlib.Path) -> FeatureStore:
  """The store to train on / rank, built first if needed.

  config.store if set; else the offline benchmark config.bench (built or
  reused by spider_jax.groundtruth.run, results in WORKDIR/bench) when its
  variant is set; else the synthetic store in WORKDIR/store. The zoo is
  restricted to `config.ptms` (see `select_ptms`); `config.exclude_pools`
  and `config.exclude_tasks` hide pools and tasks by name.
  """
  if config.store:
    path = pathlib.Path(config.store)
  elif config.bench.variant:
    path = build_benchmark(config.bench, workdir)
  else:
    path = workdir / "store"
    if not (path / "meta.json").exists() and jax.process_index() == 0:
      spec = SyntheticSpec(seed=config.synthetic.seed,
                           num_train=config.synthetic.num_train)
      logging.info("Writing the synthetic store to %s", path)
      write_synthetic_store(path, spec)
    sharding.barrier("synthetic_store")  # Others wait for process 0's store.
  names = lambda text: [n.strip() for n in text.split(",") if n.strip()]
  whole = FeatureStore(path)
  return FeatureStore(
      path, ptms=select_ptms(whole, config.ptms), generic_from=config.encoder,
      exclude_pools=names(config.exclude_pools),
      exclude_tasks=sorted(set(tasks_to_hide(whole, config.ground_truth))
                           | set(names(config.get("exclude_tasks", "")))))


def tasks_to_hide(store: FeatureStore, ground_truth: str) -> list[str]:
  """Training/validation tasks to leave out under config `ground_truth`.

  "any": none; "finetuned": every one whose ground truth is not
  fine-tuned (the store's meta.json lists the fine-tuned ones under
  `ground_truth.finetuned_tasks`, written by spider_jax.groundtruth with
  `finetune.val_tasks` / `finetune.train_tasks`); "auto": "finetuned" if
  the store lists any, else "any".
  """
  if ground_truth not in ("any", "finetuned", "auto"):
    raise ValueError(f"ground_truth={ground_truth!r}; use any, finetuned or "
                     "auto.")
  tuned = set(store.meta.get("ground_truth", {}).get("finetuned_tasks", ()))
  if ground_truth == "any" or (ground_truth == "auto" and not tuned):
    return []
  if not tuned:
    raise ValueError(
        f"ground_truth=finetuned but store {store.path} has no fine-tuned "
        "training or validation task; build one with `python -m "
        "spider_jax.groundtruth --config=configs/bench.py:default "
        "--config.finetune.enabled=True --config.finetune.val_tasks=True "
        "--config.finetune.train_tasks=N`, or use ground_truth=any.")
  return [n for n in store.task_names() if store.meta["tasks"][n]["role"]
          != "target" and n not in tuned]


def build_benchmark(bench: ml_collections.ConfigDict,
                    workdir: pathlib.Path) -> pathlib.Path:
  """Builds or reuses the benchmark store of `bench`; returns its path.

  Every stage is cached under bench.cache_dir, so a second call only checks
  hashes. On several processes every process takes part
  (`groundtruth.run(all_processes=True)`: feature extraction is split over
  them, process 0 trains the zoo and writes the store and ground truth);
  all return once process 0 is done. Its summary goes to
  WORKDIR/bench/summary.json.
  """
  from spider_jax import groundtruth  # Heavy imports only when needed.
  bench = bench.copy_and_resolve_references()
  with bench.unlocked():
    bench.results_dir = str(workdir / "bench")
  log = ((lambda m: print(m, flush=True)) if jax.process_index() == 0
         else (lambda m: None))
  path = groundtruth.run(bench, log=log, all_processes=True)["store"]
  sharding.barrier("benchmark_store")
  return pathlib.Path(path)


def select_ptms(store: FeatureStore, spec: str) -> list[str] | None:
  """The PTM subset named by `spec` (config field `ptms`).

  "all" (or "") = the whole zoo (None); "fine_tuned" = the PTMs whose every
  target ground-truth cell is a fine-tuned accuracy (the store's
  meta["ground_truth"]["target_cell_source"], written by
  spider_jax.groundtruth; feature-only PTMs scored by a linear probe are
  left out); otherwise a comma-separated list of names.
  """
  if spec in ("", "all"):
    return None
  if spec == "fine_tuned":
    source = store.meta.get("ground_truth", {}).get("target_cell_source")
    if not source:
      raise ValueError(
          f"--config.ptms=fine_tuned needs a store written by "
          f"spider_jax.groundtruth (meta ground_truth.target_cell_source); "
          f"{store.path} has none. Use --config.ptms=all or a list of names.")
    return [m for m in store.ptm_names
            if all(cells.get(m) == "finetune" for cells in source.values())]
  return [m.strip() for m in spec.split(",") if m.strip()]


def zoo_of(store: FeatureStore, task_token: str = "prototype") -> ZooInfo:
  """The store's zoo as the scorer sees it."""
  return ZooInfo(store.ptm_names, store.ptm_dims, store.encoder_dim,
                 task_token)


def build_model(config, zoo: ZooInfo, seed: int) -> FitnessTransformer:
  """The fitness transformer for `zoo` (call under jit / eval_shape)."""
  return FitnessTransformer(len(zoo.ptm_names), zoo.generic_dim, zoo.ptm_dims,
                            ModelConfig(**config.model.to_dict()),
                            rngs=nnx.Rngs(params=seed))


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam with the official per-epoch cosine decay from lr to lr_min."""
  cosine = optax.cosine_decay_schedule(
      config.lr, decay_steps=max(config.epochs, 1),
      alpha=config.lr_min / config.lr)
  return optax.adam(lambda step: cosine(step // steps_per_epoch))


def _fixed_order_sum(stacked):
  """x[0] + x[1] + ... along axis 0 of every leaf, in that order."""
  total = jax.tree.map(lambda x: x[0], stacked)
  for i in range(1, jax.tree.leaves(stacked)[0].shape[0]):
    total = jax.tree.map(lambda t, x, i=i: t + x[i], total, stacked)
  return total


def exact_loss_and_grad(graphdef, params, batch, key, chunk: int, mesh,
                        loss_options: dict | None = None):
  """Loss and gradients whose floats do not depend on the device layout.

  The batch is cut into chunks of `chunk` tasks; `lax.map` runs the same
  [chunk]-task forward and backward pass for each chunk on whichever device
  holds it, and the per-chunk loss sums and gradients are gathered and added
  in chunk order on every device. Chunk i's dropout key is
  fold_in(key, i). So 1 device, 4 devices and 2 hosts x 2 devices give the
  same bits (`tests/test_multihost.py`).

  Args:
    graphdef, params: the model.
    batch: the sharded training batch ([B, ...] leaves).
    key: the step's dropout key.
    chunk: tasks per chunk; must divide B / data-parallel devices.
    mesh: the training mesh.
    loss_options: keyword arguments of `plackett_luce_terms` (weighting,
      tie_margin).

  Returns:
    (loss [], grads like params), equal in value to `plackett_luce_loss`
    and its gradient up to rounding.
  """
  b = batch["u"].shape[0]
  groups = b // chunk
  if b % chunk or groups % mesh.shape["data"]:
    raise ValueError(f"exact_chunk={chunk} must divide the per-device batch "
                     f"({b} tasks over {mesh.shape['data']} devices).")
  chunks = split_chunks(batch, chunk)
  index = jax.lax.with_sharding_constraint(
      jnp.arange(groups), sharding.batch_sharded(mesh))

  def one(args):
    c, i = args
    def loss_sum(p):
      scores = nnx.merge(graphdef, p)(c["u"], c["u_mask"], batch_slots(c),
                                      rng=jax.random.fold_in(key, i))
      return jnp.sum(plackett_luce_terms(scores, c["gt"],
                                         **(loss_options or {})) *
                     c["weight"])
    return jax.value_and_grad(loss_sum)(params)

  sums = jax.lax.with_sharding_constraint(
      jax.lax.map(one, (chunks, index)), sharding.replicated(mesh))
  loss, grads = _fixed_order_sum(sums)
  denom = loss_denominator(batch["weight"], batch["gt"].shape[-1])
  # The barrier materialises the result, so the caller's optimizer update
  # is not fused with the layout-dependent code above (XLA may otherwise
  # contract its products and sums into FMAs differently on each layout).
  return jax.lax.optimization_barrier(
      (loss / denom, jax.tree.map(lambda g: g / denom, grads)))


def make_train_step(graphdef, tx, mesh, exact_chunk: int = 0,
                    loss_options: dict | None = None):
  """The jitted, donated step: (params, train_state, batch, key) -> new.

  exact_chunk > 0 computes the loss and gradients with
  `exact_loss_and_grad` (same floats on any device layout); 0 lets XLA sum
  over the whole batch (faster; layouts agree to rounding). loss_options
  are keyword arguments of the loss (weighting, tie_margin).
  """
  rep = sharding.replicated(mesh)

  @functools.partial(jax.jit, donate_argnums=(0, 1),
                     out_shardings=(rep, rep, rep))
  def train_step(params, train_state, batch, key):
    key = jax.random.fold_in(key, train_state["step"])
    if exact_chunk:
      loss, grads = exact_loss_and_grad(graphdef, params, batch, key,
                                        exact_chunk, mesh, loss_options)
    else:
      def loss_fn(p):
        scores = nnx.merge(graphdef, p)(batch["u"], batch["u_mask"],
                                        batch_slots(batch), rng=key)
        return plackett_luce_loss(scores, batch["gt"], batch["weight"],
                                  **(loss_options or {}))
      loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, train_state["opt"], params)
    params = optax.apply_updates(params, updates)
    return params, {"opt": opt, "step": train_state["step"] + 1}, {
        "loss": loss, "grad_norm": optax.tree.norm(grads)}

  return train_step


def ptm_feature_tokens(store: FeatureStore, dim: int, *, seed: int,
                       num_images: int = 256) -> np.ndarray:
  """[M, dim] initial PTM tokens computed from the PTMs' own features.

  Every PTM embeds the same `num_images` images of the training tasks
  (seeded choice); its descriptor is the upper triangle of the centred
  cosine-similarity matrix of those images (what it considers alike,
  comparable across feature widths). The descriptors are standardised and
  projected on their principal components; these fill the first
  min(M - 1, dim) coordinates with unit variance, and the rest is N(0, 1)
  as in the default initialisation.
  """
  rng = np.random.default_rng(seed)
  names = store.task_names("train")
  feats = {m: [] for m in store.ptm_names}
  count = 0
  for name in rng.permutation(names):
    task = store.task(str(name))
    rows = rng.permutation(len(task.labels))[:max(num_images - count, 0)]
    for m in store.ptm_names:
      feats[m].append(np.asarray(task.ptm_features(m))[rows])
    count += len(rows)
    if count >= num_images:
      break
  iu = np.triu_indices(count, k=1)
  desc = []
  for m in store.ptm_names:
    f = np.concatenate(feats[m]).astype(np.float64)
    f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    g = f @ f.T
    g -= g.mean(0, keepdims=True) + g.mean(1, keepdims=True) - g.mean()
    desc.append(g[iu])
  desc = np.stack(desc)
  desc = (desc - desc.mean(0)) / np.maximum(desc.std(0), 1e-12)
  u, sv, _ = np.linalg.svd(desc, full_matrices=False)
  r = min(len(desc) - 1, dim)
  pcs = u[:, :r] * sv[:r]
  pcs /= np.maximum(pcs.std(0), 1e-12)
  out = rng.standard_normal((len(desc), dim))
  out[:, :r] = pcs
  return out.astype(np.float32)


def mean_weighted_tau(scores: np.ndarray, gt_rows: np.ndarray) -> float:
  """Mean over tasks of weighted tau: [T, M] scores vs [T, M] accuracies."""
  return float(np.mean([metrics.weighted_tau(g, s)
                        for g, s in zip(gt_rows, scores)]))


def validation_tasks(store: FeatureStore) -> tuple[list, np.ndarray]:
  """The store's T >= 1 "val" tasks and their [T, M] ground truth."""
  names = store.task_names("val")
  gt = store.ground_truth()
  return ([store.task(n) for n in names],
          np.stack([gt.row(n, store.ptm_names) for n in names]))


def validate(scorer: Scorer, store: FeatureStore, k_max: int,
             task_token: str = "prototype") -> dict:
  """Mean weighted tau on the "val" tasks for k = 0..k_max.

  Returns:
    {"per_k": [tau at k=0, ...], "best_k": int, "best": float}; empty
    dict when the store has no validation tasks.
  """
  if not store.task_names("val"):
    return {}
  tasks, gt = validation_tasks(store)
  zoo = zoo_of(store, task_token)
  depths = range(min(k_max, len(store.ptms)) + 1)
  per_k = [mean_weighted_tau(scores, gt)
           for scores in score_depths(scorer, tasks, zoo, depths)]
  best_k = int(np.argmax(per_k))
  return {"per_k": per_k, "best_k": best_k, "best": per_k[best_k]}


def checkpoint_meta(config, store: FeatureStore, prior: np.ndarray,
                    val: dict) -> dict:
  """JSON metadata saved beside the parameters."""
  return {
      "ptm_names": list(store.ptm_names),
      "ptm_dims": list(store.ptm_dims),
      "generic_dim": store.encoder_dim,
      "encoder": store.encoder_name,
      "model": config.model.to_dict(),
      "config": json.loads(config.to_json()),
      "prior": prior.tolist(),
      "rerank_k": int(val.get("best_k", 0)),
      "val": val,
  }


def train(config: ml_collections.ConfigDict, workdir,
          should_stop: Callable[[], bool] | None = None,
          store: FeatureStore | None = None) -> dict:
  """Trains (or resumes) the ranker in `workdir`; returns a summary dict.

  Writes WORKDIR/checkpoints (orbax), WORKDIR/metrics.jsonl and
  WORKDIR/config.json. Only process 0 writes logs; every process takes part
  in checkpointing. When `should_stop()` turns True on any process (e.g. a
  SIGTERM preemption notice), all processes save a checkpoint at the current
  step and return with summary["preempted"] = True. `store` (default:
  `open_or_build_store(config, workdir)`) lets a caller pass the store it
  already opened.
  """
  if config.loss_weighting not in WEIGHTINGS or config.loss_tie_margin < 0:
    raise ValueError(
        f"--config.loss_weighting={config.loss_weighting!r} / "
        f"--config.loss_tie_margin={config.loss_tie_margin}: use one of "
        f"{WEIGHTINGS} and a margin >= 0 (accuracy points).")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if store is None:
    store = open_or_build_store(config, workdir)
  zoo = zoo_of(store, config.model.task_token)
  mesh = sharding.data_mesh()
  if config.batch_size % mesh.size:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by "
                     f"the {mesh.size} devices; pick a multiple.")
  sampler = TrainingSampler(store, store.task_names("train"),
                            batch_size=config.batch_size,
                            k_max=config.k_max if config.model.ptm_specific
                            else 0,
                            seed=config.seed, min_keep=config.min_keep,
                            task_token=config.model.task_token)
  gt = store.ground_truth()
  prior = metrics.constant_prior(np.stack(
      [gt.row(n, store.ptm_names) for n in store.task_names("train")]))
  spe = sampler.steps_per_epoch
  total = config.epochs * spe
  tx = make_optimizer(config, spe)
  rep = sharding.replicated(mesh)
  graphdef, abstract_params = nnx.split(
      nnx.eval_shape(lambda: build_model(config, zoo, config.seed)))
  init = lambda: nnx.split(build_model(config, zoo, config.seed))[1]
  params = jax.jit(init, out_shardings=rep)()
  if config.ptm_init == "features":
    params["ptm_tokens"].value = jax.device_put(
        ptm_feature_tokens(store, config.model.dim, seed=config.seed), rep)
  elif config.ptm_init != "normal":
    raise ValueError(f"unknown --config.ptm_init={config.ptm_init!r}; use "
                     "normal or features.")
  train_state = {"opt": jax.jit(tx.init, out_shardings=rep)(params),
                 "step": jax.device_put(jnp.zeros((), jnp.int32), rep)}
  abstract = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)
  is_main = jax.process_index() == 0
  if is_main:
    (workdir / "config.json").write_text(config.to_json(indent=1))
  val, start = {}, 0
  with checkpoint.manager(workdir / "checkpoints",
                          keep_latest=config.keep_latest) as mngr:
    restored = checkpoint.restore_train(mngr, abstract(params),
                                        abstract(train_state))
    if restored is not None:
      params, train_state, meta = restored
      checkpoint.check_zoo(meta, zoo.ptm_names, zoo.ptm_dims, zoo.generic_dim,
                           store.encoder_name)
      start = int(train_state["step"])
      val = meta.get("val", {})
      logging.info("Resumed from step %d", start)
    step_fn = make_train_step(
        graphdef, tx, mesh, config.exact_chunk,
        dict(weighting=config.loss_weighting,
             tie_margin=config.loss_tie_margin))
    scorer = Scorer(graphdef, params, mesh=mesh,
                    batch_size=config.eval_batch_size,
                    exact_chunk=config.exact_chunk)
    key = jax.random.key(config.seed)
    rows = sharding.process_rows(config.batch_size, mesh)  # Built here.
    log = open(workdir / "metrics.jsonl", "a") if is_main else None
    t0 = time.time()
    stop = total if config.stop_after_steps <= 0 else min(
        total, config.stop_after_steps)
    bar = tqdm(range(start, stop), initial=start, total=total,
               desc="train", disable=not is_main, leave=False)
    preempted = False
    for step in bar:
      if should_stop is not None and sharding.any_process(should_stop()):
        if mngr.latest_step() != step:
          checkpoint.save(mngr, step, params, train_state,
                          checkpoint_meta(config, store, prior, val), None)
        preempted = True
        break
      batch = sharding.put_local_batch(sampler.batch(step, rows),
                                       config.batch_size, mesh)
      params, train_state, m = step_fn(params, train_state, batch, key)
      if (step + 1) % spe == 0 or step + 1 == total:
        epoch = (step + 1) // spe
        scorer.set_params(params)
        val = validate(scorer, store, sampler.k_max,
                       config.model.task_token)
        checkpoint.save(mngr, step + 1, params, train_state,
                        checkpoint_meta(config, store, prior, val),
                        val.get("best"))
        if log:
          log.write(json.dumps({"step": step + 1, "epoch": epoch,
                                "val_weighted_tau": val.get("per_k"),
                                "val_best_k": val.get("best_k")}) + "\n")
      if log:
        loss = float(m["loss"])
        if not np.isfinite(loss):
          raise FloatingPointError(f"non-finite loss at step {step}.")
        log.write(json.dumps({"step": step + 1, "loss": loss,
                              "grad_norm": float(m["grad_norm"]),
                              "time": round(time.time() - t0, 3)}) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{loss:.4f}",
                        val=f"{val.get('best', float('nan')):.3f}")
    if log:
      log.close()
    final_step = int(train_state["step"])
  return {"workdir": str(workdir), "steps": final_step, "total_steps": total,
          "val": val, "store": str(store.path), "preempted": preempted}


def main(argv):
  from absl import app, flags
  from spider_jax import cli
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.initialize_runtime()
  stop = cli.stop_event_on_sigterm()
  summary = train(flags.FLAGS.config, flags.FLAGS.workdir, stop.is_set)
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  from absl import app
  from spider_jax import cli
  cli.define_flags("train.py")
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
