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


def group_offsets(group_sizes: jax.Array) -> jax.Array:
    """The groups' first rows and, last, the end of the last group: (G + 1,)."""
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes).astype(jnp.int32)])


def group_order(group_sizes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(row offsets of the groups (G + 1,), the groups with rows first (G,), how many have rows (1,)).
    The tail repeats the last group with rows, so that its weights are not fetched again."""
    num_groups = group_sizes.shape[0]
    offsets = group_offsets(group_sizes)
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


# Rows per tile of `row_tiled_grouped_matmul`, by the number of rows: 512 for many (each weight
# block then serves 512 rows, past the v5e's 240 flops per HBM byte), fewer below (a tile that
# holds a group boundary is computed once per group: smaller tiles compute fewer rows twice).
ROW_TILES = ((8192, 512), (2048, 256), (0, 128))
# The largest column block of one weight, in bytes: blocks of a few MiB stay well inside the
# chip's memory, double-buffered, beside a row tile and its float32 accumulator.
WEIGHT_BLOCK_BYTES = 4 * 2**20


def row_tile(num_rows: int) -> int:
    return next(tile for least, tile in ROW_TILES if num_rows >= least)


def wide_column_block(depth: int, width: int, itemsize: int, blocks_per_step: int) -> int:
    """The widest block of 128-column multiples that divides `width` and keeps `blocks_per_step`
    weight blocks of `depth` rows within WEIGHT_BLOCK_BYTES; the whole width if 128 does not divide it."""
    if width % LANE:
        return width
    fitting = [
        LANE * count
        for count in range(1, width // LANE + 1)
        if width % (LANE * count) == 0 and blocks_per_step * depth * LANE * count * itemsize <= WEIGHT_BLOCK_BYTES
    ]
    return max(fitting, default=LANE)


def tile_steps(group_sizes: jax.Array, num_tiles: int, tile: int) -> tuple[jax.Array, ...]:
    """The steps of `row_tiled_grouped_matmul`: one per (row tile, group with rows in it), in
    order, then one per tile past the last row (it is written with zeros), padded to the static
    bound num_tiles + groups - 1 by repeating the last tile with nothing to compute. Returns,
    per step: its tile, its group, the group whose weights are in memory (that of the last step
    that computes, so that a step that computes nothing fetches nothing), and flags (1: it
    computes; 2: its tile's first step, which zeroes the accumulator); and the groups' row offsets."""
    num_groups = group_sizes.shape[0]
    num_steps = num_tiles + num_groups - 1
    offsets = group_offsets(group_sizes)
    ends = offsets[1:]
    tile_start = jnp.arange(num_tiles, dtype=jnp.int32) * tile
    has_rows = tile_start < offsets[-1]
    last_row = jnp.minimum(tile_start + tile, offsets[-1]) - 1
    first_group = jnp.searchsorted(ends, tile_start, side="right").astype(jnp.int32)
    last_group = jnp.searchsorted(ends, last_row, side="right").astype(jnp.int32)
    steps_of_tile = jnp.where(has_rows, last_group - first_group + 1, 1)
    tile_first_step = jnp.cumsum(steps_of_tile) - steps_of_tile
    step = jnp.arange(num_steps, dtype=jnp.int32)
    in_range = step < jnp.sum(steps_of_tile)
    step_tile = jnp.where(in_range, jnp.searchsorted(tile_first_step, step, side="right") - 1, num_tiles - 1)
    step_tile = step_tile.astype(jnp.int32)
    group = jnp.clip(first_group[step_tile] + step - tile_first_step[step_tile], 0, num_groups - 1)
    computes = in_range & has_rows[step_tile] & (group_sizes[group] > 0)
    first = in_range & (step == tile_first_step[step_tile])
    last_computing = jax.lax.cummax(jnp.where(computes, step, -1))
    fetched = group[jnp.where(last_computing >= 0, last_computing, jnp.argmax(computes))]
    flags = computes.astype(jnp.int32) + 2 * first.astype(jnp.int32)
    return step_tile, group.astype(jnp.int32), fetched.astype(jnp.int32), flags, offsets


def _row_tiled_kernel(
    activation, steps_outer, layer_ref, tile_ref, group_ref, fetched_ref, flags_ref, offsets_ref, *refs
):
    rows_ref, *weight_refs, out_ref, accumulator_ref = refs
    step, column = (pl.program_id(0), pl.program_id(1)) if steps_outer else (pl.program_id(1), pl.program_id(0))
    accumulator = accumulator_ref.at[column if steps_outer else 0]
    flags = flags_ref[step]

    @pl.when(flags >= 2)
    def _():
        accumulator[...] = jnp.zeros(accumulator.shape, accumulator.dtype)

    @pl.when(flags % 2 == 1)
    def _():
        group = group_ref[step]
        row = tile_ref[step] * rows_ref.shape[0] + jax.lax.broadcasted_iota(jnp.int32, accumulator.shape, 0)
        in_group = (row >= offsets_ref[group]) & (row < offsets_ref[group + 1])
        products = [jnp.dot(rows_ref[...], w[...], preferred_element_type=jnp.float32) for w in weight_refs]
        product = products[0] if activation is None else activation(products[0]) * products[1]
        accumulator[...] += jnp.where(in_group, product, 0.0)

    out_ref[...] = accumulator[...].astype(out_ref.dtype)


def row_tiled_grouped_matmul(
    rows: jax.Array,
    weights: jax.Array,
    layer: jax.Array | int,
    group_sizes: jax.Array,
    activation=None,
    steps_outer: bool | None = None,
    interpret: bool = False,
) -> jax.Array:
    """`stacked_grouped_matmul` for many rows (a prompt's token-expert pairs): rows (M, K) sorted
    by group, weights (L, G, K, N) read in the stack at `layer` (an int or a traced scalar: a
    loop over the layers reads each in place). Returns (M, N), rows past the last group zero;
    with `activation`, the gated product act(rows @ W[:, :N/2]) * (rows @ W[:, N/2:]), (M, N/2),
    fused: the gate and up halves of a block are multiplied and gated in the chip's memory.

    Rows are taken in tiles; each tile is multiplied by the weights of every group with rows in
    it, masked to that group's rows, so a tile that holds a group boundary is computed once per
    group. A step is a (tile, group) pair. Steps run either outermost (each step fetches its
    group's weights, each row tile is fetched once) or within each block of columns (each
    group's block of weights is fetched once, the rows once per block), whichever reads fewer
    bytes (`steps_outer`: None) or as `steps_outer` says; steps with nothing to compute fetch nothing."""
    num_rows, depth = rows.shape
    num_layers, num_groups, weight_depth, width = weights.shape
    if weight_depth != depth or group_sizes.shape != (num_groups,) or (activation and width % 2):
        raise ValueError(
            f"row_tiled_grouped_matmul: rows {rows.shape}, weights {weights.shape}, group_sizes "
            f"{group_sizes.shape}{', gated' if activation else ''} do not fit together"
        )
    if isinstance(layer, int) and not 0 <= layer < num_layers:
        raise ValueError(f"row_tiled_grouped_matmul: layer {layer} of a stack of {num_layers}")
    return _row_tiled_grouped_matmul(rows, weights, layer, group_sizes, activation, steps_outer, interpret)


@functools.partial(jax.jit, static_argnames=("activation", "steps_outer", "interpret"))
def _row_tiled_grouped_matmul(rows, weights, layer, group_sizes, activation, steps_outer, interpret):
    num_rows, depth = rows.shape
    num_layers, num_groups, _, width = weights.shape
    out_width = width if activation is None else width // 2
    tile = row_tile(num_rows)
    num_tiles = -(-num_rows // tile)  # the last tile may run past the rows: its rows there are masked
    halves = 1 if activation is None else 2
    block = wide_column_block(depth, out_width, weights.dtype.itemsize, halves)
    columns = out_width // block
    step_tile, group, fetched, flags, offsets = tile_steps(group_sizes, num_tiles, tile)
    num_steps = step_tile.shape[0]
    layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, num_layers - 1).reshape(1)

    group_bytes = depth * width * weights.dtype.itemsize
    rows_bytes = num_tiles * tile * depth * rows.dtype.itemsize
    # (weight bytes, row bytes) read with the steps outermost, and with the column blocks outermost
    by_steps = (num_steps * group_bytes, rows_bytes)
    by_columns = (min(num_steps, num_groups) * group_bytes, columns * rows_bytes)
    if steps_outer is None:
        steps_outer = sum(by_steps) <= sum(by_columns)
    weight_bytes, row_bytes = by_steps if steps_outer else by_columns
    cost = pl.CostEstimate(
        flops=2 * num_steps * tile * depth * width,
        transcendentals=num_steps * tile * out_width if activation else 0,
        bytes_accessed=weight_bytes + row_bytes + num_steps * tile * out_width * rows.dtype.itemsize,
    )

    def index_map(block_index):
        """block_index(step, column, layer, tile, fetched) -> the block's index, on either grid order."""

        def index(a, b, layer, tile, group, fetched, flags, offsets):
            step, column = (a, b) if steps_outer else (b, a)
            return block_index(step, column, layer[0], tile, fetched)

        return index

    def weight_block(half):
        return pl.BlockSpec(
            (None, None, depth, block),
            index_map(lambda step, column, layer, tile, fetched: (layer, fetched[step], 0, column + half * columns)),
        )

    out = pl.pallas_call(
        functools.partial(_row_tiled_kernel, activation, steps_outer),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(num_steps, columns) if steps_outer else (columns, num_steps),
            in_specs=[
                pl.BlockSpec((tile, depth), index_map(lambda step, column, layer, tile, fetched: (tile[step], 0))),
                *(weight_block(half) for half in range(halves)),
            ],
            out_specs=pl.BlockSpec(
                (tile, block), index_map(lambda step, column, layer, tile, fetched: (tile[step], column))
            ),
            scratch_shapes=[pltpu.VMEM((columns if steps_outer else 1, tile, block), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((num_rows, out_width), rows.dtype, manual_axis_type=jax.typeof(weights).mat),
        # Both dimensions carry state: a tile's accumulator over its steps, in order.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(layer, step_tile, group, fetched, flags, offsets, rows, *(weights,) * halves)
    return out
