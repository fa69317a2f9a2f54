"""What the `aria-jax` subcommands share: the parser classes, value types and option groups."""

from __future__ import annotations

import argparse


class UserError(Exception):
    """A problem with what the user asked for, reported as one line without a traceback."""


class CommandLineParser(argparse.ArgumentParser):
    """A mistake on the command line is one line too, like every other user error: the usage
    that argparse prints first is one --help away."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default: "off" for a flag, "none" for an option unset
    by default; not for required values, nor where the help explains the default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or not action.option_strings or action.default is argparse.SUPPRESS or "default" in text:
            return text
        if action.nargs == 0 and action.default is False:  # store_true
            return f"{text} (default: off)"
        if action.default is None or action.default == []:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


def add_command(commands, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every option's default."""
    return commands.add_parser(name, help=summary, description=description, formatter_class=HelpWithDefaults)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0  # the same message as for 0 or a negative number
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def byte_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    size = int(upper) if upper.isdecimal() else 0
    for unit, scale in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdecimal():
            size = int(float(upper[: -len(unit)]) * scale)
            break
    if size < 1:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (for example 5GB, 500MB or a number of bytes)")
    return size


def parse_mesh(text: str) -> dict[str, int]:
    """ "expert=8,tensor=1" -> {"expert": 8, "tensor": 1}."""
    from aria_jax.sharding import MESH_AXES  # here: importing JAX would slow every --help

    sizes = {}
    for part in filter(None, text.split(",")):
        name, _, value = (piece.strip() for piece in part.partition("="))
        if name not in MESH_AXES or not value.isdigit() or int(value) < 1:
            raise UserError(f"--mesh {text!r}: expected comma-separated data=N, expert=N, tensor=N (N >= 1)")
        sizes[name] = int(value)
    return sizes


def add_answer_options(command: argparse.ArgumentParser, max_new_tokens: int, max_new_tokens_help: str) -> None:
    """What generate and chat share: how an answer is sampled, how images are cropped, the dtypes."""
    command.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, help=max_new_tokens_help)
    command.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    command.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    command.add_argument("--seed", type=int, default=0, help="sampling seed, an integer in [0, 2**64)")
    command.add_argument(
        "--max-image-size",
        type=positive_int,
        default=None,
        help="Aria only: crop size in pixels, 490 or 980; default: the checkpoint's",
    )
    command.add_argument(
        "--split-image", action="store_true", help="Aria only: also feed high-resolution tiles of each image"
    )
    command.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="parameter and compute dtype"
    )
    command.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        default=None,
        help="quantize the decoder's weights while loading (int4 in groups of 128 inputs)",
    )
    add_kv_cache_dtype_option(command)
    add_awaker_gate_option(command)


def add_awaker_gate_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--awaker-gate",
        choices=["released", "image_features"],
        default=None,
        help="Awaker2.5-VL checkpoints only: what its expert routers read after the first answer token; "
        "released (the default) is the released model's plain token embeddings, image_features keeps the "
        "prompt step's routing (image features in) for every token",
    )


def add_kv_cache_dtype_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--kv-cache-dtype",
        choices=["int8"],
        default=None,
        help="keep the KV cache in int8, a scale per token and head (about half the memory of "
        "bfloat16); default: the compute dtype",
    )
