"""`aria-jax plan --target`: generation compiled by a real accelerator's compiler, judged.

For each program `generate()` runs (prefill, then decode), per chip: the compiler's memory
figures and whether they fit the chip's HBM, the compiler's estimate of the program's time
(`hlo_cost`), and the roofline next to it (`roofline`): for decode, the bytes a step must read
over the HBM bandwidth of all chips; for prefill, its flops over the peak of all chips.

Decode is reported per token. `generate()` samples the first new token in prefill and makes one
decode call for the remaining `max_new_tokens - 1` (as long as no stop string needs checking on
the host), whose `while` loop runs one step per token and stops on data, so its trip count is
unknown to the compiler. The estimate per token is therefore one loop iteration plus the rest of
the call (its set-up and its ending) spread over the steps the call runs; both parts are printed.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp

from aria_jax.accelerators import Chip, Target
from aria_jax.hlo_cost import Cost, ProgramCost
from aria_jax.plan import (
    GenerationShape,
    RefusedProgram,
    abstract_params,
    compile_generation,
    per_device_bytes,
    total_bytes,
)
from aria_jax.quantization import Quantization
from aria_jax.roofline import decode_step_bytes, prefill_flops

GB = 1e9
HEAVIEST_SHOWN = 5


def compile_again_without_memory_check(error: Exception) -> dict | None:
    """The TPU compiler refuses a program that does not fit in HBM; compiled again with its
    memory check off, the program still reports what it would need."""
    if "RESOURCE_EXHAUSTED" in str(error):
        return {"xla_tpu_no_crash_on_oom": True}
    return None


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The compiler's estimate of a program, in seconds (per token for decode)."""

    seconds: float
    seconds_cheapest: float  # with every conditional at its cheapest branch
    compiler_share: float  # the fraction of `seconds` that is the compiler's own cycle estimate
    unknown_trip_loops: int  # loops of data-dependent length, counted once each
    step_seconds: float | None = None  # decode: one iteration of the decode loop
    call_seconds: float | None = None  # decode: the rest of one decode call
    steps_per_call: int | None = None


@dataclasses.dataclass(frozen=True)
class Roofline:
    seconds: float
    bytes: dict[str, int] | None = None  # decode: what a step must read, by kind
    flops: float | None = None  # prefill


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    other_weights: int  # held on the chip, not arguments of this program
    compile_seconds: float
    estimate: Estimate
    roofline: Roofline
    heaviest: list[dict]
    refusal: str | None = None  # the compiler refused it as it is (does not fit); figures from a second compile

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.other_weights

    @property
    def ratio(self) -> float:
        return self.estimate.seconds / self.roofline.seconds


@dataclasses.dataclass(frozen=True)
class UncompiledProgram:
    """A program with no figures: the compiler refused it, or it takes the outputs of one that was."""

    name: str
    reason: str


@dataclasses.dataclass(frozen=True)
class TargetPlan:
    target: Target
    mesh_shape: dict[str, int]
    shape: GenerationShape
    dtype: str
    moe_backend: str | None  # None: a dense decoder (Qwen2-VL, Awaker2.5-VL)
    params_per_chip: int
    programs: list[ProgramReport | UncompiledProgram]
    hlo: dict[str, str]
    quantization: Quantization | None = None
    params_in_all: int = 0

    @property
    def weights(self) -> str:
        """The weights' dtype, as `--quantize` made them."""
        if self.quantization is None:
            return self.dtype
        groups = f" in groups of {self.quantization.group_size}" if self.quantization.scheme == "int4" else ""
        return f"{self.quantization.scheme} weights{groups}, {self.dtype} compute"

    @property
    def chip(self) -> Chip:
        return self.target.chip

    def fits(self, program: ProgramReport | UncompiledProgram) -> bool:
        return isinstance(program, ProgramReport) and program.refusal is None and program.peak <= self.chip.hbm_bytes

    def to_json(self) -> dict:
        chip = self.chip
        programs = []
        for program in self.programs:
            entry = dataclasses.asdict(program)
            if isinstance(program, ProgramReport):
                entry.update(compiled=True, peak=program.peak, fits=self.fits(program), ratio=program.ratio)
            else:
                entry.update(compiled=False, fits=False)
            programs.append(entry)
        return {
            "target": self.target.name,
            "chips": self.target.num_chips,
            "chip": dataclasses.asdict(chip),
            "mesh": self.mesh_shape,
            "batch": self.shape.batch,
            "prompt_length": self.shape.prompt_length,
            "cache_length": self.shape.cache_length,
            "max_new_tokens": self.shape.max_new_tokens,
            "dtype": self.dtype,
            "kv_cache_dtype": self.shape.kv_cache_dtype,
            "moe_backend": self.moe_backend,
            "params_per_chip": self.params_per_chip,
            "params_in_all": self.params_in_all,
            "quantization": self.quantization and self.quantization.to_json(),
            "programs": programs,
            "note": "memory from the compiler; times are the compiler's estimates (on TPU) or a bytes/flops rule "
            "per instruction (where the compiler gives none, and on GPU), not timings",
        }

    def table(self) -> str:
        chip, shape = self.chip, self.shape
        mesh = ", ".join(f"{name}={size}" for name, size in self.mesh_shape.items())
        lines = [
            f"target {self.target.name}: {self.target.num_chips} x {chip.name} "
            f"({chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bytes_per_second / GB:.0f} GB/s, "
            f"{chip.hbm_bytes / 2**30:.1f} GiB HBM per chip); mesh {mesh}",
            f"batch {shape.batch}, prompt {shape.prompt_length}, KV cache {shape.cache_length} "
            f"({shape.max_new_tokens} new tokens{', int8' if shape.kv_cache_dtype == 'int8' else ''}), "
            f"{self.weights}{'' if self.moe_backend is None else f', moe_backend {self.moe_backend}'}; "
            f"params {self.params_in_all / GB:.2f} GB in all, {self.params_per_chip / GB:.2f} GB per chip",
        ]
        for program in self.programs:
            lines += self._program_lines(program)
        if self.target.platform == "tpu":
            lines.append(
                "Times are the TPU compiler's own estimates (a bytes/flops rule where it gives none), not timings."
            )
        else:
            lines.append(
                "XLA:GPU gives no time estimate: times are a bytes/flops rule applied to each instruction "
                "of the compiled program, not timings."
            )
        return "\n".join(lines)

    def _program_lines(self, program: ProgramReport | UncompiledProgram) -> list[str]:
        name = f"  {program.name:8s}"
        if isinstance(program, UncompiledProgram):
            return [f"{name} {program.reason}"]
        pad = " " * len(name)
        lines = [
            f"{name} arguments {program.arguments / GB:.2f} GB  outputs {program.outputs / GB:.2f} GB  "
            f"(donated {program.aliased / GB:.2f} GB)  temporaries {program.temporaries / GB:.2f} GB  "
            f"other weights {program.other_weights / GB:.2f} GB  peak {program.peak / GB:.2f} GB  "
            f"fits {self.chip.hbm_bytes / 2**30:.1f} GiB: {'yes' if self.fits(program) else 'no'}  "
            f"(compiled in {program.compile_seconds:.0f} s)"
        ]
        if program.refusal:
            lines.append(
                f"{pad} the compiler refused it ({program.refusal}); these figures are from compiling it "
                f"again with its memory check off"
            )
        estimate, roofline = program.estimate, program.roofline
        per = " per token" if estimate.steps_per_call is not None else ""
        detail = (
            f"cheapest branches {estimate.seconds_cheapest * 1e3:.2f} ms; "
            f"{estimate.compiler_share:.0%} compiler cycles, {1 - estimate.compiler_share:.0%} bytes/flops rule"
        )
        if estimate.unknown_trip_loops:
            detail += f"; {estimate.unknown_trip_loops} loops of data-dependent length counted once"
        lines.append(f"{pad} estimated {estimate.seconds * 1e3:.2f} ms{per} ({detail})")
        if estimate.step_seconds is not None:
            lines.append(
                f"{pad}   = {estimate.step_seconds * 1e3:.2f} ms per decode step + "
                f"{estimate.call_seconds * 1e3:.2f} ms per decode call / {estimate.steps_per_call} steps"
            )
        chips = self.target.num_chips
        if roofline.bytes is not None:
            basis = (
                f"{sum(roofline.bytes.values()) / GB:.2f} GB / "
                f"({chips} x {self.chip.hbm_bytes_per_second / GB:.0f} GB/s)"
            )
            parts = ", ".join(f"{kind} {size / GB:.2f} GB" for kind, size in roofline.bytes.items())
            basis += f" [{parts}]"
        else:
            basis = f"{roofline.flops:.3g} flops / ({chips} x {self.chip.peak_flops / 1e12:.0f} TFLOP/s)"
        lines.append(
            f"{pad} roofline {roofline.seconds * 1e3:.2f} ms{per}: {basis}; estimate / roofline {program.ratio:.1f}x"
        )
        if program.heaviest:
            lines.append(f"{pad} heaviest ({'one decode call of one step' if per else 'the whole program'}):")
            for item in program.heaviest:
                lines.append(
                    f"{pad}   {item['seconds'] * 1e3:8.2f} ms  {item['opcode']} {item['shape']}  {item['source']}"
                )
        return lines


def _estimate(cost: ProgramCost, decode_steps: int | None) -> Estimate:
    total: Cost = cost.total
    share = total.compiler_seconds / total.seconds if total.seconds else 0.0
    if decode_steps is None:
        return Estimate(total.seconds, total.seconds_cheapest, share, total.unknown_trip_loops)
    token_loops = [loop for loop in cost.outer_loops() if loop.trip_count is None]
    if len(token_loops) != 1:
        # No single loop of unknown length: the call's time spread over the tokens it makes.
        return Estimate(
            total.seconds / decode_steps,
            total.seconds_cheapest / decode_steps,
            share,
            total.unknown_trip_loops,
            None,
            None,
            decode_steps,
        )
    step = token_loops[0].iteration
    call = Cost(
        total.seconds - step.seconds,
        total.seconds_cheapest - step.seconds_cheapest,
        total.compiler_seconds - step.compiler_seconds,
    )
    per_token = step + Cost(
        call.seconds / decode_steps, call.seconds_cheapest / decode_steps, call.compiler_seconds / decode_steps
    )
    return Estimate(
        per_token.seconds,
        per_token.seconds_cheapest,
        per_token.compiler_seconds / per_token.seconds if per_token.seconds else 0.0,
        step.unknown_trip_loops,
        step.seconds,
        call.seconds,
        decode_steps,
    )


def _heaviest(cost: ProgramCost) -> list[dict]:
    return [
        {
            "seconds": seconds,
            "opcode": instruction.opcode,
            "shape": instruction.shape.split("{")[0] if not instruction.shape.startswith("(") else "(tuple)",
            "source": instruction.source,
            "name": instruction.name,
        }
        for seconds, instruction in cost.heaviest(HEAVIEST_SHOWN)
    ]


def plan_target(
    config, target: Target, mesh, dtype, shape: GenerationShape, quantization: Quantization | None = None
) -> TargetPlan:
    """Compiles generation of `config`'s model (Aria, Qwen2-VL or Awaker2.5-VL) for `target`."""
    chip = target.chip
    dtype = jnp.dtype(dtype)
    programs = compile_generation(
        config,
        mesh,
        dtype,
        shape,
        compiler_options=target.compiler_options,
        when_refused=compile_again_without_memory_check if target.platform == "tpu" else None,
        quantization=quantization,
    )
    text = config.text_config
    reports, hlo = [], {}
    for program in programs:
        if isinstance(program, RefusedProgram):
            reports.append(
                UncompiledProgram(program.name, f"does not fit: the compiler refused it ({program.message})")
            )
            continue
        hlo[program.name] = program.compiled.as_text()
        cost = ProgramCost(hlo[program.name], chip)
        memory = program.compiled.memory_analysis()
        if program.name == "decode":
            estimate = _estimate(cost, shape.decode_steps)
            step_bytes = decode_step_bytes(
                config, dtype, shape.batch, shape.cache_length, quantization, shape.kv_cache_dtype
            )
            roofline = Roofline(sum(step_bytes.values()) / (target.num_chips * chip.hbm_bytes_per_second), step_bytes)
        else:
            estimate = _estimate(cost, None)
            flops = prefill_flops(config, dtype, shape.batch, shape.prompt_length)
            roofline = Roofline(flops / (target.num_chips * chip.peak_flops), flops=flops)
        reports.append(
            ProgramReport(
                program.name,
                memory.argument_size_in_bytes,
                memory.output_size_in_bytes,
                memory.alias_size_in_bytes,
                memory.temp_size_in_bytes,
                program.resident_bytes,
                program.compile_seconds,
                estimate,
                roofline,
                _heaviest(cost),
                program.refusal,
            )
        )
    for name in [name for name in ("prefill", "decode") if name not in {report.name for report in reports}]:
        reports.append(
            UncompiledProgram(name, f"not compiled: it takes the outputs of {reports[-1].name}, which did not compile")
        )
    params = abstract_params(config, mesh, dtype, quantization)
    return TargetPlan(
        target,
        dict(zip(mesh.axis_names, mesh.axis_sizes)),
        shape,
        dtype.name,
        getattr(text, "moe_backend", None),
        per_device_bytes(params),
        reports,
        hlo,
        quantization,
        total_bytes(params),
    )


def write_json(plan: TargetPlan, path: str) -> None:
    with open(path, "w") as out:
        json.dump(plan.to_json(), out, indent=2)
        out.write("\n")


def dump_hlo(plan: TargetPlan, directory: str) -> list[str]:
    """Each compiled program's optimized HLO as `directory/<program>.txt`."""
    os.makedirs(directory, exist_ok=True)
    written = []
    for name, text in plan.hlo.items():
        path = os.path.join(directory, f"{name}.txt")
        with open(path, "w") as out:
            out.write(text)
        written.append(path)
    return written
