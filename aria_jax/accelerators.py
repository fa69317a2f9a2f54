"""Accelerators we compile for without owning one: their chips' figures and their devices.

`aria-jax plan --target NAME` compiles with the real TPU compiler (from the `libtpu` wheel) or
the real XLA:GPU compiler (from `jax-cuda12-plugin`), on a CPU-only machine: JAX describes the
devices of a topology that is not attached (`jax.experimental.topologies`), and programs lowered
for a mesh of those devices compile as they would on the real machine. Nothing runs.

JAX itself must run on the CPU (`JAX_PLATFORMS=cpu`, set before JAX loads: with libtpu
installed and no TPU, a TPU client would start and print a trace), and `prepare_environment`
must run before the first topology is made: libtpu warns on stderr without its variables.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip's public figures (bf16 matrix peak, HBM bandwidth and size, interconnect).

    `clock_hz` converts the TPU compiler's `estimated_cycles` to seconds. Google publishes no
    clock for v5e, v6e or v5p, so it is the published bf16 peak divided by the matrix units'
    flops per cycle (128x128 or 256x256 multiply-accumulate arrays, 2 flops each). The same
    rule gives v4's published 1050 MHz, and the compiler's own estimate of a large bf16 matmul
    comes out at 80-100% of the published peak with these clocks (tests/test_plan_target.py
    checks it). XLA:GPU writes no per-instruction estimate, so GPUs need no clock.

    `interconnect_bytes_per_second` is the chip's bidirectional ICI (TPU) or NVLink (GPU)
    bandwidth, used only to cost collectives that carry no compiler estimate.
    """

    name: str
    peak_flops: float  # bf16, dense
    hbm_bytes_per_second: float
    hbm_bytes: int
    interconnect_bytes_per_second: float
    clock_hz: float | None


def _tpu_clock(peak_flops: float, matrix_units: int, array_side: int) -> float:
    return peak_flops / (matrix_units * array_side * array_side * 2)


# Public specifications (cloud.google.com/tpu/docs/v5e, v6e, v5p; NVIDIA's H100 SXM datasheet).
CHIPS = {
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16 * GIB, 400e9, _tpu_clock(197e12, 4, 128)),
    # Google's page says two MXUs in one place and four in another; the compiler's estimate of a
    # large matmul (455k flops per cycle) only fits four 256x256 units.
    "v6e": Chip("TPU v6e", 918e12, 1640e9, 32 * GIB, 800e9, _tpu_clock(918e12, 4, 256)),
    # megacore: the two TensorCores of a chip are one device, with 4 MXUs each.
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95 * GIB, 1200e9, _tpu_clock(459e12, 8, 128)),
    "v4": Chip("TPU v4", 275e12, 1200e9, 32 * GIB, 300e9, _tpu_clock(275e12, 8, 128)),
    # 989 TFLOP/s dense bf16, 3.35 TB/s; memory is the device_memory_size of the shipped target
    # description (79.1 GiB, sold as 80 GB); NVLink 4: 900 GB/s.
    "h100": Chip("NVIDIA H100 SXM", 989e12, 3.35e12, 84_942_979_072, 900e9, None),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A `--target` name: a chip and how many of it, arranged as the hardware arranges them."""

    name: str
    chip_key: str
    shape: tuple[int, ...]

    @property
    def chip(self) -> Chip:
        return CHIPS[self.chip_key]

    @property
    def platform(self) -> str:
        return "cuda" if self.chip_key == "h100" else "tpu"

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def compiler_options(self) -> dict:
        if self.platform == "cuda":
            # XLA:GPU sizes CUB's radix sort (its choice for large sorts, like the vocabulary
            # sorts of sampling) by asking a GPU; without one it compiles its own sort kernel.
            return {"xla_gpu_enable_cub_radix_sort": False}
        return {}


# Slices the TPU compiler accepts by name (others, like `v5litepod-8`, its parser rejects), and
# the GPU target: H100 SXM on one host.
TPU_TOPOLOGIES = {"v5e": ("2x2", "2x4", "4x4"), "v6e": ("2x2", "2x4"), "v5p": ("2x2x1", "2x2x2"), "v4": ("2x2x1",)}
GPU_COUNTS = (1, 2, 4, 8)


def supported_targets() -> list[str]:
    names = [f"{chip}:{shape}" for chip, shapes in TPU_TOPOLOGIES.items() for shape in shapes]
    return names + [f"h100:{count}" for count in GPU_COUNTS]


class TargetError(ValueError):
    """A target that is not supported, or whose compiler is not installed."""


def parse_target(name: str) -> Target:
    chip, _, shape = name.strip().lower().partition(":")
    valid = (chip in TPU_TOPOLOGIES and shape in TPU_TOPOLOGIES[chip]) or (
        chip == "h100" and shape.isdigit() and int(shape) in GPU_COUNTS
    )
    if not valid:
        raise TargetError(f"--target {name!r} is not supported; supported targets: {', '.join(supported_targets())}")
    return Target(f"{chip}:{shape}", chip, tuple(int(size) for size in shape.split("x")))


# What the compile-only machinery of each platform needs in the environment. libtpu reads the
# accelerator type and worker list when it loads and warns on stderr without them; the values
# only describe this (absent) host, the compiled topology is passed explicitly.
def _tpu_environment(target: Target) -> dict[str, str]:
    cores = target.num_chips * (2 if target.chip_key in ("v4", "v5p") else 1)
    accelerator = {"v5e": f"v5litepod-{target.num_chips}", "v6e": f"v6e-{target.num_chips}"}.get(
        target.chip_key, f"{target.chip_key}-{cores}"
    )
    return {
        "TPU_ACCELERATOR_TYPE": accelerator,
        "TPU_WORKER_HOSTNAMES": "localhost",
        # another process compiling for a TPU at the same time holds libtpu's lock file
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    }


def prepare_environment(target: Target) -> None:
    """Settings the target's compiler reads when it loads (at the first topology)."""
    if target.platform == "tpu":
        os.environ.update(_tpu_environment(target))
    else:
        # The plugin refuses to load without CUDA libraries unless told that it only compiles.
        os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"


def check_compiler_installed(target: Target) -> None:
    if target.platform == "tpu" and importlib.util.find_spec("libtpu") is None:
        raise TargetError(f"--target {target.name} needs the TPU compiler (libtpu): pip install 'aria-jax[tpu]'")
    if target.platform == "cuda" and importlib.util.find_spec("jax_cuda12_plugin") is None:
        raise TargetError(f"--target {target.name} needs the XLA:GPU compiler: pip install 'aria-jax[gpu-compile]'")


GPU_TARGET_DESCRIPTION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets", "h100_sxm.txtpb")


def target_devices(target: Target) -> list:
    """The devices of `target`'s topology, in the order the hardware numbers them."""
    from jax.experimental import topologies

    check_compiler_installed(target)
    if target.platform == "tpu":
        # Hosts of 2x4 chips (v5e, v6e) or 2x2x1 (v4, v5p), as the real slices are cabled.
        host = (2, 4) if len(target.shape) == 2 else (2, 2, 1)
        per_host = tuple(min(size, limit) for size, limit in zip(target.shape, host))
        per_host += (1,) * (3 - len(per_host))
        topology = topologies.get_topology_desc(
            topology_name=target.name,
            platform="tpu",
            chip_config_name="megacore" if target.chip_key in ("v4", "v5p") else "default",
            chips_per_host_bounds=per_host,
            wrap=(False, False, False),
        )
        return list(topology.devices)
    with open(GPU_TARGET_DESCRIPTION) as description:
        topology = topologies.get_topology_desc(
            platform="cuda", topology_name="", target_config=description.read(), topology=f"1x1x{target.num_chips}"
        )
    return list(topology.devices)
