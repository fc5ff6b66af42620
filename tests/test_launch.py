"""Launch scripts (launch/*.sh, launch/slurm_gpu.sbatch) in dry-run mode.

No cloud account, no cluster, no training: every script is run with
--dry-run (or DRY_RUN=1) and the printed "+ ..." command lines are checked;
gcloud/srun are replaced by recording fakes where a real run is needed.
launch/local_multiprocess.sh also runs one real 2-process jax.distributed
job on CPU (a few seconds).
"""

import json
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_pod.sh"
SLURM = LAUNCH / "slurm_gpu.sbatch"
LOCAL = LAUNCH / "local_multiprocess.sh"

# Variables the scripts read; cleared so the caller's shell cannot leak in.
_SCRIPT_VARS = (
    "TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "TPU_VERSION", "PROJECT",
    "WORKDIR", "DRY_RUN", "SPOT", "YES", "DETACH", "REMOTE_DIR",
    "REMOTE_VENV", "COPY_PATHS", "JAX_SPEC", "VENV", "PYTHON", "SRUN_ARGS",
    "SPIDER_JAX_REPO", "SPIDER_JAX_VENV", "NUM_PROCESSES",
    "DEVICES_PER_PROCESS", "PORT", "TIMEOUT", "VIRTUAL_ENV",
    "SLURM_JOB_ID", "SLURM_SUBMIT_DIR", "XLA_FLAGS", "JAX_PLATFORMS")

SLICE = {"TPU_NAME": "my-slice", "ZONE": "us-central2-b",
         "ACCELERATOR_TYPE": "v4-16"}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None,
                                reason="needs bash")


def run(script, *args, env=None, cwd=REPO, timeout=60):
  full_env = {k: v for k, v in os.environ.items() if k not in _SCRIPT_VARS}
  full_env.update(env or {})
  return subprocess.run(["bash", str(script), *map(str, args)], cwd=cwd,
                        env=full_env, capture_output=True, text=True,
                        timeout=timeout, check=False)


def commands(out):
  """The "+ ..." lines of a dry run, each split into words."""
  return [shlex.split(line[2:]) for line in out.stdout.splitlines()
          if line.startswith("+ ")]


def dry(script, *args, env=None, **kw):
  out = run(script, "--dry-run", *args, env=env, **kw)
  assert out.returncode == 0, out.stderr
  cmds = commands(out)
  assert cmds, out.stdout
  # Nothing but command lines on stdout.
  assert all(line.startswith("+ ") for line in out.stdout.splitlines()), (
      out.stdout)
  return cmds


def fake_tool(directory, name):
  """An executable `name` that appends its argv (one JSON list per line)."""
  log = directory / f"{name}.calls"
  path = directory / name
  path.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import json, sys
      with open({str(log)!r}, "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
      """))
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return log


def calls(log):
  if not log.exists():
    return []
  return [json.loads(line) for line in log.read_text().splitlines()]


#### --help ####


@pytest.mark.parametrize("script", [TPU, SLURM, LOCAL])
def test_help(script):
  out = run(script, "--help")
  assert out.returncode == 0, out.stderr
  assert "Usage:" in out.stdout
  assert "--dry-run" in out.stdout


def test_tpu_help_says_workdir_must_be_shared():
  out = run(TPU, "--help")
  assert "gs://" in out.stdout
  assert "every worker" in out.stdout


#### tpu_pod.sh ####


def test_tpu_create():
  (cmd,) = dry(TPU, "create", env=SLICE)
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-slice",
                 "--zone", "us-central2-b", "--accelerator-type", "v4-16",
                 "--version", "tpu-ubuntu2204-base"]


def test_tpu_create_from_flags_with_project_and_spot():
  out = run(TPU, "--name", "s2", "--zone=europe-west4-a",
            "--accelerator-type", "v5litepod-16",
            "--version", "v2-alpha-tpuv5-lite", "--project", "proj",
            "--spot", "create", env={"DRY_RUN": "1"})
  assert out.returncode == 0, out.stderr
  (cmd,) = commands(out)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "s2"]
  for flag, value in [("--zone", "europe-west4-a"),
                      ("--accelerator-type", "v5litepod-16"),
                      ("--version", "v2-alpha-tpuv5-lite"),
                      ("--project", "proj")]:
    assert cmd[cmd.index(flag) + 1] == value
  assert "--spot" in cmd


def _ssh_command(cmd):
  """Checks a `gcloud ... ssh --worker=all` line, returns its --command."""
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-slice"]
  assert "--worker=all" in cmd
  assert cmd[cmd.index("--zone") + 1] == "us-central2-b"
  return shlex.split(cmd[cmd.index("--command") + 1])


def test_tpu_up_creates_copies_and_bootstraps():
  create, mkdir, scp, setup = dry(TPU, "up", env=SLICE)
  assert create[4:6] == ["create", "my-slice"]
  assert _ssh_command(mkdir) == ["mkdir", "-p", "spider_jax"]
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp",
                     "--recurse"]
  assert "--worker=all" in scp
  assert "my-slice:spider_jax" in scp
  sources = scp[6:scp.index("my-slice:spider_jax")]
  assert {pathlib.Path(s).name for s in sources} >= {
      "spider_jax", "configs", "launch", "pyproject.toml", "requirements.txt"}
  assert all(pathlib.Path(s).exists() for s in sources)
  assert _ssh_command(setup) == ["bash", "spider_jax/launch/tpu_pod.sh",
                                 "worker-setup"]


@pytest.mark.parametrize("job", ["train", "rank"])
def test_tpu_job_runs_on_all_workers_with_distributed(job):
  (cmd,) = dry(TPU, job, f"--config=configs/{job}.py:paper",
               "--config.seed=3", "--workdir=gs://bucket/run1", env=SLICE)
  remote = _ssh_command(cmd)
  assert remote == ["bash", "spider_jax/launch/tpu_pod.sh", "worker-run",
                    f"spider_jax.{job}", "--distributed",
                    f"--config=configs/{job}.py:paper", "--config.seed=3",
                    "--workdir=gs://bucket/run1"]


def test_tpu_job_takes_workdir_from_env_and_detaches():
  (cmd,) = dry(TPU, "--detach", "train", env={**SLICE,
                                              "WORKDIR": "gs://b/w"})
  remote = _ssh_command(cmd)
  assert remote[3:] == ["--log", "spider_jax_run.log", "spider_jax.train",
                        "--distributed", "--workdir=gs://b/w"]


def test_tpu_worker_run_dry_run():
  cmds = dry(TPU, "worker-run", "spider_jax.rank", "--distributed",
             env={"SPIDER_JAX_VENV": "/opt/v"})
  assert cmds == [["/opt/v/bin/python", "-m", "spider_jax.rank",
                   "--distributed"]]


def test_tpu_delete():
  (cmd,) = dry(TPU, "delete", env=SLICE)
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-slice",
                 "--zone", "us-central2-b"]
  (cmd,) = dry(TPU, "--yes", "delete", env=SLICE)
  assert cmd[-1] == "--quiet"


def test_tpu_worker_setup_installs_tpu_jax_and_pins(tmp_path):
  venv = tmp_path / "venv"
  cmds = dry(TPU, "worker-setup", env={"PYTHON": sys.executable,
                                       "SPIDER_JAX_VENV": str(venv)})
  py = str(venv / "bin" / "python")
  assert cmds[0] == [sys.executable, "-m", "venv", str(venv)]
  assert [py, "-m", "pip", "install", "-q", "jax[tpu]==0.10.2"] in cmds
  assert [py, "-m", "pip", "install", "-q", "--no-deps", "-e",
          str(REPO)] in cmds
  (grep,) = [c for c in cmds if c[0] == "grep"]
  req = grep[grep.index(">") + 1]
  assert [py, "-m", "pip", "install", "-q", "-r", req] in cmds
  # The filter itself, run for real: no jax/jaxlib pins, everything else.
  kept = subprocess.run(grep[:grep.index(">")], capture_output=True,
                        text=True, check=True).stdout.splitlines()
  names = [line.split("==")[0].strip() for line in kept
           if line.strip() and not line.startswith("#")]
  assert "jax" not in names and "jaxlib" not in names
  assert {"flax", "optax", "numpy", "orbax-checkpoint"} <= set(names)
  assert not venv.exists()  # A dry run creates nothing.


@pytest.mark.parametrize("args, env, missing", [
    (["create"], {"ZONE": "z", "ACCELERATOR_TYPE": "v4-8"}, "TPU_NAME"),
    (["create"], {"TPU_NAME": "n", "ACCELERATOR_TYPE": "v4-8"}, "ZONE"),
    (["create"], {"TPU_NAME": "n", "ZONE": "z"}, "ACCELERATOR_TYPE"),
    (["copy"], {"ZONE": "z"}, "TPU_NAME"),
    (["setup"], {"TPU_NAME": "n"}, "ZONE"),
    (["train", "--config=configs/train.py:tiny"], {"TPU_NAME": "n",
                                                   "ZONE": "z"}, "WORKDIR"),
    (["delete"], {"TPU_NAME": "n"}, "ZONE"),
])
def test_tpu_missing_variables_exit_2(args, env, missing):
  out = run(TPU, "--dry-run", *args, env=env)
  assert out.returncode == 2
  assert f"{missing} is not set" in out.stderr
  assert "export" in out.stderr  # Says how to set it.
  assert not out.stdout  # Nothing was (pretend-)run.


@pytest.mark.parametrize("args", [[], ["explode"], ["--bogus", "create"],
                                  ["create", "extra"], ["--zone"]])
def test_tpu_usage_errors_exit_2(args):
  out = run(TPU, *args, env=SLICE)
  assert out.returncode == 2, out
  assert "error:" in out.stderr


def test_tpu_real_mode_runs_exactly_the_printed_commands(tmp_path):
  log = fake_tool(tmp_path, "gcloud")
  env = {**SLICE, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
  dry_cmds = dry(TPU, "up", env=env)
  assert not log.exists()  # The dry run did not call gcloud.
  out = run(TPU, "up", env=env)
  assert out.returncode == 0, out.stderr
  assert [["gcloud", *c] for c in calls(log)] == dry_cmds


#### slurm_gpu.sbatch ####


def test_slurm_dry_run(tmp_path):
  venv = tmp_path / "cuda_venv"
  cmds = dry(SLURM, "train", "--config=configs/train.py:paper",
             "--workdir=/shared/runs/paper",
             env={"VENV": str(venv), "PYTHON": sys.executable})
  py = str(venv / "bin" / "python")
  assert [sys.executable, "-m", "venv", str(venv)] in cmds
  assert [py, "-m", "pip", "install", "-q", "jax[cuda12]==0.10.2"] in cmds
  assert [py, "-m", "pip", "install", "-q", "--no-deps", "-e",
          str(REPO)] in cmds
  assert cmds[-1] == ["srun", "--kill-on-bad-exit=1", py, "-m",
                      "spider_jax.train", "--distributed",
                      "--config=configs/train.py:paper",
                      "--workdir=/shared/runs/paper"]
  assert not venv.exists()


def test_slurm_rank_workdir_from_env_and_ready_venv():
  # The test venv has jax and spider_jax, so no bootstrap is printed.
  venv = pathlib.Path(sys.executable).parent.parent
  cmds = dry(SLURM, "rank", "--config.rank.k=3",
             env={"VENV": str(venv), "WORKDIR": "/shared/w",
                  "SRUN_ARGS": "--mpi=none"})
  assert cmds == [["srun", "--kill-on-bad-exit=1", "--mpi=none",
                   str(venv / "bin" / "python"), "-m", "spider_jax.rank",
                   "--distributed", "--config.rank.k=3",
                   "--workdir=/shared/w"]]


def test_slurm_missing_workdir_exit_2():
  out = run(SLURM, "--dry-run", "train", env={"PYTHON": sys.executable})
  assert out.returncode == 2
  assert "WORKDIR is not set" in out.stderr
  assert "--workdir" in out.stderr


def test_slurm_outside_slurm_without_dry_run_exit_2():
  out = run(SLURM, "train", "--workdir=/x", env={"PYTHON": sys.executable})
  assert out.returncode == 2
  assert "sbatch" in out.stderr


def test_slurm_as_batch_job_from_spool_dir(tmp_path):
  """sbatch runs a copy of the script: the repo comes from the submit dir."""
  spool = tmp_path / "spool"
  spool.mkdir()
  shutil.copy(SLURM, spool / "slurm_script")
  log = fake_tool(tmp_path, "srun")
  venv = pathlib.Path(sys.executable).parent.parent
  out = run(spool / "slurm_script", "train", "--workdir=/shared/w",
            env={"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
                 "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(REPO),
                 "VENV": str(venv)}, cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert calls(log) == [["--kill-on-bad-exit=1", str(venv / "bin" / "python"),
                         "-m", "spider_jax.train", "--distributed",
                         "--workdir=/shared/w"]]
  # Without a way to find the repo: exit 2, naming SPIDER_JAX_REPO.
  out = run(spool / "slurm_script", "train", env={"SLURM_JOB_ID": "42"},
            cwd=tmp_path)
  assert out.returncode == 2
  assert "SPIDER_JAX_REPO" in out.stderr


#### local_multiprocess.sh ####


def test_local_dry_run_starts_n_processes(tmp_path):
  cmds = dry(LOCAL, "--num_processes", "3", "--devices_per_process=2",
             "--workdir", tmp_path, "--", "python", "job.py", "--x=1")
  assert cmds[0] == ["mkdir", "-p", str(tmp_path / "logs")]
  procs = [c for c in cmds if "job.py" in c]
  assert len(procs) == 3
  coordinators, ids = set(), []
  for i, c in enumerate(procs):
    assert c[:3] == ["env", "JAX_PLATFORMS=cpu",
                     "XLA_FLAGS=--xla_force_host_platform_device_count=2"]
    assert c[3:6] == ["python", "job.py", "--x=1"]
    (coord,) = [a for a in c if a.startswith("--coordinator_address=")]
    coordinators.add(coord)
    assert coord.startswith("--coordinator_address=127.0.0.1:")
    assert "--num_processes=3" in c
    ids += [a for a in c if a.startswith("--process_id=")]
    assert c[-4:] == [">", str(tmp_path / "logs" / f"process_{i}.log"),
                      "2>&1", "&"]
  assert len(coordinators) == 1
  assert ids == ["--process_id=0", "--process_id=1", "--process_id=2"]
  assert not (tmp_path / "logs").exists()


def test_local_dry_run_entry_point_and_port(tmp_path):
  cmds = dry(LOCAL, "--port", "12345", "--workdir", tmp_path,
             "--python", "/venv/bin/python", "rank",
             "--config=configs/rank.py:synthetic_tiny")
  procs = [c for c in cmds if "spider_jax.rank" in c]
  assert len(procs) == 2
  for i, c in enumerate(procs):
    j = c.index("/venv/bin/python")
    assert c[j:j + 6] == ["/venv/bin/python", "-m", "spider_jax.rank",
                          "--distributed", "--config=configs/rank.py:synthetic_tiny",
                          f"--workdir={tmp_path}"]
    assert c[j + 6:j + 9] == ["--coordinator_address=127.0.0.1:12345",
                              "--num_processes=2", f"--process_id={i}"]


@pytest.mark.parametrize("args, message", [
    (["--", "python", "x.py"], "WORKDIR is not set"),
    (["--num_processes", "0", "--workdir=/tmp/x", "--", "true"],
     "--num_processes"),
    (["--port", "99999", "--workdir=/tmp/x", "--", "true"], "--port"),
    (["--workdir=/tmp/x"], "missing train, rank or -- COMMAND"),
    (["--workdir=/tmp/x", "--"], "no COMMAND"),
    (["--bogus"], "unknown argument"),
])
def test_local_usage_errors_exit_2(args, message):
  out = run(LOCAL, "--dry-run", *args)
  assert out.returncode == 2, out
  assert message in out.stderr


_CHECK = """\
import argparse, pathlib
p = argparse.ArgumentParser()
p.add_argument("--out")
p.add_argument("--devices", type=int)
p.add_argument("--coordinator_address")
p.add_argument("--num_processes", type=int)
p.add_argument("--process_id", type=int)
a = p.parse_args()

import jax
import jax.numpy as jnp
import numpy as np

jax.distributed.initialize(a.coordinator_address, a.num_processes,
                           a.process_id)
assert jax.process_count() == 2, jax.process_count()
assert jax.device_count() == 2 * a.devices, jax.devices()
assert jax.local_device_count() == a.devices
# A cross-process collective: each process feeds its own rows.
mesh = jax.make_mesh((jax.device_count(),), ("data",))
rows = np.full((jax.local_device_count(), 3), jax.process_index() + 1.0,
               np.float32)
x = jax.make_array_from_process_local_data(
    jax.NamedSharding(mesh, jax.P("data")), rows)
total = jax.jit(jnp.sum, out_shardings=jax.NamedSharding(mesh, jax.P()))(x)
psum = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v.sum(), "data"),
                             mesh=mesh, in_specs=jax.P("data"),
                             out_specs=jax.P()))(x)
pathlib.Path(a.out, f"process_{a.process_id}.done").write_text(
    f"{float(total)} {float(psum)}")
"""


@pytest.mark.parametrize("devices", [1, 2])
def test_local_real_two_process_job(tmp_path, devices):
  script = tmp_path / "check.py"
  script.write_text(_CHECK)
  out = run(LOCAL, "--num_processes", "2", "--devices_per_process", devices,
            "--workdir", tmp_path / "w", "--timeout", "120", "--",
            sys.executable, script, "--out", tmp_path, "--devices", devices,
            timeout=180)
  logs = {p.name: p.read_text() for p in (tmp_path / "w" / "logs").glob("*")}
  assert out.returncode == 0, (out.stderr, logs)
  assert sorted(logs) == ["process_0.log", "process_1.log"]
  expected = 3.0 * devices * (1 + 2)  # Rows of 1s and 2s, 3 wide.
  for i in range(2):
    total, psum = (tmp_path / f"process_{i}.done").read_text().split()
    assert float(total) == expected
    assert float(psum) == expected


def test_local_one_failure_stops_the_others(tmp_path):
  script = tmp_path / "fail.py"
  script.write_text(textwrap.dedent("""\
      import argparse, sys, time
      p = argparse.ArgumentParser()
      p.add_argument("--coordinator_address")
      p.add_argument("--num_processes", type=int)
      p.add_argument("--process_id", type=int)
      a = p.parse_args()
      if a.process_id == 1:
        print("process 1 gives up")
        sys.exit(3)
      time.sleep(300)  # Like a process waiting for its peers forever.
      """))
  start = time.monotonic()
  out = run(LOCAL, "--workdir", tmp_path / "w", "--", sys.executable, script,
            timeout=120)
  assert out.returncode == 3
  assert time.monotonic() - start < 60
  assert "process 1 failed with exit code 3" in out.stderr
  assert "process 1 gives up" in out.stderr  # The tail of its log.


def test_local_timeout(tmp_path):
  script = tmp_path / "sleep.py"
  script.write_text("import time\ntime.sleep(300)\n")
  out = run(LOCAL, "--workdir", tmp_path / "w", "--timeout", "1", "--",
            sys.executable, script, timeout=60)
  assert out.returncode == 124
  assert "timeout" in out.stderr


#### shellcheck (.ci/run installs it; skipped elsewhere if missing) ####


@pytest.mark.skipif(shutil.which("shellcheck") is None and
                    not os.environ.get("CI"),
                    reason="shellcheck not installed (apt-get install "
                    "shellcheck)")
def test_shellcheck_clean():
  out = subprocess.run(
      ["shellcheck", "-x", "launch/common.sh", "launch/tpu_pod.sh",
       "launch/local_multiprocess.sh", "launch/slurm_gpu.sbatch",
       "launch/install_data.sh", ".ci/run"],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stdout
