"""Converters between moe_jax parameter trees and other libraries' checkpoints."""
