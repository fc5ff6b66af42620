"""Preemption and multi-process runs of the real entry points (subprocesses).

* SIGKILL mid-run, restart: final parameters equal an uninterrupted run's.
* SIGTERM: the trainer checkpoints at the signal's step and exits 0.
* 20 training steps on 2 processes x 2 CPU devices (jax.distributed on
  localhost), 1 process x 4 devices and 1 device give the same parameters,
  losses, gradient norms and validation scores, bit for bit
  (`--config.exact_chunk=1`), and the trained ranker's target scores are
  the same floats on the three layouts.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from spider_jax import checkpoint

from conftest import free_port, latest_params, run_processes

REPO = pathlib.Path(__file__).resolve().parents[1]
EPOCHS = 5  # tiny: 20 steps per epoch -> 100 steps.


def train_cmd(workdir, store, *extra):
  return [sys.executable, "-m", "spider_jax.train",
          "--config=configs/train.py:tiny", f"--config.store={store}",
          f"--config.epochs={EPOCHS}", f"--workdir={workdir}", *extra]


def env(devices=1):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def wait_for_epochs(workdir, n, proc, timeout=600):
  """Waits until `n` epochs are checkpointed (their val line is logged)."""
  log = pathlib.Path(workdir) / "metrics.jsonl"
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError(f"trainer exited early: {proc.stderr.read()}")
    if log.exists() and log.read_text().count("val_weighted_tau") >= n:
      return
    time.sleep(0.2)
  raise AssertionError("timed out waiting for a checkpoint")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  from spider_jax.data.synthetic import SyntheticSpec, write_synthetic_store
  path = tmp_path_factory.mktemp("mh") / "store"
  write_synthetic_store(path, SyntheticSpec(num_train=160))
  return path


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
  """An uninterrupted run on 1 device."""
  wd = tmp_path_factory.mktemp("ref")
  subprocess.run(train_cmd(wd, store), cwd=REPO, env=env(), check=True,
                 capture_output=True, timeout=900)
  return latest_params(wd)


def assert_same(a, b):
  assert a[0] == b[0]
  for x, y in zip(a[1], b[1]):
    np.testing.assert_array_equal(x, y)


def test_sigkill_then_resume_matches_uninterrupted(store, reference,
                                                   tmp_path):
  proc = subprocess.Popen(train_cmd(tmp_path, store), cwd=REPO, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  wait_for_epochs(tmp_path, 1, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  with checkpoint.manager(tmp_path / "checkpoints") as mngr:
    assert mngr.latest_step() is not None and mngr.latest_step() < 100
  subprocess.run(train_cmd(tmp_path, store), cwd=REPO, env=env(), check=True,
                 capture_output=True, timeout=900)
  assert_same(latest_params(tmp_path), reference)


def test_sigterm_checkpoints_at_the_signal(store, tmp_path):
  # A long run (600 steps), so the signal surely lands mid-run.
  proc = subprocess.Popen(train_cmd(tmp_path, store, "--config.epochs=30"),
                          cwd=REPO, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  wait_for_epochs(tmp_path, 1, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  summary = json.loads(out[out.index("{"):])
  assert summary["preempted"] is True
  step, _ = latest_params(tmp_path)
  assert 20 <= step == summary["steps"] < 600  # Saved at the signal.


def test_two_processes_equal_four_devices(store, tmp_path):
  # exact_chunk=1: loss, gradients and validation scores are computed task
  # by task and summed in a fixed order, so every layout gives the same bits.
  steps = ["--config.stop_after_steps=20", "--config.exact_chunk=1"]
  four = tmp_path / "four"
  subprocess.run(train_cmd(four, store, *steps), cwd=REPO, env=env(4),
                 check=True, capture_output=True, timeout=900)
  one = tmp_path / "one"
  subprocess.run(train_cmd(one, store, *steps), cwd=REPO, env=env(1),
                 check=True, capture_output=True, timeout=900)
  multi = tmp_path / "multi"
  port = free_port()
  for rc, _, err in run_processes(
      lambda i: train_cmd(multi, store, *steps, "--coordinator_address="
                          f"127.0.0.1:{port}", "--num_processes=2",
                          f"--process_id={i}"),
      2, env=env(2), timeout=900, cwd=REPO):
    assert rc == 0, err[-3000:]
  reference = latest_params(one)
  assert reference[0] == 20
  assert_same(latest_params(four), reference)
  assert_same(latest_params(multi), reference)
  losses = {}
  for name, wd in (("one", one), ("four", four), ("multi", multi)):
    lines = (wd / "metrics.jsonl").read_text().splitlines()
    losses[name] = [json.loads(x) for x in lines]
    for row in losses[name]:
      row.pop("time", None)
  assert losses["one"] == losses["four"] == losses["multi"]
  assert any("val_weighted_tau" in row for row in losses["one"])
  # Scoring the target tasks (k = 2) with that ranker: the same floats on
  # 1 device, 4 devices and 2 processes x 2 devices.
  check = [sys.executable, str(REPO / "tests" / "exact_scores_check.py"),
           str(one / "checkpoints"), str(store)]
  scores = {}
  for name, devices in (("one", 1), ("four", 4)):
    subprocess.run(check + [str(tmp_path / f"{name}.npy")], cwd=REPO,
                   env=env(devices), check=True, capture_output=True,
                   timeout=600)
    scores[name] = np.load(tmp_path / f"{name}.npy")
  port = free_port()
  for rc, _, err in run_processes(
      lambda i: check + [str(tmp_path / "multi.npy"),
                         f"--coordinator_address=127.0.0.1:{port}",
                         "--num_processes=2", f"--process_id={i}"],
      2, env=env(2), timeout=600, cwd=REPO):
    assert rc == 0, err[-3000:]
  scores["multi"] = np.load(tmp_path / "multi.npy")
  assert scores["one"].shape[0] > 0 and np.isfinite(scores["one"]).all()
  np.testing.assert_array_equal(scores["four"], scores["one"])
  np.testing.assert_array_equal(scores["multi"], scores["one"])
