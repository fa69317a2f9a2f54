"""Memory plans: will a config fit a mesh? Compiled ahead of time, with no weights at all.

Prefill and decode are lowered with abstract arrays (`jax.ShapeDtypeStruct`, carrying their
shardings) and compiled for the mesh; the compiler's memory analysis gives each device's
bytes of arguments (params, KV cache), outputs and temporaries. On a machine without the
devices, a CPU mesh of as many simulated devices stands in: the partitioning, and so the
per-device params and KV cache, are the same. Temporaries are not: XLA:CPU multiplies bf16 in
float32 and keeps float32 copies of the weights it multiplies, which TPU and GPU compilers do
not. So on CPU a bf16 plan also compiles in float32, where no copy is made, and takes half of
that compile's temporaries as the estimate used to decide what fits (the bf16 compile's own
figure is printed too). XLA:CPU also lowers `ragged_dot` to a dense matmul over the local
experts, so prefill temporaries stay an upper bound.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from aria_jax.config import AriaConfig
from aria_jax.generate import DecodeState, Sampling, decode, prefill
from aria_jax.modeling import TextDecoder, multimodal_param_shapes
from aria_jax.sharding import check_layout, param_sharding_for
from aria_jax.weights import flatten_tree, unflatten_tree

DEVICE_MEMORY = {"v5e": 16e9, "v6e": 32e9, "H100": 80e9}


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Per-device bytes of one compiled step; `temporaries_estimate` is what fitting uses."""

    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    temporaries_estimate: int
    compile_seconds: float

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries_estimate


@dataclasses.dataclass(frozen=True)
class Plan:
    mesh_shape: dict[str, int]
    params_per_device: int
    cache_per_device: int
    steps: list[StepMemory]

    @property
    def peak(self) -> int:
        return max(step.peak for step in self.steps)

    def fits(self) -> dict[str, bool]:
        return {device: self.peak <= memory for device, memory in DEVICE_MEMORY.items()}

    def table(self) -> str:
        gb = 1e9
        mesh = ", ".join(f"{name}={size}" for name, size in self.mesh_shape.items())
        lines = [f"mesh {mesh}: per device, params {self.params_per_device / gb:.2f} GB, "
                 f"KV cache {self.cache_per_device / gb:.2f} GB"]
        for step in self.steps:
            lines.append(f"  {step.name:8s} arguments {step.arguments / gb:6.2f} GB  outputs {step.outputs / gb:6.2f} GB"
                         f"  (donated {step.aliased / gb:.2f} GB)  temporaries {step.temporaries_estimate / gb:6.2f} GB"
                         f" (as compiled here {step.temporaries / gb:.2f} GB)  peak {step.peak / gb:6.2f} GB"
                         f"  (compiled in {step.compile_seconds:.0f} s)")
        lines.append("  fits: " + ", ".join(f"{device} ({memory / gb:.0f} GB) {'yes' if ok else 'no'}"
                                          for (device, ok), memory in zip(self.fits().items(), DEVICE_MEMORY.values())))
        return "\n".join(lines)


def _per_device_bytes(abstract) -> int:
    """Bytes one device holds of every array in `abstract` (ShapeDtypeStructs with shardings)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(abstract):
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard_shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _compile(lowered):
    """The compiled step, its memory analysis and its compile time."""
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, compiled.memory_analysis(), time.perf_counter() - start


def plan_memory(config: AriaConfig, mesh, dtype, batch: int, max_length: int, prompt_length: int) -> Plan:
    """Compiles prefill (a `prompt_length` prompt into a `max_length` cache) and one decode chunk
    for `batch` rows on `mesh`, and returns each device's memory."""
    check_layout(config, mesh)
    dtype = jnp.dtype(dtype)
    compiled = _compile_steps(config, mesh, dtype, batch, max_length, prompt_length)
    estimates = [analysis.temp_size_in_bytes for _, analysis, _, _ in compiled]
    if jax.default_backend() == "cpu" and dtype.itemsize < 4:
        reference = _compile_steps(config, mesh, jnp.dtype(jnp.float32), batch, max_length, prompt_length)
        estimates = [analysis.temp_size_in_bytes * dtype.itemsize // 4 for _, analysis, _, _ in reference]
    steps = [
        StepMemory(name, a.argument_size_in_bytes, a.output_size_in_bytes, a.alias_size_in_bytes,
                   a.temp_size_in_bytes, estimate, seconds)
        for (name, a, seconds, _), estimate in zip(compiled, estimates)
    ]
    params, state = compiled[0][3], compiled[1][3]
    return Plan(dict(zip(mesh.axis_names, mesh.axis_sizes)), _per_device_bytes(params),
                _per_device_bytes(state.cache), steps)


def _compile_steps(config: AriaConfig, mesh, dtype, batch: int, max_length: int, prompt_length: int) -> list:
    """[(name, memory analysis, compile seconds, abstract input)] for prefill (input: the
    params) and decode (input: the decode state)."""
    text = config.text_config
    boxed = multimodal_param_shapes(config, dtype)
    sharding_for = param_sharding_for(boxed, mesh)
    flat = flatten_tree(jax.tree_util.tree_map(lambda p: p.value, boxed, is_leaf=lambda x: hasattr(x, "names")))
    params = unflatten_tree({path: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding_for(path))
                             for path, leaf in flat.items()})
    replicated = NamedSharding(mesh, P())

    def host(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    sampling = Sampling(host((batch,), jnp.float32), host((batch,), jnp.int32), host((batch,), jnp.float32),
                        host((batch, 2), jnp.uint32))
    stop_ids = host((8,), jnp.int32)
    capacity = max_length - prompt_length

    def prefill_step(params, input_ids, attention_mask, sampling, stop_ids):
        decoder = TextDecoder(text, dtype=dtype, param_dtype=dtype)
        embeds = decoder.apply({"params": params["language_model"]}, input_ids, method=TextDecoder.embed)
        return prefill(params["language_model"], embeds, attention_mask, sampling, stop_ids, config=text,
                       cache_length=max_length, max_new_tokens_capacity=capacity, dtype=dtype)

    def decode_step(params, state, sampling, stop_ids):
        return decode(params["language_model"], state, 16, capacity, sampling, stop_ids, config=text,
                      prompt_len=prompt_length, dtype=dtype)

    with jax.set_mesh(mesh):
        prefill_jit = jax.jit(prefill_step)
        prefill_args = (params, host((batch, prompt_length), jnp.int32), host((batch, prompt_length), jnp.int32),
                        sampling, stop_ids)
        compiled_prefill, prefill_memory, prefill_seconds = _compile(prefill_jit.lower(*prefill_args))
        state: DecodeState = jax.tree_util.tree_map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            jax.eval_shape(prefill_jit, *prefill_args), compiled_prefill.output_shardings)
        _, decode_memory, decode_seconds = _compile(
            jax.jit(decode_step, donate_argnums=1).lower(params, state, sampling, stop_ids))
    return [("prefill", prefill_memory, prefill_seconds, params), ("decode", decode_memory, decode_seconds, state)]

