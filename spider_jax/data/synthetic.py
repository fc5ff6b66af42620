"""A synthetic FeatureStore with a planted, task-dependent PTM ranking.

Each task lives at an angle phi on a circle of "domains"; its generic
features are class clusters around a centre 2.5 * (cos phi, sin phi) A (A a
fixed [2, Dg] map), so phi is readable from the mean of its class prototypes.
Each PTM m prefers the angle psi_m (spread around the circle) and has a small
task-independent bias b_m; its accuracy on a task is

  acc = 100 * sigmoid(1.5 * (cos(phi - psi_m) + b_m) + 0.3), rounded to 0.1,

so the best PTM depends on the task and the constant prior (mean rank)
cannot order the zoo well. A PTM's own features separate the classes in
proportion to its fit, so re-ranking tokens and LogME-type scores carry
signal too. Rounding creates occasional tied accuracies.

`python -m spider_jax.data.synthetic --out=DIR` writes one.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from spider_jax.data.store import FeatureStore, PTMInfo, StoreWriter


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Size of a synthetic store.

  Attributes:
    num_ptms: M.
    generic_dim: Dg.
    ptm_dims: feature widths, cycled over the PTMs.
    num_train, num_val, num_target: tasks per role.
    min_classes, max_classes: class-count range of a task.
    min_shots, max_shots: samples per class.
    num_source_classes: width of each PTM's source softmax.
    seed: everything is a function of it.
  """
  num_ptms: int = 8
  generic_dim: int = 32
  ptm_dims: tuple[int, ...] = (16, 24, 32)
  num_train: int = 160
  num_val: int = 16
  num_target: int = 24
  min_classes: int = 3
  max_classes: int = 10
  min_shots: int = 8
  max_shots: int = 20
  num_source_classes: int = 10
  seed: int = 0


def planted_accuracy(phi: np.ndarray, psi: np.ndarray,
                     bias: np.ndarray) -> np.ndarray:
  """[T] task angles x [M] PTM angles/biases -> [T, M] accuracies (%)."""
  q = np.cos(phi[:, None] - psi[None, :]) + bias[None, :]
  return np.round(100.0 / (1.0 + np.exp(-(1.5 * q + 0.3))), 1)


def write_synthetic_store(path, spec: SyntheticSpec = SyntheticSpec()
                          ) -> FeatureStore:
  """Writes a synthetic FeatureStore to `path` and returns it opened."""
  rng = np.random.default_rng(spec.seed)
  m, dg = spec.num_ptms, spec.generic_dim
  dims = [spec.ptm_dims[i % len(spec.ptm_dims)] for i in range(m)]
  ptms = [PTMInfo(f"ptm{i:02d}", dims[i], spec.num_source_classes)
          for i in range(m)]
  psi = 2 * np.pi * np.arange(m) / m + rng.normal(0, 0.1, m)
  bias = rng.normal(0, 0.25, m)
  a = rng.normal(size=(2, dg))
  a /= np.linalg.norm(a, axis=1, keepdims=True)
  source_maps = [rng.normal(size=(d, spec.num_source_classes)) for d in dims]
  roles = (["train"] * spec.num_train + ["val"] * spec.num_val +
           ["target"] * spec.num_target)
  phis = rng.uniform(0, 2 * np.pi, len(roles))
  acc = planted_accuracy(phis, psi, bias)
  writer = StoreWriter(path, encoder_name="synthetic_generic", encoder_dim=dg,
                       ptms=ptms, extra_meta={"synthetic": {
                           "spec": dataclasses.asdict(spec),
                           "ptm_angles": psi.tolist(),
                           "ptm_bias": bias.tolist()}})
  gt = {}
  for t, role in enumerate(roles):
    name = f"{role}{t:03d}"
    c = int(rng.integers(spec.min_classes, spec.max_classes + 1))
    shots = rng.integers(spec.min_shots, spec.max_shots + 1, size=c)
    labels = np.repeat(np.arange(c), shots)
    centre = 2.5 * np.array([np.cos(phis[t]), np.sin(phis[t])]) @ a
    class_means = centre + rng.normal(0, 0.5, (c, dg))
    generic = class_means[labels] + rng.normal(0, 0.5, (labels.size, dg))
    feats, probs = {}, {}
    for j, p in enumerate(ptms):
      fit = 1.0 / (1.0 + np.exp(-3.0 * (acc[t, j] / 100.0 - 0.5)))
      codes = rng.normal(0, 1, (c, p.dim))
      f = 2.0 * fit * codes[labels] + rng.normal(0, 1, (labels.size, p.dim))
      feats[p.name] = np.maximum(f, 0.0)  # ReLU-like, as real penultimates.
      logits = feats[p.name] @ source_maps[j] / np.sqrt(p.dim)
      e = np.exp(logits - logits.max(1, keepdims=True))
      probs[p.name] = e / e.sum(1, keepdims=True)
    split = np.zeros(labels.size, np.int8)
    for cls in range(c):  # Per class: 60 % train (>= 1), 20 % val, 20 % test.
      rows = rng.permutation(np.flatnonzero(labels == cls))
      n_tr = max(1, int(round(0.6 * rows.size)))
      n_va = int(round(0.2 * rows.size))
      split[rows[n_tr:n_tr + n_va]] = 1
      split[rows[n_tr + n_va:]] = 2
    writer.add_pool(name, labels=labels, generic=generic, features=feats,
                    source_probs=probs)
    writer.add_task(name, pool=name, split=split, role=role)
    gt[name] = {p.name: float(acc[t, j]) for j, p in enumerate(ptms)}
  writer.set_ground_truth(gt)
  writer.set_seconds_per_sample({"encoder": 0.0,
                                 **{p.name: 0.0 for p in ptms}})
  return writer.close()


def main(argv):
  del argv
  from absl import flags
  store = write_synthetic_store(
      pathlib.Path(flags.FLAGS.out),
      SyntheticSpec(seed=flags.FLAGS.seed))
  print(f"wrote {store.path}: {len(store.ptms)} PTMs, "
        f"{len(store.task_names())} tasks")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("out", None, "Directory to write the store to.",
                      required=True)
  flags.DEFINE_integer("seed", 0, "Seed.")
  app.run(main)
