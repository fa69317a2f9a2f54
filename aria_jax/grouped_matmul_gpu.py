"""A grouped matmul for GPUs (Pallas on Triton) that reads each group's weights where they lie in
a stack of layers: rows (M, K) sorted by group, weights (L, G, K, N), -> (M, N), row r of group g
multiplied by weights[layer, g].

Why: XLA:GPU's ragged_dot takes one layer's weights, so a decode step copied each layer's experts
out of the stacks over layers (on 8 x H100 at batch 32, ~0.12 ms a layer), and it compiles as a
dense matmul of every row by every group (a prompt's experts did 8 times their work on
`expert=8`). Here a program per (group, block of columns) walks its group's rows in tiles and
reads its block of the group's weights in place; a group without rows reads nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from aria_jax.sharding import pallas_interpreted

ROW_TILE = 16  # Triton's smallest matmul tile: a decode step's few rows per group
LARGE_ROW_TILE = 64  # a prompt's many: each weight block read once per 64 rows, not 16
DEPTH_TILE = 64  # the largest tiles; smaller powers of two down to ROW_TILE where these do not divide
COLUMN_TILE = 128
# The scope the kernel runs in: XLA:GPU's Triton calls carry no cost estimate, and `hlo_cost`
# reads the kernel's bytes and flops from the shapes of a call in this scope.
SCOPE = "gpu_stacked_grouped_matmul"


def tile(size: int, largest: int) -> int | None:
    """The largest power of two from `largest` down to ROW_TILE that divides `size`, or None."""
    return next(
        (t for t in (largest >> k for k in range(largest.bit_length())) if t >= ROW_TILE and size % t == 0), None
    )


def fits(weights) -> bool:
    """Whether `stacked_grouped_matmul_gpu` takes these (..., K, N) weights: tiles divide K and N."""
    return tile(weights.shape[-2], DEPTH_TILE) is not None and tile(weights.shape[-1], COLUMN_TILE) is not None


def _kernel(layer_ref, offsets_ref, rows_ref, weights_ref, out_ref, *, row_tile, depth_tile, column_tile):
    group, column = pl.program_id(0), pl.program_id(1)
    num_groups, depth = weights_ref.shape[1], rows_ref.shape[1]
    start, end = offsets_ref[group], offsets_ref[group + 1]
    columns = pl.dslice(column * column_tile, column_tile)

    def tile_at(first, end):
        """A tile of rows from `first`, moved back to end at the last row if it would run past it
        (a slice past the end is clamped, in Pallas' interpreter, or reads out of bounds), and
        which of its rows are from `first` to `end`: those it computes and writes."""
        moved = jnp.minimum(first, rows_ref.shape[0] - row_tile)
        row = moved + jnp.arange(row_tile)
        return moved, ((row >= first) & (row < end))[:, None]

    def rows_tile(index, carry):
        first, here = tile_at(start + index * row_tile, end)
        tile_rows = pl.dslice(first, row_tile)

        def depth_step(step, accumulator):
            block = pl.dslice(step * depth_tile, depth_tile)
            x = plgpu.load(rows_ref.at[tile_rows, block], mask=here, other=0.0)
            w = plgpu.load(weights_ref.at[layer_ref[0], group, block, columns])
            return accumulator + plgpu.dot(x, w)

        product = jax.lax.fori_loop(0, depth // depth_tile, depth_step, jnp.zeros((row_tile, column_tile), jnp.float32))
        plgpu.store(out_ref.at[tile_rows, columns], product.astype(out_ref.dtype), mask=here)
        return carry

    @pl.when(group < num_groups)
    def _():
        jax.lax.fori_loop(0, jax.lax.div(end - start + row_tile - 1, row_tile), rows_tile, 0)

    @pl.when(group == num_groups)  # rows past the last group (pairs routed elsewhere): zeros
    def _():
        def zero_tile(index, carry):
            first, here = tile_at(start + index * row_tile, end)
            zeros = jnp.zeros((row_tile, column_tile), out_ref.dtype)
            plgpu.store(out_ref.at[pl.dslice(first, row_tile), columns], zeros, mask=here)
            return carry

        jax.lax.fori_loop(0, jax.lax.div(end - start + row_tile - 1, row_tile), zero_tile, 0)


def stacked_grouped_matmul_gpu(
    rows: jax.Array, weights: jax.Array, layer, group_sizes: jax.Array, interpret: bool | None = None
) -> jax.Array:
    """rows (M, K) sorted by group, the first group_sizes[0] in group 0 and so on (rows past
    their sum come out zero); weights (L, G, K, N); layer: an int or traced scalar -> (M, N).
    Tiles of ROW_TILE rows (a decode step's), or LARGE_ROW_TILE from as many rows a group on
    average (a prompt's).
    `interpret`: in Pallas' interpreter; by default unless the program is compiled for a GPU."""
    if interpret is None:
        interpret = pallas_interpreted("gpu")
    num_rows, depth = rows.shape
    _, num_groups, weight_depth, width = weights.shape
    if weight_depth != depth or not fits(weights) or group_sizes.shape != (num_groups,):
        raise ValueError(
            f"stacked_grouped_matmul_gpu: rows {rows.shape}, weights {weights.shape}, group_sizes "
            f"{group_sizes.shape}: depth must match, and powers of two from {ROW_TILE} divide depth and width"
        )
    depth_tile, column_tile = tile(depth, DEPTH_TILE), tile(width, COLUMN_TILE)
    row_tile = LARGE_ROW_TILE if num_rows >= LARGE_ROW_TILE * num_groups else ROW_TILE
    # At least a tile of rows, so that no tile reads or writes outside the arrays.
    padded = max(num_rows, row_tile)
    rows = jnp.pad(rows, ((0, padded - num_rows), (0, 0)))
    offsets = jnp.concatenate(
        [jnp.zeros(1, jnp.int32), jnp.cumsum(group_sizes, dtype=jnp.int32), jnp.full(1, num_rows, jnp.int32)]
    )
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    with jax.named_scope(SCOPE):
        out = pl.pallas_call(
            functools.partial(_kernel, row_tile=row_tile, depth_tile=depth_tile, column_tile=column_tile),
            grid=(num_groups + 1, width // column_tile),
            # Under shard_map the result varies over the mesh axes the weights do (as the rows).
            out_shape=jax.ShapeDtypeStruct((padded, width), rows.dtype, manual_axis_type=jax.typeof(weights).mat),
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),  # Triton's, not Mosaic GPU's
            interpret=interpret,
            name="stacked_grouped_matmul_gpu",
        )(layer, offsets, rows, weights)
    return out[:num_rows]
