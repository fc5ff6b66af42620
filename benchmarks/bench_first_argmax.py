"""Milliseconds per call of first-argmax forms on XLA:CPU (NCE's hot loop).

  python benchmarks/bench_first_argmax.py            # one core (pinned)
  python benchmarks/bench_first_argmax.py --threads  # default threading

Input: the 5000 x 1000 float64 source probabilities of bench_baselines.py.
Rows: the plain row max; `nce.first_argmax` as used; it plus NCE's input
check (a sum for NaN/Inf, a row min for negative values); the alternatives
tried for it; numpy's argmax. Each is a median over 40 calls after a warm-up
call; every form is checked to return numpy's first argmax.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

if "--threads" not in sys.argv:       # must precede the jax import
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_multi_thread_eigen=false"
                             " intra_op_parallelism_threads=1")

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_baselines import make_data  # noqa: E402
from spider_jax.baselines import nce as nce_lib  # noqa: E402


def median_ms(fn, calls: int = 40) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def where_eq_max(x):
  s = x.shape[1]
  cols = jax.lax.optimization_barrier(jnp.arange(s, dtype=jnp.int32))
  m = jnp.max(x, axis=1, keepdims=True)
  return jnp.min(jnp.where(x == m, cols[None], s), axis=1)


def blocked_maxima(x, block: int = 8):
  n, s = x.shape
  xb = x.reshape(n, s // block, block)
  b, _ = nce_lib.first_argmax(jnp.max(xb, axis=2))
  inner = jnp.take_along_axis(xb, b[:, None, None], axis=1)[:, 0]
  j, _ = nce_lib.first_argmax(inner)
  return b * block + j


def row_blocks_in_cache(x, rows: int = 100):
  n, s = x.shape
  z, valid = jax.lax.map(nce_lib.checked_first_argmax,
                         x.reshape(n // rows, rows, s))
  return z.reshape(n), jnp.all(valid)


def checked(index_and_valid):
  """The index where the check passed, else -1 (keeps the check alive)."""
  index, valid = index_and_valid
  return jnp.where(valid, index, -1)


def main():
  with jax.enable_x64(True):
    _, _, p = make_data(5000, 1024, 50)
    x = jax.device_put(p)
    want = p.argmax(1)
    forms = {
        "row max only (jnp.max, axis 1)": lambda x: jnp.max(x, axis=1),
        # Non-negative floats order like their bits, and NaN/Inf/negative
        # bits lie above +Inf's: one pass would give the max and the check.
        "row max of the bits as uint64": lambda x: jnp.max(
            jax.lax.bitcast_convert_type(x, jnp.uint64), axis=1),
        "nce.first_argmax": lambda x: nce_lib.first_argmax(x)[0],
        "first_argmax + input check (nce)":
            lambda x: checked(nce_lib.checked_first_argmax(x)),
        "min(where(x == row max, column, S))": where_eq_max,
        "blocked maxima (8), then argmax of blocks": blocked_maxima,
        "lax.map over 100-row blocks, with check":
            lambda x: checked(row_blocks_in_cache(x)),
        "jnp.argmax": lambda x: jnp.argmax(x, axis=1),
        "lax.top_k(x, 1)": lambda x: jax.lax.top_k(x, 1)[1][:, 0],
    }
    print(f"# jax {jax.__version__}, one core: {'--threads' not in sys.argv}"
          f", load average {os.getloadavg()[0]:.2f}")
    print("| form | ms per call | equals np.argmax |")
    print("|---|---|---|")
    for name, fn in forms.items():
      jitted = jax.jit(fn)
      out = np.asarray(jitted(x))
      same = ("-" if name.startswith("row max")
              else str(bool((out.astype(int) == want).all())))
      calls = 3 if "top_k" in name else 40
      print(f"| {name} | {median_ms(lambda: jitted(x), calls):.2f} "
            f"| {same} |", flush=True)
    print(f"| numpy argmax | {median_ms(lambda: p.argmax(1)):.2f} | True |")


if __name__ == "__main__":
  main()
