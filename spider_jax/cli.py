"""Flags and process setup shared by the entry points (train, rank,
groundtruth).

Only the entry points call into this module, from their `__main__` blocks:
libraries never parse flags or touch jax.config.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import threading

import jax
from absl import flags, logging
from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]


def define_flags(default_config: str) -> None:
  """--config (ml_collections file), --workdir and the multi-host flags."""
  try:  # config_flags reads the --config.* overrides right here.
    config_flags.DEFINE_config_file(
        "config", str(REPO / "configs" / default_config),
        "Config file[:variant]; override fields with --config.x=...",
        lock_config=True)
  except (AttributeError, KeyError) as e:
    _unknown_field(e)
  flags.DEFINE_string("workdir", "runs/default", "Run directory.")
  define_distributed_flags()


def define_distributed_flags() -> None:
  """--distributed and the explicit-cluster flags (`initialize_runtime`)."""
  flags.DEFINE_bool("distributed", False,
                    "Call jax.distributed.initialize() (multi-host: TPU pod "
                    "slices and SLURM need no other flag). Also enabled by "
                    "SPIDER_JAX_DISTRIBUTED=1.")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 (explicit clusters only).")
  flags.DEFINE_integer("num_processes", None, "Number of processes.")
  flags.DEFINE_integer("process_id", None, "This process's index.")


def parse_flags(argv):
  """absl flag parsing with a clear message for unknown config fields."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpfull to see the "
             "flags.")
  except (AttributeError, KeyError) as e:  # Raised by config_flags.
    _unknown_field(e)


def _unknown_field(e: Exception):
  overrides = [a for a in sys.argv if a.startswith("--config.")]
  sys.exit(f"Unknown config field {e} in {overrides}: the config has no such "
           "field. Check the spelling against the config file (configs/*.py; "
           "fields are listed in its docstring and get_config).")


def initialize_runtime() -> None:
  """Quiet orbax's INFO logs; start jax.distributed when asked."""
  logging.set_verbosity(logging.WARNING)
  fl = flags.FLAGS
  if fl.distributed or os.environ.get("SPIDER_JAX_DISTRIBUTED") == "1" or \
      fl.coordinator_address:
    # CPU collectives across processes need gloo (no effect on TPU/GPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=fl.coordinator_address,
                               num_processes=fl.num_processes,
                               process_id=fl.process_id)
    logging.warning("jax.distributed: process %d of %d, %d global devices",
                    jax.process_index(), jax.process_count(),
                    jax.device_count())


def stop_event_on_sigterm() -> threading.Event:
  """An Event set by SIGTERM (preemption notice): the trainer checkpoints
  and exits cleanly at the next step."""
  event = threading.Event()

  def handler(signum, frame):
    del frame
    logging.warning("Received signal %d: checkpointing and stopping.", signum)
    event.set()

  signal.signal(signal.SIGTERM, handler)
  return event
