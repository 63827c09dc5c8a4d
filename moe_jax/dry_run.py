"""Compile a preset's training step for a mesh of fake CPU devices and report what it costs.

    python -m moe_jax.dry_run --gin_file=gin_configs/models/openmoe_8b_32e.gin \\
        --mesh=data:16,expert:4 --batch 64 --seq_len 2048 [--fsdp] [--gin.SCAN_LAYERS=True]

Nothing is allocated: parameters, optimizer state and batch are abstract, in their
shardings; XLA compiles the step for `prod(mesh)` host devices. Printed per device: parameter
and optimizer-state bytes (from the shard shapes), and the compiled memory analysis (arguments,
outputs, temporaries = activations and scratch); then the collectives in the optimised HLO.
The mesh flag sets XLA_FLAGS before JAX starts, so run it as its own process.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time


def _parse(argv):
  from moe_jax import config  # no jax at import time: XLA_FLAGS must be set first
  files, bindings, rest = config.split_gin_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mesh", default="data:-1", help="e.g. data:16,expert:16,model:4")
  parser.add_argument("--batch", type=int, default=0, help="global batch (default: one "
                      "sequence per device on the batch axes)")
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument("--fsdp", default=None, action=argparse.BooleanOptionalAction,
                      help="also split weights over `data` (default: the preset's FSDP)")
  parser.add_argument("--optimizer", default="adafactor", choices=["adafactor", "adamw"])
  parser.add_argument("--transport", default=None,
                      choices=["auto", "all_gather", "ragged_all_to_all"],
                      help="dropless expert parallelism's transport (default: the preset's)")
  parser.add_argument("--target_backend", default="gpu", choices=["gpu", "tpu", "cpu"],
                      help="the backend the job is planned for: 'auto' transports resolve as "
                      "there; a transport XLA:CPU cannot compile is reported from the lowered "
                      "program")
  args = parser.parse_args(rest)
  if not files:
    parser.error("give a --gin_file")
  from moe_jax import checks  # pylint: disable=g-import-not-at-top  (no jax: gin only)
  checks.exit_on_setting_error(checks.gin_files, files, ("", os.getcwd(), config.REPO_ROOT))
  for name in ("batch", "seq_len"):
    checks.exit_on_setting_error(checks.integer, f"--{name}", getattr(args, name),
                                 0 if name == "batch" else 1)
  return files, bindings, args


LOWERED_COLLECTIVES = ("stablehlo.all_to_all", "ragged_all_to_all", "stablehlo.all_gather",
                       "stablehlo.reduce_scatter", "stablehlo.all_reduce",
                       "stablehlo.collective_permute")
COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")


def collective_counts(hlo: str) -> dict:
  return {kind: len(re.findall(rf"\b{kind}(-start)?\(", hlo)) for kind in COLLECTIVES}


def largest_collectives(hlo: str, top: int = 3) -> dict:
  """Per kind, the largest result shapes (e.g. 'f32[32,2048,8192]') in the optimised HLO."""
  out = {}
  for kind in COLLECTIVES:
    shapes = set(re.findall(rf"= ((?:f32|bf16|s32|f16|u32|pred)\[[0-9,]*\])[^=]*? "
                            rf"{kind}(?:-start)?\(", hlo))
    size = lambda sh: math.prod(int(d) for d in sh[sh.index("[") + 1:-1].split(",") if d)
    out[kind] = sorted(shapes, key=size, reverse=True)[:top]
  return out


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  files, bindings, args = _parse(argv)
  from moe_jax.partitioning import parse_mesh  # pure python
  sizes = parse_mesh(args.mesh)
  num_devices = math.prod(s for s in sizes.values() if s > 0)
  if -1 in sizes.values():
    raise SystemExit("--mesh: give every axis size explicitly (no -1) for a dry run.")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={num_devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec

  from moe_jax import checks, config, expert_parallel, partitioning as part, train_step as ts

  # The MoE layers' layout for this mesh, as runs/pretrain.gin sets it for a training run
  # (the flags' own bindings come after, so they win).
  layout = ["MOE_LAYOUT = @moe_jax.config.moe_layout()",
            "NUM_EXPERT_PARTITIONS = @moe_jax.config.expert_partitions()",
            f"moe_jax.config.moe_layout.mesh = {args.mesh!r}",
            f"moe_jax.config.expert_partitions.mesh = {args.mesh!r}",
            "moe_jax.config.expert_partitions.rules = %PARTITIONING_RULES"]
  if args.transport:
    layout.append(f"DROPLESS_TRANSPORT = '{args.transport}'")
  lm = checks.exit_on_setting_error(config.load_model, files, layout + list(bindings))
  module = lm.module
  mesh = part.make_mesh(**sizes)
  rules = (config.configured_rules() if args.fsdp is None
           else part.standard_rules(fsdp=args.fsdp))
  fsdp = dict(rules).get("embed") is not None
  batch_size = args.batch or part.logical_axis_size(mesh, rules, "batch")
  with expert_parallel.planning_for(args.target_backend):
    part.validate(module, mesh, rules, batch_size)
  optimizer = optax.adafactor(1e-3) if args.optimizer == "adafactor" else optax.adamw(1e-4)

  tokens = jax.ShapeDtypeStruct((batch_size, args.seq_len), jnp.int32)
  boxed = jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t), tokens)
  var_shardings = part.logical_shardings(boxed, mesh, rules)
  abstract_vars = nn.meta.unbox(boxed)
  abstract_state = jax.eval_shape(lambda v: ts.TrainState.create(v, optimizer), abstract_vars)
  state_shardings = part.train_state_shardings(abstract_state, var_shardings, mesh)
  opt_shardings = state_shardings.opt_state
  batch_sharding = NamedSharding(mesh, PartitionSpec(part.BATCH_AXES))
  batch = {k: jax.ShapeDtypeStruct(tokens.shape, jnp.int32, sharding=batch_sharding)
           for k in ("decoder_input_tokens", "decoder_target_tokens")}
  state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, state_shardings)

  step = jax.jit(lambda s, b, r: ts.train_step(lm, optimizer, s, b, r),
                 out_shardings=(state_shardings, None), donate_argnums=0)
  start = time.time()
  with part.activate(mesh, rules), expert_parallel.planning_for(args.target_backend):
    lowered = step.lower(state_in, batch, jax.random.PRNGKey(0))
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      if "ragged-all-to-all" not in str(e):
        raise
      compiled = None  # XLA:CPU: "UNIMPLEMENTED: HLO opcode ragged-all-to-all"
  seconds = time.time() - start

  def per_device_bytes(tree, shardings):
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
    return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
               for a, s in zip(leaves, shards))

  gib = lambda n: f"{n / 2**30:.3f} GiB"
  print(f"preset {' '.join(files)}; mesh {dict(mesh.shape)} ({num_devices} devices); batch "
        f"{batch_size} x {args.seq_len}; {args.optimizer}; fsdp={fsdp}; "
        f"{'compiled' if compiled is not None else 'lowered'} in {seconds:.0f} s")
  print(f"per device: params {gib(per_device_bytes(abstract_state.params, state_shardings.params))}"
        f", optimizer {gib(per_device_bytes(abstract_state.opt_state, opt_shardings))}")
  moe = _moe_report(module, mesh, rules, batch_size * args.seq_len, args.target_backend)
  if compiled is None:
    text = lowered.as_text()
    counts = {kind: len(re.findall(rf"\b{kind}\b", text)) for kind in LOWERED_COLLECTIVES}
    print("XLA:CPU cannot compile the ragged all-to-all: no compiled memory analysis; the "
          "lowered program's collectives: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if moe:
      print(f"estimated per device beyond parameters and optimizer: the MoE receive buffer "
            f"{gib(moe['buffer_bytes'])} and sorted rows {gib(moe['sorted_bytes'])} per layer")
    return counts
  mem = compiled.memory_analysis()
  if mem is not None:
    print(f"compiled memory per device: arguments {gib(mem.argument_size_in_bytes)}, outputs "
          f"{gib(mem.output_size_in_bytes)}, temporaries (activations + scratch) "
          f"{gib(mem.temp_size_in_bytes)}, aliased {gib(mem.alias_size_in_bytes)}")
  hlo = compiled.as_text()
  counts = collective_counts(hlo)
  print("collectives in the step: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
  for kind, shapes in largest_collectives(hlo).items():
    if shapes:
      print(f"  largest {kind} results: {', '.join(shapes)}")
  return counts


def _moe_report(module, mesh, rules, tokens: int, target_backend: str):
  """Prints the dropless transport's exchange per MoE layer against the ideal; returns the
  figures (or None for a model without dropless expert parallelism)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from moe_jax import expert_parallel, partitioning as part  # pylint: disable=g-import-not-at-top
  layer = module.sparse_sublayers().get("moe") if hasattr(module, "sparse_sublayers") else None
  if layer is None:
    return None
  if layer.dispatch != "dropless" or layer.layout != "grouped":
    return None
  ep = part.logical_axis_size(mesh, rules, "expert")
  local_tokens = tokens // part.logical_axis_size(mesh, rules, "group")
  k = round(layer.experts_per_token(local_tokens))  # dropless routers choose a whole k
  itemsize = jnp.dtype(module.dtype).itemsize
  moved = expert_parallel.exchange_bytes(local_tokens, k, module.d_model, ep, itemsize)
  transport = expert_parallel.resolve_transport(layer.transport, target_backend)
  rows = expert_parallel.buffer_rows(local_tokens, k, ep, layer.num_experts // ep,
                                     layer.receive_buffer_factor)
  mib = lambda n: f"{n / 2**20:.1f} MiB"
  print(f"dropless expert parallelism ({transport} transport on {target_backend}; EP={ep}, "
        f"{local_tokens} tokens per device, k={k}, H={module.d_model}): per MoE layer, device "
        f"and direction the ideal exchange k·T·H is {mib(moved['ideal'])}; "
        f"ragged_all_to_all moves {mib(moved['ragged_all_to_all'])} "
        f"({moved['ragged_all_to_all'] / moved['ideal']:.2f}x), all_gather "
        f"{mib(moved['all_gather'])} ({moved['all_gather'] / moved['ideal']:.2f}x, about (EP-1)/k); "
        f"receive buffer {rows} rows ({mib(rows * module.d_model * itemsize)})")
  return {"buffer_bytes": rows * module.d_model * itemsize,
          "sorted_bytes": k * local_tokens * module.d_model * itemsize, **moved}


if __name__ == "__main__":
  main()
