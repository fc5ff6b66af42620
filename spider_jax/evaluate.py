"""Weighted-tau table of transferability scores against fine-tune accuracy.

  python -m spider_jax.evaluate \
      --scores ../shared/reference/zoo10_baseline_scores.csv \
      --ground-truth ../shared/reference/zoo10_finetune_accuracy.csv

`--scores` is a long table `Dataset,Model,<method>,<method>,...` (one row
per task and PTM, higher score = better); `--ground-truth` is the wide table
`model,<task>,...` read by `spider_jax.data.read_ground_truth`. For every
method column and task the Model Spider protocol
`scipy.stats.weightedtau(accuracy, score, rank=None)` is computed
(`spider_jax.metrics.weighted_tau`), then the mean over tasks.
`--round_scores=3` rounds scores first, as the TLlib README prints them
(this is how the Model Spider table's Aircraft LEEP and LogME cells arise).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
from typing import Sequence

import numpy as np
from absl import app
from absl import flags

from spider_jax import metrics
from spider_jax.data.store import GroundTruth, read_ground_truth


class ScoreFileError(ValueError):
  """A score table is malformed."""


@dataclasses.dataclass(frozen=True)
class ScoreTable:
  """Long-format scores.

  Attributes:
    methods: method (column) names.
    tasks: task names in file order.
    models: {task: PTM names in file order}.
    values: {method: {task: [M] float64 scores in `models[task]` order}}.
  """
  methods: tuple[str, ...]
  tasks: tuple[str, ...]
  models: dict[str, tuple[str, ...]]
  values: dict[str, dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class TauTable:
  """Weighted tau per (method, task) plus the mean over tasks.

  Attributes:
    methods: row names.
    tasks: column names.
    values: [K, T] float64 (NaN where tau is undefined).
    mean: [K] float64 mean over tasks (NaN if any cell is NaN).
  """
  methods: tuple[str, ...]
  tasks: tuple[str, ...]
  values: np.ndarray
  mean: np.ndarray

  def cell(self, method: str, task: str) -> float:
    return float(self.values[self.methods.index(method),
                             self.tasks.index(task)])


def read_scores(path: os.PathLike) -> ScoreTable:
  """Reads a long score table `Dataset,Model,<method>...`.

  Raises:
    ScoreFileError: missing header columns, non-numeric cells, duplicates.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise ScoreFileError(f"score table {path} does not exist.")
  with open(path, newline="") as f:
    rows = [r for r in csv.reader(f) if r]
  if (not rows or len(rows[0]) < 3
      or [c.strip().lower() for c in rows[0][:2]] != ["dataset", "model"]):
    raise ScoreFileError(f"{path}: expected a header 'Dataset,Model,<method>"
                         ",...' (one row per task and PTM).")
  methods = tuple(c.strip() for c in rows[0][2:])
  tasks: list[str] = []
  models: dict[str, list[str]] = {}
  cells: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
  for i, r in enumerate(rows[1:], start=2):
    if len(r) != len(rows[0]):
      raise ScoreFileError(f"{path}:{i}: expected {len(rows[0])} cells, got "
                           f"{len(r)}.")
    task, model = r[0].strip(), r[1].strip()
    if task not in models:
      tasks.append(task)
      models[task] = []
    if model in models[task]:
      raise ScoreFileError(f"{path}:{i}: duplicate row for ({task}, "
                           f"{model}).")
    models[task].append(model)
    for m, c in zip(methods, r[2:]):
      try:
        cells[m].setdefault(task, []).append(float(c))
      except ValueError:
        raise ScoreFileError(f"{path}:{i}: non-numeric {m} score "
                             f"{c!r}.") from None
  return ScoreTable(
      methods, tuple(tasks), {t: tuple(v) for t, v in models.items()},
      {m: {t: np.asarray(v, np.float64) for t, v in d.items()}
       for m, d in cells.items()})


def tau_table(scores: ScoreTable, ground_truth: GroundTruth, *,
              methods: Sequence[str] | None = None,
              tasks: Sequence[str] | None = None,
              round_scores: int | None = None) -> TauTable:
  """Weighted tau (Model Spider protocol) of every method on every task.

  Args:
    scores: the score table.
    ground_truth: accuracies; must hold every scored (task, PTM).
    methods: subset/order of methods (default: file order).
    tasks: subset/order of tasks (default: file order).
    round_scores: round scores to this many decimals first (None: exact).

  Returns:
    The table.
  """
  methods = tuple(methods or scores.methods)
  tasks = tuple(tasks or scores.tasks)
  for m in methods:
    if m not in scores.values:
      raise ScoreFileError(f"no score column {m!r} (have {scores.methods}).")
  vals = np.full((len(methods), len(tasks)), np.nan)
  for j, t in enumerate(tasks):
    if t not in scores.models:
      raise ScoreFileError(f"no scores for task {t!r}.")
    gt = ground_truth.row(t, scores.models[t])
    for i, m in enumerate(methods):
      s = scores.values[m][t]
      if round_scores is not None:
        s = np.round(s, round_scores)
      vals[i, j] = metrics.weighted_tau(gt, s)
  return TauTable(methods, tasks, vals, np.mean(vals, axis=1))


def format_table(table: TauTable, digits: int = 3) -> str:
  """Markdown table: one row per method, tasks then Mean as columns."""
  head = ["method", *table.tasks, "Mean"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
  for i, m in enumerate(table.methods):
    cells = [f"{v:.{digits}f}" for v in (*table.values[i], table.mean[i])]
    lines.append("| " + " | ".join([m, *cells]) + " |")
  return "\n".join(lines)


_SCORES = flags.DEFINE_string("scores", None,
                              "Long score CSV: Dataset,Model,<method>,...")
_GT = flags.DEFINE_string("ground-truth", None,
                          "Wide accuracy CSV: model,<task>,...")
_ROUND = flags.DEFINE_integer("round_scores", None,
                              "Round scores to this many decimals first.")
_METHODS = flags.DEFINE_list("methods", None,
                             "Methods to report (default: all columns).")
_TASKS = flags.DEFINE_list("tasks", None,
                           "Tasks (columns) to report, in this order "
                           "(default: file order).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _SCORES.value or not _GT.value:
    raise app.UsageError("--scores and --ground-truth are required.")
  table = tau_table(read_scores(_SCORES.value), read_ground_truth(_GT.value),
                    methods=_METHODS.value, tasks=_TASKS.value,
                    round_scores=_ROUND.value)
  print(format_table(table))


if __name__ == "__main__":
  app.run(main)
