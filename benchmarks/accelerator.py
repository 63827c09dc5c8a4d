"""The GPU/TPU code paths, timed on whatever backend JAX finds, with the core dependencies only.

No TensorFlow or seqio: batches are synthetic. Two parts, one process:

1. The MoE layer, forward + backward in bfloat16, for dispatch gather / einsum / dropless at
   E = 8 and 64, top-2, against the dense FFN doing the ideal work (width k·F on the same
   tokens, benchmarks/moe_layer.py's `dense_equivalent`), timed in interleaved rounds and
   reported as the median within-round ratio layer / dense. Sizes: 8 × 2048 tokens, H = 2048,
   F = 4096 per expert on a GPU/TPU; on CPU scaled down (--size small: 2 × 256 tokens,
   H = 256, F = 512). Target on an H100: ratio <= 1.3 at E = 64. The layer runs with the
   backend's own expert implementation ("auto": batched einsum / lax.ragged_dot on GPU/TPU).
2. A train step of a ~1B-active preset (Mixtral's recipe at d_model 2048, 16 layers, 8 experts
   of width 4096, top-2: 1.0B active of 3.2B parameters; on CPU its 2-layer d_model-256
   miniature), bfloat16 activations, Adafactor: tokens/s and MFU = tokens/s × train FLOP/token
   / peak, the peak being a bfloat16 matmul measured in this process on one device, times the
   device count (on CPU the host's cores are shared by its simulated devices: one matmul
   measures the whole machine). Target on an H100: MFU >= 45%.

    python benchmarks/accelerator.py                 # sizes for the backend found
    python benchmarks/accelerator.py --size small    # CI-sized, on any backend
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import moe_layer as layer_bench  # noqa: E402  (benchmarks/moe_layer.py)
import train_step as step_bench  # noqa: E402  (benchmarks/train_step.py)

SIZES = {  # batch, length, H, F, train-step preset bindings, batch × seq of the step
    "full": dict(batch=8, length=2048, model_dim=2048, hidden=4096,
                 preset=["D_MODEL=2048", "NUM_LAYERS=16", "NUM_HEADS=16", "NUM_KV_HEADS=8",
                         "HEAD_DIM=128", "EXPERT_DIM=4096", "MLP_DIM=4096"],
                 step_batch=8, step_seq=2048),
    "small": dict(batch=2, length=256, model_dim=256, hidden=512,
                  preset=["D_MODEL=256", "NUM_LAYERS=2", "NUM_HEADS=4", "NUM_KV_HEADS=2",
                          "HEAD_DIM=64", "EXPERT_DIM=512", "MLP_DIM=512",
                          "VOCAB_SIZE=1024"],
                  step_batch=4, step_seq=128),
}
PRESET = "gin_configs/models/mixtral_8x7b.gin"


def peak_flops(dtype=jnp.bfloat16, size: int = 0) -> float:
  """Device-count × FLOP/s of a large matmul in `dtype` on one device (CPU: the host)."""
  from moe_jax import metrics  # pylint: disable=g-import-not-at-top
  size = size or (2048 if jax.default_backend() == "cpu" else 8192)
  per_device = metrics.measure_peak_flops(size=size, dtype=dtype)
  return per_device * (1 if jax.default_backend() == "cpu" else jax.device_count())


def layer_ratios(size: dict, repeats: int, experts=(8, 64),
                 dispatches=("gather", "einsum", "dropless")) -> list:
  """[(E, dispatch, ratio, layer ms, dense ms, dropped)] in bfloat16, top-2."""
  from moe_jax.moe_layer import MoeLayer  # pylint: disable=g-import-not-at-top
  from moe_jax.routing import TokenChoiceRouter  # pylint: disable=g-import-not-at-top
  tokens = size["batch"] * size["length"]
  x = jax.random.normal(jax.random.PRNGKey(0), (1, tokens, size["model_dim"]), jnp.bfloat16)
  dense = layer_bench.dense_equivalent(x[0], 2, size["hidden"], "swiglu")
  dense = (dense[0], tuple(a if a is None else a.astype(jnp.bfloat16) for a in dense[1]))
  rows = []
  for num_experts in experts:
    for dispatch in dispatches:
      if dispatch == "einsum" and num_experts * tokens > 2**22:
        continue  # the [G, S, E, C] one-hot reference is O(T²): minutes at this size
      layer = MoeLayer(TokenChoiceRouter(2), num_experts, size["hidden"], activation="swiglu",
                       dispatch=dispatch, train_capacity_factor=1.25, group_size=tokens,
                       dtype=jnp.bfloat16)
      params = layer.init(jax.random.PRNGKey(1), x, None, True)["params"]

      def loss(p, x, layer=layer):
        y, aux = layer.apply({"params": p}, x, None, False)
        return layer_bench.square_loss(y) + 0.01 * aux.aux_loss + 1e-3 * aux.z_loss

      _, aux = jax.jit(lambda p, x, layer=layer: layer.apply({"params": p}, x, None, False))(
          params, x)
      times = layer_bench.timeit({"dense": dense,
                                  "layer": (jax.jit(jax.grad(loss, argnums=(0, 1))),
                                            (params, x))}, repeats=repeats)
      rows.append((num_experts, dispatch, layer_bench.ratio(times, "layer", "dense"),
                   1e3 * np.median(times["layer"]), 1e3 * np.median(times["dense"]),
                   float(aux.metrics["dropped_fraction"])))
      print(f"layer E={num_experts:<3d} {dispatch:8s} ratio {rows[-1][2]:.2f} "
            f"(layer {rows[-1][3]:.1f} ms, dense {rows[-1][4]:.1f} ms, dropped "
            f"{rows[-1][5]:.3f})", flush=True)
  return rows


def train_step_mfu(size: dict, steps: int) -> dict:
  args = argparse.Namespace(batch=size["step_batch"], seq_len=size["step_seq"],
                            warmup=min(2, steps), steps=steps)
  bindings = size["preset"] + ["ACTIVATION_DTYPE='bfloat16'", "FSDP=False",
                               "MOE_LAYOUT='packed'" if jax.device_count() == 1 else
                               "MOE_LAYOUT='grouped'",
                               f"NUM_EXPERT_PARTITIONS={1}"]
  row = step_bench.benchmark("mixtral_1b_active", [PRESET], bindings, args,
                             dict(data=-1))
  peak = peak_flops()
  row.update(peak=peak, mfu=row["achieved"] / peak)
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(SIZES), default=None,
                      help="default: full on GPU/TPU, small on CPU")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--experts", type=int, action="append", default=None,
                      help="default: 8 and 64")
  parser.add_argument("--dispatch", action="append", default=None,
                      choices=["gather", "einsum", "dropless"], help="default: all three")
  parser.add_argument("--skip_train_step", action="store_true")
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  size_name = args.size or ("small" if backend == "cpu" else "full")
  size = SIZES[size_name]
  print(f"backend {backend}: {jax.devices()[0].device_kind} × {jax.device_count()}; sizes "
        f"{size_name} ({size['batch']}×{size['length']} tokens, H={size['model_dim']}, "
        f"F={size['hidden']})", flush=True)
  start = time.perf_counter()
  rows = layer_ratios(size, args.repeats, args.experts or (8, 64),
                      args.dispatch or ("gather", "einsum", "dropless"))
  e64 = [r for r in rows if r[0] == 64]
  if e64:
    best = min(e64, key=lambda r: r[2])
    verdict = ("a CPU smoke-test size: no target" if backend == "cpu" else
               f"target on an H100 <= 1.3: {'met' if best[2] <= 1.3 else 'not met'}")
    print(f"summary: layer/dense at E=64 best {best[2]:.2f} ({best[1]}) ({verdict})",
          flush=True)
  if not args.skip_train_step:
    row = train_step_mfu(size, args.steps)
    count = lambda n: f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"
    print(f"train step ({count(row['active'])} active of {count(row['total'])}, "
          f"{size['step_batch']}×{size['step_seq']} tokens, bf16): {row['step_s'] * 1e3:.0f} ms, "
          f"{row['tokens_per_s']:,.0f} tokens/s, {row['achieved'] / 1e12:.2f} TFLOP/s of a "
          f"bf16 peak {row['peak'] / 1e12:.2f} TFLOP/s: MFU {100 * row['mfu']:.1f}% (target "
          f"on an H100 >= 45%)", flush=True)
  print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
