"""Tokens, fitness transformer, loss and metrics: invariances and references."""

import csv
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from spider_jax import metrics, tokens
from spider_jax.data.store import read_ground_truth
from spider_jax.losses import plackett_luce_loss
from spider_jax.model import FitnessTransformer, ModelConfig

DIMS = (6, 8, 10, 8, 6)
CONFIGS = {
    "paper": ModelConfig(dim=32),
    "heads_ffn_bias": ModelConfig(dim=32, num_heads=4, mlp_ratio=2,
                                  qkv_bias=True),
    "deep": ModelConfig(dim=32, num_layers=2, num_heads=4, mlp_ratio=2,
                        pre_norm=True),
}


def make_inputs(seed=0, b=3, p=8, dg=12, ph=4):
  rng = np.random.default_rng(seed)
  counts = np.array([3, 5, 8])[:b]
  u = rng.normal(size=(b, p, dg)).astype(np.float32)
  u_mask = np.arange(p)[None] < counts[:, None]
  u = u * u_mask[..., None]
  ptm = np.array([[0, 3], [1, 2], [4, 0]])[:b]
  h = rng.normal(size=(b, 2, ph, max(DIMS))).astype(np.float32)
  h *= np.arange(max(DIMS))[None, None, None] < np.array(DIMS)[ptm][
      ..., None, None]
  h_mask = np.arange(ph)[None, None] < np.array([[[2], [4]], [[0], [3]],
                                                 [[4], [1]]])[:b]
  h *= h_mask[..., None]
  return u, u_mask, {"h": h, "h_mask": h_mask, "ptm": ptm}


def model(cfg, m=5):
  return FitnessTransformer(m, 12, DIMS[:m], cfg, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- tokens


def test_prototypes_are_means_of_normalised_features():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(20, 5))
  y = rng.integers(0, 4, 20)
  y[:4] = np.arange(4)
  protos = tokens.class_prototypes(x, y, 4)
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  want = np.stack([xn[y == c].mean(0) for c in range(4)])
  np.testing.assert_allclose(protos, want, rtol=1e-12)
  # Same numbers through jnp.
  np.testing.assert_allclose(
      tokens.class_prototypes(jnp.asarray(x, jnp.float32), jnp.asarray(y), 4),
      want, rtol=1e-5, atol=1e-6)


def test_prototype_spread_tokens():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(30, 6))
  y = np.repeat(np.arange(3), 10)
  y[-1] = 4                                           # class 3 is empty
  got = tokens.class_tokens(x, y, 5, task_token="prototype_spread")
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  for c in range(5):
    rows = xn[y == c]
    want = (np.concatenate([rows.mean(0), rows.std(0)]) if len(rows)
            else np.zeros(12))
    np.testing.assert_allclose(got[c], want, atol=1e-12)
  np.testing.assert_array_equal(tokens.class_tokens(x, y, 5),
                                tokens.class_prototypes(x, y, 5))
  assert tokens.token_dim(7, "prototype_spread") == 14
  with pytest.raises(ValueError, match="unknown task_token"):
    tokens.class_tokens(x, y, 5, task_token="spread")
  cfg = ModelConfig(dim=8, task_token="prototype_spread")
  assert model(cfg).u_w[...].shape == (24, 8)


def test_prototype_centered_tokens():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(40, 6))
  y = np.repeat(np.arange(4), 10)
  protos = tokens.class_prototypes(x, y, 4)
  got = tokens.class_tokens(x, y, 4, task_token="prototype_centered")
  np.testing.assert_allclose(got, protos - protos.mean(0), atol=1e-12)
  np.testing.assert_allclose(got.sum(0), 0.0, atol=1e-12)
  assert tokens.token_dim(6, "prototype_centered") == 6
  # An empty class stays a zero row and is left out of the mean; jnp agrees.
  y5 = y.copy()
  y5[y5 == 3] = 4                                     # class 3 is empty
  protos5 = tokens.class_prototypes(x, y5, 5)
  want = protos5 - protos5[[0, 1, 2, 4]].mean(0)
  want[3] = 0.0
  got5 = tokens.class_tokens(x, y5, 5, task_token="prototype_centered")
  np.testing.assert_allclose(got5, want, atol=1e-12)
  np.testing.assert_allclose(
      tokens.class_tokens(jnp.asarray(x, jnp.float32), jnp.asarray(y5), 5,
                          task_token="prototype_centered"),
      want, atol=1e-6)


def test_prototype_size_tokens():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(31, 6))
  y = np.array([0] * 10 + [1] * 20 + [3])             # class 2 is empty
  got = tokens.class_tokens(x, y, 4, task_token="prototype_size")
  assert got.shape == (4, 8) and tokens.token_dim(6, "prototype_size") == 8
  np.testing.assert_allclose(got[:, :6], tokens.class_prototypes(x, y, 4),
                             atol=1e-12)
  total = np.log2(32.0) / 10
  np.testing.assert_allclose(got[:, 6:], [[np.log2(11) / 10, total],
                                          [np.log2(21) / 10, total],
                                          [0.0, 0.0], [0.1, total]],
                             atol=1e-12)
  # Given counts (a task's whole train split) replace the rows' own; jnp
  # agrees.
  counts = np.array([40, 80, 0, 4])
  want = np.log2(1.0 + np.array([40, 80, 4])) / 10
  for xs, ys in ((x, y), (jnp.asarray(x, jnp.float32), jnp.asarray(y))):
    sized = tokens.class_tokens(xs, ys, 4, task_token="prototype_size",
                                counts=counts)
    np.testing.assert_allclose(np.asarray(sized)[[0, 1, 3], 6], want,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(sized)[[0, 1, 3], 7],
                               np.log2(125.0) / 10, atol=1e-6)
  cfg = ModelConfig(dim=8, task_token="prototype_size")
  assert model(cfg).u_w[...].shape == (14, 8)


def test_buckets_and_padding():
  assert [tokens.bucket_size(n) for n in (1, 8, 9, 13, 85, 200, 397, 1500)
          ] == [8, 8, 12, 16, 96, 256, 448, 1536]
  t, mask = tokens.task_tokens(np.ones((6, 3)), np.array([0, 1, 2, 0, 1, 2]),
                               3)
  assert t.shape == (8, 3) and mask.tolist() == [True] * 3 + [False] * 5
  assert np.all(t[3:] == 0)
  with pytest.raises(ValueError, match="do not fit"):
    tokens.pad_tokens(np.ones((9, 2)), 8)


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("name", ["paper", "heads_ffn_bias"])
def test_efficient_equals_full_formulation(name):
  net = model(CONFIGS[name])
  u, u_mask, slots = make_inputs()
  np.testing.assert_allclose(net(u, u_mask), net.full_scores(u, u_mask),
                             atol=2e-5)
  np.testing.assert_allclose(net(u, u_mask, slots),
                             net.full_scores(u, u_mask, slots), atol=2e-5)


@pytest.mark.parametrize("name,m", [("paper", 40), ("heads_ffn_bias", 40),
                                    ("heads_ffn_bias", 20)])
def test_large_zoo_path_equals_full_formulation(name, m):
  """M > P folds W_v (and, for M > P * heads, W_o) into the task tokens."""
  dims = [DIMS[i % len(DIMS)] for i in range(m)]
  net = FitnessTransformer(m, 12, dims, CONFIGS[name], rngs=nnx.Rngs(1))
  u, u_mask, slots = make_inputs()
  slots["ptm"] = np.array([[10, m - 7], [1, m - 15], [m - 1, 0]])
  slots["h"] *= (np.arange(max(DIMS))[None, None, None] <
                 np.array(dims)[slots["ptm"]][..., None, None])
  np.testing.assert_allclose(net(u, u_mask), net.full_scores(u, u_mask),
                             atol=2e-5)
  np.testing.assert_allclose(net(u, u_mask, slots),
                             net.full_scores(u, u_mask, slots), atol=2e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_permuting_zoo_permutes_scores(name):
  net = model(CONFIGS[name])
  u, u_mask, slots = make_inputs()
  base = np.asarray(net(u, u_mask, slots))
  perm = np.array([3, 0, 4, 1, 2])
  inv = np.argsort(perm)
  permuted = model(CONFIGS[name])
  permuted.ptm_tokens[...] = net.ptm_tokens[...][perm]
  permuted.h_w[...] = net.h_w[...][perm]
  permuted.h_b[...] = net.h_b[...][perm]
  slots_p = dict(slots, ptm=inv[slots["ptm"]])
  np.testing.assert_allclose(np.asarray(permuted(u, u_mask, slots_p)),
                             base[:, perm], atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_class_order_and_padding_do_not_change_scores(name):
  net = model(CONFIGS[name])
  u, u_mask, slots = make_inputs()
  base = np.asarray(net(u, u_mask, slots))
  # Permute the real prototypes of task 2 (8 classes) and the H tokens.
  u2, h2 = u.copy(), slots["h"].copy()
  u2[2] = u[2][np.random.default_rng(1).permutation(8)]
  h2[1, 1, :3] = slots["h"][1, 1, [2, 0, 1]]
  s2 = np.asarray(net(u2, u_mask, dict(slots, h=h2)))
  np.testing.assert_allclose(s2, base, atol=1e-5)
  # Pad to a bigger bucket with garbage (masked) rows.
  pad = np.random.default_rng(2).normal(size=(3, 4, 12)).astype(np.float32)
  u3 = np.concatenate([u, pad], 1)
  m3 = np.concatenate([u_mask, np.zeros((3, 4), bool)], 1)
  np.testing.assert_allclose(np.asarray(net(u3, m3, slots)), base, atol=1e-5)


def test_inactive_slots_change_nothing_and_active_ones_do():
  net = model(CONFIGS["paper"])
  u, u_mask, slots = make_inputs()
  base = np.asarray(net(u, u_mask))
  with_slots = np.asarray(net(u, u_mask, slots))
  active = slots["h_mask"].any(-1)
  changed = np.zeros_like(base, bool)
  for b, kk in zip(*np.nonzero(active)):
    changed[b, slots["ptm"][b, kk]] = True
  np.testing.assert_allclose(with_slots[~changed], base[~changed], atol=1e-6)
  assert np.all(np.abs(with_slots[changed] - base[changed]) > 1e-6)


def test_dropout_only_in_training_mode():
  net = model(CONFIGS["paper"])
  u, u_mask, _ = make_inputs()
  a = np.asarray(net(u, u_mask, rng=jax.random.key(0)))
  b = np.asarray(net(u, u_mask, rng=jax.random.key(1)))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(net(u, u_mask), net(u, u_mask))


# ---------------------------------------------------------------- loss


def numpy_plackett_luce(scores, gt, margin=0.0, hyperbolic=False):
  """Plain reference: PL with strict order, averaging over tie orders is
  NOT what we do; ties: competitors = self + worse by more than margin.
  hyperbolic: term i times 1 / (1 + #better), rescaled to sum to M."""
  total = 0.0
  for s, g in zip(scores, gt):
    m = len(s)
    w = np.ones(m)
    if hyperbolic:
      w = np.array([1.0 / (1 + np.sum(g > g[i] + margin)) for i in range(m)])
      w *= m / w.sum()
    for i in range(m):
      comp = [l for l in range(m) if l == i or g[l] < g[i] - margin]
      total += w[i] * (-s[i] + np.log(np.sum(np.exp(s[comp]))))
  return total / (scores.shape[0] * (scores.shape[1] - 1))


def official_listmle(scores, gt):
  """The official HierarchicalCE: sort by gt, sum over positions 0..M-2."""
  total = 0.0
  for s, g in zip(scores, gt):
    order = np.argsort(-g, kind="stable")
    ss = s[order]
    for j in range(len(s) - 1):
      total += -ss[j] + np.log(np.sum(np.exp(ss[j:])))
  return total / (scores.shape[0] * (scores.shape[1] - 1))


@pytest.mark.parametrize("weighting", ["uniform", "hyperbolic"])
def test_loss_matches_numpy_with_ties(weighting):
  rng = np.random.default_rng(0)
  for _ in range(20):
    m = int(rng.integers(2, 9))
    s = rng.normal(size=(4, m))
    g = rng.integers(0, 4, size=(4, m)).astype(float)  # Many ties.
    got = plackett_luce_loss(jnp.asarray(s), jnp.asarray(g),
                             weighting=weighting)
    np.testing.assert_allclose(
        got, numpy_plackett_luce(s, g, hyperbolic=weighting == "hyperbolic"),
        rtol=1e-5)


def test_loss_without_ties_is_the_official_listmle():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(5, 10))
  g = np.stack([rng.permutation(10) for _ in range(5)]).astype(float)
  np.testing.assert_allclose(plackett_luce_loss(jnp.asarray(s),
                                                jnp.asarray(g)),
                             official_listmle(s, g), rtol=1e-5)


def test_loss_ignores_order_within_ties_and_has_finite_grads():
  g = jnp.array([[3.0, 3.0, 1.0, 0.0]])
  s = jnp.array([[0.5, -0.2, 0.1, 0.0]])
  swapped = s[:, jnp.array([1, 0, 2, 3])]
  np.testing.assert_allclose(plackett_luce_loss(s, g),
                             plackett_luce_loss(swapped, g), rtol=1e-6)
  grads = jax.grad(lambda x: plackett_luce_loss(x, g))(s)
  assert np.all(np.isfinite(grads))
  big = jax.grad(lambda x: plackett_luce_loss(x, g))(s * 1e4)
  assert np.all(np.isfinite(big))


def test_hyperbolic_loss_weights_the_top():
  # Relative to the official loss, the hyperbolic one charges more for
  # misplacing the best PTM than for misplacing the worst two.
  g = jnp.array([[3.0, 2.0, 1.0, 0.0]])
  top_wrong = jnp.array([[0.0, 2.0, 1.0, -1.0]])     # best and second swapped
  bottom_wrong = jnp.array([[2.0, 1.0, -1.0, 0.0]])  # last two swapped
  ratio = lambda x: (plackett_luce_loss(x, g, weighting="hyperbolic") /
                     plackett_luce_loss(x, g))
  assert ratio(top_wrong) > 1.0 > ratio(bottom_wrong)
  with pytest.raises(ValueError, match="unknown loss weighting"):
    plackett_luce_loss(top_wrong, g, weighting="linear")


def test_tie_margin_leaves_near_ties_unordered():
  rng = np.random.default_rng(3)
  s = rng.normal(size=(4, 7))
  g = rng.uniform(50, 90, size=(4, 7))
  for weighting in ("uniform", "hyperbolic"):
    np.testing.assert_allclose(
        plackett_luce_loss(jnp.asarray(s), jnp.asarray(g),
                           weighting=weighting, tie_margin=5.0),
        numpy_plackett_luce(s, g, margin=5.0,
                            hyperbolic=weighting == "hyperbolic"), rtol=1e-5)
  # 80.0 and 78.5 are within the margin: their order costs nothing.
  g = jnp.array([[80.0, 78.5, 60.0]])
  s = jnp.array([[0.3, 1.0, -0.5]])
  swapped = s[:, jnp.array([1, 0, 2])]
  np.testing.assert_allclose(plackett_luce_loss(s, g, tie_margin=2.0),
                             plackett_luce_loss(swapped, g, tie_margin=2.0),
                             rtol=1e-6)
  assert plackett_luce_loss(s, g) > plackett_luce_loss(swapped, g)
  assert float(plackett_luce_loss(s, g, tie_margin=100.0)) == 0.0


def test_loss_task_weights_drop_padding():
  s = jnp.array([[1.0, 0.0, 2.0], [5.0, -5.0, 0.0]])
  g = jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0]])
  one = plackett_luce_loss(s[:1], g[:1])
  np.testing.assert_allclose(
      plackett_luce_loss(s, g, jnp.array([1.0, 0.0])), one, rtol=1e-6)


# ---------------------------------------------------------------- metrics


def test_paired_difference():
  from spider_jax.metrics import paired_difference
  d = paired_difference([0.5, 0.7, 0.9], [0.4, 0.7, 0.6])
  np.testing.assert_allclose(d["mean"], 0.4 / 3)
  np.testing.assert_allclose(d["se"], np.std([0.1, 0.0, 0.3], ddof=1) /
                             np.sqrt(3))
  assert paired_difference([0.5], [0.2]) == {"mean": 0.5 - 0.2, "se": None}


def closed_form_weighted_tau(x, y):
  """baselines.md section 2: lexicographic rank by (x, y), hyperbolic."""
  n = len(x)
  order = np.lexsort((-y, -x))
  r = np.empty(n, int)
  r[order] = np.arange(n)
  num = dx = dy = 0.0
  for i, j in itertools.combinations(range(n), 2):
    w = 1 / (r[i] + 1) + 1 / (r[j] + 1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    num += w * sx * sy
    dx += w * (sx != 0)
    dy += w * (sy != 0)
  return num / np.sqrt(dx * dy)


def test_weighted_tau_on_tie_heavy_vectors():
  rng = np.random.default_rng(0)
  for _ in range(200):
    n = int(rng.integers(3, 12))
    x = rng.integers(0, 4, n).astype(float)
    y = rng.integers(0, 4, n).astype(float)
    if np.all(x == x[0]) or np.all(y == y[0]):
      continue
    got = metrics.weighted_tau(x, y)
    assert abs(got - closed_form_weighted_tau(x, y)) < 1e-12
    assert abs(got - scipy.stats.weightedtau(x, y, rank=None).statistic) < \
        1e-15


def test_weighted_tau_official_cells():
  """Model Spider's published table: H-Score Aircraft 0.328, LogME Cars 0.677."""
  ref = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / \
      "reference"
  assert ref.exists(), f"reference data missing: expected {ref}"
  gt = read_ground_truth(ref / "zoo10_finetune_accuracy.csv")
  with open(ref / "zoo10_baseline_scores.csv") as f:
    rows = list(csv.DictReader(f))

  def cell(dataset, method):
    sc = {r["Model"]: float(r[method]) for r in rows if r["Dataset"] == dataset}
    return metrics.weighted_tau(gt.row(dataset),
                                [sc[m] for m in gt.models])

  assert cell("Aircraft", "H-Score") == pytest.approx(0.328, abs=5e-4)
  assert cell("Cars", "LogME") == pytest.approx(0.677, abs=5e-4)


def test_rel_regret_prior():
  gt = np.array([70.0, 90.0, 80.0])
  assert metrics.rel_at_k(gt, [3, 1, 2], 1) == pytest.approx(70 / 90)
  assert metrics.rel_at_k(gt, [3, 1, 2], 3) == 1.0
  assert metrics.top1_regret(gt, [0, 1, 0]) == 0.0
  assert metrics.top1_regret(gt, [0, 0, 1]) == pytest.approx(10.0)
  prior = metrics.constant_prior([[1, 3, 2], [1, 2, 3]])
  np.testing.assert_allclose(prior, [1.0, 2.5, 2.5])
  with pytest.raises(ValueError, match="NaN"):
    metrics.weighted_tau([1, 2, np.nan], [1, 2, 3])
