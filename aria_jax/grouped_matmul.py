"""A grouped matmul that reads its weights where they lie in a stack of layers: the TPU kernel of
the routed experts in decode.

`stacked_grouped_matmul(rows, weights, layer, group_sizes)`: rows (M, K) sorted by group;
weights (L, G, K, N), every layer's experts in one array as the params hold them. Returns
(M, N): each group's rows times `weights[layer, group]`; rows past the last group are zero.

Why a kernel: XLA materializes a slice of an array before a matmul reads it, so taking a layer's
experts out of the stack (`weights[layer]`) copies all of them every decode step, whatever the
routing. Here the weights stay in HBM and only the blocks of groups that hold rows are copied
into the chip's memory, once each; a group without rows costs nothing. Meant for few rows (a
decode step's token-expert pairs): every row block is multiplied by each group's weights and
masked to the group's rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from aria_jax.quantization import QuantizedArray, array_bytes

ROW_ALIGN = 8  # sublanes: rows are padded to a multiple
LANE = 128


def column_block(width: int) -> int:
    """Output columns per step: 256 or 128 if they divide the width, else the whole width."""
    return next((block for block in (256, LANE) if width % block == 0), width)


def group_order(group_sizes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(row offsets of the groups (G + 1,), the groups with rows first (G,), how many have rows (1,)).
    The tail repeats the last group with rows, so that its weights are not fetched again."""
    num_groups = group_sizes.shape[0]
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes).astype(jnp.int32)])
    has_rows = group_sizes > 0
    count = jnp.sum(has_rows).astype(jnp.int32)
    active = jnp.nonzero(has_rows, size=num_groups, fill_value=0)[0].astype(jnp.int32)
    last = active[jnp.maximum(count - 1, 0)]
    active = jnp.where(jnp.arange(num_groups) < count, active, last)
    return offsets, active, count.reshape(1)


def _kernel(offsets_ref, active_ref, count_ref, rows_ref, weights_ref, *refs):
    *scales_ref, out_ref, accumulator_ref = refs
    step = pl.program_id(1)

    @pl.when(step == 0)
    def _():
        accumulator_ref[...] = jnp.zeros_like(accumulator_ref)

    @pl.when(step < count_ref[0])
    def _():
        group = active_ref[step]
        row = jax.lax.broadcasted_iota(jnp.int32, accumulator_ref.shape, 0)
        in_group = (row >= offsets_ref[group]) & (row < offsets_ref[group + 1])
        if scales_ref:
            product = _quantized_product(rows_ref, weights_ref, scales_ref[0])
        else:
            product = jnp.dot(rows_ref[...], weights_ref[...], preferred_element_type=jnp.float32)
        accumulator_ref[...] += jnp.where(in_group, product, 0.0)

    @pl.when(step == pl.num_programs(1) - 1)
    def _():
        out_ref[...] = accumulator_ref[...].astype(out_ref.dtype)


def _quantized_product(rows_ref, values_ref, scales_ref) -> jax.Array:
    """rows times the quantized weights' block, the integers converted in VMEM: one scale per
    output column (int8), or one per group of inputs, each group's product scaled before the sum."""
    groups, depth = scales_ref.shape[0], values_ref.shape[0]
    group = depth // groups
    product = None
    for g in range(groups):
        part = jnp.dot(
            rows_ref[:, g * group : (g + 1) * group],
            values_ref[g * group : (g + 1) * group, :].astype(rows_ref.dtype),
            preferred_element_type=jnp.float32,
        ) * scales_ref[g : g + 1, :].astype(jnp.float32)
        product = part if product is None else product + part
    return product


@functools.partial(jax.jit, static_argnames=("layer", "interpret"))
def stacked_grouped_matmul(
    rows: jax.Array, weights: jax.Array | QuantizedArray, layer: int, group_sizes: jax.Array, interpret: bool = False
) -> jax.Array:
    """`weights` may be quantized (`aria_jax.quantization`): int8 or int4 values, read as they
    are stored and converted in the chip's memory."""
    scales = []
    if isinstance(weights, QuantizedArray):
        weights, scales = weights.values, [weights.scales]
    num_rows, depth = rows.shape
    num_layers, num_groups, weight_depth, width = weights.shape
    if weight_depth != depth or not 0 <= layer < num_layers or group_sizes.shape != (num_groups,):
        raise ValueError(
            f"stacked_grouped_matmul: rows {rows.shape}, weights {weights.shape}, layer {layer}, "
            f"group_sizes {group_sizes.shape} do not fit together"
        )
    padded_rows = -(-num_rows // ROW_ALIGN) * ROW_ALIGN
    rows = jnp.pad(rows, ((0, padded_rows - num_rows), (0, 0)))
    block = column_block(width)
    offsets, active, count = group_order(group_sizes)
    # one group's weights (and scales) as the chip holds them, int4 packed two to a byte
    group_bytes = sum(array_bytes(w.shape[2:], w.dtype) for w in (weights, *scales))
    touched = min(num_groups, num_rows)  # at most one group per row
    cost = pl.CostEstimate(
        flops=2 * padded_rows * depth * width * touched,
        transcendentals=0,
        bytes_accessed=touched * group_bytes + (padded_rows * depth + padded_rows * width) * rows.dtype.itemsize,
    )
    expert_block = lambda column, step, offsets, active, count: (layer, active[step], 0, column)  # noqa: E731
    out = pl.pallas_call(
        _kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(width // block, num_groups),
            in_specs=[
                pl.BlockSpec((padded_rows, depth), lambda column, step, offsets, active, count: (0, 0)),
                pl.BlockSpec((None, None, depth, block), expert_block),
                *(pl.BlockSpec((None, None, s.shape[2], block), expert_block) for s in scales),
            ],
            out_specs=pl.BlockSpec((padded_rows, block), lambda column, step, offsets, active, count: (0, column)),
            scratch_shapes=[pltpu.VMEM((padded_rows, block), jnp.float32)],
        ),
        # Under shard_map the result varies over the mesh axes the weights do (a superset of the rows').
        out_shape=jax.ShapeDtypeStruct((padded_rows, width), rows.dtype, manual_axis_type=jax.typeof(weights).mat),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(offsets, active, count, rows, weights, *scales)
    return out[:num_rows]
