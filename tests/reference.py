"""Independent reference computations: plain numpy, loops over groups, tokens and experts.

Nothing here imports moe_jax: these follow SPEC §2 directly, so the tests compare the library
against the formulas, not against itself.
"""
import math

import numpy as np


def softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()


def logsumexp(z):
  z = np.asarray(z, np.float64)
  return z.max() + math.log(np.exp(z - z.max()).sum())


def capacity(group_size, num_experts, k, cf, min_capacity):
  return min(max(math.ceil(cf * k * group_size / num_experts), min_capacity), group_size)


def token_choice(logits, k, capacity_, mask, *, normalize=False, batch_prioritized=False,
                 bias=None, score="softmax", keep=None):
  """Tokens choose top-k experts, with capacity queues.

  logits: [G, S, E]; mask: [G, S] (1 real); keep: optional [G, S, k] bool from random routing.
  Returns dict of [G, S, k] arrays: expert, gate (combine weight, 0 if dropped), kept, position,
  plus scores [G, S, E] and selected [G, S, E] (before capacity).
  """
  g_, s_, e_ = logits.shape
  expert = np.zeros((g_, s_, k), np.int64)
  gate = np.zeros((g_, s_, k))
  kept = np.zeros((g_, s_, k), bool)
  position = np.full((g_, s_, k), -1)
  scores = np.zeros((g_, s_, e_))
  selected = np.zeros((g_, s_, e_))
  for g in range(g_):
    for s in range(s_):
      if score == "softmax":
        sc = softmax(logits[g, s])
      else:
        sc = 1.0 / (1.0 + np.exp(-np.asarray(logits[g, s], np.float64)))
      scores[g, s] = sc
      sel = sc + (0 if bias is None else bias)
      order = sorted(range(e_), key=lambda e: (-sel[e], e))[:k]
      expert[g, s] = order
      gs = sc[order]
      gate[g, s] = gs / gs.sum() if normalize else gs
      if mask[g, s]:
        for e in order:
          selected[g, s, e] += 1
    if batch_prioritized:
      tokens = sorted(range(s_), key=lambda s: (-scores[g, s].max(), s))
    else:
      tokens = list(range(s_))
    counters = [0] * e_
    for j in range(k):  # all first choices before all second choices
      for s in tokens:
        if not mask[g, s] or (keep is not None and not keep[g, s, j]):
          continue
        e = expert[g, s, j]
        position[g, s, j] = counters[e]
        counters[e] += 1
        if capacity_ is None or position[g, s, j] < capacity_:
          kept[g, s, j] = True
  gate = np.where(kept, gate, 0.0)
  return dict(expert=expert, gate=gate, kept=kept, position=position, scores=scores,
              selected=selected)


def expert_choice(logits, capacity_, mask):
  """Each expert takes its top-C real tokens of the group by router prob.

  Returns token [G, E, C], weight [G, E, C], valid [G, E, C].
  """
  g_, s_, e_ = logits.shape
  token = np.zeros((g_, e_, capacity_), np.int64)
  weight = np.zeros((g_, e_, capacity_))
  valid = np.zeros((g_, e_, capacity_), bool)
  for g in range(g_):
    probs = np.stack([softmax(logits[g, s]) for s in range(s_)])
    for e in range(e_):
      real = [s for s in range(s_) if mask[g, s]]
      ranked = sorted(real, key=lambda s: (-probs[s, e], s))[:capacity_]
      for c, s in enumerate(ranked):
        token[g, e, c] = s
        weight[g, e, c] = probs[s, e]
        valid[g, e, c] = True
  return dict(token=token, weight=weight, valid=valid)


def z_loss(logits, mask):
  total, count = 0.0, 0
  for g in range(logits.shape[0]):
    for s in range(logits.shape[1]):
      if mask[g, s]:
        total += logsumexp(logits[g, s]) ** 2
        count += 1
  return total / max(count, 1)


def aux_loss(probs, selected, mask):
  """E · Σ_e f_e P_e per group (real tokens only), averaged over groups with real tokens."""
  g_, s_, e_ = probs.shape
  losses = []
  for g in range(g_):
    real = [s for s in range(s_) if mask[g, s]]
    if not real:
      continue
    assignments = sum(selected[g, s].sum() for s in real)
    total = 0.0
    for e in range(e_):
      f = sum(selected[g, s, e] for s in real) / assignments
      p = sum(probs[g, s, e] for s in real) / len(real)
      total += f * p
    losses.append(e_ * total)
  return float(np.mean(losses)) if losses else 0.0


ACTIVATIONS = {
    "relu": (lambda z: np.maximum(z, 0.0), False),
    "gelu": (lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
             False),
    "swiglu": (lambda z: z / (1 + np.exp(-z)), True),
    "geglu": (lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
              True),
}


def expert_ffn(x, e, weights, activation):
  """One expert on one token vector x [H]."""
  act, gated = ACTIVATIONS[activation]
  if gated:
    hidden = act(x @ weights["wi_gate"][e]) * (x @ weights["wi"][e])
  else:
    hidden = act(x @ weights["wi"][e])
  return hidden @ weights["wo"][e]


def moe_output_token_choice(x, routing, weights, activation):
  """y[g, s] = Σ_j gate_j · expert_{e_j}(x[g, s]) over kept choices."""
  g_, s_, h = x.shape
  y = np.zeros((g_, s_, h))
  for g in range(g_):
    for s in range(s_):
      for j in range(routing["expert"].shape[-1]):
        if routing["kept"][g, s, j]:
          e = routing["expert"][g, s, j]
          y[g, s] += routing["gate"][g, s, j] * expert_ffn(x[g, s], e, weights, activation)
  return y


def moe_output_expert_choice(x, routing, weights, activation):
  g_, s_, h = x.shape
  y = np.zeros((g_, s_, h))
  for g in range(g_):
    for e in range(routing["token"].shape[1]):
      for c in range(routing["token"].shape[2]):
        if routing["valid"][g, e, c]:
          s = routing["token"][g, e, c]
          y[g, s] += routing["weight"][g, e, c] * expert_ffn(x[g, s], e, weights, activation)
  return y


def rope(x, positions, theta):
  """Rotates pairs (i, i + D/2) by angle pos · θ^(−2i/D), one coordinate at a time."""
  b, l, n, d = x.shape
  out = np.array(x, np.float64)
  for bi in range(b):
    for li in range(l):
      for i in range(d // 2):
        angle = positions[bi, li] * theta ** (-2.0 * i / d)
        a, c = x[bi, li, :, i], x[bi, li, :, i + d // 2]
        out[bi, li, :, i] = a * np.cos(angle) - c * np.sin(angle)
        out[bi, li, :, i + d // 2] = c * np.cos(angle) + a * np.sin(angle)
  return out
