"""`python -m convert convert|export ...`: the checkpoint converter's commands alone, as
`aria-jax convert` and `aria-jax export` run them."""

import sys

from aria_jax.cli import build_parser, convert, run

parser = build_parser(
    [convert],
    prog="python -m convert",
    description="Checkpoint conversion: hub safetensors to a converted checkpoint and back.",
)
sys.exit(run(parser))
