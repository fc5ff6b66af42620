r"""Measures zoo throughput and fine-tuning cost on this machine.

  python -m spider_jax.zoo.bench --out=/tmp/zoo_bench.json [--quick]

Reports (JSON): feature-extraction img/s per PTM and input size (batch 128,
after compilation), from-scratch training of each local arch on sklearn
digits, `finetune` wall time at 1000 training images (28x28 local archs,
64 px EfficientNet-Lite0) and one linear-probe cell. Timings are wall-clock
on whatever else the machine is doing; run it on an idle machine for
reference numbers.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from spider_jax.zoo import archs
from spider_jax.zoo import ckpt
from spider_jax.zoo import finetune
from spider_jax.zoo import registry
from spider_jax.zoo import train


def _throughput(fn, images: np.ndarray, reps: int = 3) -> float:
  jax.block_until_ready(fn(images))
  t0 = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(fn(images))
  return reps * len(images) / (time.perf_counter() - t0)


def run(quick: bool = False) -> dict:
  """Runs all measurements; `quick` shrinks them (smoke test)."""
  out: dict = {"load_average_start": os.getloadavg(),
               "devices": str(jax.devices())}
  x, y = train.sklearn_digits()
  perm = np.random.default_rng(0).permutation(len(x))
  n_tr = 200 if quick else 1000
  tr, va, te = perm[:n_tr], perm[1000:1300], perm[1300:]
  epochs = 1 if quick else 5
  batch = x[:128]

  # Local archs: train from scratch on the full digits, then fine-tune.
  tmp = tempfile.mkdtemp()
  out["local"] = {}
  for arch in sorted(archs.ARCHS):
    model, meta = train.train_arrays(
        arch, x, y, epochs=1 if quick else 10, seed=0,
        source="sklearn_digits")
    d = os.path.join(tmp, arch)
    ckpt.save(d, model, meta)
    spec = registry.local_spec(d)
    loaded = spec.load()
    r = finetune.finetune(loaded, x[tr], y[tr], x[va], y[va], x[te], y[te],
                          lrs=(3e-3, 1e-3), epochs=epochs, seed=0)
    out["local"][arch] = {
        "feature_dim": spec.feature_dim,
        "params": int(sum(v.size for v in jax.tree.leaves(
            nnx.state(model, nnx.Param)))),
        "pretrain_seconds_10ep_1617img": meta["train_seconds"],
        "pretrain_holdout_acc": meta["accuracy"],
        "features_img_per_s": _throughput(loaded.features, batch),
        "finetune": r,
    }
    print(arch, json.dumps(out["local"][arch]), flush=True)

  # Packaged PTMs: feature throughput per input size.
  out["features_img_per_s"] = {}
  sizes = (64,) if quick else (32, 64, 96)
  for v in ("lite0", "lite1", "lite2"):
    for size in sizes:
      fn = registry.efficientnet_spec(v, size).load().features
      out["features_img_per_s"][f"efficientnet_{v}@{size}"] = _throughput(
          fn, batch)
  nsfw = registry.open_nsfw_spec().load().features
  out["features_img_per_s"]["open_nsfw@224"] = _throughput(nsfw, batch[:64],
                                                           reps=1)
  print(json.dumps(out["features_img_per_s"]), flush=True)

  # EfficientNet-Lite0 fine-tuning at 64 px.
  spec = registry.efficientnet_spec("lite0", 64)
  r = finetune.finetune(spec, x[tr], y[tr], x[va], y[va], x[te], y[te],
                        lrs=(1e-3, 3e-4), epochs=1 if quick else 3, seed=0)
  out["finetune_efficientnet_lite0@64"] = r
  print("lite0", json.dumps(r), flush=True)

  # One linear-probe cell (Lite0 features, 1000/300/497 split, 5 L2 values).
  f = registry.extract_features(spec.load().features, x, 128)
  t0 = time.perf_counter()
  rep = finetune.linear_probe_report(f[tr], y[tr], f[va], y[va], f[te],
                                     y[te])
  rep["seconds_incl_compile"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  finetune.linear_probe(f[tr], y[tr], f[va], y[va], f[te], y[te])
  rep["seconds_cached"] = time.perf_counter() - t0
  out["linear_probe_efficientnet_lite0@64"] = rep
  out["load_average_end"] = os.getloadavg()
  return out


def main(argv):  # pragma: no cover
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  res = run(flags.FLAGS.quick)
  path = flags.FLAGS.out
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as fh:
    json.dump(res, fh, indent=2, default=str)
  os.replace(tmp, path)
  print(f"wrote {path}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  absl_flags.DEFINE_string("out", "/tmp/zoo_bench.json", "Output JSON.")
  absl_flags.DEFINE_bool("quick", False, "Tiny smoke run.")
  app.run(main)
