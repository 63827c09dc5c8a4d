"""Train-step throughput (tokens/s) and MFU of gin presets, on synthetic packed batches.

For each preset: build the model from gin (`config.load_model`), initialise it sharded on the
mesh (`partitioning.init_sharded`, the train state laid out by `train_state_shardings`), jit
`train_step.train_step` with Adafactor (`optimizers.create_optimizer(name="adafactor")`) on
donated state, compile, run `--warmup` steps, then time `--steps` steps one by one (wall time
to `block_until_ready`) and take the median. Printed per preset:
  tokens/s        batch · seq_len / median step time (every position is a loss token);
  train FLOP/tok  3 × `params.count(module, seq_len).flops_per_token` (active parameters:
                  experts count k / E; `metrics.train_flops_per_token`), as the trainer logs;
  achieved        tokens/s × train FLOP/tok;
  MFU             achieved / peak, the peak being `metrics.measure_peak_flops` (a large dense
                  matmul) measured in this process before and after every preset, the
                  largest value kept (other work can only lower it): for the host on CPU
                  (simulated devices share its cores), per device × device count otherwise.
The table is printed at the end (progress goes to stderr).

Batches are synthetic and need no TensorFlow: random tokens in [3, vocab), two packed
segments per row (`decoder_segment_ids` 1 then 2, `decoder_positions` restarting at the
boundary), `decoder_loss_weights` ones and `decoder_causal_attention` zeros (pure causal LM).
One batch is placed on the mesh once and reused, so input transfer is not timed.

    python benchmarks/train_step.py                              # tiny and small, 16 × 256
    python benchmarks/train_step.py --presets tiny --dense --steps 20
    python benchmarks/train_step.py --preset \\
        big=gin_configs/models/mixtral_8x7b_tiny.gin,D_MODEL=512,NUM_LAYERS=8 --batch 32
    python benchmarks/train_step.py --cpu_devices 8 --mesh data:4,expert:2   # simulated mesh
    python benchmarks/train_step.py --gin.ACTIVATION_DTYPE="'bfloat16'" --peak_dtype bfloat16

`--preset NAME=FILE[,FILE...][,NAME=VALUE...]`: items with `=` are gin bindings (macros such
as D_MODEL=256 or full names such as model.Decoder.remat_policy="'full'"), the others gin
files. `--gin.NAME=VALUE` flags apply to every preset, after its own bindings.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moe_jax import config  # noqa: E402  (gin only: jax is imported after XLA_FLAGS is set)

_OPENMOE_TINY = "gin_configs/models/openmoe_base_16e_tiny.gin"
PRESETS = {
    # openmoe_base_16e's recipe at tiny.gin sizes (4 layers, d 64, 8 experts, 1 MoE layer),
    # with the 8k vocabulary the shipped SentencePiece model has.
    "tiny": (_OPENMOE_TINY, "VOCAB_SIZE=8384"),
    # The same recipe wider: about 1.1 s a step (16 × 256) on the idle 2-core CPU VM.
    "small": (_OPENMOE_TINY, "VOCAB_SIZE=8384", "D_MODEL=128", "NUM_HEADS=4", "HEAD_DIM=32",
              "MLP_DIM=512", "EXPERT_DIM=256", "NUM_LAYERS=4"),
}
DENSE_BINDING = "model.Decoder.moe_layer = None"


def parse_preset(spec: str):
  """'NAME=FILE[,FILE...][,NAME=VALUE...]' -> (name, gin files, gin bindings)."""
  name, sep, rest = spec.partition("=")
  if not sep or not name or not rest:
    raise argparse.ArgumentTypeError(f"--preset {spec!r}: expected NAME=gin_file[,binding...]")
  files, bindings = [], []
  for item in filter(None, rest.split(",")):
    if "=" in item:
      key, _, value = item.partition("=")
      bindings.append(f"{key.strip()} = {value.strip()}")
    else:
      files.append(item)
  if not files:
    raise argparse.ArgumentTypeError(f"--preset {spec!r}: no gin file")
  return name, files, bindings


def parse_args(argv):
  _, global_bindings, rest = config.split_gin_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", action="append", type=parse_preset, default=[],
                      metavar="NAME=FILE[,BINDING...]", help="a preset of your own (repeatable)")
  parser.add_argument("--presets", default=None,
                      help=f"comma-separated built-in presets from {sorted(PRESETS)} (default: "
                      "all of them unless --preset is given)")
  parser.add_argument("--dense", action="store_true",
                      help=f"also run each preset with `{DENSE_BINDING}` (its dense backbone: "
                      "every layer a dense FFN of MLP_DIM), for comparison")
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--batch", type=int, default=16, help="global batch (rows)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--mesh", default="data:-1", help="e.g. data:4,expert:2")
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="simulate this many CPU devices (sets XLA_FLAGS before jax starts)")
  parser.add_argument("--peak_size", type=int, default=0,
                      help="matmul size for the peak (default 2048 on CPU, 8192 otherwise)")
  parser.add_argument("--peak_dtype", default="float32", choices=["float32", "bfloat16"],
                      help="dtype of the peak matmul: match the presets' ACTIVATION_DTYPE")
  args = parser.parse_args(rest)
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  if args.seq_len < 2:
    parser.error("--seq_len must be >= 2 (two packed segments per row)")
  presets = list(args.preset)
  names = args.presets.split(",") if args.presets else ([] if presets else list(PRESETS))
  for name in filter(None, names):
    if name not in PRESETS:
      parser.error(f"unknown preset {name!r}; built-in: {', '.join(PRESETS)} (or --preset)")
    file, *bindings = PRESETS[name]
    presets.append((name, [file], [b.replace("=", " = ", 1) for b in bindings]))
  presets = [(n, f, b + global_bindings) for n, f, b in presets]
  if args.dense:
    presets = [p for n, f, b in presets for p in ((n, f, b), (f"{n}/dense", f,
                                                              b + [DENSE_BINDING]))]
  return presets, args


def synthetic_batch(rng, batch: int, seq_len: int, vocab_size: int):
  """A packed decoder-only batch: two segments per row (the cut drawn per row), t5x features."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  tokens = rng.integers(3, vocab_size, size=(batch, seq_len + 1), dtype=np.int32)
  cut = rng.integers(1, seq_len, size=(batch, 1))  # segment 2 starts at `cut` (1..L-1)
  index = np.arange(seq_len)[None, :]
  segment_ids = np.where(index < cut, 1, 2).astype(np.int32)
  positions = np.where(index < cut, index, index - cut).astype(np.int32)
  return {
      "decoder_input_tokens": tokens[:, :-1],
      "decoder_target_tokens": tokens[:, 1:],
      "decoder_loss_weights": np.ones((batch, seq_len), np.float32),
      "decoder_segment_ids": segment_ids,
      "decoder_positions": positions,
      "decoder_causal_attention": np.zeros((batch, seq_len), np.int32),
  }


def benchmark(name, files, bindings, args, mesh_sizes):
  """Compiles and times one preset's train step; returns the table row's values."""
  # pylint: disable=g-import-not-at-top
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from moe_jax import metrics, optimizers, params, partitioning as part
  from moe_jax import train_step as ts
  # pylint: enable=g-import-not-at-top

  lm = config.load_model(files, bindings)
  module = lm.module
  mesh = part.make_mesh(**mesh_sizes)
  rules = config.configured_rules()
  part.validate(module, mesh, rules, args.batch)
  tx = optimizers.create_optimizer(name="adafactor").tx
  report = params.count(module, args.seq_len)
  train_flops = metrics.train_flops_per_token(report.flops_per_token)

  tokens = jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32)
  boxed = jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t), tokens)
  variable_shardings = part.logical_shardings(boxed, mesh, rules)
  abstract_state = jax.eval_shape(lambda v: ts.TrainState.create(v, tx), nn.meta.unbox(boxed))
  state_shardings = part.train_state_shardings(abstract_state, variable_shardings, mesh)
  with part.activate(mesh, rules):
    variables = nn.meta.unbox(part.init_sharded(module, mesh, rules, tokens))
    state = jax.jit(lambda v: ts.TrainState.create(v, tx),
                    out_shardings=state_shardings)(variables)
    del variables

    full = synthetic_batch(np.random.default_rng(0), args.batch, args.seq_len, module.vocab_size)
    rows = part.host_batch_rows(mesh, rules, args.batch)
    batch = part.global_batch({k: v[rows] for k, v in full.items()}, mesh, rules)

    step_fn = jax.jit(lambda s, b, r: ts.train_step(lm, tx, s, b, r),
                      out_shardings=(state_shardings, None), donate_argnums=0)
    rng = jax.random.PRNGKey(0)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start

    for _ in range(args.warmup):
      state, out = compiled(state, batch, rng)
    if args.warmup:
      jax.block_until_ready((state, out))
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      state, out = compiled(state, batch, rng)
      jax.block_until_ready((state, out))
      times.append(time.perf_counter() - start)
  if bool(out["nonfinite"]):
    print(f"warning: {name}: non-finite loss or gradient in the last step", file=sys.stderr)
  step_s = float(np.median(times))
  tokens_per_s = args.batch * args.seq_len / step_s
  return {
      "name": name, "total": report.total, "active": report.active,
      "train_flops": train_flops, "compile_s": compile_s, "step_s": step_s,
      "spread": (min(times), max(times)), "tokens_per_s": tokens_per_s,
      "achieved": tokens_per_s * train_flops,
  }


def _millions(n: float) -> str:
  return f"{n / 1e6:.2f}M"


def main(argv=None):
  presets, args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.cpu_devices:  # before jax starts its backend
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.cpu_devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax  # pylint: disable=g-import-not-at-top
  from moe_jax import metrics  # pylint: disable=g-import-not-at-top
  from moe_jax.partitioning import parse_mesh  # pylint: disable=g-import-not-at-top

  mesh_sizes = parse_mesh(args.mesh)

  backend = jax.default_backend()
  devices = jax.devices()
  on_cpu = backend == "cpu"
  peak_size = args.peak_size or (2048 if on_cpu else 8192)
  # Simulated CPU devices share the host's cores: one matmul measures the whole machine.
  measure_peak = lambda: metrics.measure_peak_flops(size=peak_size, dtype=args.peak_dtype) * (
      1 if on_cpu else len(devices))
  # Measured before and after every preset; the largest counts, as other work on the machine
  # can only lower a measurement (one taken in a busy moment would inflate every MFU).
  peaks = [measure_peak()]
  rows = []
  for name, files, bindings in presets:
    rows.append(benchmark(name, files, bindings, args, mesh_sizes))
    peaks.append(measure_peak())
    print(f"{name}: {rows[-1]['step_s'] * 1e3:.0f} ms/step", file=sys.stderr, flush=True)
  peak_flops = max(peaks)

  kind = devices[0].device_kind
  cores = f", {os.cpu_count()} cores" if on_cpu else ""
  scope = "host" if on_cpu else f"{len(devices)} devices"
  print(f"jax {jax.__version__}; {backend} {kind} x{len(devices)}{cores}; peak "
        f"({args.peak_dtype} {peak_size}² matmul, {scope}) {peak_flops / 1e9:,.1f} GFLOP/s "
        f"(max of {len(peaks)} measurements, min {min(peaks) / 1e9:,.1f})")
  print(f"batch {args.batch} × seq {args.seq_len} = {args.batch * args.seq_len} tokens/step; "
        f"adafactor; mesh {args.mesh}; median of {args.steps} steps after {args.warmup} "
        "warm-up")
  print("| preset | params (active) | train MFLOP/token | compile s | step ms (min–max) | "
        "tokens/s | achieved GFLOP/s | MFU |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    lo, hi = r["spread"]
    print(f"| {r['name']} | {_millions(r['total'])} ({_millions(r['active'])}) | "
          f"{r['train_flops'] / 1e6:.2f} | {r['compile_s']:.1f} | {r['step_s'] * 1e3:.0f} "
          f"({lo * 1e3:.0f}–{hi * 1e3:.0f}) | {r['tokens_per_s']:,.0f} | "
          f"{r['achieved'] / 1e9:,.1f} | {r['achieved'] / peak_flops:.1%} |")
  if "tensorflow" in sys.modules:
    print("note: TensorFlow was imported (it should not be)", file=sys.stderr)


if __name__ == "__main__":
  main()
