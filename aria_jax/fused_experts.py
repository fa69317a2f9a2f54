"""A decode step's routed experts in one TPU kernel, read where they lie in the stacks of layers.

`fused_experts(x, combine, gate_up, down, layer, top_k, activation)`: x (T, D) the step's tokens;
combine (T, E) each token's routing weight for each expert (0 where it is not routed there, at
most `top_k` experts per token);
gate_up (L, E, D, 2F) and down (L, E, F, D), every layer's experts as the params hold them.
Returns (T, D) in float32: the sum over experts e of
combine[:, e] * (activation(x @ G_e) * (x @ U_e)) @ D_e, with G_e, U_e the halves of gate_up[layer, e].

Why: decode's few tokens do not need their (token, slot) pairs sorted by expert. Every token
goes through each expert that holds any of them, and the routing weights, 0 for the others,
select the results; the gating and the down-projection are done in VMEM on blocks of the
expert's width. One kernel replaces the sort, the gathers, two grouped matmuls and the scatter
back, each a small operation per layer; an expert without tokens is neither computed nor fetched.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from aria_jax.grouped_matmul import LANE, ROW_ALIGN, group_order


def _kernel(active_ref, count_ref, x_ref, combine_ref, gate_ref, up_ref, down_ref, out_ref, accumulator_ref, *, act):
    step, block = pl.program_id(0), pl.program_id(1)

    @pl.when((step == 0) & (block == 0))
    def _():
        accumulator_ref[...] = jnp.zeros_like(accumulator_ref)

    @pl.when(step < count_ref[0])
    def _():
        x = x_ref[...]
        gate = jnp.dot(x, gate_ref[...], preferred_element_type=jnp.float32)
        up = jnp.dot(x, up_ref[...], preferred_element_type=jnp.float32)
        hidden = (act(gate) * up).astype(x.dtype)
        projected = jnp.dot(hidden, down_ref[...], preferred_element_type=jnp.float32)
        accumulator_ref[...] += combine_ref[...] * projected

    @pl.when((step == pl.num_programs(0) - 1) & (block == pl.num_programs(1) - 1))
    def _():
        out_ref[...] = accumulator_ref[...]


@functools.partial(jax.jit, static_argnames=("layer", "top_k", "activation", "interpret"))
def fused_experts(
    x: jax.Array,
    combine: jax.Array,
    gate_up: jax.Array,
    down: jax.Array,
    layer: int,
    top_k: int,
    activation=jax.nn.silu,
    interpret: bool = False,
) -> jax.Array:
    num_tokens, depth = x.shape
    num_layers, num_experts, weight_depth, double_width = gate_up.shape
    width = double_width // 2
    if (
        weight_depth != depth
        or down.shape != (num_layers, num_experts, width, depth)
        or combine.shape != (num_tokens, num_experts)
        or not 0 <= layer < num_layers
    ):
        raise ValueError(
            f"fused_experts: x {x.shape}, combine {combine.shape}, gate_up {gate_up.shape}, down {down.shape}, "
            f"layer {layer} do not fit together"
        )
    padded = -(-num_tokens // ROW_ALIGN) * ROW_ALIGN
    x = jnp.pad(x, ((0, padded - num_tokens), (0, 0)))
    # (E, T, 1): an expert's weights as a column, to scale its rows of the product
    combine = jnp.pad(combine.astype(jnp.float32), ((0, padded - num_tokens), (0, 0))).T[:, :, None]
    _, active, count = group_order(jnp.sum(combine[:, :, 0] != 0, axis=1).astype(jnp.int32))
    block = LANE if width % LANE == 0 else width
    blocks = width // block
    touched = min(num_experts, num_tokens * top_k)  # the static worst case: each token's experts all here
    expert_bytes = 3 * depth * width * gate_up.dtype.itemsize
    cost = pl.CostEstimate(
        flops=2 * padded * 3 * depth * width * touched,
        transcendentals=padded * width * touched,
        bytes_accessed=touched * expert_bytes + padded * depth * (x.dtype.itemsize + 4) + combine.size * 4,
    )

    def block_of(step, column, count):
        """The block an active step computes; the steps after the last active one keep the last
        block, so that nothing more is fetched."""
        return jnp.where(step < count[0], column, blocks - 1)

    def gate_block(step, column, active, count):
        return layer, active[step], 0, block_of(step, column, count)

    def up_block(step, column, active, count):
        return layer, active[step], 0, blocks + block_of(step, column, count)

    def down_block(step, column, active, count):
        return layer, active[step], block_of(step, column, count), 0

    out = pl.pallas_call(
        functools.partial(_kernel, act=activation),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(num_experts, blocks),
            in_specs=[
                pl.BlockSpec((padded, depth), lambda step, column, active, count: (0, 0)),
                pl.BlockSpec((None, padded, 1), lambda step, column, active, count: (active[step], 0, 0)),
                pl.BlockSpec((None, None, depth, block), gate_block),
                pl.BlockSpec((None, None, depth, block), up_block),
                pl.BlockSpec((None, None, block, depth), down_block),
            ],
            out_specs=pl.BlockSpec((padded, depth), lambda step, column, active, count: (0, 0)),
            scratch_shapes=[pltpu.VMEM((padded, depth), jnp.float32)],
        ),
        # Under shard_map the result varies over the mesh axes the weights do (a superset of x's).
        out_shape=jax.ShapeDtypeStruct((padded, depth), jnp.float32, manual_axis_type=jax.typeof(gate_up).mat),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(active, count, x, combine, gate_up, gate_up, down)
    return out[:num_tokens]
