"""Expert feed-forward kernels: a stack of E expert FFNs on already-dispatched tokens.

Pure JAX (no flax). Two layouts are supported:

* ``capacity_ffn``: fixed-capacity expert buffers ``x: [E, C, H]``, optionally with
  per-expert fill counts so that empty slots are skipped.
* ``ragged_ffn``: dropless layout ``x: [M, H]`` with rows sorted by expert and
  data-dependent ``group_sizes: [E]``.

Expert ``e`` on rows ``x_e: [n, H]`` computes

* non-gated: ``y = act(x_e @ w_in[e]) @ w_out[e]``
* gated:     ``y = (act(x_e @ w_gate[e]) * (x_e @ w_in[e])) @ w_out[e]``

with ``w_in, w_gate: [E, H, F]`` and ``w_out: [E, F, H]``.

Why the CPU paths look the way they do (XLA:CPU, jax 0.10, 2-core AVX-512 box):

* XLA:CPU sends row-major 2-D dots (``x @ w``, ``x @ w.T``) to YNNPACK and
  ``x.T @ dh`` weight-gradient dots to Eigen; per-expert 2-D dots of ~100-200
  rows run at about dense-matmul throughput, batched ``dot_general`` over the
  expert axis does not (einsum is 3-10% slower end to end at E=64-128). Hence
  a ``lax.scan`` over experts issuing 2-D dots ("scan" / "chunked"). Fusing
  w_gate|w_in into one [H, 2F] dot was tried and is slower (extra copies).
* Autodiff through ``scan``/``switch`` stacks per-branch residuals padded to the
  worst case, and cannot go through ``while`` loops with data-dependent trip
  counts, so both CPU paths use a ``jax.custom_vjp``: the forward saves only the
  pre-activations ([rows, F]); the backward is an explicit loop over experts.
* Data-dependent row counts use ``lax.switch`` over <= 16 static row counts
  ("buckets"), so every dot has a static shape and at most one bucket step of
  rows per chunk is wasted; compile time stays ~2 s at realistic sizes.
* What remains between these kernels and a dense FFN at large E is mostly not
  the dots: it is first-touch page faults on the fresh [E, H, F] weight-gradient
  buffers (~0.3 ms per MB here, i.e. ~100 ms for 3 x 128 MB at E=64) and the
  per-expert copies of weight slices, both inherent to per-expert weights.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Activation = Callable[[jax.Array], jax.Array]

# Upper bound on the number of static row-count branches per lax.switch; it
# bounds compile time (each branch holds 2-3 forward / 4-6 backward dots).
_MAX_BUCKETS = 16
_ROW_ALIGN = 8


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _buckets(limit: int, n_buckets: Optional[int] = None) -> tuple[int, ...]:
  """Ascending static row counts ``(q, 2q, ..., limit)`` with at most n_buckets."""
  n_buckets = n_buckets or _MAX_BUCKETS
  q = _round_up(max(1, -(-limit // n_buckets)), _ROW_ALIGN)
  return tuple(sorted({min(limit, q * i) for i in range(1, -(-limit // q) + 1)}))


def _bucket_index(n: jax.Array, buckets: Sequence[int]) -> jax.Array:
  """Index of the smallest bucket >= n (n <= buckets[-1] is assumed)."""
  return jnp.sum(jnp.asarray(buckets[:-1], jnp.int32) < n).astype(jnp.int32)


def _dot_t(a: jax.Array, b: jax.Array, ca: int, cb: int, dtype=None) -> jax.Array:
  """2-D dot contracting ``a`` axis ``ca`` with ``b`` axis ``cb`` (no transposes)."""
  return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())),
                         preferred_element_type=dtype)


# ----------------------------------------------------------------------------
# Per-row-block FFN forward / backward shared by all custom-VJP kernels.
# ----------------------------------------------------------------------------
def _ffn_fwd_rows(x, w_in, w_gate, w_out, act):
  """x: [n, H] -> (y: [n, H], residuals: tuple of [n, F] pre-activations)."""
  h = x @ w_in
  if w_gate is None:
    return act(h) @ w_out, (h,)
  g = x @ w_gate
  return (act(g) * h) @ w_out, (h, g)


def _ffn_bwd_rows(x, res, dy, w_in, w_gate, w_out, act):
  """Backward of ``_ffn_fwd_rows``; returns (dx, dw_in, dw_gate|None, dw_out).

  Rows of ``dy`` that are zero contribute nothing to any gradient, which is how
  callers mask invalid rows. Activation derivatives come from ``jax.vjp`` of
  the (elementwise) activation, so any ``act`` works. Weight gradients are
  accumulated in float32.
  """
  f32 = jnp.float32
  da = _dot_t(dy, w_out, 1, 1)  # [n, F] = dy @ w_out^T
  if w_gate is None:
    (h,) = res
    a, act_vjp = jax.vjp(act, h)
    dw_out = _dot_t(a, dy, 0, 0, f32)
    (dh,) = act_vjp(da)
    return _dot_t(dh, w_in, 1, 1), _dot_t(x, dh, 0, 0, f32), None, dw_out
  h, g = res
  ag, act_vjp = jax.vjp(act, g)
  dw_out = _dot_t(ag * h, dy, 0, 0, f32)
  dh = da * ag
  (dg,) = act_vjp(da * h)
  dx = _dot_t(dh, w_in, 1, 1) + _dot_t(dg, w_gate, 1, 1)
  return dx, _dot_t(x, dh, 0, 0, f32), _dot_t(x, dg, 0, 0, f32), dw_out


def _pad_rows(a: jax.Array, rows: int, start=0) -> jax.Array:
  """Place ``a: [n, D]`` at row ``start`` of a zero ``[rows, D]`` array."""
  if a.shape[0] == rows:
    return a
  return lax.dynamic_update_slice_in_dim(
      jnp.zeros((rows,) + a.shape[1:], a.dtype), a, start, axis=0)


def _row_mask(n_rows: int, lo, hi) -> jax.Array:
  i = lax.broadcasted_iota(jnp.int32, (n_rows, 1), 0)
  return (i >= lo) & (i < hi)


# ----------------------------------------------------------------------------
# Capacity layout.
# ----------------------------------------------------------------------------
def _einsum_ffn(x, w_in, w_gate, w_out, act):
  h = jnp.einsum("ech,ehf->ecf", x, w_in)
  if w_gate is not None:
    h = act(jnp.einsum("ech,ehf->ecf", x, w_gate)) * h
  else:
    h = act(h)
  return jnp.einsum("ecf,efh->ech", h, w_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _capacity_scan(x, w_in, w_gate, w_out, counts, act, buckets):
  return _capacity_scan_fwd(x, w_in, w_gate, w_out, counts, act, buckets)[0]


def _capacity_scan_fwd(x, w_in, w_gate, w_out, counts, act, buckets):
  C = x.shape[1]

  def expert(_, xs):
    xe, wi, wg, wo, n = xs
    if buckets is None:  # every slot is computed
      return None, _ffn_fwd_rows(xe, wi, wg, wo, act)

    def branch(s):
      def run():
        y, res = _ffn_fwd_rows(xe[:s], wi, wg, wo, act)
        # Slots >= n are zero on input, but act(0) @ w_out need not be.
        y = jnp.where(_row_mask(s, 0, n), y, 0)
        return _pad_rows(y, C), tuple(_pad_rows(r, C) for r in res)
      return run

    def empty():
      res_shape = (C, wi.shape[1])
      return jnp.zeros_like(xe), tuple(
          jnp.zeros(res_shape, x.dtype) for _ in range(1 if wg is None else 2))

    idx = jnp.where(n > 0, _bucket_index(n, buckets) + 1, 0)
    return None, lax.switch(idx, [empty] + [branch(s) for s in buckets])

  y, res = lax.scan(expert, None, (x, w_in, w_gate, w_out, counts))[1]
  return y, (x, w_in, w_gate, w_out, counts, res)


def _capacity_scan_bwd(act, buckets, saved, dy):
  x, w_in, w_gate, w_out, counts, res = saved
  C = x.shape[1]
  wdt = (w_in.dtype, None if w_gate is None else w_gate.dtype, w_out.dtype)

  def cast(grads):
    dx, *dws = grads
    return (dx,) + tuple(None if d is None else d.astype(t) for d, t in zip(dws, wdt))

  def expert(_, xs):
    xe, wi, wg, wo, n, re, dye = xs
    if buckets is None:
      return None, cast(_ffn_bwd_rows(xe, re, dye, wi, wg, wo, act))

    def branch(s):
      def run():
        d = jnp.where(_row_mask(s, 0, n), dye[:s], 0)
        dx, *dws = _ffn_bwd_rows(xe[:s], tuple(r[:s] for r in re), d, wi, wg, wo, act)
        return cast((_pad_rows(dx, C), *dws))
      return run

    def empty():
      return (jnp.zeros_like(xe), jnp.zeros_like(wi),
              None if wg is None else jnp.zeros_like(wg), jnp.zeros_like(wo))

    idx = jnp.where(n > 0, _bucket_index(n, buckets) + 1, 0)
    return None, lax.switch(idx, [empty] + [branch(s) for s in buckets])

  dx, dwi, dwg, dwo = lax.scan(
      expert, None, (x, w_in, w_gate, w_out, counts, res, dy))[1]
  return dx, dwi, dwg, dwo, None


_capacity_scan.defvjp(_capacity_scan_fwd, _capacity_scan_bwd)


def capacity_ffn(x: jax.Array, w_in: jax.Array, w_gate: Optional[jax.Array],
                 w_out: jax.Array, activation: Activation,
                 counts: Optional[jax.Array] = None,
                 implementation: str = "auto") -> jax.Array:
  """Expert FFNs on capacity buffers.

  Args:
    x: [E, C, H] per-expert token buffers.
    w_in: [E, H, F]; w_gate: [E, H, F] or None (non-gated); w_out: [E, F, H].
    activation: elementwise callable, e.g. ``jax.nn.relu`` / ``jax.nn.silu``.
    counts: optional [E] int; only slots ``[0, counts[e])`` of expert e hold
      tokens (other rows must be zero on input). Those other rows are zero on
      output and contribute nothing to weight gradients.
    implementation: "einsum" (batched einsum reference; best on GPU/TPU),
      "scan" (custom-VJP scan over experts with 2-D dots; with ``counts`` it
      skips empty slots via a switch over <=16 static row counts), or "auto"
      ("scan" on CPU, "einsum" elsewhere).

  Returns:
    [E, C, H].
  """
  E, C, _ = x.shape
  if implementation == "auto":
    implementation = "scan" if jax.default_backend() == "cpu" else "einsum"
  if implementation == "einsum":
    y = _einsum_ffn(x, w_in, w_gate, w_out, activation)
    if counts is not None:
      valid = jnp.arange(C)[None, :] < counts.astype(jnp.int32)[:, None]
      y = jnp.where(valid[..., None], y, 0)
    return y
  if implementation == "scan":
    if counts is None:
      counts_ = jnp.full((E,), C, jnp.int32)
      buckets = None
    else:
      counts_ = jnp.clip(counts.astype(jnp.int32), 0, C)
      buckets = _buckets(C)
    return _capacity_scan(x, w_in, w_gate, w_out, counts_, activation, buckets)
  raise ValueError(f"unknown capacity_ffn implementation {implementation!r}")


# ----------------------------------------------------------------------------
# Ragged (dropless) layout.
# ----------------------------------------------------------------------------
def _ragged_dot_ffn(x, group_sizes, w_in, w_gate, w_out, act):
  gs = group_sizes.astype(jnp.int32)
  h = lax.ragged_dot(x, w_in, gs)
  if w_gate is not None:
    h = act(lax.ragged_dot(x, w_gate, gs)) * h
  else:
    h = act(h)
  # Rows outside every group come out of ragged_dot as zeros.
  return lax.ragged_dot(h, w_out, gs)


def _ragged_plan(M: int, E: int) -> tuple[int, tuple[int, ...]]:
  """Static chunk size B and row-count buckets for the chunked ragged kernel.

  B = mean group size + 4 sqrt(mean) (>= 64): with roughly balanced routing a
  group is one chunk, handled by one switch branch with bucket step ~B/16.
  Bigger groups loop over B-row chunks. (B = 2 x mean was ~10% slower at E=8,
  where the padded B-row windows get large.)
  """
  avg = -(-M // E)
  B = min(_round_up(min(max(avg + 4 * math.isqrt(avg), 64), 2048), _ROW_ALIGN), M)
  return B, _buckets(B)


def _group_bounds(group_sizes, M):
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), M)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return starts, ends


def _chunk_geometry(start, end, j, M, B, buckets):
  """Chunk j of a group: its first row p, the in-bounds B-row output window
  [W, W + B) containing it, the chunk's rows [lo, hi) within the window, and
  the switch bucket index."""
  p = start + j * B
  r = jnp.minimum(B, end - p)
  W = jnp.minimum(p, M - B)
  lo = p - W
  return p, W, lo, lo + r, _bucket_index(r, buckets)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ragged_chunked(x, group_sizes, w_in, w_gate, w_out, act, B, buckets):
  # Primal-only (inference) path: XLA cannot drop the residual buffers carried
  # through the while loops, so don't build them.
  return _ragged_chunked_fwd(x, group_sizes, w_in, w_gate, w_out, act, B, buckets,
                             save_residuals=False)[0]


def _ragged_chunked_fwd(x, group_sizes, w_in, w_gate, w_out, act, B, buckets,
                        save_residuals=True):
  """Scan over experts; each group runs as B-row chunks. Every chunk's switch
  branch computes its s = bucket rows, pads the result into the B-row window
  [W, W + B) and the caller writes the group's rows of that window in place."""
  M = x.shape[0]
  F = w_in.shape[2]
  starts, ends = _group_bounds(group_sizes, M)
  n_res = (1 if w_gate is None else 2) if save_residuals else 0

  def expert(carry, xs):
    wi, wg, wo, start, end = xs

    def branch(s):
      def run(p, W):
        q = jnp.minimum(p, M - s)  # rows [q, q + s) hold the chunk, in bounds
        y, res = _ffn_fwd_rows(lax.dynamic_slice_in_dim(x, q, s), wi, wg, wo, act)
        return _pad_rows(y, B, q - W), tuple(_pad_rows(r, B, q - W) for r in res[:n_res])
      return run

    def chunk(j, carry):
      y, res = carry
      p, W, lo, hi, k = _chunk_geometry(start, end, j, M, B, buckets)
      yb, resb = lax.switch(k, [branch(s) for s in buckets], p, W)
      m = _row_mask(B, lo, hi)

      def put(buf, new):
        old = lax.dynamic_slice_in_dim(buf, W, B)
        return lax.dynamic_update_slice_in_dim(buf, jnp.where(m, new, old), W, 0)

      return put(y, yb), tuple(put(r, rb) for r, rb in zip(res, resb))

    n_chunks = (end - start + B - 1) // B
    return lax.fori_loop(0, n_chunks, chunk, carry), None

  init = (jnp.zeros_like(x), tuple(jnp.zeros((M, F), x.dtype) for _ in range(n_res)))
  y, res = lax.scan(expert, init, (w_in, w_gate, w_out, starts, ends))[0]
  return y, (x, group_sizes, w_in, w_gate, w_out, res)


def _ragged_chunked_bwd(act, B, buckets, saved, dy):
  x, group_sizes, w_in, w_gate, w_out, res = saved
  M = x.shape[0]
  starts, ends = _group_bounds(group_sizes, M)
  f32 = jnp.float32
  # dy is often a broadcast (e.g. grad of a sum); XLA would sink it into the
  # expert loop and re-materialize all [M, H] of it per expert. The barrier
  # makes it an opaque, materialized-once operand.
  dy = lax.optimization_barrier(dy)

  def expert(dx, xs):
    wi, wg, wo, start, end = xs

    def branch(s):
      def run(p, W, r):
        q = jnp.minimum(p, M - s)
        sl = lambda a: lax.dynamic_slice_in_dim(a, q, s)
        d = jnp.where(_row_mask(s, p - q, p - q + r), sl(dy), 0)
        dxs, *dws = _ffn_bwd_rows(sl(x), tuple(map(sl, res)), d, wi, wg, wo, act)
        return (_pad_rows(dxs, B, q - W), *dws)
      return run

    def chunk(j, carry):
      dx, acc = carry
      p, W, lo, hi, k = _chunk_geometry(start, end, j, M, B, buckets)
      dxb, *dws = lax.switch(k, [branch(s) for s in buckets], p, W, hi - lo)
      old = lax.dynamic_slice_in_dim(dx, W, B)
      dx = lax.dynamic_update_slice_in_dim(
          dx, jnp.where(_row_mask(B, lo, hi), dxb, old), W, 0)
      acc = tuple(None if a is None else a + d for a, d in zip(acc, dws))
      return dx, acc

    zeros = lambda w: None if w is None else jnp.zeros(w.shape, f32)
    n_chunks = (end - start + B - 1) // B
    dx, acc = lax.fori_loop(0, n_chunks, chunk, (dx, (zeros(wi), zeros(wg), zeros(wo))))
    return dx, tuple(None if a is None else a.astype(w.dtype)
                     for a, w in zip(acc, (wi, wg, wo)))

  dx, (dwi, dwg, dwo) = lax.scan(
      expert, jnp.zeros_like(x), (w_in, w_gate, w_out, starts, ends))
  return dx, None, dwi, dwg, dwo


_ragged_chunked.defvjp(_ragged_chunked_fwd, _ragged_chunked_bwd)


def ragged_ffn(x: jax.Array, group_sizes: jax.Array, w_in: jax.Array,
               w_gate: Optional[jax.Array], w_out: jax.Array,
               activation: Activation, implementation: str = "auto",
               expected_rows: Optional[int] = None) -> jax.Array:
  """Expert FFNs on expert-sorted rows (dropless MoE).

  Args:
    x: [M, H] rows sorted by expert; expert e owns rows
      ``[offset_e, offset_e + group_sizes[e])`` with offset the exclusive cumsum.
      Rows at or beyond ``sum(group_sizes)`` are padding.
    group_sizes: [E] int (traced; any values with sum <= M).
    w_in: [E, H, F]; w_gate: [E, H, F] or None; w_out: [E, F, H].
    activation: elementwise callable.
    implementation: "ragged_dot" (``lax.ragged_dot``; on XLA:CPU it lowers to a
      dense masked matmul over all experts, i.e. E times the FLOPs, so use it
      on GPU/TPU only), "chunked" (custom-VJP scan over experts, each group
      processed in static-size row chunks; cost does not grow with E), or
      "auto" ("chunked" on CPU, "ragged_dot" elsewhere).
    expected_rows: rows expected in use (default M). A buffer sized for the worst case
      (dropless expert parallelism: EP × the even share) would otherwise size the chunked
      kernel's chunks for M / E rows per expert, and its bucket padding with them.

  Returns:
    [M, H]; padding rows are zero.
  """
  M = x.shape[0]
  E = w_in.shape[0]
  if implementation == "auto":
    implementation = "chunked" if jax.default_backend() == "cpu" else "ragged_dot"
  if implementation == "ragged_dot":
    return _ragged_dot_ffn(x, group_sizes, w_in, w_gate, w_out, activation)
  if implementation == "chunked":
    if M == 0:
      return jnp.zeros_like(x)
    B, buckets = _ragged_plan(min(expected_rows or M, M), E)
    B = min(B, M)
    return _ragged_chunked(x, group_sizes.astype(jnp.int32), w_in, w_gate, w_out,
                           activation, B, buckets)
  raise ValueError(f"unknown ragged_ffn implementation {implementation!r}")
