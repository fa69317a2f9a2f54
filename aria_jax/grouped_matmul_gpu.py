"""A grouped matmul for GPUs (Pallas on Triton) that reads each group's weights where they lie in
a stack of layers: rows (M, K) sorted by group, weights (L, G, K, N), -> (M, N), row r of group g
multiplied by weights[layer, g].

Why: XLA:GPU's ragged_dot takes one layer's weights, so a decode step copied each layer's experts
out of the stacks over layers (on 8 x H100 at batch 32, ~0.12 ms a layer). Here a program per
(group, block of columns) walks its group's rows in tiles and reads its block of the group's
weights in place; a group without rows reads nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from aria_jax.sharding import pallas_interpreted

ROW_TILE = 16  # Triton's smallest matmul tile
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


def _kernel(layer_ref, offsets_ref, rows_ref, weights_ref, out_ref, *, depth_tile, column_tile):
    group, column = pl.program_id(0), pl.program_id(1)
    num_groups, depth = weights_ref.shape[1], rows_ref.shape[1]
    start, end = offsets_ref[group], offsets_ref[group + 1]
    columns = pl.dslice(column * column_tile, column_tile)

    def row_tile(index, carry):
        first = start + index * ROW_TILE
        here = (first + jnp.arange(ROW_TILE) < end)[:, None]
        tile_rows = pl.dslice(first, ROW_TILE)

        def depth_step(step, accumulator):
            block = pl.dslice(step * depth_tile, depth_tile)
            x = plgpu.load(rows_ref.at[tile_rows, block], mask=here, other=0.0)
            w = plgpu.load(weights_ref.at[layer_ref[0], group, block, columns])
            return accumulator + plgpu.dot(x, w)

        product = jax.lax.fori_loop(0, depth // depth_tile, depth_step, jnp.zeros((ROW_TILE, column_tile), jnp.float32))
        plgpu.store(out_ref.at[tile_rows, columns], product.astype(out_ref.dtype), mask=here)
        return carry

    @pl.when(group < num_groups)
    def _():
        jax.lax.fori_loop(0, jax.lax.div(end - start + ROW_TILE - 1, ROW_TILE), row_tile, 0)

    @pl.when(group == num_groups)  # rows past the last group (pairs routed elsewhere): zeros
    def _():
        def zero_tile(index, carry):
            first = start + index * ROW_TILE
            here = (first + jnp.arange(ROW_TILE) < end)[:, None]
            zeros = jnp.zeros((ROW_TILE, column_tile), out_ref.dtype)
            plgpu.store(out_ref.at[pl.dslice(first, ROW_TILE), columns], zeros, mask=here)
            return carry

        jax.lax.fori_loop(0, jax.lax.div(end - start + ROW_TILE - 1, ROW_TILE), zero_tile, 0)


def stacked_grouped_matmul_gpu(
    rows: jax.Array, weights: jax.Array, layer, group_sizes: jax.Array, interpret: bool | None = None
) -> jax.Array:
    """rows (M, K) sorted by group, the first group_sizes[0] in group 0 and so on (rows past
    their sum come out zero); weights (L, G, K, N); layer: an int or traced scalar -> (M, N).
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
    # A tile of rows past the end, so that no tile reads or writes outside the arrays.
    padded = rows.shape[0] + ROW_TILE
    rows = jnp.pad(rows, ((0, ROW_TILE), (0, 0)))
    offsets = jnp.concatenate(
        [jnp.zeros(1, jnp.int32), jnp.cumsum(group_sizes, dtype=jnp.int32), jnp.full(1, num_rows, jnp.int32)]
    )
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    with jax.named_scope(SCOPE):
        out = pl.pallas_call(
            functools.partial(_kernel, depth_tile=depth_tile, column_tile=column_tile),
            grid=(num_groups + 1, width // column_tile),
            # Under shard_map the result varies over the mesh axes the weights do (as the rows).
            out_shape=jax.ShapeDtypeStruct((padded, width), rows.dtype, manual_axis_type=jax.typeof(weights).mat),
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),  # Triton's, not Mosaic GPU's
            interpret=interpret,
            name="stacked_grouped_matmul_gpu",
        )(layer, offsets, rows, weights)
    return out[:num_rows]
