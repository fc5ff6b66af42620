"""`python -m spider_jax.rank`: rank every PTM for every target task.

With no arguments it uses configs/rank.py (default variant): it builds or
reuses the cached offline benchmark (configs/bench.py:default, 19 PTMs,
10 target tasks, ground truth = the committed fine-tune table), trains the
ranker on the benchmark's training tasks if WORKDIR/checkpoints
(./runs/default) holds none, ranks the target tasks with the re-ranking
depth chosen on validation tasks, and compares Model Spider (k = 0 and the
chosen k) with the constant prior (mean training rank), a random ranking and
the transferability baselines: weighted tau per task, the means of weighted
tau, rel@1 and top-1 regret, and each method's seconds per task (its own
compute plus the forward passes it needs).

Outputs in WORKDIR/rank/: results.md, results.json (everything, including
scores and ground truth), rankings.csv (task, method, model, score, rank),
metrics.csv (task, method, metric, value), wtau_per_task.png,
wtau_vs_time.png and predicted_vs_true.png; baseline scores are cached in
WORKDIR/rank/cache/ (keyed by the store, zoo, tasks and seed).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pathlib
import time

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from spider_jax import baselines, checkpoint, metrics
from spider_jax import report as report_lib
from spider_jax.data.store import (FeatureStore, atomic_write_json,
                                   atomic_write_text)
from spider_jax.ranker import Ranker
from spider_jax.scoring import score_tasks
from spider_jax.train import open_or_build_store, train



def resolve_checkpoint(config, workdir: pathlib.Path,
                       store: FeatureStore | None = None) -> pathlib.Path:
  """The checkpoint to use; trains one in WORKDIR if none is configured."""
  if config.rank.checkpoint:
    path = pathlib.Path(config.rank.checkpoint)
    if not path.exists():
      raise checkpoint.CheckpointError(
          f"checkpoint directory {path} does not exist; fix "
          "--config.rank.checkpoint or leave it empty to train one.")
    return path
  path = workdir / "checkpoints"
  with checkpoint.manager(path) as mngr:
    have = mngr.latest_step() is not None
  if not have or _unfinished(path):
    logging.warning("No finished checkpoint in %s: training the ranker.", path)
    train(config, workdir, store=store)
  return path


def _unfinished(path: pathlib.Path) -> bool:
  """True if the latest checkpoint's run stopped before its last step."""
  with checkpoint.manager(path) as mngr:
    step = mngr.latest_step()
  _, meta = checkpoint.read_meta(path, step)
  cfg = meta["config"]
  return cfg.get("stop_after_steps", -1) > 0 and step < cfg[
      "stop_after_steps"]


def parse_methods(text: str) -> list[str]:
  """Comma-separated method names -> list; unknown names are an error."""
  methods = [m.strip() for m in text.split(",") if m.strip()]
  known = ("spider",) + tuple(baselines.METHODS)
  unknown = [m for m in methods if m not in known]
  if unknown or not methods:
    raise ValueError(f"unknown method(s) {unknown or text!r} in "
                     f"--config.rank.methods; known: {', '.join(known)}.")
  return methods


def forward_seconds(store: FeatureStore, tasks, models) -> np.ndarray:
  """[T] seconds of the forward passes a method needs on each task.

  Args:
    store: gives the recorded seconds per image ("encoder" and each PTM).
    tasks: T tasks; each is charged for its training rows.
    models: per task, the names whose passes are needed.
  """
  sps = store.seconds_per_sample()
  return np.array([t.mask("train").sum() * sum(sps.get(m, 0.0) for m in ms)
                   for t, ms in zip(tasks, models)])


def rank(config, workdir) -> dict:
  """Ranks the configured tasks; writes WORKDIR/rank/*; returns the report.

  Returns:
    {"k": depth used, "tasks": [...], "methods": [...], "scores":
     {method: [T, M]}, "metrics": {method: {task: {metric: value}}},
     "mean": {method: {metric: value}}, "vs_prior": {method: {"mean", "se"}}
     (weighted tau minus the prior's, paired over tasks; when "prior" is
     ranked), "seconds_per_task": {method: {"forward": s, "method": s,
     "total": s}} (mean over tasks; forward = the recorded cost of the
     network passes the method needs)}.
  """
  workdir = pathlib.Path(workdir)
  methods = parse_methods(config.rank.methods)
  store = open_or_build_store(config, workdir)
  ckpt = resolve_checkpoint(config, workdir, store) if "spider" in methods or \
      "prior" in methods else None
  ranker = (Ranker.load(ckpt, batch_size=config.eval_batch_size,
                        model_parallel=config.rank.model_parallel)
            if ckpt is not None else None)
  if ranker is not None:
    checkpoint.check_zoo(ranker.meta, store.ptm_names, store.ptm_dims,
                         store.encoder_dim, store.encoder_name)
  role = config.rank.tasks
  names = store.task_names(None if role == "all" else role)
  if not names:
    raise ValueError(f"the store has no tasks with role {role!r}.")
  tasks = [store.task(n) for n in names]
  ptms = list(store.ptm_names)
  k = (int(ranker.meta.get("rerank_k", 0)) if ranker is not None else 0) \
      if config.rank.k < 0 else int(config.rank.k)
  scores, seconds = {}, {}

  def timed(name, fn, forward):
    t0 = time.perf_counter()
    scores[name] = np.asarray(fn(), np.float64)
    spent = (time.perf_counter() - t0) / len(tasks)
    fwd = float(np.mean(forward))
    seconds[name] = {"forward": fwd, "method": spent, "total": fwd + spent}

  key = jax.random.key(config.seed)
  for method in methods:
    if method == "spider":
      base = None
      for kk in sorted({0, k}):
        enc = [["encoder"]] * len(tasks)
        if kk:  # Plus the forward passes of each task's top-k PTMs.
          top = np.argsort(-base, axis=1, kind="stable")[:, :kk]
          enc = [e + [ptms[j] for j in row] for e, row in zip(enc, top)]
        timed(f"spider(k={kk})",
              lambda kk=kk: score_tasks(ranker.scorer, tasks, ranker.zoo,
                                        k=kk),
              forward_seconds(store, tasks, enc))
        base = scores[f"spider(k={kk})"] if kk == 0 else base
    elif method == "prior":
      timed("prior", lambda: np.tile(ranker.prior, (len(tasks), 1)),
            np.zeros(len(tasks)))
    elif method == "random":
      timed("random", lambda: np.stack([
          baselines.random_scores(jax.random.fold_in(key, i), len(ptms))
          for i in range(len(tasks))]), np.zeros(len(tasks)))
    else:
      cache = workdir / "rank" / "cache" / f"{method}.json"
      ckey = baseline_cache_key(store, names, config.seed)
      hit = json.loads(cache.read_text()) if cache.exists() else {}
      if hit.get("key") == ckey:  # Scores and times of an earlier run.
        scores[method] = np.array(hit["scores"], np.float64)
        seconds[method] = hit["seconds"]
        continue
      bar = tqdm(total=len(tasks), desc=method, leave=False,
                 disable=jax.process_index() != 0)

      def run(method=method, bar=bar):
        out = []
        with jax.enable_x64(True):  # Baselines match float64 references.
          for i, t in enumerate(tasks):
            out.append(baselines.score_zoo(method, t, ptms,
                                           key=jax.random.fold_in(key, i),
                                           **method_options(method, t)))
            bar.update()
        return np.stack(out)
      timed(method, run, forward_seconds(store, tasks, [ptms] * len(tasks)))
      bar.close()
      if jax.process_index() == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, {"key": ckey,
                                  "scores": scores[method].tolist(),
                                  "seconds": seconds[method]})
  gt = store.ground_truth()
  report = {"k": k, "checkpoint": str(ckpt), "store": str(store.path),
            "role": role, "ground_truth_status": store.meta.get(
                "ground_truth", {}).get("status", "given"),
            "tasks": names, "ptm_names": ptms,
            "methods": list(scores), "seconds_per_task": seconds,
            "scores": {m: s.tolist() for m, s in scores.items()},
            "ground_truth": {}, "metrics": {}, "mean": {}, "vs_prior": {}}
  have_gt = all(t in gt.tasks for t in names)
  if have_gt:
    rows = {n: gt.row(n, store.ptm_names) for n in names}
    report["ground_truth"] = {n: r.tolist() for n, r in rows.items()}
    for m, s in scores.items():
      per = {n: metrics.task_metrics(rows[n], s[i])
             for i, n in enumerate(names)}
      report["metrics"][m] = per
      report["mean"][m] = {key: float(np.mean([v[key] for v in per.values()]))
                           for key in next(iter(per.values()))}
    if "prior" in scores:
      wtau = lambda m: [report["metrics"][m][n]["weighted_tau"] for n in names]
      report["vs_prior"] = {m: metrics.paired_difference(wtau(m),
                                                         wtau("prior"))
                            for m in scores}
  if jax.process_index() == 0:
    write_outputs(report, workdir / "rank", plots=config.rank.plots)
  return report


def method_options(method: str, task) -> dict:
  """Per-task options of a baseline: GBC's PCA width is at most the number
  of training samples (64 as the reference when the task has that many)."""
  if method.startswith("gbc"):
    return {"pca_dim": int(min(64, task.mask("train").sum()))}
  return {}


def baseline_cache_key(store: FeatureStore, tasks, seed: int) -> str:
  """Key of cached baseline scores: store content, zoo, tasks, seed."""
  meta = {k: v for k, v in store.meta.items() if k != "ground_truth"}
  return hashlib.sha256(json.dumps(
      [str(store.path.resolve()), meta, list(store.ptm_names), list(tasks),
       seed], sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_outputs(report: dict, out: pathlib.Path, plots: bool = True
                  ) -> None:
  """results.json, results.md, rankings.csv, metrics.csv and the plots.

  Every file is written to a temporary name and renamed.
  """
  out.mkdir(parents=True, exist_ok=True)
  atomic_write_json(out / "results.json", report)
  report_lib.write_markdown(report, out)
  if plots:
    report_lib.write_plots(report, out)
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["task", "method", "model", "score", "rank"])
  for m, s in report["scores"].items():
    for i, task in enumerate(report["tasks"]):
      ranks = metrics.ranks_from_scores(s[i])
      for j, name in enumerate(report["ptm_names"]):
        w.writerow([task, m, name, repr(float(s[i][j])), int(ranks[j]) + 1])
  atomic_write_text(out / "rankings.csv", buf.getvalue())
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["task", "method", "metric", "value"])
  for m, per in report["metrics"].items():
    for task, vals in per.items():
      for key, v in vals.items():
        w.writerow([task, m, key, repr(v)])
  atomic_write_text(out / "metrics.csv", buf.getvalue())


def format_report(report: dict) -> str:
  """One row per method: weighted tau per task, the means, time per task."""
  methods = report["methods"]
  if not report["metrics"]:
    lines = ["No ground truth for these tasks; rankings only."]
    for i, t in enumerate(report["tasks"]):
      best = report["ptm_names"][int(np.argmax(report["scores"][methods[0]][i]))]
      lines.append(f"{t}: best by {methods[0]} = {best}")
    return "\n".join(lines)
  tasks = report["tasks"]
  width = max(len(m) for m in methods) + 2
  short = [t.replace("_target", "")[:7] for t in tasks]
  vs = report.get("vs_prior", {})
  head = ("method".ljust(width) + "".join(f"{t:>8}" for t in short)
          + f"{'wtau':>10}" + (f"{'vs prior (SE)':>17}" if vs else "")
          + "".join(f"{h:>10}" for h in ("rel@1", "regret", "s/task")))
  lines = ["weighted tau per task, then means over the tasks"
           + ("; vs prior = mean difference from the constant prior, paired "
              "over the tasks" if vs else ""), head, "-" * len(head)]
  for m in methods:
    mean = report["mean"][m]
    lines.append(m.ljust(width) + "".join(
        f"{report['metrics'][m][t]['weighted_tau']:>8.3f}" for t in tasks)
        + f"{mean['weighted_tau']:>10.3f}"
        + (f"{report_lib.difference(vs[m]):>17}" if vs else "")
        + f"{mean['rel@1']:>10.3f}{mean['regret@1']:>10.2f}"
        f"{report['seconds_per_task'][m]['total']:>10.3g}")
  return "\n".join(lines)


def main(argv):
  from absl import app, flags
  from spider_jax import cli
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.initialize_runtime()
  report = rank(flags.FLAGS.config, flags.FLAGS.workdir)
  if jax.process_index() != 0:
    return
  print(format_report(report))
  out = pathlib.Path(flags.FLAGS.workdir) / "rank"
  status = report["ground_truth_status"]
  if status not in ("complete", "given"):
    print(f"\nWARNING: ground truth status is {status!r}: some target cells "
          "are not fine-tuned accuracies (see the store's meta.json).")
  best = (max(report["methods"], key=lambda m: report["mean"][m][
      "weighted_tau"]) if report["mean"] else "-")
  print(f"\nk={report['k']} (chosen on validation tasks); best mean "
        f"weighted tau: {best}; report: {out}/results.md (and results.json, "
        "rankings.csv, metrics.csv, *.png)")


if __name__ == "__main__":
  from absl import app
  from spider_jax import cli
  cli.define_flags("rank.py")
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
