"""Device meshes and where every parameter and activation lives on them.

The mesh has three named axes: `data` (batch rows), `expert` (the routed experts of every MoE
layer) and `tensor` (attention heads, MLP width, vocabulary, and the experts' model dimension).
One table maps the logical axis names that every parameter carries
(`nn.with_logical_partitioning`) onto them; a logical axis that is not in the table, or whose
size does not divide over its mesh axes, is replicated. The MoE layer runs its experts under
`jax.shard_map` over the `expert` and `tensor` axes (`moe.py`); everything else is left to the
compiler's propagation.

The shared experts split their width over the `expert` axis and, like the routed ones, their
model dimension over `tensor`; embedding and lm_head split their vocabulary over both; the
decoder's attention splits its model dimension over `expert` and its heads over `tensor`. Decode
reads every weight it touches once per token, so a weight replicated over the `expert` axis would
cost its full size on every chip.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aria_jax.config import AriaConfig, AriaTextConfig

MESH_AXES = ("data", "expert", "tensor")

LOGICAL_TO_MESH = {
    # Rows are split over the expert axis too: attention and the KV cache then divide over every
    # device, and the MoE gathers the tokens of all rows for its experts (replicated in, psum out).
    "batch": ("data", "expert"),
    "experts": "expert",
    "expert_embed": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "heads": "tensor",
    # The decoder attention's model dimension: its weights divide over the expert axis whatever
    # the head count (Aria's 20 heads do not divide over 8); decode reads only its own slice.
    "attention_embed": "expert",
    "mlp": "tensor",
    "shared_mlp": "expert",
    # The embedding and lm_head split their vocabulary over every device, keeping their model
    # dimension ("vocab_embed") whole: each device then reads and multiplies only its own rows.
    "vocab": ("tensor", "expert"),
}


class LayoutError(ValueError):
    """A mesh that does not fit the model or the machine; the message suggests one that does."""


def make_mesh(data: int = 1, expert: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A (data, expert, tensor) mesh over `devices` (default: all devices of all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise LayoutError(f"mesh axis {name}={size!r} must be a positive integer")
    if data * expert * tensor != len(devices):
        raise LayoutError(
            f"data={data} x expert={expert} x tensor={tensor} = {data * expert * tensor} devices, "
            f"but there are {len(devices)}; the sizes must multiply to the device count "
            f"(for example expert={len(devices)})"
        )
    # Auto axes: the compiler propagates shardings through the model; only the experts are
    # placed by hand, under shard_map.
    return jax.make_mesh(
        (data, expert, tensor), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices
    )


def compile_platform() -> str:
    """The platform of the program being traced: that of the mesh's devices (`aria-jax plan
    --target` compiles for a TPU on a CPU host), else JAX's default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def compiling_for_gpu() -> bool:
    """Whether the program being traced is for an NVIDIA GPU (JAX names the platform either way)."""
    return compile_platform() in ("gpu", "cuda")


def pallas_interpreted(kernel_platform: str) -> bool:
    """Whether a Pallas kernel written for `kernel_platform` ("tpu" or "gpu") runs in Pallas'
    interpreter: the program being traced is for another platform (tests run accelerator kernels
    on CPU this way)."""
    compiled_for = "gpu" if compiling_for_gpu() else compile_platform()
    return compiled_for != kernel_platform


def on_several_devices() -> bool:
    """Whether the program being traced runs on a mesh of more than one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and math.prod(mesh.axis_sizes) > 1


def on_one_cpu() -> bool:
    """Whether the program being traced is for one CPU device, not a mesh of several. There
    generation takes paths of its own around XLA:CPU's copies of sliced weights; a mesh of CPU
    devices (tests, `aria-jax plan` on the host) runs the accelerators' program."""
    return compile_platform() == "cpu" and not on_several_devices()


def mesh_axis_size(mesh, name: str) -> int:
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1) if mesh is not None else 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_layout(config: AriaConfig | AriaTextConfig, mesh, quantization=None) -> None:
    """Every sharded dimension divides over its mesh axis; otherwise say which and what fits.
    With int4 `quantization` (`aria_jax.quantization`), the routed experts' groups along their
    model dimension must divide over `tensor` too: each shard dequantizes its own slice."""
    text = getattr(config, "text_config", config)
    tensor_dims = {
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "vocab_size": text.vocab_size,
    }
    if text.moe_num_experts:
        tensor_dims["hidden_size"] = text.hidden_size  # the experts' model dimension
    else:
        tensor_dims["intermediate_size"] = text.intermediate_size  # the dense MLP's width
    if isinstance(config, AriaConfig):
        tensor_dims["vision num_attention_heads"] = config.vision_config.num_attention_heads
        tensor_dims["vision intermediate_size"] = config.vision_config.intermediate_size
    elif hasattr(config, "vision_config"):  # Qwen2-VL's tower
        tensor_dims["vision num_heads"] = config.vision_config.num_heads
        tensor_dims["vision mlp width"] = config.vision_config.mlp_width
    expert_size, tensor_size = mesh_axis_size(mesh, "expert"), mesh_axis_size(mesh, "tensor")
    devices = math.prod(mesh.axis_sizes)
    expert_dims = (
        {"moe_num_experts": text.moe_num_experts, "shared expert width": text.shared_expert_size}
        if text.moe_num_experts
        else {}
    )
    for name, value in expert_dims.items():
        if value % expert_size:
            valid = [d for d in _divisors(math.gcd(*expert_dims.values())) if devices % d == 0]
            raise LayoutError(
                f"{name}={value} does not divide over expert={expert_size}; "
                f"expert sizes that fit {devices} devices: {', '.join(map(str, valid))}"
            )
    if quantization is not None and quantization.scheme == "int4" and text.hidden_size > quantization.group_size:
        tensor_dims["hidden_size / group_size"] = text.hidden_size // quantization.group_size
    tensor_ok = math.gcd(*tensor_dims.values())
    for name, value in tensor_dims.items():
        if value % tensor_size:
            valid = [d for d in _divisors(tensor_ok) if devices % d == 0]
            suggestion = max(valid)
            other_axis = "expert" if text.moe_num_experts else "data"  # a dense model has no experts to split
            raise LayoutError(
                f"{name}={value} does not divide over tensor={tensor_size}; tensor sizes that fit this model: "
                f"{', '.join(map(str, valid))} (for example {other_axis}={devices // suggestion}, tensor={suggestion})"
            )


def mesh_axes_for(logical: str | None, size: int, mesh) -> tuple[str, ...] | None:
    """The mesh axes a dimension of `size` with this logical name splits over on `mesh`: those
    of the table that the mesh has, or none if their product does not divide `size`."""
    axes = LOGICAL_TO_MESH.get(logical) if logical else None
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in mesh.axis_names)
    split = math.prod(mesh_axis_size(mesh, a) for a in axes)
    return axes if axes and size % split == 0 else None


def param_sharding_for(boxed_shapes, mesh) -> Callable[[tuple[str, ...]], NamedSharding]:
    """`sharding_for(path)` for the loaders, from an `eval_shape`d (boxed) params tree."""
    leaves = jax.tree_util.tree_flatten_with_path(boxed_shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    specs = {}
    for key_path, boxed in leaves:
        names = boxed.names if isinstance(boxed, nn.Partitioned) else (None,) * len(boxed.shape)
        specs[tuple(k.key for k in key_path)] = P(
            *(mesh_axes_for(name, size, mesh) for name, size in zip(names, nn.meta.unbox(boxed).shape))
        )
    return lambda path: NamedSharding(mesh, specs[path])


def constrain(x: jax.Array, *logical_axes: str | None) -> jax.Array:
    """Pins `x` to the layout its logical axes map to on the current mesh (`jax.set_mesh`); a
    dimension that does not divide over its mesh axes stays whole. Nothing without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(
        x, P(*(mesh_axes_for(name, size, mesh) for size, name in zip(x.shape, logical_axes)))
    )


def take_rows(table: jax.Array, ids: jax.Array, logical: str) -> jax.Array:
    """`table[ids]` for a table whose rows (logical axis `logical`) may split over the mesh.
    Fewer ids than a shard holds rows (a decode step's tokens): each shard looks up the ids that
    fall in its rows and the rows are summed over the shards, only one of them non-zero. XLA:GPU
    would otherwise gather the whole table onto every device at every step (full Aria on 8 H100:
    514 MB, 0.5 ms a token). More ids: the compiler's own lookup."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = None if mesh.empty else mesh_axes_for(logical, table.shape[0], mesh)
    shard_rows = table.shape[0] // math.prod(mesh_axis_size(mesh, axis) for axis in axes or ())
    if not axes or ids.size >= shard_rows:
        return jnp.take(table, ids, axis=0)

    def rows_here(table_shard, ids):
        local = ids - jax.lax.axis_index(axes) * shard_rows
        here = (local >= 0) & (local < shard_rows)
        rows = jnp.where(here[..., None], jnp.take(table_shard, jnp.where(here, local, 0), axis=0), 0)
        # float32: XLA:CPU cannot compile a bfloat16 all-reduce; exact, one term is not zero
        return jax.lax.psum(rows.astype(jnp.float32), axes).astype(table.dtype)

    return jax.shard_map(rows_here, axis_names=set(mesh.axis_names), in_specs=(P(axes), P()), out_specs=P())(table, ids)


def replicate_to(mesh, array) -> jax.Array:
    """A host array (the same on every host) as a replicated global array on `mesh`. Works with
    several hosts, where a plain numpy argument would not."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, NamedSharding(mesh, P()), lambda index: array[index])


# Options of each platform's compiler for every program the models compile. XLA's TPU compiler
# rewrites a matmul of one row (decode at batch 1, the last token's logits) as a product and a sum
# on the vector units, which its own estimate puts at 2-4x the time of reading the weights and
# above the matrix units' (full Aria, v5e 2x4, decode at batch 1: 9.17 -> 8.47 ms per token).
# Not with int4 weights: the product and sum fuse their conversion, where the matrix units take
# them converted into a copy first (int4 decode at batch 1: 9.30 ms with the rewrite, 9.71 without).
COMPILER_OPTIONS = {"tpu": {"xla_tpu_enable_dot_strength_reduction": False}}


def jit_for(platform: str, function: Callable, int4_weights: bool = False, **jit_options) -> Callable:
    """`jax.jit(function, **jit_options)` with the compiler options of `platform`."""
    options = None if int4_weights else COMPILER_OPTIONS.get(platform)
    return jax.jit(function, compiler_options=options, **jit_options)


class MeshRunner:
    """Runs jitted functions on a mesh, or plainly when there is none: host arrays become
    replicated global arrays, and the mesh becomes the context that the MoE's shard_map and the
    sharding constraints read."""

    def __init__(self, mesh: jax.sharding.Mesh | None = None, int4_weights: bool = False):
        self.mesh, self.int4_weights = mesh, int4_weights

    @property
    def platform(self) -> str:
        """Where the programs run: the mesh's devices (`aria-jax plan --target`: an accelerator's
        topology), else JAX's default backend."""
        return self.mesh.devices.flat[0].platform if self.mesh is not None else jax.default_backend()

    def jit(self, function: Callable, **jit_options) -> Callable:
        """`function` jitted with its platform's compiler options (`COMPILER_OPTIONS`; `int4_weights`:
        the params hold int4 weights), run on the mesh."""
        return self.wrap(jit_for(self.platform, function, self.int4_weights, **jit_options))

    def wrap(self, jitted: Callable) -> Callable:
        if self.mesh is None:
            return jitted

        def on_mesh(*args, **kwargs):
            def to_mesh(x):
                return replicate_to(self.mesh, x) if isinstance(x, (np.ndarray, np.generic)) else x

            args, kwargs = jax.tree_util.tree_map(to_mesh, (args, kwargs))
            with jax.set_mesh(self.mesh):
                return jitted(*args, **kwargs)

        def trace(*args, **kwargs):
            """`jitted.trace` on the mesh (`aria-jax plan` lowers and compiles the result)."""
            with jax.set_mesh(self.mesh):
                return jitted.trace(*args, **kwargs)

        on_mesh.trace = trace
        return on_mesh
