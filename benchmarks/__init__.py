"""Benchmarks of aria_jax: `benchmarks.run` compares it with transformers on the same weights."""
