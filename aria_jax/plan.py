"""Plans: what generation costs on a mesh, compiled ahead of time with no weights at all.

`compile_generation` compiles the very jitted functions `generate()` runs (the model's prompt
embedding, then `Generator.prefill` and `Generator.decode`, see `generation_functions`), lowered
with abstract arguments (`jax.ShapeDtypeStruct`s carrying the shardings that `generate()`'s
arguments have: the params' from the sharding table, replicated host arrays, and each program's
inputs laid out as the previous program's compiled outputs). Generation runs one prefill, then
(when no stop string needs checking on the host) one decode call that makes every remaining
token; the plan compiles them for a prompt of `prompt_length` tokens (rounded up to its bucket,
as `generate()` pads it) and a KV cache of `max_length`.

The model is the config's family's (`generation_model`): Aria, Qwen2-VL or Awaker2.5-VL, each
with the inputs its `prefill_inputs` gives prefill for a text prompt: Qwen2-VL's M-RoPE positions
(B, T, 3), a host array, and Awaker's router inputs, the outputs of its gate-inputs program
(compiled here as the embedding is, for their layout). Image prompts are not planned: the vision
tower's weights are counted as held on the device, its programs are not compiled.

`plan_memory` is the host-CPU plan: each device's memory, on a CPU mesh of as many simulated
devices as the mesh has. The partitioning, and so the per-device params and KV cache, are the
same as on the real devices. Temporaries are not: XLA:CPU multiplies bf16 in float32 and keeps
float32 copies of the weights it multiplies, which TPU and GPU compilers do not. So on CPU a
bf16 plan also compiles in float32, where no copy is made, and takes half of that compile's
temporaries as the estimate used to decide what fits (the bf16 compile's own figure is printed
too). XLA:CPU also lowers `ragged_dot` to a dense matmul over the local experts, so prefill
temporaries stay an upper bound. `aria_jax.plan_target` compiles for real accelerators instead.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from aria_jax.buckets import prompt_bucket
from aria_jax.config import AriaConfig, ConfigError
from aria_jax.device_loop import Sampling
from aria_jax.families import param_layout
from aria_jax.host_loop import STOP_ID_SLOTS
from aria_jax.kv_cache import check_kv_cache_dtype
from aria_jax.pretrained import AriaForConditionalGeneration
from aria_jax.quantization import Quantization, array_bytes, quantized_shapes
from aria_jax.qwen2_vl.config import AwakerConfig
from aria_jax.sharding import check_layout, param_sharding_for
from aria_jax.weights import flatten_tree, unflatten_tree

DEVICE_MEMORY = {"v5e": 16e9, "v6e": 32e9, "H100": 80e9}


@dataclasses.dataclass(frozen=True)
class GenerationShape:
    """The shapes one `generate()` request compiles for."""

    batch: int
    prompt_length: int  # the prompt's bucket: generate() left-pads prompts to it
    cache_length: int  # `generate(..., max_length=)`: the KV cache length
    kv_cache_dtype: str | None = None  # `generate(..., kv_cache_dtype=)`

    @classmethod
    def for_request(
        cls, batch: int, prompt_length: int, max_length: int, kv_cache_dtype: str | None = None
    ) -> "GenerationShape":
        bucket = prompt_bucket(prompt_length)
        if bucket >= max_length:
            padded = f" (padded to its bucket, {bucket})" if bucket != prompt_length else ""
            raise ValueError(
                f"--prompt-length {prompt_length}{padded} leaves no room to generate in --max-length {max_length}"
            )
        check_kv_cache_dtype(kv_cache_dtype)
        return cls(batch, bucket, max_length, kv_cache_dtype)

    @property
    def max_new_tokens(self) -> int:
        return self.cache_length - self.prompt_length

    @property
    def decode_steps(self) -> int:
        """Loop iterations of the one decode call: prefill samples the first new token."""
        return self.max_new_tokens - 1


@dataclasses.dataclass(frozen=True)
class CompiledProgram:
    name: str
    compiled: object  # jax.stages.Compiled
    compile_seconds: float
    resident_bytes: int  # per device: weights the model holds that are not arguments of this program
    refusal: str | None = None  # the compiler's first answer, when it refused the program


@dataclasses.dataclass(frozen=True)
class RefusedProgram:
    """A program the compiler refused, even when asked again (`when_refused`)."""

    name: str
    message: str


def check_plannable(config) -> None:
    """Plans are for the multimodal models (Aria, Qwen2-VL, Awaker2.5-VL), whose text prompts
    `generate()` embeds before prefill."""
    if not hasattr(config, "vision_config"):
        raise ConfigError(
            f"plan takes a multimodal config (Aria, Qwen2-VL or Awaker2.5-VL), got a {type(config).__name__}"
        )


def generation_model(config, params: dict, dtype, mesh):
    """The model `generate()` runs for `config`'s family, holding `params` (abstract or real)."""
    check_plannable(config)
    if isinstance(config, AriaConfig):
        return AriaForConditionalGeneration(config, params, dtype, mesh=mesh)
    from aria_jax.qwen2_vl.pretrained import AwakerForConditionalGeneration, Qwen2VLForConditionalGeneration

    model_class = (
        AwakerForConditionalGeneration if isinstance(config, AwakerConfig) else Qwen2VLForConditionalGeneration
    )
    return model_class(config, params, dtype, mesh=mesh)


def abstract_params(config, mesh, dtype, quantization: Quantization | None = None) -> dict:
    """The multimodal params as ShapeDtypeStructs, each with the sharding the loaders give it
    (quantized as `quantization` stores them)."""
    boxed = quantized_shapes(param_layout(config, dtype)[1], quantization)
    sharding_for = param_sharding_for(boxed, mesh)
    flat = flatten_tree(jax.tree_util.tree_map(lambda p: p.value, boxed, is_leaf=lambda x: hasattr(x, "names")))
    return unflatten_tree(
        {path: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding_for(path)) for path, leaf in flat.items()}
    )


def total_bytes(abstract) -> int:
    """Bytes of every array in `abstract`, each counted once (as a checkpoint holds them)."""
    return sum(array_bytes(leaf.shape, leaf.dtype) for leaf in jax.tree_util.tree_leaves(abstract))


def per_device_bytes(abstract) -> int:
    """Bytes one device holds of every array in `abstract` (ShapeDtypeStructs with shardings)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(abstract):
        total += array_bytes(leaf.sharding.shard_shape(leaf.shape), leaf.dtype)
    return total


def _outputs_as_inputs(compiled) -> object:
    """A compiled program's outputs as abstract arguments of the next program."""

    def as_input(info, sharding):
        return jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding)

    return jax.tree_util.tree_map(as_input, compiled.out_info, compiled.output_shardings)


def _unused_argument_bytes(traced, abstract_params) -> int:
    """Per-device bytes of the params (the first argument) that the traced function never
    reads: jit drops them from the compiled program, but the device still holds them."""
    jaxpr = traced.jaxpr.jaxpr
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    leaves = jax.tree_util.tree_leaves(abstract_params)
    return sum(per_device_bytes(leaf) for leaf, var in zip(leaves, jaxpr.invars) if id(var) not in read)


def compile_generation(
    config,
    mesh,
    dtype,
    shape: GenerationShape,
    compiler_options: dict | None = None,
    when_refused=None,
    quantization: Quantization | None = None,
) -> list[CompiledProgram | RefusedProgram]:
    """Compiles prefill and decode for `shape` on `mesh` (its devices may be an accelerator's
    topology). When the compiler refuses a program, `when_refused(error)` may return compiler
    options to compile it again with (on TPU: with the memory check off, to report what a
    program that does not fit would need); the program then carries the refusal, or, refused
    again, ends the list (the next program takes its outputs). Without `when_refused` (or when
    it returns None) the error propagates."""
    check_plannable(config)
    check_layout(config, mesh, quantization)
    dtype = jnp.dtype(dtype)
    params = abstract_params(config, mesh, dtype, quantization)
    text_params = params["language_model"]
    other_weights = per_device_bytes({k: v for k, v in params.items() if k != "language_model"})
    model = generation_model(config, params, dtype, mesh)
    embed_prompt, prefill, decode = model.generation_functions()
    replicated = NamedSharding(mesh, P())

    def host_array(shape, dtype):
        """A numpy argument: generate() places it replicated on the mesh (`MeshRunner`)."""
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    batch, prompt = shape.batch, shape.prompt_length
    ids = host_array((batch, prompt), jnp.int32)
    mask = host_array((batch, prompt), jnp.int32)
    sampling = Sampling(
        host_array((batch,), jnp.float32),
        host_array((batch,), jnp.int32),
        host_array((batch,), jnp.float32),
        host_array((batch, 2), jnp.uint32),
    )
    stop_ids = host_array((STOP_ID_SLOTS,), jnp.int32)
    python_int = jax.ShapeDtypeStruct((), jnp.int32, weak_type=True)  # the chunk and max_new_tokens

    def compile_program(name, traced, params_argument, weights_held_besides):
        with jax.set_mesh(mesh):
            lowered = traced.lower()
        start, refusal = time.perf_counter(), None
        try:
            compiled = lowered.compile(compiler_options=compiler_options)
        except Exception as error:  # a refusal can be a finding: the caller decides
            retry_options = when_refused(error) if when_refused is not None else None
            if retry_options is None:
                raise
            refusal = " ".join(str(error).split())
            try:
                compiled = lowered.compile(compiler_options={**(compiler_options or {}), **retry_options})
            except Exception as second:  # noqa: BLE001  (reported, as the first refusal is)
                return RefusedProgram(name, f"{refusal}; asked again: {' '.join(str(second).split())}")
        resident = weights_held_besides + _unused_argument_bytes(traced, params_argument)
        return CompiledProgram(name, compiled, time.perf_counter() - start, resident, refusal)

    # A text prompt's embedding (no images) runs first; compiled here for the layout of its
    # output, which is prefill's input.
    embedding = compile_program("prompt embedding", embed_prompt.trace(params, ids), params, 0)
    if isinstance(embedding, RefusedProgram):
        return [embedding]
    embeds = _outputs_as_inputs(embedding.compiled)
    prefill_inputs = {}
    if not isinstance(config, AriaConfig):
        # M-RoPE's (temporal, height, width) positions, computed on the host (`_prompt_positions`).
        prefill_inputs["position_ids"] = host_array((batch, prompt, 3), jnp.int32)
    if isinstance(config, AwakerConfig):
        # Awaker's routers read the span means of the prompt's embeddings (`prefill_inputs`).
        gates = compile_program(
            "gate inputs",
            model._gate_inputs.trace(
                params, ids, embeds, host_array((batch, 2), jnp.int32), plain_after_prompt=model.gate == "released"
            ),
            params,
            0,
        )
        if isinstance(gates, RefusedProgram):
            return [gates]
        prefill_inputs["gate_inputs"] = _outputs_as_inputs(gates.compiled)
    prefill_program = compile_program(
        "prefill",
        prefill.trace(
            text_params,
            embeds,
            mask,
            sampling,
            stop_ids,
            **prefill_inputs,
            cache_length=shape.cache_length,
            max_new_tokens_capacity=shape.max_new_tokens,
            kv_cache_dtype=shape.kv_cache_dtype,
        ),
        text_params,
        other_weights,
    )
    if isinstance(prefill_program, RefusedProgram):
        return [prefill_program]
    state = _outputs_as_inputs(prefill_program.compiled)
    decode_program = compile_program(
        "decode",
        decode.trace(text_params, state, python_int, python_int, sampling, stop_ids, prompt_len=prompt),
        text_params,
        other_weights,
    )
    return [prefill_program, decode_program]


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Per-device bytes of one compiled step; `temporaries_estimate` is what fitting uses."""

    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    temporaries_estimate: int
    resident: int  # weights held on the device that are not arguments (vision tower, projector)
    compile_seconds: float

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries_estimate + self.resident


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
        lines = [
            f"mesh {mesh}: per device, params {self.params_per_device / gb:.2f} GB, "
            f"KV cache {self.cache_per_device / gb:.2f} GB"
        ]
        for step in self.steps:
            lines.append(
                f"  {step.name:8s} arguments {step.arguments / gb:6.2f} GB  outputs {step.outputs / gb:6.2f} GB"
                f"  (donated {step.aliased / gb:.2f} GB)"
                f"  temporaries {step.temporaries_estimate / gb:6.2f} GB"
                f" (as compiled here {step.temporaries / gb:.2f} GB)"
                f"  other weights {step.resident / gb:.2f} GB"
                f"  peak {step.peak / gb:6.2f} GB  (compiled in {step.compile_seconds:.0f} s)"
            )
        lines.append(
            "  fits: "
            + ", ".join(
                f"{device} ({memory / gb:.0f} GB) {'yes' if ok else 'no'}"
                for (device, ok), memory in zip(self.fits().items(), DEVICE_MEMORY.values())
            )
        )
        return "\n".join(lines)


def plan_memory(
    config,
    mesh,
    dtype,
    batch: int,
    max_length: int,
    prompt_length: int,
    quantization: Quantization | None = None,
    kv_cache_dtype: str | None = None,
) -> Plan:
    """Compiles generation's prefill and decode for `batch` rows on `mesh` (host CPU devices)
    and returns each device's memory."""
    dtype = jnp.dtype(dtype)
    shape = GenerationShape.for_request(batch, prompt_length, max_length, kv_cache_dtype)
    programs = compile_generation(config, mesh, dtype, shape, quantization=quantization)
    estimates = [p.compiled.memory_analysis().temp_size_in_bytes for p in programs]
    if jax.default_backend() == "cpu" and dtype.itemsize < 4:
        reference = compile_generation(config, mesh, jnp.dtype(jnp.float32), shape, quantization=quantization)
        estimates = [p.compiled.memory_analysis().temp_size_in_bytes * dtype.itemsize // 4 for p in reference]
    steps = []
    for program, estimate in zip(programs, estimates):
        memory = program.compiled.memory_analysis()
        steps.append(
            StepMemory(
                program.name,
                memory.argument_size_in_bytes,
                memory.output_size_in_bytes,
                memory.alias_size_in_bytes,
                memory.temp_size_in_bytes,
                estimate,
                program.resident_bytes,
                program.compile_seconds,
            )
        )
    params = abstract_params(config, mesh, dtype, quantization)
    cache = _outputs_as_inputs(programs[0].compiled).cache
    return Plan(dict(zip(mesh.axis_names, mesh.axis_sizes)), per_device_bytes(params), per_device_bytes(cache), steps)
