"""The ranking report: results.md and the PNG plots of `spider_jax.rank`.

Plots use matplotlib's object API (`Figure` + the Agg canvas), so nothing
here touches matplotlib's global state or needs a display.
"""

from __future__ import annotations

import pathlib

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spider_jax import metrics
from spider_jax.data.store import atomic_write_text

__all__ = ["difference", "markdown", "write_markdown", "write_plots"]

METRICS = (("weighted_tau", "mean wtau"), ("rel@1", "mean rel@1"),
           ("regret@1", "mean regret@1"))


def difference(d: dict) -> str:
  """'+0.001 (0.012)': a `metrics.paired_difference` and its SE."""
  se = "-" if d["se"] is None else f"{d['se']:.3f}"
  return f"{d['mean']:+.3f} ({se})"


def markdown(report: dict) -> str:
  """results.md: one row per method (weighted tau per target, means, time).

  Args:
    report: the dict returned by `spider_jax.rank.rank` (with ground truth).
  """
  tasks, methods = report["tasks"], report["methods"]
  lines = [f"# Ranking report\n",
           f"- store: `{report['store']}`",
           f"- zoo: {len(report['ptm_names'])} PTMs; {len(tasks)} "
           f"{report.get('role', 'target')} tasks",
           f"- ground truth: {report.get('ground_truth_status', 'given')}",
           f"- re-ranking depth chosen on validation tasks: k = "
           f"{report['k']}", ""]
  if not report["metrics"]:
    return "\n".join(lines + ["No ground truth for these tasks."]) + "\n"
  vs = report.get("vs_prior", {})
  labels = [label for _, label in METRICS]
  if vs:
    labels.insert(1, "wtau - prior (SE)")
  head = ["method"] + list(tasks) + labels + ["s / task"]
  lines += ["Weighted tau (official protocol) per task, then means over "
            "tasks; s / task = the method's own compute + the forward "
            "passes it needs (recorded per image in the store)."
            + (" wtau - prior = the mean over tasks of the method's weighted "
               "tau minus the constant prior's, with its standard error "
               "(paired over the tasks)." if vs else ""), "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head)]
  best = max(methods, key=lambda m: report["mean"][m]["weighted_tau"])
  for m in methods:
    per = report["metrics"][m]
    cells = [f"{per[t]['weighted_tau']:.3f}" for t in tasks]
    means = [f"{report['mean'][m][key]:.3f}" for key, _ in METRICS]
    if m == best:
      means[0] = f"**{means[0]}**"
    if vs:
      means.insert(1, difference(vs[m]))
    cells += means + [f"{report['seconds_per_task'][m]['total']:.4g}"]
    lines.append("| " + " | ".join([m] + cells) + " |")
  return "\n".join(lines) + "\n"


def _save(fig: Figure, path: pathlib.Path) -> None:
  tmp = path.with_name(path.name + ".tmp")
  FigureCanvasAgg(fig)
  fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
  tmp.replace(path)


def write_plots(report: dict, out: pathlib.Path) -> list[pathlib.Path]:
  """Writes the three PNG plots into `out`; returns their paths.

  * wtau_per_task.png: weighted tau per task (columns) per method (rows).
  * wtau_vs_time.png: mean weighted tau against seconds per task (log x).
  * predicted_vs_true.png: per task, each PTM's predicted rank (by the
    chosen-k Model Spider row, else the first method) against its true rank.
  """
  if not report["metrics"]:
    return []
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tasks, methods = report["tasks"], report["methods"]
  paths = []

  wt = np.array([[report["metrics"][m][t]["weighted_tau"] for t in tasks]
                 for m in methods])
  fig = Figure(figsize=(1.0 + 0.7 * len(tasks), 1.0 + 0.35 * len(methods)))
  ax = fig.add_subplot()
  im = ax.imshow(wt, cmap="RdYlGn", vmin=-1, vmax=1, aspect="auto")
  ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right",
                fontsize=7)
  ax.set_yticks(range(len(methods)), methods, fontsize=7)
  for i in range(len(methods)):
    for j in range(len(tasks)):
      ax.text(j, i, f"{wt[i, j]:.2f}", ha="center", va="center", fontsize=6)
  fig.colorbar(im, ax=ax, label="weighted tau")
  ax.set_title("weighted tau per task and method")
  paths.append(out / "wtau_per_task.png")
  _save(fig, paths[-1])

  fig = Figure(figsize=(6.5, 4.5))
  ax = fig.add_subplot()
  for m in methods:
    x = max(report["seconds_per_task"][m]["total"], 1e-6)
    y = report["mean"][m]["weighted_tau"]
    ax.scatter([x], [y], color="C3" if m.startswith("spider") else "C0")
    ax.annotate(m, (x, y), fontsize=7, xytext=(3, 3),
                textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("seconds per task (method + forward passes)")
  ax.set_ylabel("mean weighted tau")
  ax.set_title("accuracy / efficiency")
  ax.grid(alpha=0.3)
  paths.append(out / "wtau_vs_time.png")
  _save(fig, paths[-1])

  # The chosen-k Model Spider row (the last one), else the first method.
  main = next((m for m in reversed(methods) if m.startswith("spider")),
              methods[0])
  cols = min(5, len(tasks))
  rows = -(-len(tasks) // cols)
  fig = Figure(figsize=(2.6 * cols, 2.8 * rows), layout="constrained")
  m_count = len(report["ptm_names"])
  for i, t in enumerate(tasks):
    ax = fig.add_subplot(rows, cols, i + 1)
    true = metrics.ranks_from_scores(np.asarray(report["ground_truth"][t]))
    pred = metrics.ranks_from_scores(np.asarray(report["scores"][main][i]))
    ax.scatter(true + 1, pred + 1, s=12)
    ax.plot([1, m_count], [1, m_count], color="grey", lw=0.8)
    ax.set_title(f"{t}\nwtau {report['metrics'][main][t]['weighted_tau']:.2f}",
                 fontsize=7)
    ax.tick_params(labelsize=6)
    if i % cols == 0:
      ax.set_ylabel(f"{main} rank", fontsize=7)
    if i >= (rows - 1) * cols:
      ax.set_xlabel("true rank", fontsize=7)
  paths.append(out / "predicted_vs_true.png")
  _save(fig, paths[-1])
  return paths


def write_markdown(report: dict, out: pathlib.Path) -> pathlib.Path:
  """Writes results.md into `out` (atomically); returns its path."""
  path = pathlib.Path(out) / "results.md"
  atomic_write_text(path, markdown(report))
  return path
