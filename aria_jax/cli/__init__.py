"""The `aria-jax` command line, one module per subcommand. A user error prints one line naming
the problem and exits 2.

Subcommands import JAX and the model code only when they run: `--help` stays quick, and
`plan` sets JAX's device settings before JAX starts."""

from __future__ import annotations

import argparse
import sys

from aria_jax.cli import bench, chat, convert, finetune, generate, plan, serve
from aria_jax.cli.options import CommandLineParser, UserError

SUBCOMMANDS = (generate, chat, convert, plan, finetune, serve, bench)  # in the order --help lists them


def build_parser(
    subcommands=SUBCOMMANDS,
    prog: str = "aria-jax",
    description: str = "Aria in JAX: generation, fine-tuning and checkpoint conversion.",
) -> argparse.ArgumentParser:
    parser = CommandLineParser(prog=prog, description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    for subcommand in subcommands:
        subcommand.add(commands)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Runs the subcommand `argv` names; its exit code."""
    args = parser.parse_args(argv)
    try:
        code = args.run(args)  # None, or bench's exit code
    except (UserError, ValueError, OSError) as err:  # CheckpointError, ConfigError, LayoutError included
        print(f"aria-jax: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, always
        return 2
    except KeyboardInterrupt:  # Ctrl-C, e.g. while a model loads: no traceback
        print("aria-jax: interrupted", file=sys.stderr)
        return 130
    return code or 0


def main(argv: list[str] | None = None) -> int:
    """The `aria-jax` console script."""
    return run(build_parser(), argv)
