"""Checkpoint conversion (`conversion`): hub safetensors to a converted orbax checkpoint and back.
Run as `aria-jax convert` / `aria-jax export` (the command line is `aria_jax.cli`), or `python -m convert`."""
