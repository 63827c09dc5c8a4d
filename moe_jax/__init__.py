"""moe_jax: sparse Mixture-of-Experts language models in JAX/Flax.

Core modules import only jax, flax, optax, orbax, gin and numpy (never TensorFlow or seqio).
"""
__version__ = "0.1.0"
