"""`aria-jax bench`: aria_jax against transformers on the same random weights (`aria_jax.benchmark`)."""

from __future__ import annotations

import argparse

from aria_jax.benchmark import add_options
from aria_jax.cli.options import add_command


def add(commands) -> None:
    command = add_command(
        commands,
        "bench",
        "benchmark against transformers on the same random weights; prints a markdown table",
        description="Benchmark aria_jax against transformers' PyTorch Aria on the same random weights (a "
        "small bench config, saved once in --cache-dir), each side in its own subprocess: prefill, "
        "decode and image prefill, and an MoE micro-benchmark, printed as a markdown table with the "
        "machine's limits beside the numbers.",
    )
    add_options(command)
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from aria_jax.benchmark import main

    return main(benchmark_argv(args))


def benchmark_argv(args: argparse.Namespace) -> list[str]:
    """The parsed `bench` options back as command-line arguments for `aria_jax.benchmark.main`."""
    argv = []
    for name, value in vars(args).items():
        if name in ("command", "run") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv
