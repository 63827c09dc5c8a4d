"""Routing analyses against hand-built records with known answers and against plain loops."""
import collections
import math
import subprocess
import sys

import numpy as np
import pytest

from moe_jax.analysis import analyses
from moe_jax.analysis.records import DROPPED, KEPT, SKIPPED, UNUSED, RoutingRecords


def make_records(expert, status=None, *, num_experts=4, token_id=None, position=None,
                 row_position=None, example_id=None, label=None, label_names=(),
                 top_expert=None, top_prob=None, entropy=None, num_chosen=None,
                 layer_ids=None, **meta):
  """RoutingRecords from expert [N, R] or [M, N, R]; unspecified fields get simple values
  (status KEPT where expert >= 0 else UNUSED, top-1 prob 1 on choice 0, entropy 0)."""
  expert = np.asarray(expert)
  expert = expert[None] if expert.ndim == 2 else expert
  m, n, _ = expert.shape
  if status is None:
    status = np.where(expert >= 0, KEPT, UNUSED)
  status = np.asarray(status).reshape(expert.shape)
  if top_expert is None:
    top_expert = np.maximum(expert[..., :1], 0)
    top_prob = np.ones(top_expert.shape)
  position = np.arange(n) if position is None else position
  return RoutingRecords(
      token_id=np.arange(n) if token_id is None else token_id, position=position,
      row_position=position if row_position is None else row_position,
      example_id=np.zeros(n) if example_id is None else example_id,
      label=np.full(n, -1) if label is None else label,
      expert=expert, gate=np.where(status == KEPT, 0.5, 0.0), status=status,
      top_expert=top_expert, top_prob=top_prob,
      entropy=np.zeros((m, n)) if entropy is None else entropy,
      num_chosen=np.sum(expert >= 0, -1) if num_chosen is None else num_chosen,
      layer_ids=tuple(range(m)) if layer_ids is None else layer_ids,
      num_experts=num_experts, label_names=label_names, **meta)


def random_records(seed=0, m=2, n=300, r=2, e=6, p=3, vocab=12, labels=("code", "text")):
  """Token-choice-like records with every status, several layers and labels."""
  rng = np.random.default_rng(seed)
  probs = rng.dirichlet(np.full(e, 0.5), size=(m, n))
  order = np.argsort(-probs, axis=-1)
  expert = order[..., :r]
  status = rng.choice([KEPT, DROPPED, SKIPPED], p=[0.7, 0.2, 0.1], size=(m, n, r))
  status[..., 0] = np.where(status[..., 0] == SKIPPED, KEPT, status[..., 0])
  status[:, rng.random(n) < 0.05] = UNUSED  # e.g. padding
  top_expert = order[..., :p]
  return make_records(
      np.where(status == UNUSED, -1, expert), status, num_experts=e,
      token_id=rng.integers(0, vocab, n), position=rng.integers(0, 16, n),
      label=rng.integers(-1, len(labels), n), label_names=labels + ("empty",),
      top_expert=top_expert, top_prob=np.take_along_axis(probs, top_expert, -1),
      entropy=-np.sum(probs * np.log(probs), -1), layer_ids=tuple(range(1, 2 * m, 2)),
      capacity_factor=1.0)


# --- expert load and dead experts ---------------------------------------------------------------
def _labelled_load_records():
  # code tokens go to experts 0,0,0,0,1,2; text tokens to 1,1,2,2,3,3; one unlabelled token's
  # first choice is UNUSED (padding-like) and must not count.
  first = [0, 0, 0, 0, 1, 2, 1, 1, 2, 2, 3, 3, -1]
  label = [0] * 6 + [1] * 6 + [-1]
  return make_records(np.array(first)[:, None], label=label, label_names=("code", "text", "x"))


def test_expert_load_known_counts():
  out = analyses.expert_load(_labelled_load_records(), plot=False)
  t = out.table
  overall = t[t.label == "all"].sort_values("expert")
  np.testing.assert_array_equal(overall.assigned, [4, 3, 3, 2])
  np.testing.assert_allclose(overall.share, [1 / 3, 1 / 4, 1 / 4, 1 / 6])
  assert set(t.label) == {"all", "code", "text"}  # "x" has no tokens
  s = out.summary
  assert s["layer_0/busiest_over_least"] == 2.0
  assert s["layer_0/cv"] == pytest.approx(math.sqrt(0.5) / 3)
  # TV distance, worked by hand: ½(1/3 + 1/12 + 1/12 + 1/6) = 1/3 for both labels.
  assert s["layer_0/code/load_skew"] == pytest.approx(1 / 3)
  assert s["layer_0/text/load_skew"] == pytest.approx(1 / 3)
  # code's busiest expert 0 has 2/3 vs 1/3 overall (×2); text's busiest (1) 1/3 vs 1/4.
  assert s["layer_0/most_skewed_label"] == "code"
  assert s["layer_0/most_skewed_label_expert"] == 0
  assert s["layer_0/most_skewed_label_over_all"] == pytest.approx(2.0)


def test_expert_load_counts_kept_and_dropped_but_not_skipped_or_unused():
  rec = random_records(seed=1)
  t = analyses.expert_load(rec, plot=False).table
  for m, layer in enumerate(rec.layer_ids):
    for label_index, label in [(None, "all"), (0, "code"), (1, "text")]:
      assigned, kept = collections.Counter(), collections.Counter()
      for i in range(rec.num_tokens):
        if label_index is not None and rec.label[i] != label_index:
          continue
        for c in range(rec.expert.shape[-1]):
          if rec.status[m, i, c] in (KEPT, DROPPED):
            assigned[int(rec.expert[m, i, c])] += 1
            kept[int(rec.expert[m, i, c])] += rec.status[m, i, c] == KEPT
      rows = t[(t.layer == layer) & (t.label == label)].sort_values("expert")
      assert list(rows.assigned) == [assigned[e] for e in range(6)]
      assert list(rows.kept) == [kept[e] for e in range(6)]
      np.testing.assert_allclose(rows.share, [assigned[e] / sum(assigned.values())
                                              for e in range(6)])


def test_expert_load_inf_ratio_when_an_expert_gets_nothing():
  out = analyses.expert_load(make_records(np.array([[0], [1], [1]])), plot=False)
  assert out.summary["layer_0/busiest_over_least"] == float("inf")


def test_dead_experts_finds_the_starved_and_the_never_chosen():
  # 100 assignments: expert 3 gets 1 (share 0.01: 0.04 of fair), expert 2 none.
  first = [0] * 60 + [1] * 39 + [3]
  out = analyses.dead_experts(make_records(np.array(first)[:, None]), threshold=0.1,
                              plot=False)
  t = out.table.sort_values("expert")
  np.testing.assert_allclose(t.share_over_fair, [2.4, 1.56, 0.0, 0.04])
  assert list(t.dead) == [False, False, True, True]
  assert list(t.never_chosen) == [False, False, True, False]
  assert out.summary["layer_0/num_dead"] == 2
  assert out.summary["layer_0/dead_experts"] == "2,3"
  # A looser threshold keeps expert 3 alive.
  assert analyses.dead_experts(make_records(np.array(first)[:, None]), threshold=0.01,
                               plot=False).summary["layer_0/dead_experts"] == "2"


# --- token specialization ------------------------------------------------------------------------
def _specialization_records():
  # token 7: 12× to expert 3 (second choice always 0); token 9: 10× expert 1, 10× expert 2;
  # token 11: 5× (below min_count).
  token = [7] * 12 + [9] * 20 + [11] * 5
  first = [3] * 12 + [1, 2] * 10 + [0] * 5
  second = [0] * 12 + [3] * 20 + [1] * 5
  return make_records(np.stack([first, second], -1), token_id=token)


def test_token_specialization_known_tokens():
  out = analyses.token_specialization(_specialization_records(), min_count=10, plot=False)
  t = out.table.set_index("token_id")
  assert set(t.index) == {7, 9}
  assert t.loc[7, "top_expert"] == 3 and t.loc[7, "top_share"] == 1.0
  assert t.loc[7, "entropy"] == 0.0
  assert t.loc[9, "top_share"] == 0.5 and t.loc[9, "top_expert"] == 1  # tie: lowest id
  assert t.loc[9, "entropy"] == pytest.approx(math.log(2))
  assert t.loc[9, "normalized_entropy"] == pytest.approx(0.5)  # ln 2 / ln 4
  s = out.summary
  assert s["layer_0/mean_top_share"] == pytest.approx((12 * 1.0 + 20 * 0.5) / 32)
  # Overall first choices: 5×e0, 10×e1, 10×e2, 12×e3 of 37.
  assert s["layer_0/baseline_top_share"] == pytest.approx(12 / 37)
  assert s["layer_0/token_coverage"] == pytest.approx(32 / 37)
  assert s["num_token_ids"] == 2


def test_token_specialization_all_choices():
  out = analyses.token_specialization(_specialization_records(), min_count=10, choices="all",
                                      plot=False)
  t = out.table.set_index("token_id")
  assert t.loc[7, "count"] == 24 and t.loc[7, "top_share"] == 0.5
  assert t.loc[9, "top_expert"] == 3 and t.loc[9, "top_share"] == 0.5
  assert t.loc[9, "entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
  with pytest.raises(ValueError, match="choices"):
    analyses.token_specialization(_specialization_records(), choices="second")


def test_token_specialization_matches_loop_reference():
  rec = random_records(seed=2)
  t = analyses.token_specialization(rec, min_count=20, plot=False).table
  for m, layer in enumerate(rec.layer_ids):
    counts = collections.defaultdict(collections.Counter)
    occurrences = collections.Counter(rec.token_id.tolist())
    for i in range(rec.num_tokens):
      if rec.status[m, i, 0] in (KEPT, DROPPED):
        counts[int(rec.token_id[i])][int(rec.expert[m, i, 0])] += 1
    expected = {tok: c for tok, c in counts.items() if occurrences[tok] >= 20}
    rows = t[t.layer == layer].set_index("token_id")
    assert set(rows.index) == set(expected)
    for tok, c in expected.items():
      total = sum(c.values())
      top = min(c, key=lambda e: (-c[e], e))
      assert rows.loc[tok, "top_expert"] == top
      assert rows.loc[tok, "top_share"] == pytest.approx(c[top] / total)
      assert rows.loc[tok, "entropy"] == pytest.approx(
          -sum(v / total * math.log(v / total) for v in c.values()))


def test_context_free_router_sits_at_the_null_not_at_the_baseline():
  # Tokens routed independently of their id: top_share is only chance concentration.
  rng = np.random.default_rng(3)
  first = rng.choice(4, p=[0.3, 0.3, 0.2, 0.2], size=4000)
  s = analyses.token_specialization(
      make_records(first[:, None], token_id=rng.integers(0, 200, 4000)), plot=False).summary
  assert s["layer_0/mean_top_share"] == pytest.approx(s["layer_0/null_top_share"], abs=0.02)
  assert s["layer_0/mean_top_share"] > s["layer_0/baseline_top_share"] + 0.05


def test_top_tokens_per_expert():
  token = [7] * 12 + [5] * 3 + [5] * 2 + [8] * 3
  first = [3] * 12 + [3] * 3 + [1] * 2 + [3] * 3
  out = analyses.top_tokens_per_expert(make_records(np.array(first)[:, None], token_id=token),
                                       top_n=2, decode=lambda i: f"<{i}>")
  e3 = out.table[out.table.expert == 3].sort_values("rank")
  assert list(e3.token_id) == [7, 5]  # 5 and 8 tie at 3: the lower id first; top_n = 2
  assert list(e3.piece) == ["<7>", "<5>"]
  assert list(e3["count"]) == [12, 3]
  np.testing.assert_allclose(e3.share_of_token, [1.0, 3 / 5])
  np.testing.assert_allclose(e3.share_of_expert, [12 / 18, 3 / 18])
  assert out.summary["layer_0/mean_top1_share_of_token"] == pytest.approx((1.0 + 2 / 5) / 2)
  assert out.figure is None


# --- drops by position ---------------------------------------------------------------------------
def _drop_records(capacity_factor=1.0, drops=True):
  # 4 examples × 16 positions; every example drops positions 14, 15, examples 0, 1 also 12, 13.
  position = np.tile(np.arange(16), 4)
  example = np.repeat(np.arange(4), 16)
  dropped = drops & ((position >= 14) | ((position >= 12) & (example < 2)))
  status = np.where(dropped, DROPPED, KEPT)[:, None]
  return make_records(np.zeros((64, 1), int), status, position=position, example_id=example,
                      capacity_factor=capacity_factor)


def test_drops_towards_the_end():
  out = analyses.drops_by_position([_drop_records(1.0), _drop_records(2.0, drops=False)],
                                   num_buckets=8, plot=False)
  t = out.table
  cf1 = t[t.capacity == "cf_1"].sort_values("bucket")
  np.testing.assert_array_equal(cf1.assignments, [8] * 8)
  np.testing.assert_array_equal(cf1.dropped, [0] * 6 + [4, 8])
  np.testing.assert_allclose(cf1.dropped_fraction, [0] * 6 + [0.5, 1.0])
  assert np.all(np.diff(cf1.dropped_fraction) >= 0)
  np.testing.assert_allclose(cf1.bucket_start, np.arange(0, 16, 2))
  np.testing.assert_allclose(cf1.bucket_end, np.arange(2, 17, 2))
  assert (t[t.capacity == "cf_2"].dropped_fraction == 0).all()
  s = out.summary
  assert s["cf_1/dropped_fraction"] == pytest.approx(12 / 64)
  assert s["cf_1/first_bucket_dropped_fraction"] == 0.0
  assert s["cf_1/last_bucket_dropped_fraction"] == 1.0
  assert s["cf_2/dropped_fraction"] == 0.0
  with pytest.raises(ValueError, match="different capacity"):
    analyses.drops_by_position([_drop_records(1.0), _drop_records(1.0)])


def test_drops_match_a_loop_over_uneven_buckets():
  rec = random_records(seed=4)  # positions 0..15 → length 16; 5 buckets of width 3.2
  t = analyses.drops_by_position(rec, num_buckets=5, position="position", plot=False).table
  length = int(rec.position.max()) + 1
  for m, layer in enumerate(rec.layer_ids):
    for b in range(5):
      lo, hi = b * length / 5, (b + 1) * length / 5
      assigned = dropped = 0
      for i in range(rec.num_tokens):
        if lo <= rec.position[i] < hi:
          for c in range(rec.expert.shape[-1]):
            assigned += rec.status[m, i, c] in (KEPT, DROPPED)
            dropped += rec.status[m, i, c] == DROPPED
      row = t[(t.layer == layer) & (t.bucket == b)].iloc[0]
      assert (row.assignments, row.dropped) == (assigned, dropped)
      assert row.dropped_fraction == pytest.approx(dropped / assigned)


# --- routing agreement ---------------------------------------------------------------------------
def _loop_js(p, q):
  """Jensen–Shannon divergence (nats) of two probability lists, by the definition."""
  js = 0.0
  for a, b in zip(p, q):
    mid = (a + b) / 2
    js += 0.5 * (a * math.log(a / mid) if a > 0 else 0) + 0.5 * (b * math.log(b / mid)
                                                                 if b > 0 else 0)
  return js


def _dense_records(probs, first=None, **kwargs):
  """Records whose top_prob holds the full distributions probs [N, E] (P = E)."""
  top_expert = np.argsort(-probs, -1, kind="stable")
  first = top_expert[:, :1] if first is None else np.asarray(first)[:, None]
  return make_records(first, num_experts=probs.shape[-1], top_expert=top_expert[None],
                      top_prob=np.take_along_axis(probs, top_expert, -1)[None], **kwargs)


def test_identical_records_agree_perfectly():
  rec = random_records(seed=5)
  out = analyses.routing_agreement(rec, rec, min_count=5, plot=False)
  assert (out.table.top1_match == 1.0).all()
  np.testing.assert_allclose(out.table.mean_js, 0.0, atol=1e-12)
  assert (out.table.token_top_expert_match == 1.0).all()
  assert set(out.table.label) == {"all", "code", "text"}


def test_js_with_all_probabilities_matches_the_definition():
  # Probabilities in 64ths are exact in float16, so the records hold the distributions exactly.
  rng = np.random.default_rng(6)
  p = rng.multinomial(64, np.full(5, 0.2), size=40) / 64
  q = rng.multinomial(64, np.full(5, 0.2), size=40) / 64
  out = analyses.routing_agreement(_dense_records(p), _dense_records(q), plot=False)
  expected = np.mean([_loop_js(a, b) for a, b in zip(p, q)])
  assert out.summary["layer_0/mean_js"] == pytest.approx(expected, rel=1e-9)
  first_p = [min(range(5), key=lambda e: (-a[e], e)) for a in p]
  first_q = [min(range(5), key=lambda e: (-b[e], e)) for b in q]
  assert out.summary["layer_0/top1_match"] == pytest.approx(np.mean(np.equal(first_p, first_q)))


def test_js_with_top_p_uses_the_shared_experts_plus_other():
  # E = 4, P = 2. Token 0: a = {0: .75, 1: .125}, b = {1: .5, 0: .25}: both experts shared,
  # "other" = .125 vs .25. Token 1: a = {0: .5, 1: .25}, b = {0: .5, 2: .25}: only expert 0 is
  # shared, so the partition is {0}, {other}: (.5, .5) vs (.5, .5), divergence 0.
  a = make_records(np.array([[0], [0]]), top_expert=[[[0, 1], [0, 1]]],
                   top_prob=[[[0.75, 0.125], [0.5, 0.25]]])
  b = make_records(np.array([[1], [0]]), top_expert=[[[1, 0], [0, 2]]],
                   top_prob=[[[0.5, 0.25], [0.5, 0.25]]])
  out = analyses.routing_agreement(a, b, plot=False)
  expected = _loop_js([0.75, 0.125, 0.125], [0.25, 0.5, 0.25]) / 2
  assert out.summary["layer_0/mean_js"] == pytest.approx(expected, rel=1e-9)
  assert out.summary["layer_0/top1_match"] == 0.5


def test_top_p_js_is_a_lower_bound_of_the_full_js():
  rng = np.random.default_rng(7)
  p = rng.multinomial(64, rng.dirichlet(np.ones(8)), size=60) / 64
  q = np.stack([rng.multinomial(64, rng.dirichlet(np.ones(8))) for _ in range(60)]) / 64
  full = analyses.routing_agreement(_dense_records(p), _dense_records(q), plot=False)
  a, b = _dense_records(p), _dense_records(q)
  for rec in (a, b):  # keep only the top 3 probabilities
    rec.top_expert, rec.top_prob = rec.top_expert[..., :3], rec.top_prob[..., :3]
  from moe_jax.analysis import agreement  # pylint: disable=g-import-not-at-top
  truncated = agreement.top_p_js_divergence(a.top_expert[0], a.top_prob[0], b.top_expert[0],
                                            b.top_prob[0])
  exact = np.array([_loop_js(x, y) for x, y in zip(p, q)])
  assert np.all(truncated <= exact + 1e-12)
  assert truncated.mean() < exact.mean()  # and strictly lower here
  assert full.summary["layer_0/mean_js"] == pytest.approx(exact.mean(), rel=1e-9)


def test_token_top_expert_match():
  # token 1: a → expert 0 (3×), b → expert 0 (2×) and 1 (1×); token 2: a → 2, b → 3.
  token = [1, 1, 1, 2, 2, 2, 2]
  a = make_records(np.array([0, 0, 0, 2, 2, 2, 2])[:, None], token_id=token)
  b = make_records(np.array([0, 1, 0, 3, 3, 2, 3])[:, None], token_id=token)
  s = analyses.routing_agreement(a, b, min_count=3, plot=False).summary
  assert s["layer_0/token_top_expert_match"] == 0.5
  assert s["layer_0/top1_match"] == pytest.approx(3 / 7)
  s = analyses.routing_agreement(a, b, min_count=4, plot=False).summary  # token 2 only
  assert s["layer_0/token_top_expert_match"] == 0.0


def test_agreement_rejects_different_tokens_and_layers():
  rec = random_records(seed=8)
  other = random_records(seed=9)
  with pytest.raises(ValueError, match="token_id"):
    analyses.routing_agreement(rec, other)
  with pytest.raises(ValueError, match="layer_ids"):
    analyses.routing_agreement(rec, random_records(seed=8, m=1))


def test_agreement_over_steps():
  a, b = random_records(seed=10), random_records(seed=10)
  b.expert = b.expert.copy()
  b.expert[..., 0] = np.where(b.expert[..., 0] >= 0, (b.expert[..., 0] + 1) % 6, -1)
  out = analyses.agreement_over_steps({0: a, 20: b, 10: b}, min_count=5, plot=False)
  t = out.table.set_index(["step", "layer"])
  assert out.summary["reference_step"] == 20
  assert t.loc[(20, 1), "top1_match"] == 1.0 and t.loc[(10, 3), "top1_match"] == 1.0
  pair = analyses.routing_agreement(a, b, min_count=5, plot=False).table
  assert t.loc[(0, 1), "top1_match"] == 0.0
  assert t.loc[(0, 1), "mean_js"] == pair[(pair.layer == 1) & (pair.label == "all")].mean_js.iloc[0]
  assert list(out.table.step.unique()) == [0, 10, 20]


# --- router confidence ---------------------------------------------------------------------------
def test_router_confidence_histograms_match_a_loop():
  rng = np.random.default_rng(11)
  e, n = 8, 500
  entropy = rng.uniform(0, math.log(e), size=(1, n)).astype(np.float16)
  top1 = rng.uniform(1 / e, 1, size=(1, n, 1)).astype(np.float16)
  rec = make_records(np.zeros((n, 1), int), num_experts=e, entropy=entropy,
                     top_expert=np.zeros((1, n, 1), int), top_prob=top1)
  out = analyses.router_confidence(rec, bins=10, plot=False)
  h, p1 = entropy[0].astype(np.float64), top1[0, :, 0].astype(np.float64)
  for quantity, values, hi in [("entropy", h, math.log(e)),
                               ("normalized_entropy", h / math.log(e), 1.0),
                               ("top1_prob", p1, 1.0)]:
    values = np.minimum(values, hi)  # float16 rounding may step past the top edge
    edges = np.linspace(0, hi, 11)
    expected = [sum(1 for v in values if edges[b] <= v < edges[b + 1] or (b == 9 and v == hi))
                for b in range(10)]
    rows = out.table[out.table.quantity == quantity].sort_values("bin")
    assert list(rows["count"]) == expected
    np.testing.assert_allclose(rows.fraction, np.array(expected) / n)
  s = out.summary
  assert s["layer_0/mean_entropy"] == pytest.approx(np.mean(entropy.astype(np.float64)))
  assert s["layer_0/mean_top1_prob"] == pytest.approx(np.mean(top1.astype(np.float64)))
  assert s["layer_0/frac_top1_prob_gt_0.5"] == sum(1 for v in top1.ravel() if v > 0.5) / n


def test_uniform_router_has_normalized_entropy_one():
  rec = make_records(np.zeros((3, 1), int), num_experts=8,
                     entropy=np.full((1, 3), math.log(8)))
  s = analyses.router_confidence(rec, plot=False).summary
  assert s["layer_0/mean_normalized_entropy"] == pytest.approx(1.0, abs=1e-3)


# --- expert choice, empty labels, zero drops -----------------------------------------------------
def test_expert_choice_never_counts_unused_slots():
  # Token 0 taken by experts 2 and 0, token 1 by none, token 2 by expert 1; token 3 was taken by
  # 4 experts but only R = 2 slots are recorded.
  expert = np.array([[2, 0], [-1, -1], [1, -1], [3, 1]])
  rec = make_records(expert, router="expert_choice", num_chosen=[[2, 0, 1, 4]])
  load = analyses.expert_load(rec, plot=False)
  rows = load.table[load.table.label == "all"].sort_values("expert")
  assert list(rows.assigned) == [1, 2, 1, 1]
  assert load.summary["layer_0/tokens_with_unrecorded_choices"] == 1
  spec = analyses.token_specialization(rec, min_count=1, plot=False).table
  assert list(spec.token_id) == [0, 2, 3]  # token 1 has no first choice
  drops = analyses.drops_by_position(rec, num_buckets=2, plot=False)
  assert drops.summary["dropless/dropped_fraction"] == 0.0
  np.testing.assert_array_equal(drops.table.assignments, [2, 3])


# --- figures, run_all, imports -------------------------------------------------------------------
def test_figures_render(tmp_path):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  rec = random_records(seed=12)
  big = random_records(seed=13, m=1, e=128, n=400, p=8, vocab=40)
  results = analyses.run_all(rec, compare_with={0: rec, 5: rec},
                             capacity_sweep=[rec, _drop_records(2.0)], decode=str)
  results += [analyses.expert_load(big), analyses.dead_experts(big),
              analyses.routing_agreement(rec, rec)]
  names = [r.name for r in results]
  assert {"expert_load", "dead_experts", "router_confidence", "token_specialization",
          "top_tokens_per_expert", "drops_by_position", "agreement_over_steps",
          "routing_agreement"} <= set(names)
  for i, result in enumerate(results):
    assert isinstance(result.figure, Figure) and result.figure.axes, result.name
    assert len(result.table) and result.summary and result.description
    path = tmp_path / f"{i}_{result.name}.png"
    result.figure.savefig(path, dpi=40)
    assert path.stat().st_size > 1000


def test_run_all_without_plots_and_comparison():
  results = analyses.run_all(random_records(seed=14), plot=False)
  assert [r.name for r in results] == ["expert_load", "dead_experts", "router_confidence",
                                       "token_specialization", "top_tokens_per_expert",
                                       "drops_by_position"]
  assert all(r.figure is None for r in results)


def test_analysis_imports_only_numpy():
  code = ("import sys, moe_jax.analysis.analyses\n"
          "print(sorted(m for m in ('pandas', 'matplotlib', 'jax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
