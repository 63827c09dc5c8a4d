"""Experts decide *what is computed*: E stacked feed-forward networks.

Weights: wi [E, H, F] (and wi_gate [E, H, F] for gated activations), wo [E, F, H].
  relu / gelu:     y = act(x wi) wo
  swiglu / geglu:  y = (act(x wi_gate) ⊙ x wi) wo      act = silu / gelu
With `use_bias` (NLLB-MoE's experts) each projection adds its bias: wi_bias [E, F],
wi_gate_bias [E, F], wo_bias [E, H]; that runs the plain reference formulation.
The math lives in `expert_kernels` (capacity buffers and ragged rows), chosen per layout.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import expert_kernels
from moe_jax.dispatch import ExpertBatch

Array = jax.Array

# name -> (elementwise activation, gated)
ACTIVATIONS: dict[str, Tuple[Callable[[Array], Array], bool]] = {
    "relu": (jax.nn.relu, False),
    "gelu": (jax.nn.gelu, False),
    "swiglu": (jax.nn.silu, True),
    "geglu": (jax.nn.gelu, True),
}


# Layer-level kernel choice -> (capacity-buffer kernel, ragged kernel) in expert_kernels.
#   auto:      the fastest for the backend (custom-VJP loops on CPU, XLA's batched/grouped
#              matmuls on GPU/TPU)
#   reference: plain batched einsum / lax.ragged_dot (on CPU ragged_dot costs E× the FLOPs)
#   loop:      the custom-VJP loops over experts, skipping empty capacity slots
IMPLEMENTATIONS = {
    "auto": ("auto", "auto"),
    "reference": ("einsum", "ragged_dot"),
    "loop": ("scan", "chunked"),
}


def check_implementation(name: str):
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"expert_implementation must be one of {tuple(IMPLEMENTATIONS)}, "
                     f"got {name!r}.")


def check_activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {name!r}.")


def expert_init():
  # Fan-in scaling per expert: axis 0 (experts) is a batch axis, not part of the fan.
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                          in_axis=-2, out_axis=-1, batch_axis=(0,))


class Experts(nn.Module):
  """E expert FFNs applied to an `ExpertBatch` (capacity buffers or ragged sorted rows).

  Expert dropout (Switch fine-tuning uses 0.4) drops hidden units with its own rate, separate
  from the model's dropout. While active (training with rate > 0) the layer uses the plain
  reference formulation, since the fast kernels fuse the hidden activation.
  """
  num_experts: int
  hidden_dim: int
  activation: str = "relu"
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: nn.initializers.Initializer = expert_init()
  implementation: str = "auto"
  use_bias: bool = False

  def __post_init__(self):
    check_activation(self.activation)
    check_implementation(self.implementation)
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"expert dropout_rate must be in [0, 1), got {self.dropout_rate}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, batch: Optional[ExpertBatch], deterministic: bool = True,
               model_dim: Optional[int] = None, distribute: Optional[Callable] = None):
    """Applies the experts to `batch`, or hands them to `distribute`.

    distribute: for expert parallelism (expert_parallel.py), a callable
      `distribute(local_ffn, w_in=, w_gate=, w_out=)` that moves tokens to the devices holding
      the weights and runs `local_ffn(rows, group_sizes, w_in, w_gate, w_out)` there on the
      local shards; its result is returned as is. `batch` is then None and `model_dim` gives H.
    """
    act, gated = ACTIVATIONS[self.activation]
    h = model_dim if batch is None else batch.inputs.shape[-1]
    e, f = self.num_experts, self.hidden_dim

    def weight(name, shape, axes):
      init = nn.with_logical_partitioning(self.kernel_init, axes)
      return self.param(name, init, shape, self.param_dtype).astype(self.dtype)

    w_in = weight("wi", (e, h, f), ("expert", "embed", "expert_mlp"))
    w_gate = weight("wi_gate", (e, h, f), ("expert", "embed", "expert_mlp")) if gated else None
    w_out = weight("wo", (e, f, h), ("expert", "expert_mlp", "embed"))
    biases = None
    if self.use_bias:
      zeros = lambda name, shape, axes: self.param(name, nn.with_logical_partitioning(
          nn.initializers.zeros, axes), shape, self.param_dtype).astype(self.dtype)
      biases = (zeros("wi_bias", (e, f), ("expert", "expert_mlp")),
                zeros("wi_gate_bias", (e, f), ("expert", "expert_mlp")) if gated else None,
                zeros("wo_bias", (e, h), ("expert", "embed")))

    capacity_kernel, ragged_kernel = IMPLEMENTATIONS[self.implementation]
    if distribute is not None:
      if self.use_bias:
        raise ValueError("experts with biases (use_bias) are not implemented with dropless "
                         "expert parallelism (layout='grouped'); use dispatch='gather'.")
      if self.dropout_rate > 0 and not deterministic:
        raise ValueError("expert dropout (expert_dropout_rate > 0) in training is not "
                         "implemented with dropless expert parallelism (layout='grouped'); "
                         "use dispatch='gather' for fine-tuning with expert dropout.")
      dtype = self.dtype
      local_ffn = lambda rows, sizes, wi, wg, wo, expected_rows=None: (
          expert_kernels.ragged_ffn(rows.astype(dtype), sizes, wi, wg, wo, act,
                                    implementation=ragged_kernel,
                                    expected_rows=expected_rows))
      return distribute(local_ffn, w_in=w_in, w_gate=w_gate, w_out=w_out)
    x = batch.inputs.astype(self.dtype)
    if (self.dropout_rate > 0 and not deterministic) or biases is not None:
      drop = nn.Dropout(self.dropout_rate, deterministic=deterministic or not self.dropout_rate)
      return _reference_ffn(x, batch.group_sizes, w_in, w_gate, w_out, act, drop, biases)
    if batch.group_sizes is not None:
      return expert_kernels.ragged_ffn(x, batch.group_sizes, w_in, w_gate, w_out, act,
                                       implementation=ragged_kernel)
    return expert_kernels.capacity_ffn(x, w_in, w_gate, w_out, act, counts=batch.counts,
                                       implementation=capacity_kernel)


def _reference_ffn(x: Array, group_sizes: Optional[Array], w_in, w_gate, w_out, act,
                   hidden_transform: Callable[[Array], Array], biases=None) -> Array:
  """Plain formulation with a hook on the hidden layer (expert dropout) and optional biases
  (b_in, b_gate or None, b_out), each [E, width]."""
  b_in, b_gate, b_out = biases or (None, None, None)
  if group_sizes is None:  # capacity layout [E, N, H]
    bias = lambda b: 0 if b is None else b[:, None, :]
    project = lambda w: jnp.einsum("enh,ehf->enf", x, w)
    out = lambda hidden: jnp.einsum("enf,efh->enh", hidden, w_out) + bias(b_out)
  else:  # ragged layout [M, H]: lax.ragged_dot (a dense masked matmul on CPU)
    expert_of_row = jnp.repeat(jnp.arange(w_in.shape[0]), group_sizes,
                               total_repeat_length=x.shape[0])
    bias = lambda b: 0 if b is None else b[expert_of_row]
    project = lambda w: jax.lax.ragged_dot(x, w, group_sizes)
    out = lambda hidden: jax.lax.ragged_dot(hidden, w_out, group_sizes) + bias(b_out)
  if w_gate is not None:
    hidden = act(project(w_gate) + bias(b_gate)) * (project(w_in) + bias(b_in))
  else:
    hidden = act(project(w_in) + bias(b_in))
  y = out(hidden_transform(hidden))
  if group_sizes is None:
    return y
  rows = jnp.arange(x.shape[0])
  return jnp.where((rows < jnp.sum(group_sizes))[:, None], y, 0)
