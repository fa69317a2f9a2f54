"""The time a compiled program is expected to take, read from its optimized HLO text.

The TPU compiler writes its own estimate into every scheduled instruction it emits code for
(`"estimated_cycles"` in the instruction's backend config). The program's time is the sum over
the instructions that run, each `while` body counted as many times as the loop runs (XLA's own
`cost_analysis()` counts a loop body once, whatever its trip count; `hlo_text.trip_count` says
how many).

What carries no compiler estimate is costed by a rule, the slower of moving its bytes through
HBM and running its flops at the chip's peak (for a Pallas kernel that declares its flops and
bytes, those): custom calls (Pallas kernels, grouped matmuls),
sorts, the instructions of conditional branches, and on GPU everything (XLA:GPU writes no
estimate). Collectives take the slower of that and their bytes on the wire over the chip's
interconnect. Arrays placed in another memory space than HBM (`S(n)` in a TPU layout: on-chip
memory) cost no HBM bandwidth. A fusion that only slices an operand (a layer's weights out of a
stacked array) is charged for the slice, not the operand, and one that updates a buffer in
place for the update. Bookkeeping (tuples, bitcasts, the `-done` half of asynchronous pairs)
and custom calls that only reserve memory cost nothing.

Two things the HLO cannot tell are reported rather than guessed: a conditional runs one of its
branches (`Cost.seconds` takes the most expensive, `Cost.seconds_cheapest` the cheapest), and a
loop whose trip count depends on data is counted once (`Cost.unknown_trip_loops` says how many
such loops were met, per execution of the program).
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import cached_property

from aria_jax import cache_attention_gpu
from aria_jax.accelerators import Chip
from aria_jax.attention import GPU_FLASH_SCOPE
from aria_jax.grouped_matmul_gpu import SCOPE as GPU_GROUPED_MATMUL_SCOPE
from aria_jax.hlo_text import Array, Computation, Instruction, Module, arrays_of, hbm_bytes, trip_count

# Instructions that move no data of their own: bookkeeping, aliases, and the second half of
# asynchronous pairs (the work is charged at the start).
FREE_OPCODES = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
    "domain",
    "copy-done",
    "send-done",
    "recv-done",
    "all-reduce-done",
    "all-gather-done",
    "collective-permute-done",
    "async-done",
    "async-update",
    "slice-done",
}
COLLECTIVES = {
    "all-reduce",
    "all-reduce-start",
    "all-gather",
    "all-gather-start",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-permute-start",
    "ragged-all-to-all",
}
# Custom calls that only reserve memory.
ALLOCATING_CUSTOM_CALLS = {"AllocateBuffer"}
SLICING_OPCODES = {"dynamic-slice", "slice", "gather"}
# Where an asynchronous start's tuple holds its destination: copy-start's is (destination, source
# alias, context); the collectives' starts are (operand alias, destination, context...).
ASYNC_DESTINATION = {"copy-start": 0}
# Inside a fusion these only re-index their operand: nothing is read until something uses them.
RE_INDEXING_OPCODES = {"bitcast", "reshape", "transpose"}
MATMUL_OPCODES = {"dot", "ragged-dot"}


@dataclasses.dataclass(frozen=True)
class Cost:
    seconds: float = 0.0  # conditionals at their most expensive branch
    seconds_cheapest: float = 0.0  # conditionals at their cheapest branch
    compiler_seconds: float = 0.0  # the part of `seconds` that is the compiler's own estimate
    unknown_trip_loops: int = 0  # loops of data-dependent length, counted once each

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(
            self.seconds + other.seconds,
            self.seconds_cheapest + other.seconds_cheapest,
            self.compiler_seconds + other.compiler_seconds,
            self.unknown_trip_loops + other.unknown_trip_loops,
        )

    def times(self, count: int) -> "Cost":
        return Cost(
            self.seconds * count,
            self.seconds_cheapest * count,
            self.compiler_seconds * count,
            self.unknown_trip_loops * count,
        )

    @property
    def rule_seconds(self) -> float:
        """The part of `seconds` costed by bytes and flops, without a compiler estimate."""
        return self.seconds - self.compiler_seconds


@dataclasses.dataclass(frozen=True)
class Loop:
    """A `while` the program runs outside any other loop."""

    name: str
    trip_count: int | None  # None: depends on data
    iteration: Cost  # one pass of the body and the condition


class ProgramCost:
    """The estimated cost of an optimized HLO module on `chip` (one chip of a mesh: SPMD programs
    run the same code on every chip)."""

    def __init__(self, hlo_text: str, chip: Chip):
        self.module = Module.parse(hlo_text)
        self.chip = chip
        self._computation_costs: dict[str, Cost] = {}

    @cached_property
    def total(self) -> Cost:
        return self.computation_cost(self.module.entry)

    def outer_loops(self) -> list[Loop]:
        """The loops not inside another loop (the decode loop of a decode program)."""
        loops, stack = [], [self.module.entry]
        while stack:
            computation = self.module.computations[stack.pop()]
            for instruction in computation.instructions:
                if instruction.opcode == "while":
                    body, condition = instruction.called("body")[0], instruction.called("condition")[0]
                    loops.append(
                        Loop(
                            instruction.name,
                            self.trip_count(instruction, computation),
                            self.computation_cost(body) + self.computation_cost(condition),
                        )
                    )
                else:
                    stack += (
                        instruction.called("calls")
                        + instruction.called("branch_computations")
                        + instruction.called("true_computation")
                        + instruction.called("false_computation")
                    )
                    if instruction.opcode == "call":
                        stack += instruction.called("to_apply")
        return loops

    def heaviest(self, count: int) -> list[tuple[float, Instruction]]:
        """The `count` instructions that take the most time in all, loop trips included
        (conditionals at their most expensive branch)."""
        totals: dict[str, float] = {}
        found: dict[str, Instruction] = {}

        def visit(name: str, times: float) -> None:
            computation = self.module.computations[name]
            for instruction in computation.instructions:
                if instruction.opcode == "while":
                    trips = self.trip_count(instruction, computation) or 1
                    visit(instruction.called("body")[0], times * trips)
                    visit(instruction.called("condition")[0], times * (trips + 1))
                elif instruction.opcode == "conditional":
                    names = instruction.called("branch_computations") or instruction.called(
                        "true_computation"
                    ) + instruction.called("false_computation")
                    visit(max(names, key=lambda n: self.computation_cost(n).seconds), times)
                elif instruction.opcode in ("call", "async-start"):
                    for callee in instruction.called("calls") + instruction.called("to_apply"):
                        visit(callee, times)
                else:
                    seconds = self.instruction_cost(instruction, computation).seconds * times
                    if seconds:
                        key = f"{name}/{instruction.name}"
                        totals[key] = totals.get(key, 0.0) + seconds
                        found[key] = instruction

        visit(self.module.entry, 1)
        ranked = sorted(totals, key=totals.get, reverse=True)[:count]
        return [(totals[key], found[key]) for key in ranked]

    def computation_cost(self, name: str) -> Cost:
        if name not in self._computation_costs:
            computation = self.module.computations[name]
            total = Cost()
            for instruction in computation.instructions:
                total = total + self.instruction_cost(instruction, computation)
            self._computation_costs[name] = total
        return self._computation_costs[name]

    def instruction_cost(self, instruction: Instruction, computation: Computation) -> Cost:
        opcode = instruction.opcode
        if opcode == "while":
            body, condition = instruction.called("body")[0], instruction.called("condition")[0]
            iteration = self.computation_cost(body) + self.computation_cost(condition)
            trips = self.trip_count(instruction, computation)
            if trips is None:
                return iteration + self.computation_cost(condition) + Cost(unknown_trip_loops=1)
            return iteration.times(trips) + self.computation_cost(condition)
        if opcode == "conditional":
            branches = [
                self.computation_cost(name)
                for name in instruction.called("branch_computations")
                or instruction.called("true_computation") + instruction.called("false_computation")
            ]
            dearest = max(branches, key=lambda cost: cost.seconds)
            cheapest = min(branch.seconds_cheapest for branch in branches)
            return Cost(
                dearest.seconds,
                cheapest,
                dearest.compiler_seconds,
                max(branch.unknown_trip_loops for branch in branches),
            )
        if opcode in ("call", "async-start"):
            return sum(
                (self.computation_cost(name) for name in instruction.called("calls") + instruction.called("to_apply")),
                Cost(),
            )
        if instruction.estimated_cycles is not None and self.chip.clock_hz:
            seconds = instruction.estimated_cycles / self.chip.clock_hz
            return Cost(seconds, seconds, seconds)
        if opcode in FREE_OPCODES or instruction.custom_call_target in ALLOCATING_CUSTOM_CALLS:
            return Cost()
        seconds = self.bytes_or_flops_seconds(instruction, computation)
        return Cost(seconds, seconds)

    # -- costs without a compiler estimate -------------------------------------------------------

    def bytes_or_flops_seconds(self, instruction: Instruction, computation: Computation) -> float:
        chip = self.chip
        declared = declared_kernel_cost(instruction) or self.triton_kernel_cost(instruction, computation)
        if declared is not None:
            flops, bytes_accessed = declared
            return max(bytes_accessed / chip.hbm_bytes_per_second, flops / chip.peak_flops)
        seconds = max(
            self.bytes_moved(instruction, computation) / chip.hbm_bytes_per_second,
            self.flops(instruction, computation) / chip.peak_flops,
        )
        if instruction.opcode in COLLECTIVES:
            seconds = max(seconds, self.wire_bytes(instruction, computation) / chip.interconnect_bytes_per_second)
        return seconds

    def operand_shape(self, computation: Computation, name: str) -> str:
        operand = computation.by_name.get(name)
        return operand.shape if operand is not None else ""

    def bytes_moved(self, instruction: Instruction, computation: Computation) -> int:
        """HBM bytes read and written: operands and result."""
        if instruction.opcode == "fusion":
            return self._fusion_bytes(instruction, computation)
        if instruction.opcode == "slice-start":
            return arrays_of(instruction.shape)[1].bytes  # reads the slice, wherever it goes
        if instruction.opcode.endswith("-start") and instruction.shape.startswith("("):
            # Only the destination is written, and only if it is in HBM (a prefetch into VMEM is not).
            tuple_arrays = arrays_of(instruction.shape)
            written = tuple_arrays[ASYNC_DESTINATION.get(instruction.opcode, 1)] if len(tuple_arrays) > 1 else None
            result_bytes = written.bytes if written is not None and written.memory_space == 0 else 0
        else:
            result_bytes = hbm_bytes(instruction.shape)
        if instruction.opcode in SLICING_OPCODES:
            return 2 * result_bytes  # reads only what it keeps
        if instruction.opcode == "dynamic-update-slice":
            return 2 * hbm_bytes(self.operand_shape(computation, instruction.operands[1]))  # in place
        return result_bytes + sum(hbm_bytes(self.operand_shape(computation, name)) for name in instruction.operands)

    def _fusion_bytes(self, fusion: Instruction, computation: Computation) -> int:
        fused = self.module.computations[fusion.called("calls")[0]]
        total = 0
        for index, name in enumerate(fusion.operands):
            shape = self.operand_shape(computation, name)
            if hbm_bytes(shape) == 0:
                continue
            parameter = fused.parameter(index)
            sliced = _sliced_reads(fused, parameter) if parameter is not None else None
            total += hbm_bytes(shape) if sliced is None else sliced
        roots = [fused.by_name[name] for name in fused.root.operands] if fused.root.opcode == "tuple" else [fused.root]
        result_arrays = [a for a in arrays_of(fusion.shape)]
        for root, array in zip(roots, result_arrays):
            if array.memory_space != 0:
                continue
            if root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
                total += hbm_bytes(fused.by_name[root.operands[1]].shape)
            else:
                total += array.bytes
        return total

    def flops(self, instruction: Instruction, computation: Computation) -> float:
        opcode = instruction.opcode
        if opcode == "fusion":
            fused = self.module.computations[instruction.called("calls")[0]]
            return sum(self.flops(inner, fused) for inner in fused.instructions)
        result = arrays_of(instruction.shape)
        if not result:
            return 0.0
        if opcode in MATMUL_OPCODES:
            lhs = arrays_of(self.operand_shape(computation, instruction.operands[0]))
            contracting = instruction.integer_list("lhs_contracting_dims")
            contracted = math.prod(lhs[0].dims[d] for d in contracting) if lhs else 1
            return 2.0 * math.prod(result[0].dims) * contracted
        if opcode == "convolution":
            kernel = arrays_of(self.operand_shape(computation, instruction.operands[1]))
            labels = re.search(r"dim_labels=\w+_(\w+)->", instruction.attributes)
            if not kernel or not labels or "o" not in labels.group(1):
                return 0.0
            per_output = math.prod(kernel[0].dims) // kernel[0].dims[labels.group(1).index("o")]
            return 2.0 * math.prod(result[0].dims) * per_output
        if opcode == "custom-call":
            return self._custom_call_matmul_flops(instruction, computation, result[0])
        return 0.0

    def triton_kernel_cost(self, instruction: Instruction, computation: Computation) -> tuple[float, float] | None:
        """(flops, bytes) of our Triton kernels, read from their shapes: XLA:GPU's Triton calls
        carry no cost estimate (Pallas' Triton lowering drops it). None for any other instruction.

        `attention._triton_flash`: q (B, T, N, H) and k (B, S, N, H) make two matmuls of
        B x N x T x S x H (scores, then values), H padded to a power of two by the kernel; a causal
        kernel skips the blocks above the diagonal, about half. It reads its operands once.

        `grouped_matmul_gpu`: rows (M, K) by weights (L, G, K, N) read in place, at most
        min(M, G) groups' (K, N) of one layer: the static worst case, each row its own group.

        `cache_attention_gpu`: q (B, K, R, H) against k (B, K, S, H) makes two matmuls of
        B x K x R x S x H, and each block of R's rows reads the cache (keys, values, mask, an
        int8 cache's scales) once: the static worst case, every block reaching every key."""
        if instruction.opcode != "custom-call" or not instruction.operands:
            return None
        source = instruction.source
        result = arrays_of(instruction.shape)
        operands = [arrays_of(self.operand_shape(computation, name)) for name in instruction.operands]
        if GPU_FLASH_SCOPE in source and len(operands) > 1 and operands[1]:
            batch, queries, heads, head_dim = result[0].dims
            flops = 4.0 * batch * heads * queries * operands[1][0].dims[1] * (1 << (head_dim - 1).bit_length())
            return (flops / 2 if GPU_FLASH_SCOPE + "_causal" in source else flops), self.bytes_moved(
                instruction, computation
            )
        if GPU_GROUPED_MATMUL_SCOPE in source and len(operands) == 4 and operands[2] and operands[3]:
            rows, weights = operands[2][0], operands[3][0]
            num_rows, depth = rows.dims
            _, num_groups, _, width = weights.dims
            weight_bytes = min(num_rows, num_groups) * depth * width * weights.bytes // math.prod(weights.dims)
            return 2.0 * num_rows * depth * width, rows.bytes + result[0].bytes + weight_bytes
        if cache_attention_gpu.SCOPE in source and len(operands) >= 5 and all(operands[1:5]):
            q, k = operands[1][0], operands[2][0]
            batch, num_kv_heads, num_rows, head_dim = q.dims
            blocks = -(-num_rows // cache_attention_gpu.QUERY_BLOCK)
            cache_bytes = sum(array.bytes for operand in operands[2:] for array in operand)
            flops = 4.0 * batch * num_kv_heads * num_rows * k.dims[2] * head_dim
            return flops, blocks * cache_bytes + q.bytes + sum(array.bytes for array in result)
        return None

    def _custom_call_matmul_flops(self, instruction: Instruction, computation: Computation, result: Array) -> float:
        """Library matmuls (cuBLAS on GPU) state their contracting dimensions in the config."""
        match = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instruction.attributes)
        if not match or not instruction.operands:
            return 0.0
        lhs = arrays_of(self.operand_shape(computation, instruction.operands[0]))
        dims = [int(d.strip('"')) for d in match.group(1).split(",") if d.strip()]
        return 2.0 * math.prod(result.dims) * math.prod(lhs[0].dims[d] for d in dims) if lhs else 0.0

    def wire_bytes(self, instruction: Instruction, computation: Computation) -> float:
        """Bytes each chip sends for a collective over a group of n chips (ring algorithms)."""
        n = 2 if instruction.opcode.startswith("collective-permute") else self.group_size(instruction)
        if n <= 1:
            return 0.0
        operand_bytes = sum(
            array.bytes for name in instruction.operands for array in arrays_of(self.operand_shape(computation, name))
        )
        base = instruction.opcode.removesuffix("-start")
        if base == "all-reduce":
            return 2 * (n - 1) / n * operand_bytes
        if base == "all-gather":
            return (n - 1) * operand_bytes
        if base == "collective-permute":
            return operand_bytes
        return (n - 1) / n * operand_bytes

    def group_size(self, instruction: Instruction) -> int:
        attributes = instruction.attributes
        listed = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
        if listed:
            return len([d for d in listed.group(1).split(",") if d])
        iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
        if iota:
            return int(iota.group(2))
        mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
        if mesh:
            sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
            return math.prod(int(sizes.get(axis, 1)) for axis in re.findall(r"'([^']+)'", mesh.group(2)))
        return self.module.num_partitions

    def trip_count(self, loop: Instruction, computation: Computation) -> int | None:
        return trip_count(self.module, loop, computation)


def declared_kernel_cost(instruction: Instruction) -> tuple[float, float] | None:
    """(flops, bytes) that a Pallas kernel declares for itself (`pl.CostEstimate`), if it does.
    A kernel that indexes a large operand (a layer's experts in a stack of layers) reads far
    less than its operands' size, which is all the bytes rule could see."""
    if instruction.opcode != "custom-call":
        return None
    declared = re.search(r'"cost_estimate":\s*\{([^}]*)\}', instruction.attributes)
    if declared is None:
        return None
    fields = dict(re.findall(r'"(\w+)":\s*"?(\d+)', declared.group(1)))
    if "bytes_accessed" not in fields:
        return None
    return float(fields.get("flops", 0)), float(fields["bytes_accessed"])


def _sliced_reads(fused: Computation, value: Instruction) -> int | None:
    """The bytes a fusion reads of `value` when every use only slices it (possibly after
    re-indexing it); a buffer updated in place is not read at all. None when some use reads it
    whole."""
    users = fused.users.get(value.name, [])
    if not users:
        return None
    total = 0
    for user in users:
        if user.operands[0] != value.name and user.opcode not in RE_INDEXING_OPCODES:
            return None
        if user.opcode in SLICING_OPCODES:
            total += sum(array.bytes for array in arrays_of(user.shape))
        elif user.opcode == "dynamic-update-slice":
            continue
        elif user.opcode in RE_INDEXING_OPCODES:
            inner = _sliced_reads(fused, user)
            if inner is None:
                return None
            total += inner
        else:
            return None
    return total
