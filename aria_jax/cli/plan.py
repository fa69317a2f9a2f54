"""`aria-jax plan`: memory (and, with --target, estimated time) of generation, compiled without weights.

JAX reads the settings that choose its devices when it starts, so this module imports nothing
of JAX (nor of aria_jax beyond the command line) before `run` has made them."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys

from aria_jax.cli.options import UserError, add_command, add_kv_cache_dtype_option, parse_mesh, positive_int

ARIA_DEFAULT_MESH = "expert=8"
# A dense decoder has no experts to split: its heads and MLP width over tensor, rows over data.
DENSE_DEFAULT_MESH = "data=2,tensor=4"


def add(commands) -> None:
    command = add_command(
        commands,
        "plan",
        "memory (and, with --target, estimated time) of generation, compiled without weights",
        description="Will it fit, and how fast will it run? Compile generate()'s prefill and decode for a model "
        "config on a mesh, without loading any weights. Without --target: on simulated CPU devices, "
        "a table of per-device memory (params, KV cache, the peaks of prefill and decode). With "
        "--target (e.g. v5e:2x4, h100:8): with that accelerator's own compiler, on this machine, "
        "per chip memory and whether it fits the chip's HBM, the compiler's estimated time (decode: "
        "per token) and the roofline beside it. Times are compiler estimates, not timings.",
    )
    command.add_argument(
        "--config",
        default="configs/aria.json",
        help="config.json (or a model directory) of Aria, Qwen2-VL or Awaker2.5-VL, e.g. configs/qwen2-vl-7b.json",
    )
    command.add_argument(
        "--mesh",
        default=None,
        help="mesh axis sizes, e.g. data=2,expert=8,tensor=4 (default: Aria expert=8; "
        f"Qwen2-VL and Awaker, dense, {DENSE_DEFAULT_MESH})",
    )
    command.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="param and compute dtype")
    command.add_argument("--batch", type=positive_int, default=8, help="rows generated together")
    command.add_argument("--max-length", type=positive_int, default=8192, help="KV cache length (prompt + new tokens)")
    command.add_argument(
        "--prompt-length",
        type=positive_int,
        default=None,
        help="prefill length, rounded up to its bucket as generate() pads it (default: half of --max-length)",
    )
    command.add_argument(
        "--target",
        default=None,
        help="compile for this accelerator, e.g. v5e:2x4 (TPU: pip install 'aria-jax[tpu]') or "
        "h100:8 (pip install 'aria-jax[gpu-compile]'); an unknown name lists the supported ones",
    )
    command.add_argument(
        "--moe-backend",
        default=None,
        help="routed-expert implementation to compile, as AriaTextConfig.moe_backend (default: the config's)",
    )
    add_kv_cache_dtype_option(command)
    command.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        default=None,
        help="weights quantized as from_pretrained(quantize=...) stores them",
    )
    command.add_argument("--group-size", type=positive_int, default=128, help="int4: inputs per scale")
    command.add_argument(
        "--json", default=None, metavar="PATH", help="with --target: write every figure to PATH as JSON"
    )
    command.add_argument(
        "--dump-hlo",
        default=None,
        metavar="DIR",
        help="with --target: write each compiled program's optimized HLO to DIR/<program>.txt",
    )
    command.set_defaults(run=run)


def default_mesh(config_path: str) -> str:
    """The --mesh default for the config's family, read without JAX (it must not start yet)."""
    from aria_jax.config import read_config_json
    from aria_jax.qwen2_vl.config import is_qwen2_vl

    try:
        return DENSE_DEFAULT_MESH if is_qwen2_vl(read_config_json(config_path)) else ARIA_DEFAULT_MESH
    except (ValueError, OSError):  # reported when the config is loaded
        return ARIA_DEFAULT_MESH


def run(args: argparse.Namespace) -> None:
    if args.mesh is None:
        args.mesh = default_mesh(args.config)
    if args.target:
        mesh_sizes = parse_mesh(args.mesh)
        prepare_target_environment(args.target)
    else:
        mesh_sizes = simulate_devices(args.mesh)
    if not args.target and (args.json or args.dump_hlo):
        raise UserError("--json and --dump-hlo need --target (the host-CPU plan prints memory only)")

    from aria_jax.families import config_from_directory
    from aria_jax.plan import check_plannable
    from aria_jax.pretrained import resolve_dtype
    from aria_jax.quantization import Quantization

    config = config_from_directory(args.config)
    check_plannable(config)
    if args.moe_backend and not config.text_config.moe_num_experts:
        raise UserError(f"--moe-backend: {args.config} is a dense model, with no routed experts")
    if args.moe_backend:
        config = dataclasses.replace(
            config, text_config=dataclasses.replace(config.text_config, moe_backend=args.moe_backend)
        )
    prompt_length = args.prompt_length or args.max_length // 2
    quantization = Quantization.of(args.quantize, args.group_size)
    if args.target:
        plan_for_target(args, mesh_sizes, config, resolve_dtype(args.dtype), prompt_length, quantization)
        return
    from aria_jax.plan import plan_memory
    from aria_jax.sharding import make_mesh

    mesh = make_mesh(**mesh_sizes)
    print(
        plan_memory(
            config,
            mesh,
            resolve_dtype(args.dtype),
            args.batch,
            args.max_length,
            prompt_length,
            quantization,
            args.kv_cache_dtype,
        ).table()
    )


def plan_for_target(
    args: argparse.Namespace, mesh_sizes: dict[str, int], config, dtype, prompt_length: int, quantization=None
) -> None:
    from aria_jax.accelerators import parse_target, prepare_environment, target_devices
    from aria_jax.plan import GenerationShape
    from aria_jax.plan_target import dump_hlo, plan_target, write_json
    from aria_jax.sharding import make_mesh

    target = parse_target(args.target)
    shape = GenerationShape.for_request(args.batch, prompt_length, args.max_length, args.kv_cache_dtype)
    prepare_environment(target)
    with native_stderr_discarded() if target.platform == "cuda" else contextlib.nullcontext():
        mesh = make_mesh(**mesh_sizes, devices=target_devices(target))
        result = plan_target(config, target, mesh, dtype, shape, quantization)
    print(result.table())
    if args.json:
        write_json(result, args.json)
    if args.dump_hlo:
        dump_hlo(result, args.dump_hlo)


def simulate_devices(mesh_text: str) -> dict[str, int]:
    """`plan` compiles for as many simulated CPU devices as the mesh has; JAX reads these
    settings when it starts, so they are made before anything imports JAX."""
    sizes = parse_mesh(mesh_text)
    devices = math.prod(sizes.values())
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return sizes


def prepare_target_environment(target_name: str) -> None:
    """`plan --target` compiles for an accelerator this machine does not have: JAX itself runs on
    the CPU (with libtpu installed and no TPU, a TPU client would start and print a trace), and
    the target's compiler is reached through its topology. Read when JAX loads, so set before
    anything imports it."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    if target_name.strip().lower().startswith("h100"):
        # The CUDA plugin refuses to load without CUDA libraries unless told that it only
        # compiles, and logs the missing driver on stderr whenever JAX loads it.
        os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
        with native_stderr_discarded():
            import jax  # noqa: F401  (loads the plugin now, quietly)


@contextlib.contextmanager
def native_stderr_discarded():
    """Drops what native libraries write to file descriptor 2 while this runs. Python errors
    are exceptions and still reach the one-line error report."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
