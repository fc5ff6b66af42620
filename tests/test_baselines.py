"""Tests of spider_jax.baselines against the golden reference values.

Golden data: ../shared/reference/golden (next to the repository), see its
README. Every value there came from the public reference implementations in
float64; the tests run under `jax.enable_x64(True)`.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
import scipy.stats

from spider_jax import baselines
from spider_jax.baselines import _common
from spider_jax.baselines import gbc as gbc_lib
from spider_jax.baselines import knn as knn_lib
from spider_jax.baselines import nleep as nleep_lib
from spider_jax.data import PTMInfo, StoreWriter

REFERENCE = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / (
    "reference")
GOLDEN = REFERENCE / "golden"
CASES = ("a_basic", "b_medium", "c_n_lt_d", "d_binary", "e_noncontig",
         "f_zero_cols", "g_imbalanced", "h_large")


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _golden_dir() -> pathlib.Path:
  if not (GOLDEN / "expected.json").exists():
    pytest.fail(f"golden data not found at {GOLDEN}: check out the shared/ "
                "folder next to the repository (CI clones it to ../shared).")
  return GOLDEN


@pytest.fixture(scope="module")
def expected():
  return json.loads((_golden_dir() / "expected.json").read_text())


_CACHE: dict[str, dict[str, np.ndarray]] = {}


def load_case(name: str) -> dict[str, np.ndarray]:
  if name not in _CACHE:
    z = np.load(_golden_dir() / f"case_{name}.npz")
    _CACHE[name] = {k: z[k] for k in z.files}
    _CACHE[name]["features"] = _CACHE[name]["features"].astype(np.float64)
  return _CACHE[name]


def ref_value(expected, case: str, key: str):
  """Golden value; case e uses the remapped-label references."""
  e = expected[case]
  if case == "e_noncontig" and f"{key}@labels_remapped" in e:
    return e[f"{key}@labels_remapped"]
  return e[key]


# (method, golden key, input, sign, rtol)
GOLDEN_METHODS = [
    ("logme", "logme_fast", "features", 1.0, 1e-8),
    ("logme_icml", "logme_icml", "features", 1.0, 1e-8),
    ("leep", "leep_thuml", "source_probs", 1.0, 1e-9),
    ("nce", "nce_thuml", "source_probs", 1.0, 1e-9),
    ("hscore", "hscore_tllib", "features", 1.0, 1e-9),
    ("hscore_regularized", "hscore_regularized_tllib", "features", 1.0, 1e-9),
    ("transrate", "transrate_tllib", "features", 1.0, 1e-9),
    ("gbc", "gbc_modelspider", "features", 1.0, 1e-9),
    ("pactran_dirichlet", "pactran_dirichlet_modelspider", "source_probs",
     -1.0, 1e-9),
    ("lfc", "lfc_modelspider", "features", 1.0, 1e-6),
    ("sfda", "sfda", "features", 1.0, 1e-9),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method,key,inp,sign,rtol", GOLDEN_METHODS,
                         ids=[m[0] for m in GOLDEN_METHODS])
def test_matches_golden(expected, case, method, key, inp, sign, rtol):
  data = load_case(case)
  ref = ref_value(expected, case, key)
  if method == "logme" and "logme_fast_corrected" in expected[case]:
    ref = expected[case]["logme_fast_corrected"]   # N < D: full-D evidence
  fn = baselines.METHODS[method].fn
  if isinstance(ref, dict):                        # the reference raised
    with pytest.raises(baselines.BaselineError):
      fn(data[inp], data["labels"])
    return
  got = sign * float(fn(data[inp], data["labels"]))
  np.testing.assert_allclose(got, ref, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_leep_step_of_nleep_on_stored_posteriors(expected, case):
  data = load_case(case)
  got = float(baselines.score("leep", data["gmm_posteriors"], data["labels"]))
  ref = ref_value(expected, case, "nleep_leep_thuml")
  np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-15)


def test_logme_fast_equals_icml_when_n_gt_d(expected):
  for case in ("a_basic", "d_binary", "f_zero_cols", "g_imbalanced"):
    data = load_case(case)
    f, y = data["features"], data["labels"]
    fast = float(baselines.score("logme", f, y))
    icml = float(baselines.score("logme_icml", f, y))
    assert abs(fast - icml) < 5e-5, case


def test_logme_n_lt_d_restores_missing_term(expected):
  """thuml's fast LogME drops -(D-k)/2 log alpha when N < D; ours keeps it."""
  data = load_case("c_n_lt_d")
  ours = float(baselines.score("logme", data["features"], data["labels"]))
  icml = float(baselines.score("logme_icml", data["features"], data["labels"]))
  assert abs(ours - icml) < 1e-4
  assert expected["c_n_lt_d"]["logme_fast"] - ours > 3.0  # the buggy value


def test_noncontiguous_labels_are_remapped(expected):
  data = load_case("e_noncontig")
  y = data["labels"]
  assert set(np.unique(y)) == {0, 3, 7}
  remapped = np.unique(y, return_inverse=True)[1]
  for name in ("logme", "hscore", "transrate", "sfda"):
    fn = baselines.METHODS[name].fn
    a = float(fn(data["features"], y))
    b = float(fn(data["features"], remapped))
    assert a == pytest.approx(b, rel=1e-12), name
  # thuml loops over range(max + 1), so empty classes distort its value.
  assert float(baselines.score("logme", data["features"], y)) != pytest.approx(
      expected["e_noncontig"]["logme_fast"], rel=1e-3)


def test_all_zero_columns_do_not_change_scores():
  data = load_case("a_basic")
  f, y = data["features"], data["labels"]
  padded = np.concatenate([f, np.zeros((f.shape[0], 24))], axis=1)
  for name in ("logme", "logme_icml", "hscore", "transrate", "lfc"):
    fn = baselines.METHODS[name].fn
    np.testing.assert_allclose(float(fn(padded, y)), float(fn(f, y)),
                               rtol=1e-9, err_msg=name)


def test_n_lt_d_scores_are_finite_and_sane():
  data = load_case("c_n_lt_d")
  f, y, p = data["features"], data["labels"], data["source_probs"]
  c = np.unique(y).size
  assert float(baselines.score("hscore", f, y)) == pytest.approx(c - 1,
                                                                 rel=1e-9)
  for name, spec in baselines.METHODS.items():
    if spec.kernel is None or name.startswith("gbc"):
      continue
    x = p if spec.needs_source_probs else f
    key = jax.random.key(0) if spec.needs_key else None
    assert np.isfinite(float(spec.fn(x, y, key=key))), name
  with pytest.raises(baselines.BaselineError, match="pca_dim"):
    baselines.score("gbc", f, y)
  assert np.isfinite(float(baselines.score("gbc", f, y, pca_dim=8)))


def test_singleton_class():
  data = load_case("g_imbalanced")
  f, y, p = data["features"], data["labels"].copy(), data["source_probs"]
  y[np.flatnonzero(y == 5)[0]] = 4      # class 5 now has a single sample
  assert np.sum(y == 5) == 1
  with pytest.raises(baselines.BaselineError, match=">= 2 samples"):
    baselines.score("gbc", f, y)
  for name in ("logme", "logme_icml", "hscore", "hscore_regularized",
               "transrate", "sfda", "lfc", "knn_loo", "gbc_diagonal"):
    assert np.isfinite(float(baselines.METHODS[name].fn(f, y))), name
  for name in ("leep", "nce", "pactran_dirichlet"):
    assert np.isfinite(float(baselines.METHODS[name].fn(p, y))), name


def test_leep_source_class_never_predicted():
  data = load_case("a_basic")
  p, y = data["source_probs"].copy(), data["labels"]
  p[:, 7] = 0.0
  p /= p.sum(axis=1, keepdims=True)
  got = float(baselines.score("leep", p, y))
  assert np.isfinite(got)
  # A column with no mass is irrelevant: equal to LEEP without that column.
  without = float(baselines.score("leep", np.delete(p, 7, axis=1), y))
  assert got == pytest.approx(without, rel=1e-12)
  assert np.isfinite(float(baselines.score("nce", p, y)))
  assert np.isfinite(float(baselines.score("pactran_dirichlet", p, y)))


def test_device_arrays_are_accepted_and_checked():
  data = load_case("a_basic")
  f, y, p = data["features"], data["labels"], data["source_probs"]
  for name, x in (("logme", f), ("leep", p), ("lfc", f)):
    on_device = float(baselines.score(name, jax.numpy.asarray(x), y))
    assert on_device == float(baselines.score(name, x, y)), name
  with pytest.raises(baselines.BaselineError, match="softmax"):
    baselines.score("leep", jax.numpy.log(jax.numpy.asarray(p)), y)
  with pytest.raises(baselines.BaselineError, match="NaN"):
    baselines.score("logme", jax.numpy.asarray(f).at[0, 0].set(np.nan), y)


@pytest.mark.parametrize("bad,match", [
    (lambda f, y: (f[:, :, None], y), "2-D"),
    (lambda f, y: (f, y.astype(float)), "integer"),
    (lambda f, y: (f, np.zeros_like(y)), "at least 2 classes"),
    (lambda f, y: (f[:-1], y), "rows"),
    (lambda f, y: (np.where(np.arange(f.size).reshape(f.shape) == 3, np.nan,
                            f), y), "NaN"),
])
def test_bad_inputs_raise(bad, match):
  data = load_case("d_binary")
  f, y = bad(data["features"], data["labels"])
  with pytest.raises(baselines.BaselineError, match=match):
    baselines.score("logme", f, y)


def test_probability_methods_reject_logits_and_random_needs_key():
  data = load_case("d_binary")
  with pytest.raises(baselines.BaselineError, match="softmax"):
    baselines.score("leep", np.log(data["source_probs"]), data["labels"])
  with pytest.raises(baselines.BaselineError, match="PRNG key"):
    baselines.score("nleep", data["features"], data["labels"], key=None)
  with pytest.raises(baselines.BaselineError, match="PRNG key"):
    baselines.score("linear_probe", data["features"], data["labels"], key=None)


def test_nleep_rank_agreement_with_sklearn_reference(expected):
  ours, refs = [], []
  for case in CASES:
    data = load_case(case)
    info = expected["_cases_info"][case]
    lam = np.asarray(nleep_lib._pca_spectra(data["features"][None])[1])
    assert nleep_lib.pca_dims(lam, data["features"].shape[0], 0.8)[0] == (
        info["pca_dims"]), case
    ours.append(float(baselines.score("nleep", data["features"], data["labels"],
                                      key=jax.random.key(0),
                                      num_components=info["gmm_K"])))
    refs.append(ref_value(expected, case, "nleep_leep_thuml"))
  tau = scipy.stats.kendalltau(ours, refs).statistic
  assert tau >= 0.85, (ours, refs)
  np.testing.assert_allclose(ours, refs, atol=0.1)


def test_nleep_seeded_and_component_rule():
  data = load_case("d_binary")
  f, y = data["features"], data["labels"]
  a = float(baselines.score("nleep", f, y, key=jax.random.key(3)))
  b = float(baselines.score("nleep", f, y, key=jax.random.key(3)))
  assert a == b
  assert nleep_lib.modelspider_components(6667, 10) == 666
  assert nleep_lib.modelspider_components(60, 5) == 6
  c = float(baselines.score("nleep", f, y, key=jax.random.key(3),
                            num_components=lambda n, c: 5 * c))
  assert np.isfinite(c)
  with pytest.raises(baselines.BaselineError, match="num_components"):
    baselines.score("nleep", f, y, key=jax.random.key(0), num_components=10**6)


def test_nleep_packed_em_steps_match_per_component_form():
  rng = np.random.default_rng(0)
  n, d, k = 300, 5, 4
  x = rng.standard_normal((n, d)) * [3.0, 1.0, 0.5, 0.1, 1e-4] + 2.0
  resp = rng.dirichlet(np.ones(k), size=n)
  iu, ju = np.triu_indices(d)
  z = nleep_lib._packed(jax.numpy.asarray(x))
  np.testing.assert_array_equal(z, x[:, iu] * x[:, ju])
  stats = (resp.T @ x, resp.T @ np.asarray(z), resp.sum(0))
  w, mu, pc = (np.asarray(a)
               for a in nleep_lib._gaussians(stats, n, 1e-6))
  nk = resp.sum(0) + 10 * np.finfo(float).eps
  np.testing.assert_allclose(mu, resp.T @ x / nk[:, None], rtol=1e-13)
  lp = np.empty((n, k))
  for j in range(k):                       # sklearn's per-component form
    diff = x - mu[j]
    cov = (resp[:, j] * diff.T) @ diff / nk[j] + 1e-6 * np.eye(d)
    # cov's condition number is about 1e7 (feature scales 3 to 1e-4, ridge
    # 1e-6), and the packed form computes E[x x^T] - mu mu^T, so its inverse
    # differs from the centred form's in the 8th digit on some CPUs
    # (measured: 2.1e-8 relative, 1.0e-6 absolute on an entry of 48.8).
    np.testing.assert_allclose(pc[j] @ pc[j].T, np.linalg.inv(cov),
                               rtol=1e-6, atol=1e-8)
    yj = (x - mu[j]) @ pc[j]
    lp[:, j] = (-0.5 * (d * np.log(2 * np.pi) + (yj ** 2).sum(1))
                + np.log(np.diag(pc[j])).sum() + np.log(w[j]))
  norm = scipy.special.logsumexp(lp, axis=1)
  got_norm, got_lr = nleep_lib._log_resp_t(
      jax.numpy.asarray(x), z, nleep_lib._e_terms(w, mu, pc))
  # The expanded x^T L x - 2 x^T L mu + mu^T L mu cancels: its rounding is
  # ~eps |x|^2 |L| (|x|^2 ~ 30, |L| ~ 1e6 along the 1e-4 axis here), not
  # eps maha as in the per-component form.
  np.testing.assert_allclose(got_norm, norm, rtol=0, atol=1e-8)
  np.testing.assert_allclose(np.exp(got_lr).T, np.exp(lp - norm[:, None]),
                             atol=1e-8)


def test_nleep_row_blocks_match_one_block():
  rng = np.random.default_rng(1)
  n, d, k = 587, 6, 12
  x = rng.standard_normal((n, d)) + 4.0 * rng.integers(0, 3, (n, 1))
  t = d * (d + 1) // 2
  assert nleep_lib._row_blocks(n, t, 100 * t) == (98, 6)     # 1 padded row
  fit = jax.jit(nleep_lib.gmm_posteriors,
                static_argnames=("k", "max_iter", "block_elems"))
  key = jax.random.key(0)
  one = fit(x, key, k=k, max_iter=20)
  blocked = fit(x, key, k=k, max_iter=20, block_elems=100 * t)
  assert one.shape == blocked.shape == (n, k)
  np.testing.assert_allclose(blocked, one, atol=1e-10)
  np.testing.assert_allclose(np.sum(one, axis=1), 1.0, rtol=1e-12)


def test_nleep_float32_uses_per_component_form():
  data = load_case("b_medium")         # K = 200 small, degenerate components
  with jax.enable_x64(False):
    got = float(baselines.score("nleep", data["features"], data["labels"],
                                key=jax.random.key(0), num_components=200))
  ref = float(baselines.score("nleep", data["features"], data["labels"],
                              key=jax.random.key(0), num_components=200))
  assert np.isfinite(got)
  np.testing.assert_allclose(got, ref, rtol=0.05)


def _numpy_gbc_diag(x, y, spherical):
  """stable_transfer get_gbc_score transcribed to numpy."""
  stats = {}
  for c in np.unique(y):
    xc = x[y == c]
    stats[c] = (xc.mean(0), np.maximum(xc.var(0), 1e-4))
  total = 0.0
  for c1 in stats:
    for c2 in stats:
      if c1 == c2:
        continue
      (m1, s1), (m2, s2) = stats[c1], stats[c2]
      if spherical:
        s1, s2 = np.mean(s1), np.mean(s2)
      avg = (s1 + s2) / 2
      first = np.sum((m1 - m2) ** 2 / avg) / 8
      second = (np.sum(np.log(avg)) - 0.5 * np.sum(np.log(s1))
                - 0.5 * np.sum(np.log(s2)))
      total += np.exp(-(first + 0.5 * second))
  return -total


@pytest.mark.parametrize("spherical", [False, True])
def test_gbc_diagonal_spherical_match_transcription(spherical):
  data = load_case("g_imbalanced")
  f, y = data["features"], data["labels"]
  x = np.asarray(gbc_lib.pca_project(f, 32))
  want = _numpy_gbc_diag(x, y, spherical)
  name = "gbc_spherical" if spherical else "gbc_diagonal"
  got = float(baselines.score(name, f, y, pca_dim=32))
  np.testing.assert_allclose(got, want, rtol=1e-10)


def _numpy_logme_thin_svd(f, y):
  """thuml's `_fit_fixed_point` on a thin `np.linalg.svd(F)` in both regimes
  (its N <= D branch), plus the full-D term -(D - k)/2 log alpha."""
  n, d = f.shape
  u, s, _ = np.linalg.svd(f, full_matrices=False)
  sigma = (s ** 2)[:, None]
  k = s.size
  out = []
  for c in range(int(y.max()) + 1):
    t_ = (y == c).astype(np.float64)[:, None]
    x2 = (u.T @ t_) ** 2
    res_x2 = (t_ ** 2).sum() - x2.sum()
    alpha, beta = 1.0, 1.0
    for _ in range(11):
      t = alpha / beta
      gamma = (sigma / (sigma + t)).sum()
      m2 = (sigma * x2 / (t + sigma) ** 2).sum()
      res2 = (x2 / (1 + sigma / t) ** 2).sum() + res_x2
      alpha = gamma / (m2 + 1e-5)
      beta = (n - gamma) / (res2 + 1e-5)
      if abs(alpha / beta - t) / t <= 1e-3:
        break
    out.append((d / 2 * np.log(alpha) + n / 2 * np.log(beta)
                - 0.5 * np.sum(np.log(alpha + beta * sigma))
                - 0.5 * (d - k) * np.log(alpha) - beta / 2 * res2
                - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi)) / n)
  return float(np.mean(out))


@pytest.mark.parametrize("n,d,rank", [(300, 40, 40), (40, 300, 40),
                                      (64, 64, 64), (900, 800, 800),
                                      (10, 1, 1), (3, 5, 3), (200, 30, 4)])
def test_logme_tridiagonal_paths_equal_thin_svd(n, d, rank):
  """Both Gram paths (F^T F for N > D, F F^T otherwise; tridiagonal form,
  WY-blocked Q^T, resolvent solves) give the SVD-based value to 1e-10,
  also for rank-deficient F."""
  rng = np.random.default_rng(n + d)
  y = np.arange(n) % 4
  f = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d))
  f += 0.5 * y[:, None] * (rng.normal(size=(1, rank)) @ rng.normal(
      size=(rank, d)))
  want = _numpy_logme_thin_svd(f, y)
  got = float(baselines.score("logme", f, y))
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_blocked_gram_equals_product():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(50, 1100))
  np.testing.assert_allclose(np.asarray(_common.gram(jax.numpy.asarray(a))),
                             a.T @ a, rtol=1e-12, atol=1e-10)
  np.testing.assert_allclose(
      np.asarray(_common.gram(jax.numpy.asarray(a.T), rows=True)), a.T @ a,
      rtol=1e-12, atol=1e-10)


def test_first_argmax_matches_numpy_on_ties_and_scales():
  from spider_jax.baselines import nce as nce_lib
  rng = np.random.default_rng(0)
  fn = jax.jit(nce_lib.first_argmax)
  for trial in range(70):
    # Row maxima down to 1e-270 (`first_argmax`'s documented range) or 0.
    scale = [1.0, 1e-5, 1e300, 1e-270, 0.0, 1e-100, 3e-270][trial % 7]
    q = rng.integers(0, 4, size=(7, 9)).astype(float) * scale
    if trial % 3 == 0:
      q += np.abs(rng.normal(size=q.shape)) * 1e-17
    if trial % 2:
      q[0] = 0.0                                    # all-zero row
    q[2, 4] = 1.7e308 if trial % 4 == 1 else q[2, 4]   # near the top
    q[1, 5] = q[1].max()
    q[1, 3] = np.nextafter(q[1, 5], 0.0)           # one ulp below the max
    index, ordered = fn(jax.numpy.asarray(q))
    assert np.all(np.asarray(ordered))
    np.testing.assert_array_equal(np.asarray(index), np.argmax(q, axis=1),
                                  err_msg=str(q))
  # Rows it cannot order are flagged, not given a wrong index.
  q = np.ones((5, 4))
  q[1, 2], q[2, 0], q[3] = np.nan, np.inf, 1e-280
  q[4] = [0.0, 2.0 ** -1000, 0.0, 2.0 ** -1000]
  _, ordered = fn(jax.numpy.asarray(q))
  np.testing.assert_array_equal(np.asarray(ordered),
                                [True, False, False, False, False])


def test_nce_refuses_rows_first_argmax_cannot_order():
  data = load_case("d_binary")
  p = data["source_probs"].copy()
  p[3] *= 1e-280
  with pytest.raises(baselines.BaselineError, match="below 2"):
    baselines.score("nce", p, data["labels"])
  p[3] = 0.0                                     # an all-zero row is fine
  assert np.isfinite(float(baselines.score("nce", p, data["labels"])))


def test_knn_top_k_first_is_stable_descending_order():
  rng = np.random.default_rng(0)
  s = rng.integers(0, 5, size=(6, 20)).astype(float)
  s[0, 4] = -np.inf
  got = _common.top_k_first(jax.numpy.asarray(s), 5,
                            jax.numpy.arange(20, dtype=jax.numpy.int32))
  want = np.argsort(-s, axis=1, kind="stable")[:, :5]
  np.testing.assert_array_equal(np.asarray(got), want)


def test_labels_remap_paths_and_prepared_cache():
  for y in (np.array([5, 2, 5, 9, 2]), np.array([-3, 7, 7, -3, 0]),
            np.array([0, 10**9, 3, 3], np.int64),
            np.array([1, 0, 1, 0], np.uint8)):
    got, c = _common.check_labels(y)
    classes, want = np.unique(y, return_inverse=True)
    assert c == classes.size and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
  # Scores follow the labels even when one array is mutated between calls.
  data = load_case("b_medium")
  f, p = data["features"], data["source_probs"]
  y = data["labels"].copy()
  perm = np.random.default_rng(0).permutation(y)
  for name, x in (("logme", f), ("nce", p), ("leep", p)):
    a = float(baselines.score(name, x, y))
    b = float(baselines.score(name, x, perm.copy()))
    buf = y.copy()
    a2 = float(baselines.score(name, x, buf))
    buf[:] = perm
    b2 = float(baselines.score(name, x, buf))
    assert a != b and a == a2 and b == b2, name


def test_device_check_overflowing_sum_is_not_an_error():
  """Finite inputs whose sum overflows pass (exact host re-check)."""
  data = load_case("d_binary")
  f, y = data["features"].copy(), data["labels"]
  f[:4, 0] = 1e308                       # sum = inf, every value finite
  got = float(baselines.score("knn_loo", f, y))
  with np.errstate(over="ignore"):
    want = knn_lib.knn_loo_numpy(f, y)
  assert got == pytest.approx(want, abs=1e-12)
  with pytest.raises(baselines.BaselineError, match="NaN"):
    baselines.score("leep", np.where(np.arange(data["source_probs"].size)
                                     .reshape(data["source_probs"].shape)
                                     == 5, np.inf, data["source_probs"]), y)


def test_knn_matches_numpy_and_linear_probe_separates():
  data = load_case("b_medium")
  f, y = data["features"], data["labels"]
  for k in (1, 5):
    assert float(baselines.score("knn_loo", f, y, k=k)) == pytest.approx(
        knn_lib.knn_loo_numpy(f, y, k=k), abs=1e-12)
  d = load_case("d_binary")
  key = jax.random.key(0)
  f, y = d["features"], d["labels"]
  good = float(baselines.score("linear_probe", f, y, key=key))
  shuffled = np.random.default_rng(0).permutation(y)
  bad = float(baselines.score("linear_probe", f, shuffled, key=key))
  assert good > 0.95 and bad < 0.75
  assert good == float(baselines.score("linear_probe", f, y, key=key))


def test_linear_probe_fit_reaches_scipy_minimum_and_stops_early():
  import scipy.optimize
  import scipy.special
  from spider_jax.baselines import linear_probe as lp_lib
  data = load_case("b_medium")
  x = data["features"]
  x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
  _, y = np.unique(data["labels"], return_inverse=True)
  c = int(y.max()) + 1
  y1h = np.eye(c)[y]
  for l2 in (1e-3, 1.0):
    def loss(theta, l2=l2):
      w, b = theta[:-c].reshape(-1, c), theta[-c:]
      logits = x @ w + b
      lp = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
      g = (np.exp(lp) - y1h) / x.shape[0]
      return (-np.mean(np.sum(y1h * lp, 1)) + 0.5 * l2 * np.sum(w * w),
              np.concatenate([(x.T @ g + l2 * w).ravel(), g.sum(0)]))
    ref = scipy.optimize.minimize(loss, np.zeros(x.shape[1] * c + c),
                                  jac=True, method="L-BFGS-B",
                                  options={"maxiter": 500}).fun
    (w, b), used = lp_lib._fit_softmax(x, y1h, l2, 500)
    ours = loss(np.concatenate([np.asarray(w).ravel(), np.asarray(b)]))[0]
    assert ours == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert 0 < int(used) < 500      # the convergence test stopped it


# ----------------------------------------------------------------------------
# Batched over a zoo.

ZOO = [PTMInfo("p16a", 16, 10), PTMInfo("p24", 24, 10),
       PTMInfo("p16b", 16, 10), PTMInfo("p16c", 16, 0),
       PTMInfo("p16d", 16, 10)]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
  rng = np.random.default_rng(0)
  n, c = 160, 4
  labels = np.repeat(np.arange(c) * 3 + 1, n // c)      # pool ids 1,4,7,10
  means = rng.normal(size=(c, 32)) * 1.5
  feats, probs = {}, {}
  for p in ZOO:
    lat = means[np.repeat(np.arange(c), n // c)] + rng.normal(size=(n, 32))
    feats[p.name] = np.maximum(lat @ rng.normal(size=(32, p.dim)), 0.0)
    if p.num_source_classes:
      logits = lat @ rng.normal(size=(32, p.num_source_classes))
      e = np.exp(logits - logits.max(1, keepdims=True))
      probs[p.name] = e / e.sum(1, keepdims=True)
  path = tmp_path_factory.mktemp("store")
  w = StoreWriter(path, encoder_name="enc", encoder_dim=8, ptms=ZOO)
  w.add_pool("pool", labels=labels, generic=rng.normal(size=(n, 8)),
             features=feats, source_probs=probs)
  split = np.where(np.arange(n) % 8 == 0, 2, 0)
  w.add_task("task", pool="pool", split=split, role="target")
  w.set_ground_truth({"task": {p.name: float(i) for i, p in enumerate(ZOO)}})
  return w.close()


ZOO_OPTIONS = {"gbc": {"pca_dim": 8}, "gbc_diagonal": {"pca_dim": 8},
               "gbc_spherical": {"pca_dim": 8},
               "linear_probe": {"steps": 30}}


@pytest.mark.parametrize("method", [m for m, s in baselines.METHODS.items()
                                    if s.kernel is not None])
def test_score_zoo_equals_per_model_calls(tiny_store, method):
  spec = baselines.METHODS[method]
  task = tiny_store.task("task")
  names = [p.name for p in ZOO if p.num_source_classes or
           not spec.needs_source_probs]
  key = jax.random.key(7) if spec.needs_key else None
  opts = ZOO_OPTIONS.get(method, {})
  got = baselines.score_zoo(method, task, names, key=key,
                            max_models_per_call=2, **opts)
  rows = task.mask("train")
  y = task.labels[rows]
  for j, m in enumerate(names):
    x = (task.source_probs(m) if spec.needs_source_probs
         else task.ptm_features(m))[rows]
    k = None if key is None else jax.random.fold_in(key, j)
    want = float(spec.fn(x, y, key=k, **opts))
    np.testing.assert_allclose(got[j], want, rtol=1e-7, atol=1e-10,
                               err_msg=f"{method} {m}")
  assert got.shape == (len(names),) and np.all(np.isfinite(got))


def test_score_zoo_missing_source_probs_names_ptm(tiny_store):
  task = tiny_store.task("task")
  with pytest.raises(baselines.BaselineError, match="p16c"):
    baselines.score_zoo("leep", task, ["p16a", "p16c"])
  with pytest.raises(baselines.BaselineError, match="unknown method"):
    baselines.score_zoo("nope", task, ["p16a"])
  with pytest.raises(baselines.BaselineError, match="PRNG key"):
    baselines.score_zoo("nleep", task, ["p16a"])


def test_score_zoo_reference_rows(tiny_store):
  task = tiny_store.task("task")
  names = ["p24", "p16a"]
  prior = {"p16a": 3.0, "p24": 1.0}
  np.testing.assert_array_equal(
      baselines.score_zoo("prior", task, names, prior=prior), [1.0, 3.0])
  np.testing.assert_array_equal(
      baselines.score_zoo("prior", task, names, prior=[3.0, 1.0],
                          prior_names=["p16a", "p24"]), [1.0, 3.0])
  with pytest.raises(baselines.BaselineError, match="prior"):
    baselines.score_zoo("prior", task, names)
  a = baselines.score_zoo("random", task, names, key=jax.random.key(1))
  b = baselines.score_zoo("random", task, names, key=jax.random.key(1))
  c = baselines.score_zoo("random", task, names, key=jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  ranks = {"t1": [0, 1, 2], "t2": [2, 1, 0], "t3": [1, 1, 1]}
  np.testing.assert_allclose(baselines.mean_training_rank(ranks), [1, 1, 1])


def test_prior_on_released_training_rankings():
  path = REFERENCE / "training_task_rankings.json"
  if not path.exists():
    pytest.fail(f"{path} missing: check out shared/ next to the repository.")
  data = json.loads(path.read_text())
  prior = baselines.mean_training_rank(data["zoo10_task_rankings"])
  from spider_jax import metrics
  from spider_jax.data import read_ground_truth
  gt = read_ground_truth(REFERENCE / "zoo10_finetune_accuracy.csv")
  taus = []
  for t in ("Aircraft", "Caltech101", "Cars", "CIFAR10", "CIFAR100", "DTD",
            "Pet", "SUN397"):
    scores = baselines.prior_scores(prior, gt.models, data["zoo10_order"])
    taus.append(metrics.weighted_tau(gt.row(t), scores))
  # The task-agnostic prior is a strong baseline on this zoo (official 5.2).
  assert np.mean(taus) > 0.6, taus


def test_nce_refuses_nan_and_inf_at_sizes_where_xla_max_skips_nan():
  # XLA:CPU's max / min reductions drop NaN on arrays this large (jax
  # 0.10), so NCE's input check must not rely on them.
  data = load_case("d_binary")
  for bad in (np.nan, np.inf, -np.inf):
    p = data["source_probs"].copy()
    p[3, 2] = bad
    with pytest.raises(baselines.BaselineError, match="NaN/Inf"):
      baselines.score("nce", p, data["labels"])
