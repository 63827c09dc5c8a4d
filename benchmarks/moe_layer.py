"""MoE layer speed against its dense equivalent, measured in one process.

For each config and dispatch, forward+backward (jit, warm-up, median of --repeats runs) of:
  layer    the MoE layer (routing + dispatch + experts + combine), training mode
  dense    a dense FFN doing the layer's ideal work: width k·F on the same tokens
  floor    "experts-only floor": a plain batched einsum expert FFN on an already-dispatched
           [E, C, H] buffer of the layer's own shapes (for dropless: [E, T·k/E, H])
  kernel   our expert kernel alone on the layer's own dispatched buffer (its counts / sizes)
and prints
  ratio    = layer / dense      (the headline: what the sparsity costs over ideal dense work)
  floor    = floor / dense      (what a plain batched expert computation costs)
  overhead = layer / floor      (issue's definition: routing+dispatch+combine vs plain experts)
  dispatch = layer / kernel     (routing+dispatch+combine over our own expert kernel)
  dropped  = fraction of assignments dropped by capacity

    python benchmarks/moe_layer.py                       # the full table
    python benchmarks/moe_layer.py --experts 64 --top_k 2 --dispatch gather --quick
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moe_jax import expert_kernels  # noqa: E402
from moe_jax.experts import ACTIVATIONS  # noqa: E402
from moe_jax.moe_layer import MoeLayer  # noqa: E402
from moe_jax.routing import ExpertChoiceRouter, TokenChoiceRouter  # noqa: E402


def timeit(fn, *args, repeats=5):
  """Median wall time of a jitted fn (after compile + one warm-up run)."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def square_loss(y):
  # 0.5·Σy²: its gradient needs the forward output, as in a real network where y feeds the
  # next layer. (With a linear loss such as Σy, XLA drops the dense FFN's second forward
  # matmul, which the MoE layer cannot skip: its router gradient needs the expert outputs.)
  return 0.5 * jnp.sum(jnp.square(y.astype(jnp.float32)))


def grad_fn(f, argnums):
  return jax.jit(jax.grad(lambda *a: square_loss(f(*a)), argnums=argnums))


def dense_equivalent(x, k, hidden, activation, repeats):
  act, gated = ACTIVATIONS[activation]
  h = x.shape[-1]
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  w_in = jax.random.normal(keys[0], (h, k * hidden)) * h**-0.5
  w_gate = jax.random.normal(keys[1], (h, k * hidden)) * h**-0.5 if gated else None
  w_out = jax.random.normal(keys[2], (k * hidden, h)) * (k * hidden)**-0.5

  def ffn(x, w_in, w_gate, w_out):
    hid = act(x @ (w_gate if gated else w_in))
    if gated:
      hid = hid * (x @ w_in)
    return hid @ w_out

  return timeit(grad_fn(ffn, (0, 1, 2, 3) if gated else (0, 1, 3)), x, w_in, w_gate, w_out,
                repeats=repeats)


def run_config(num_experts, k, router_kind, dispatch, args, x, dense_time):
  tokens, h = x.shape[1], x.shape[2]
  act, gated = ACTIVATIONS[args.activation]
  router = (ExpertChoiceRouter(num_experts, k) if router_kind == "expert"
            else TokenChoiceRouter(num_experts, k))
  layer = MoeLayer(router, args.hidden, activation=args.activation, dispatch=dispatch,
                   train_capacity_factor=args.capacity_factor, group_size=tokens)
  variables = layer.init({"params": jax.random.PRNGKey(0)}, x, None, True)
  params = variables["params"]

  def loss(params, x):
    y, aux = layer.apply({"params": params}, x, None, False)
    return square_loss(y) + 0.01 * aux.aux_loss + 1e-3 * aux.z_loss

  layer_time = timeit(jax.jit(jax.grad(loss, argnums=(0, 1))), params, x, repeats=args.repeats)
  _, aux = jax.jit(lambda p, x: layer.apply({"params": p}, x, None, False))(params, x)
  dropped = float(aux.metrics["dropped_fraction"])

  capacity = layer.capacity(tokens, deterministic=False)
  w = nn.meta.unbox(params["experts"])
  w_in, w_gate, w_out = w["wi"], w.get("wi_gate"), w["wo"]
  buffer_rows = capacity if capacity is not None else -(-tokens * k // num_experts)
  buf = jax.random.normal(jax.random.PRNGKey(3), (num_experts, buffer_rows, h))

  def plain(buf, w_in, w_gate, w_out):
    return expert_kernels.capacity_ffn(buf, w_in, w_gate, w_out, act, implementation="einsum")

  weight_args = (0, 1, 2, 3) if gated else (0, 1, 3)
  floor_time = timeit(grad_fn(plain, weight_args), buf, w_in, w_gate, w_out,
                      repeats=args.repeats)

  # Our kernel on the layer's own loads (per-expert counts or ragged group sizes).
  load = np.asarray(aux.metrics["expert_load_after"]).astype(np.int32)
  if dispatch == "dropless":
    rows = tokens * k
    xs = jax.random.normal(jax.random.PRNGKey(4), (rows, h))
    sizes = jnp.asarray(load)

    def ours(xs, w_in, w_gate, w_out):
      return expert_kernels.ragged_ffn(xs, sizes, w_in, w_gate, w_out, act)

    kernel_time = timeit(grad_fn(ours, weight_args), xs, w_in, w_gate, w_out,
                         repeats=args.repeats)
  else:
    counts = jnp.asarray(np.minimum(load, capacity)) if router_kind == "token" else None
    if counts is not None:
      slot = jnp.arange(capacity)[None, :, None]
      buf = jnp.where(slot < counts[:, None, None], buf, 0)

    def ours(buf, w_in, w_gate, w_out):
      return expert_kernels.capacity_ffn(buf, w_in, w_gate, w_out, act, counts=counts)

    kernel_time = timeit(grad_fn(ours, weight_args), buf, w_in, w_gate, w_out,
                         repeats=args.repeats)

  name = f"E={num_experts:<3d} k={k} {router_kind:6s} {dispatch:8s}"
  print(f"{name} ratio={layer_time / dense_time:5.2f} floor={floor_time / dense_time:5.2f} "
        f"overhead={layer_time / floor_time:5.2f} dispatch={layer_time / kernel_time:5.2f} "
        f"dropped={dropped:.3f}  (layer {1e3 * layer_time:.0f} ms, dense "
        f"{1e3 * dense_time:.0f} ms, floor {1e3 * floor_time:.0f} ms, kernel "
        f"{1e3 * kernel_time:.0f} ms)", flush=True)
  return dict(experts=num_experts, k=k, router=router_kind, dispatch=dispatch,
              ratio=layer_time / dense_time, overhead=layer_time / floor_time)


def main():
  parser = argparse.ArgumentParser(description="MoE layer vs dense-equivalent benchmark.")
  parser.add_argument("--experts", type=int, action="append",
                      help="number of experts (repeatable); default 8, 32, 64, 128")
  parser.add_argument("--top_k", type=int, action="append",
                      help="experts per token (repeatable); default 2, then 1")
  parser.add_argument("--dispatch", action="append",
                      choices=["einsum", "gather", "dropless"], help="default: all three")
  parser.add_argument("--router", action="append", choices=["token", "expert"],
                      help="default: token, plus expert choice")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--model_dim", type=int, default=512)
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--activation", default="relu", choices=sorted(ACTIVATIONS))
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true",
                      help="only the configs named by the flags (default E=64, k=2, gather)")
  args = parser.parse_args()

  if args.quick:
    experts, top_ks = args.experts or [64], args.top_k or [2]
    dispatches, routers = args.dispatch or ["gather"], args.router or ["token"]
    configs = [(e, k, r, d) for e in experts for k in top_ks for r in routers for d in dispatches]
  else:
    experts = args.experts or [8, 32, 64, 128]
    dispatches = args.dispatch or ["einsum", "gather", "dropless"]
    configs = [(e, k, "token", d) for k in (args.top_k or [2]) for e in experts
               for d in dispatches]
    if not args.top_k:  # top-1 and expert choice at the headline size
      configs += [(64, 1, "token", d) for d in dispatches]
      configs += [(64, 2, "expert", d) for d in dispatches if d != "dropless"]

  x = jax.random.normal(jax.random.PRNGKey(0), (1, args.batch * args.length, args.model_dim))
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} cpus; tokens={x.shape[1]} (one group) H={args.model_dim} "
        f"F={args.hidden} act={args.activation} cf={args.capacity_factor}; fwd+bwd, "
        f"median of {args.repeats}", flush=True)
  dense_times = {}
  results = []
  for e, k, r, d in configs:
    if k not in dense_times:
      dense_times[k] = dense_equivalent(x[0], k, args.hidden, args.activation, args.repeats)
    results.append(run_config(e, k, r, d, args, x, dense_times[k]))

  def pick(dispatch, e, k=2, router="token"):
    return [res for res in results if (res["dispatch"], res["experts"], res["k"],
                                       res["router"]) == (dispatch, e, k, router)]

  parts = []
  gather_over = [(e, res["overhead"]) for e in (8, 64, 128) for res in pick("gather", e)]
  if gather_over:
    parts.append("gather overhead " + " ".join(f"E{e}={o:.2f}" for e, o in gather_over)
                 + (" (target <=1.10: " + ("met" if all(o <= 1.10 for _, o in gather_over)
                                           else "MISSED") + ")"))
  for dispatch, target in (("gather", 1.65), ("dropless", 1.6)):
    for res in pick(dispatch, 64):
      parts.append(f"{dispatch} ratio E64={res['ratio']:.2f} (target <={target}: "
                   f"{'met' if res['ratio'] <= target else 'MISSED'})")
  print("summary: " + "; ".join(parts) if parts else "summary: (no headline configs run)")


if __name__ == "__main__":
  main()
