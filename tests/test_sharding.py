"""Same numbers on 1 and 4 (simulated) devices: scoring (data parallel and
with the zoo split over devices) and a train step; bit for bit with
exact_chunk."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_one_vs_four_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, str(REPO / "tests" /
                                            "sharding_check.py")],
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  diffs = json.loads(out.stdout.strip().splitlines()[-1])
  # Only the order of float reductions may differ between layouts.
  assert diffs["scores_k0"] < 1e-5, diffs
  assert diffs["scores_k2"] < 1e-5, diffs
  assert diffs["scores_2d"] < 1e-5, diffs  # Zoo split over devices.
  assert diffs["loss"] < 1e-5, diffs
  assert diffs["grads"] < 1e-5, diffs
  # exact_chunk=1: the same floats on 1, 2 and 4 devices, and the same
  # quantities as the batched mode up to rounding.
  assert diffs["exact"] == 0.0, diffs
  assert diffs["exact_vs_batched"] < 1e-5, diffs
