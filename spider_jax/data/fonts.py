"""Font-rendered character datasets from the fonts of Debian `fonts-*` packages.

Which font covers which character set is measured from the font's cmap with
fontTools, never assumed. A glyph a font lacks is skipped and counted; a glyph
that is in the cmap but renders blank or as the font's .notdef box is rejected
and counted too. Font files are grouped by family (so the Regular and Bold of
one family never land in different groups) and the families are split once,
deterministically, into "pretrain", "ranker" and "target" groups.

Images are white ink on black, uint8 `[N, 28, 28, 1]`, like MNIST.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import pathlib
from typing import Iterable, Mapping, Sequence

import numpy as np

# The Debian font packages the benchmark uses (launch/install_data.sh installs
# them). Only their files are used, so fonts installed for other reasons do
# not change the family split.
FONT_PACKAGES = (
    "fonts-noto-core", "fonts-urw-base35", "fonts-texgyre",
    "fonts-liberation2", "fonts-freefont-ttf", "fonts-dejavu-core",
    "fonts-dejavu-extra", "fonts-lato", "fonts-go", "fonts-open-sans",
    "fonts-roboto-unhinted", "fonts-jetbrains-mono", "fonts-stix",
    "fonts-bwht", "fonts-dkg-handwriting", "fonts-breip", "fonts-femkeklaver",
    "fonts-humor-sans", "fonts-comic-neue", "culmus", "fonts-sil-ezra",
    "fonts-kacst", "fonts-tlwg-loma-ttf", "fonts-tlwg-purisa-ttf",
    "fonts-lohit-deva", "fonts-lohit-beng-bengali", "fonts-lohit-taml",
)
DPKG_INFO = "/var/lib/dpkg/info"
FONT_DIRS = ("/usr/share/fonts",)
FONT_SUFFIXES = (".ttf", ".otf")
GROUPS = ("pretrain", "ranker", "target")
# Fraction of (mixed-script) families per group, in GROUPS order.
GROUP_FRACTIONS = (0.5, 0.25, 0.25)
SPLIT_SALT = "spider_jax.fonts.v1"


def _r(lo: int, hi: int, skip: Iterable[int] = ()) -> str:
  skip = set(skip)
  return "".join(chr(c) for c in range(lo, hi + 1) if c not in skip)


# Character sets: name -> string of classes (one class per character).
CHARSETS: dict[str, str] = {
    "digits": "0123456789",
    "latin_upper": _r(0x41, 0x5A),
    "latin_lower": _r(0x61, 0x7A),
    "greek_upper": _r(0x391, 0x3A9, skip=[0x3A2]),
    "greek_lower": _r(0x3B1, 0x3C9, skip=[0x3C2]),
    "cyrillic_upper": _r(0x410, 0x42F),
    "cyrillic_lower": _r(0x430, 0x44F),
    "armenian": _r(0x531, 0x556),
    "georgian": _r(0x10D0, 0x10F0),
    # Hebrew letters without the five final forms.
    "hebrew": _r(0x5D0, 0x5EA, skip=[0x5DA, 0x5DD, 0x5DF, 0x5E3, 0x5E5]),
    # The 28 Arabic letters, isolated forms.
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    # Thai consonants without the obsolete kho khuat and kho khon.
    "thai": _r(0xE01, 0xE2E, skip=[0xE03, 0xE05]),
    "devanagari": _r(0x915, 0x939),
    "bengali": _r(0x995, 0x9B9, skip=[0x9A9, 0x9B1, 0x9B3, 0x9B4, 0x9B5]),
    "tamil": "அஆஇஈஉஊஎஏஐஒஓஔகஙசஞடணதநபமயரலவழளறன",
    "math": "∀∂∃∅∇∈∉∋∏∑∓√∝∞∠∧∨∩∪∫∴≈≠≡≤≥⊂⊃⊆⊕",
    "arrows": "←↑→↓↔↕↖↗↘↙⇐⇑⇒⇓⇔",
}
CHARSETS["math_arrows"] = CHARSETS["math"] + CHARSETS["arrows"]
# Scripts that no group uses (not in GROUP_USES, so adding them left the
# family split unchanged) and whose glyphs look like no target's or PTM's
# classes (so not Coptic, Greek-like capitals, or Cherokee, Latin-like): the
# "ranker" group's fonts that cover them (mostly FreeSerif) give training
# pools of ten more writing systems, candidates for pools.extra_train
# (docs/what_we_tried.md).
EXTRA_SCRIPTS = ("ethiopic", "sinhala", "gurmukhi", "malayalam", "gujarati",
                 "thaana", "syriac", "tifinagh", "vai", "geometric")
CHARSETS.update({
    # Ethiopic: the first (ä) form of each of the 43 consonant rows.
    "ethiopic": "".join(chr(c) for c in range(0x1200, 0x1358, 8)),
    "sinhala": _r(0xD9A, 0xDC6, skip=[0xDB2, 0xDBC, 0xDBE, 0xDBF]),
    "gurmukhi": _r(0xA15, 0xA39, skip=[0xA29, 0xA31, 0xA34, 0xA37]),
    "malayalam": _r(0xD15, 0xD39),
    "gujarati": _r(0xA95, 0xAB9, skip=[0xAA9, 0xAB1, 0xAB4]),
    "thaana": _r(0x780, 0x7A5),
    "syriac": _r(0x710, 0x72C),
    "tifinagh": _r(0x2D30, 0x2D65),
    "vai": _r(0xA500, 0xA52B),  # the first 44 Vai syllables
    "geometric": _r(0x25A0, 0x25D0),  # geometric shapes
})

# Which group uses which character set (see builders.POOL_SPECS). The family
# split balances these so that every group gets fonts for the sets it uses.
GROUP_USES: dict[str, tuple[str, ...]] = {
    "pretrain": ("latin_upper", "cyrillic_upper"),
    "ranker": ("latin_lower", "cyrillic_lower", "greek_lower", "latin_upper",
               "arabic", "thai", "devanagari", "bengali", "tamil"),
    "target": ("digits", "greek_upper", "armenian", "georgian", "hebrew",
               "math_arrows"),
}


class FontError(RuntimeError):
  """No usable font files were found."""


@dataclasses.dataclass(frozen=True)
class FontFile:
  """One font file and its measured cmap coverage.

  Attributes:
    path: absolute path of the .ttf/.otf file.
    family: typographic family name from the name table.
    codepoints: frozenset of the code points in the best cmap.
  """
  path: str
  family: str
  codepoints: frozenset

  def coverage(self, chars: str) -> float:
    """Fraction of `chars` present in the cmap."""
    return sum(ord(c) in self.codepoints for c in chars) / len(chars)


def package_font_paths(packages: Sequence[str] = FONT_PACKAGES,
                       dpkg_info: str = DPKG_INFO) -> list[str]:
  """Sorted .ttf/.otf files of installed Debian packages (from dpkg's lists).

  Raises:
    MissingPackageError: naming the packages that are not installed and the
      command that installs them.
  """
  from spider_jax.data import sources  # pylint: disable=g-import-not-at-top
  paths, missing = set(), []
  for pkg in packages:
    lists = [os.path.join(dpkg_info, f"{pkg}{arch}.list")
             for arch in ("", ":all", ":amd64", ":arm64")]
    lst = next((p for p in lists if os.path.exists(p)), None)
    if lst is None:
      missing.append(pkg)
      continue
    with open(lst) as f:
      for line in f:
        p = line.strip()
        if p.lower().endswith(FONT_SUFFIXES) and os.path.isfile(p):
          paths.add(os.path.realpath(p))
  if missing:
    raise sources.MissingPackageError(
        f"font rendering needs the Debian package(s) {missing}, which are not "
        f"installed. Install them with `sudo apt-get install -y "
        f"{' '.join(missing)}` (or `{sources.INSTALL_HINT} --debian-only`).")
  return sorted(paths)


def discover_fonts(packages: Sequence[str] | None = FONT_PACKAGES,
                   dirs: Sequence[str] = FONT_DIRS) -> list[FontFile]:
  """Reads the cmaps of the font files of `packages` (sorted by path).

  Args:
    packages: Debian packages whose fonts to use; None scans `dirs` instead.
    dirs: directories to scan when `packages` is None.

  Raises:
    MissingPackageError: when one of `packages` is not installed.
    FontError: when no usable font file is found.
  """
  from fontTools.ttLib import TTFont  # pylint: disable=g-import-not-at-top
  if packages is not None:
    paths = package_font_paths(packages)
  else:
    paths = sorted(
        str(p) for d in dirs if os.path.isdir(d)
        for p in pathlib.Path(d).rglob("*")
        if p.suffix.lower() in FONT_SUFFIXES and p.is_file())
  fonts = []
  for p in paths:
    try:
      f = TTFont(p, lazy=True, fontNumber=0)
      cmap = f.getBestCmap() or {}
      family = f["name"].getBestFamilyName() or pathlib.Path(p).stem
      f.close()
    except Exception:  # pylint: disable=broad-except
      continue  # An unreadable font is simply not used.
    if cmap:
      fonts.append(FontFile(p, str(family), frozenset(cmap)))
  if not fonts:
    raise FontError(
        f"no usable .ttf/.otf font files (packages={packages}, dirs={dirs}). "
        "Install the Debian font packages: `bash launch/install_data.sh "
        "--debian-only`.")
  return fonts


def split_font_families(fonts: Sequence[FontFile],
                        salt: str = SPLIT_SALT) -> dict[str, str]:
  """Assigns each family to "pretrain", "ranker" or "target", deterministically.

  Families are visited in the order of sha256(salt + family). Each goes to the
  group with the highest need: the sum, over the character sets that the
  group uses (GROUP_USES) and the family covers, of 1 / (1 + fonts the group
  already has for that set), plus how far the group is below its share
  (GROUP_FRACTIONS) of families. So rare scripts (Thai, Tamil, ...) end up
  where they are used, and the split depends only on the fonts' cmaps.

  Returns:
    {family: group}.
  """
  by_family = collections.defaultdict(list)
  for f in fonts:
    by_family[f.family].append(f)
  order = sorted(by_family,
                 key=lambda s: hashlib.sha256((salt + s).encode()).hexdigest())
  counts = {g: collections.Counter() for g in GROUPS}
  sizes = collections.Counter()
  out = {}
  for i, fam in enumerate(order):
    covered = {s: sum(f.coverage(CHARSETS[s]) >= 0.8 for f in by_family[fam])
               for s in CHARSETS}
    best, best_score = None, -np.inf
    for g, frac in zip(GROUPS, GROUP_FRACTIONS):
      need = sum(1.0 / (1.0 + counts[g][s]) for s in GROUP_USES[g]
                 if covered[s])
      score = need + (frac - sizes[g] / max(i, 1))
      if score > best_score:
        best, best_score = g, score
    out[fam] = best
    sizes[best] += 1
    counts[best].update(covered)
  return out


def fonts_for(fonts: Sequence[FontFile], chars: str, *,
              group: str | None = None,
              family_groups: Mapping[str, str] | None = None,
              min_coverage: float = 0.8) -> list[FontFile]:
  """Fonts covering at least `min_coverage` of `chars`, optionally one group."""
  if group is not None:
    if family_groups is None:
      family_groups = split_font_families(fonts)
    fonts = [f for f in fonts if family_groups[f.family] == group]
  return [f for f in fonts if f.coverage(chars) >= min_coverage]


# ----------------------------------------------------------------------------
# Rendering.

_CANVAS = 96
_BASE_SIZE = 48
_MIN_INK = 8.0  # total ink (sum / 255) of the 48 pt check render


class GlyphRenderer:
  """Renders glyphs of one font file with PIL, caching loaded fonts."""

  def __init__(self, font: FontFile):
    from PIL import ImageFont  # pylint: disable=g-import-not-at-top
    self.font = font
    self._pil = ImageFont.truetype(font.path, _BASE_SIZE)
    self._notdef = self._raw("\U0010FFFD", 0)

  def _raw(self, ch: str, stroke: int) -> np.ndarray:
    from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
    img = Image.new("L", (_CANVAS, _CANVAS), 0)
    ImageDraw.Draw(img).text((_CANVAS // 2, _CANVAS // 2), ch, fill=255,
                             font=self._pil, anchor="mm", stroke_width=stroke,
                             stroke_fill=255)
    return np.asarray(img)

  def check(self, ch: str) -> str:
    """"ok", "missing" (not in cmap), "blank" or "notdef" (rejected render)."""
    if ord(ch) not in self.font.codepoints:
      return "missing"
    raw = self._raw(ch, 0)
    if float(raw.sum()) / 255.0 < _MIN_INK:
      return "blank"
    if self._notdef is not None and np.array_equal(raw, self._notdef):
      return "notdef"
    return "ok"

  def render(self, ch: str, rng: np.random.Generator,
             size: int = 28) -> np.ndarray:
    """One augmented render of `ch`: uint8 [size, size].

    Random stroke (0-2 px at 48 pt), rotation (+-15 degrees), glyph scale
    (longer side 55-95% of the image) and offset (anywhere inside the image).
    """
    from PIL import Image  # pylint: disable=g-import-not-at-top
    stroke = int(rng.integers(0, 3))
    angle = float(rng.uniform(-15.0, 15.0))
    frac = float(rng.uniform(0.55, 0.95))
    u, v = rng.uniform(0.0, 1.0, size=2)
    img = Image.fromarray(self._raw(ch, stroke)).rotate(
        angle, resample=Image.BILINEAR, expand=True)
    box = img.getbbox()
    if box is None:
      return np.zeros((size, size), np.uint8)
    img = img.crop(box)
    w, h = img.size
    scale = frac * size / max(w, h)
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    img = img.resize((nw, nh), resample=Image.LANCZOS)
    out = Image.new("L", (size, size), 0)
    out.paste(img, (int(u * (size - nw)), int(v * (size - nh))))
    return np.asarray(out)


@dataclasses.dataclass
class FontDataset:
  """A rendered character dataset.

  Attributes:
    images: [N, 28, 28, 1] uint8.
    labels: [N] int64, index of the character in `chars`.
    font_ids: [N] int32, index into `font_paths` of the font used.
    chars: the class characters.
    font_paths: the font files used (those with at least one valid glyph).
    stats: counts {"missing": glyphs not in a cmap, "blank": ..., "notdef":
      ..., "ok": valid (font, glyph) pairs}.
  """
  images: np.ndarray
  labels: np.ndarray
  font_ids: np.ndarray
  chars: str
  font_paths: tuple[str, ...]
  stats: dict[str, int]


def render_dataset(chars: str, fonts: Sequence[FontFile], *,
                   per_class: int, seed: int, size: int = 28) -> FontDataset:
  """Renders `per_class` images of every character, fonts drawn at random.

  Each image picks a font uniformly among those with a valid glyph for that
  character. Deterministic given (chars, font paths, per_class, seed).

  Raises:
    FontError: when some character has no valid glyph in any font.
  """
  fonts = sorted(fonts, key=lambda f: f.path)
  stats = collections.Counter({"ok": 0, "missing": 0, "blank": 0,
                               "notdef": 0})
  renderers, valid = [], collections.defaultdict(list)
  for f in fonts:
    try:
      r = GlyphRenderer(f)
    except OSError:
      continue
    idx, any_ok = len(renderers), False
    for k, ch in enumerate(chars):
      verdict = r.check(ch)
      stats[verdict] += 1
      if verdict == "ok":
        valid[k].append(idx)
        any_ok = True
    if any_ok:
      renderers.append(r)
    else:
      renderers.append(None)
  empty = [chars[k] for k in range(len(chars)) if not valid[k]]
  if empty:
    raise FontError(f"no font among {len(fonts)} renders {empty!r}; install "
                    "more fonts (launch/install_data.sh).")
  rng = np.random.default_rng([seed, len(chars), per_class])
  images = np.zeros((len(chars) * per_class, size, size, 1), np.uint8)
  labels = np.repeat(np.arange(len(chars), dtype=np.int64), per_class)
  font_ids = np.zeros(len(labels), np.int32)
  for i, k in enumerate(labels):
    for _ in range(10):  # Re-draw the rare render that lands empty.
      j = valid[k][int(rng.integers(len(valid[k])))]
      img = renderers[j].render(chars[k], rng, size)
      if img.max() > 0:
        break
    else:
      raise FontError(f"{chars[k]!r} rendered blank 10 times in a row.")
    images[i, :, :, 0] = img
    font_ids[i] = j
  used = sorted(set(font_ids.tolist()))
  remap = np.full(len(renderers), -1, np.int32)
  remap[used] = np.arange(len(used), dtype=np.int32)
  return FontDataset(images, labels, remap[font_ids], chars,
                     tuple(renderers[j].font.path for j in used), dict(stats))


def coverage_table(fonts: Sequence[FontFile],
                   family_groups: Mapping[str, str] | None = None,
                   min_coverage: float = 0.8) -> dict[str, dict[str, int]]:
  """{charset: {group: number of font files with >= min_coverage}}."""
  if family_groups is None:
    family_groups = split_font_families(fonts)
  table = {}
  for name, chars in CHARSETS.items():
    row = collections.Counter()
    for f in fonts_for(fonts, chars, min_coverage=min_coverage):
      row[family_groups[f.family]] += 1
    table[name] = {g: row[g] for g in GROUPS}
  return table
