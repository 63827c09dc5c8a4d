"""Routing records: the layer's per-token record against numpy routing, the model recorder
(scanned and unscanned, packed batches), storage."""
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

import reference as ref
from moe_jax import moe_layer, routing
from moe_jax.analysis import recorder
from moe_jax.analysis.records import DROPPED, KEPT, SKIPPED, UNUSED, RoutingRecords
from moe_jax.model import Decoder, DecoderOnlyLM

B, L, H, F, E = 2, 12, 16, 24, 6


def _inputs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, L, H)).astype(np.float32)
  mask = np.ones((B, L), np.float32)
  mask[0, -4:] = 0
  mask[1, 5] = 0
  return x, mask


def _record(layer, x, mask, deterministic=True, rngs=None):
  variables = layer.init({"params": jax.random.PRNGKey(0)}, x, mask, True)
  (_, aux), state = layer.apply(variables, x, mask, deterministic, rngs=rngs,
                                mutable=[moe_layer.ROUTING_RECORDS])
  record = jax.tree.map(np.asarray, state[moe_layer.ROUTING_RECORDS]["record"][0])
  kernel = np.asarray(nn.meta.unbox(variables["params"])["router"]["logits"]["kernel"],
                      np.float64)
  logits = np.asarray(x, np.float64) @ kernel  # [B, L, E]: one group per sequence
  return record, aux, logits


def _check_probabilities(record, logits, mask):
  for b in range(B):
    for t in range(L):
      p = ref.softmax(logits[b, t])
      order = sorted(range(E), key=lambda e: -p[e])
      np.testing.assert_allclose(record["top_prob"][b, t], p[order], rtol=1e-5, atol=1e-7)
      np.testing.assert_array_equal(record["top_expert"][b, t], order)
      np.testing.assert_allclose(record["entropy"][b, t], -np.sum(p * np.log(p)), rtol=1e-5)


@pytest.mark.parametrize("k,cf", [(1, 1.0), (2, 0.7)])
def test_token_choice_record_matches_numpy_routing(k, cf):
  layer = moe_layer.MoeLayer(routing.TokenChoiceRouter(k), E, F, train_capacity_factor=cf,
                             eval_capacity_factor=cf, min_capacity=1)
  x, mask = _inputs()
  record, _, logits = _record(layer, x, mask)
  cap = ref.capacity(L, E, k, cf, 1)
  r = ref.token_choice(logits, k, cap, mask)
  real = mask > 0
  np.testing.assert_array_equal(record["expert"][real], r["expert"][real])
  np.testing.assert_allclose(record["gate"], r["gate"], rtol=1e-5, atol=1e-7)
  want_status = np.where(r["kept"], KEPT, DROPPED)
  want_status[~real] = UNUSED
  np.testing.assert_array_equal(record["status"], want_status)
  np.testing.assert_array_equal(record["num_chosen"], np.where(real, k, 0))
  _check_probabilities(record, logits, mask)
  if k == 2:
    assert (record["status"] == DROPPED).any()  # the capacity is exercised


def test_random_routing_skips_are_recorded_as_skipped():
  layer = moe_layer.MoeLayer(routing.TokenChoiceRouter(2, second_expert_policy="random"), E, F,
                             train_capacity_factor=2.0, min_capacity=1)
  x, mask = _inputs()
  x = 300 * x  # confident routers: second gates well under 1/2, so some are skipped
  record, aux, _ = _record(layer, x, mask, deterministic=False,
                           rngs={"routing": jax.random.PRNGKey(3)})
  real = mask > 0
  skipped = record["status"][real] == SKIPPED
  assert skipped[:, 0].sum() == 0 and skipped[:, 1].sum() > 0  # only second choices
  np.testing.assert_allclose(skipped.mean(), aux.metrics["random_routing_skipped_fraction"],
                             rtol=1e-6)
  assert np.all(record["gate"][real][skipped] == 0)


def test_expert_choice_record_lists_the_experts_that_took_each_token():
  layer = moe_layer.MoeLayer(routing.ExpertChoiceRouter(2), E, F, eval_capacity_factor=1.0,
                             min_capacity=1)
  x, mask = _inputs()
  record, _, logits = _record(layer, x, mask)
  r = ref.expert_choice(logits, ref.capacity(L, E, 2, 1.0, 1), mask)
  for b in range(B):
    takers = {t: {} for t in range(L)}
    for e in range(E):
      for c in range(r["token"].shape[-1]):
        if r["valid"][b, e, c]:
          takers[int(r["token"][b, e, c])][e] = r["weight"][b, e, c]
    for t in range(L):
      used = record["status"][b, t] == KEPT
      assert dict(zip(record["expert"][b, t][used].tolist(),
                      record["gate"][b, t][used].tolist())) == pytest.approx(takers[t])
      assert np.all(record["expert"][b, t][~used] == -1)
      assert record["num_chosen"][b, t] == len(takers[t])
      gates = record["gate"][b, t][used]
      assert np.all(np.diff(gates) <= 0)  # best first
  _check_probabilities(record, logits, mask)


# ---------------------------------------------------------------------------------------------
# The model recorder.
# ---------------------------------------------------------------------------------------------
VOCAB = 50


def _model(scan: bool, cf: float = 2.0):
  moe = functools.partial(moe_layer.MoeLayer, routing.TokenChoiceRouter(2), 4, 24,
                          eval_capacity_factor=cf, min_capacity=1,
                          expert_implementation="reference")
  return DecoderOnlyLM(Decoder(vocab_size=VOCAB, num_layers=4, d_model=32, num_heads=4,
                               mlp_dim=48, moe_layer=moe, moe_every=2, scan_layers=scan))


def _packed_batch(seed=0, rows=3, length=16):
  """Two or three packed segments per row, some padding at the end."""
  rng = np.random.default_rng(seed)
  segments = np.zeros((rows, length), np.int32)
  positions = np.zeros((rows, length), np.int32)
  for r in range(rows):
    cuts = sorted(rng.choice(np.arange(2, length - 2), 2, replace=False))
    bounds = [0, cuts[0], cuts[1], length - r]  # row r ends with r padding positions
    for s in range(3):
      segments[r, bounds[s]:bounds[s + 1]] = s + 1
      positions[r, bounds[s]:bounds[s + 1]] = np.arange(bounds[s + 1] - bounds[s])
  targets = np.where(segments > 0, rng.integers(2, VOCAB, (rows, length)), 0).astype(np.int32)
  inputs = np.where(positions == 0, 0, np.roll(targets, 1, axis=1)) * (segments > 0)
  return {"decoder_input_tokens": inputs.astype(np.int32), "decoder_target_tokens": targets,
          "decoder_segment_ids": segments, "decoder_positions": positions,
          "decoder_loss_weights": (segments > 0).astype(np.float32)}


@pytest.fixture(scope="module")
def unscanned():
  model = _model(scan=False)
  batch = _packed_batch()
  variables = jax.jit(lambda t: model.module.init(jax.random.PRNGKey(1), t))(
      batch["decoder_input_tokens"])
  return model, variables


def test_model_records_per_layer_and_token(unscanned):
  model, variables = unscanned
  assert set(variables) == {"params"}  # init records nothing: records are never variables
  batches = [_packed_batch(0), _packed_batch(1)]
  records = recorder.record_routing(model, variables, batches, label="code", step=7)
  assert records.layer_ids == (1, 3)
  assert records.capacity_factor == 2.0 and records.step == 7 and records.num_experts == 4
  real = [b["decoder_segment_ids"] > 0 for b in batches]
  assert records.num_tokens == sum(int(r.sum()) for r in real)
  np.testing.assert_array_equal(records.token_id, np.concatenate(
      [b["decoder_input_tokens"][r] for b, r in zip(batches, real)]))
  np.testing.assert_array_equal(records.position, np.concatenate(
      [b["decoder_positions"][r] for b, r in zip(batches, real)]))
  # One id per packed segment: 3 segments in each of 3 rows, 2 batches.
  assert len(np.unique(records.example_id)) == 18
  for ex in np.unique(records.example_id):  # an example is a run of consecutive positions
    np.testing.assert_array_equal(records.position[records.example_id == ex],
                                  np.arange((records.example_id == ex).sum()))
  assert records.label_names == ("code",) and np.all(records.label == 0)
  # Kept assignments per expert = the layer's own load metric, batch by batch.
  start = 0
  for batch, r in zip(batches, real):
    part = records.select(np.arange(start, start + int(r.sum())))
    start += int(r.sum())
    _, stats = model.apply(variables, batch, deterministic=True)
    for m in range(2):
      kept = part.expert[m][part.status[m] == KEPT]
      np.testing.assert_array_equal(np.bincount(kept, minlength=4),
                                    np.asarray(stats["expert_load_after"][m]))


def test_scanned_model_records_the_same_as_unscanned(unscanned):
  model, variables = unscanned
  scanned = _model(scan=True)
  params = nn.meta.unbox(variables["params"])
  # Unscanned layers_i -> scanned layers/block_j with a leading unit axis (i = 2u + j).
  stacked = {"layers": {f"block_{j}": jax.tree.map(
      lambda *a: np.stack(a), *[params[f"layers_{2 * u + j}"] for u in range(2)])
      for j in range(2)}}
  stacked.update({k: v for k, v in params.items() if not k.startswith("layers_")})
  batch = _packed_batch(2)
  a = recorder.record_routing(model, variables, [batch])
  b = recorder.record_routing(scanned, {"params": stacked}, [batch])
  assert b.layer_ids == a.layer_ids == (1, 3)
  np.testing.assert_array_equal(a.expert, b.expert)
  np.testing.assert_array_equal(a.status, b.status)
  np.testing.assert_allclose(a.gate.astype(np.float32), b.gate.astype(np.float32), atol=1e-3)


def test_capacity_factor_override_drops_more(unscanned):
  model, variables = unscanned
  batch = _packed_batch(3)
  roomy = recorder.record_routing(model, variables, [batch])
  tight = recorder.record_routing(model, variables, [batch], capacity_factor=0.5)
  assert tight.capacity_factor == 0.5
  assert (roomy.status == DROPPED).sum() == 0 < (tight.status == DROPPED).sum()
  # The first MoE layer makes the same choices with fewer slots (later ones see its drops).
  np.testing.assert_array_equal(roomy.expert[0], tight.expert[0])


def test_max_tokens_text_batches_and_storage(unscanned, tmp_path):
  model, variables = unscanned
  texts = ["abc", "hello world", "x" * 40]
  encode = lambda s: [2 + (ord(c) % (VOCAB - 2)) for c in s]
  batches = list(recorder.text_batches(texts, encode, sequence_length=16, batch_size=2))
  assert len(batches) == 2
  np.testing.assert_array_equal(batches[0]["decoder_target_tokens"][0, :4],
                                encode("abc") + [1])
  np.testing.assert_array_equal(batches[0]["decoder_input_tokens"][0, :4],
                                [0] + encode("abc"))
  full = recorder.record_routing(model, variables, batches)
  assert full.num_tokens == 4 + 12 + 16
  # Compact: 22 bytes of token fields + per layer 5 per recorded choice (R = 2), 4 per
  # recorded probability (P = E = 4) and 4 (entropy, num_chosen).
  assert full.nbytes == full.num_tokens * (22 + 2 * (5 * 2 + 4 * 4 + 4))
  assert full.label_names == () and np.all(full.label == -1)
  cut = recorder.record_routing(model, variables, batches, max_tokens=10)
  assert cut.num_tokens == 10
  np.testing.assert_array_equal(cut.expert, full.expert[:, :10])
  path = str(tmp_path / "records.npz")
  full.save(path)
  loaded = RoutingRecords.load(path)
  for name in ("token_id", "example_id", "expert", "gate", "status", "top_prob", "entropy"):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(full, name))
  assert (loaded.layer_ids, loaded.capacity_factor, loaded.step) == (full.layer_ids, 2.0, None)
  both = RoutingRecords.concatenate([
      recorder.record_routing(model, variables, batches[:1], label="a"),
      recorder.record_routing(model, variables, batches[1:], label="b")])
  assert both.label_names == ("a", "b")
  np.testing.assert_array_equal(both.expert, full.expert)
  assert len(np.unique(both.example_id)) == 3
  frame = full.to_frame(layer=3)
  assert len(frame) == full.num_tokens * 2 and set(frame["status"]) <= {"kept", "dropped"}
