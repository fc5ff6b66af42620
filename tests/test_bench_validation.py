"""benchmarks/bench_validation.py end to end on the synthetic store."""

import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_bench_validation_compares_both_ways(tmp_path):
  out = subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "bench_validation.py"),
       "--config=configs/rank.py:synthetic_tiny", "--config.k_max=5",
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
      check=True).stdout
  assert "depths 0..5" in out
  compiles = {m: int(n) for m, n in
              re.findall(r"^\| (per depth|score_depths)\b.*\| (\d+) \|$", out,
                         re.M)}
  # Per depth: stage 1 + one program per depth > 0, per bucket; shared: 2.
  assert compiles["per depth"] == 3 * compiles["score_depths"], out
  score_diff, tau_diff = map(float, re.search(
      r"max \|score difference\| (\S+); .* over depths (\S+)", out).groups())
  assert score_diff < 1e-5 and tau_diff < 1e-6, out
