"""One process of the multi-host test: a few training steps of a tiny preset on a mesh that
spans every process's devices. Prints the losses as JSON on process 0.

    MOE_JAX_COORDINATOR=localhost:PORT MOE_JAX_NUM_PROCESSES=2 MOE_JAX_PROCESS_ID=i \\
      XLA_FLAGS=--xla_force_host_platform_device_count=4 python distributed_worker.py
(with MOE_JAX_NUM_PROCESSES=1 and 8 devices: the single-process reference run)
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import jax  # noqa: E402

from moe_jax import partitioning as part  # noqa: E402

if int(os.environ.get("MOE_JAX_NUM_PROCESSES", "1")) > 1:
  part.initialize_distributed()

import flax.linen  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from moe_jax import config, train_step as ts  # noqa: E402

lm = config.load_model(["gin_configs/models/st_moe_tiny.gin"], ["NUM_EXPERTS = 8"])
mesh = part.make_mesh(data=2, expert=4)
rules = part.standard_rules()
rng = np.random.default_rng(0)
tokens = rng.integers(1, lm.module.vocab_size, size=(3, 8, 16)).astype(np.int32)  # 3 steps
part.validate(lm.module, mesh, rules, batch_size=8)
variables = part.init_sharded(lm.module, mesh, rules, jnp.asarray(tokens[0]),
                              rng=jax.random.PRNGKey(1))
var_shardings = part.logical_shardings(variables, mesh, rules)
variables = flax.linen.meta.unbox(variables)
optimizer = optax.adamw(1e-2)
create = lambda v: ts.TrainState.create(v, optimizer)
shardings = part.train_state_shardings(jax.eval_shape(create, variables), var_shardings, mesh)
with part.activate(mesh, rules):
  # The optimizer state is created directly in its shardings, like the parameters.
  state = jax.jit(create, out_shardings=shardings)(variables)
  step = jax.jit(lambda s, b: ts.train_step(lm, optimizer, s, b, jax.random.PRNGKey(2)))
  rows = part.host_batch_rows(mesh, rules, 8)
  losses = []
  for t in tokens:
    local = {"decoder_input_tokens": t[rows], "decoder_target_tokens": np.roll(t, -1, 1)[rows]}
    state, metrics = step(state, part.global_batch(local, mesh, rules))
    losses.append(float(metrics["loss/total"]))
if jax.process_index() == 0:
  print("LOSSES " + json.dumps({"losses": losses, "processes": jax.process_count(),
                                "devices": jax.device_count(), "rows": [rows.start, rows.stop]}))
