"""The MoE feed-forward block: top-k router, routed SiLU-gated experts, always-on shared experts.

Routed experts have interchangeable implementations that tests hold to each other:
- `routed_experts_sorted`: dropless. The (token, slot) pairs are sorted by expert so each expert's
  rows are contiguous, then one grouped matmul (`jax.lax.ragged_dot`) per projection. Work is
  proportional to tokens x top-k on backends with a real grouped matmul (TPU, GPU); XLA:CPU
  lowers it to a dense matmul over every expert.
- `routed_experts_looped`: the rows laid out by expert, each expert's padded to whole blocks,
  then loops of plain matmuls over the blocks: work proportional to the routed pairs on CPU,
  where matmuls are fast and `ragged_dot` is not.
- `routed_experts_gathered`: each (token, slot) multiplies by its own gathered expert weights;
  reads only the chosen experts, the fast path for decode (few tokens, many experts).
- `routed_experts_dense`: every expert on every token, combined with the routing weights. The
  reference: simple enough to check by eye.
- `routed_experts_in_stack(layer)`: on TPU, Pallas kernels that read the layer's experts inside
  the weights stacked over layers and skip experts without rows: no copy of a layer's experts.
  A decode step of few tokens through every local expert that holds any (`fused_experts`), else
  the sorted rows (`grouped_matmul`).
`auto` chooses by the platform the program is compiled for (`compile_platform`).

On a mesh, the routed and the shared experts run together under `jax.shard_map`
(`experts_over_mesh`), one all-reduce per layer; prefill sends each token to its experts' shards
instead (`experts_by_dispatch`), so that no shard multiplies the pairs of another's experts.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from aria_jax.config import AriaTextConfig
from aria_jax.expert_weights import ROUTED_EXPERT_AXES
from aria_jax.fused_experts import fused_experts
from aria_jax.grouped_matmul import row_tiled_grouped_matmul, stacked_grouped_matmul
from aria_jax.grouped_matmul_gpu import fits as gpu_tiles_fit
from aria_jax.grouped_matmul_gpu import stacked_grouped_matmul_gpu
from aria_jax.layers import ACTIVATIONS, adapted, default_kernel_init, param_with_axes
from aria_jax.quantization import QuantizedArray, dequantized, spec_for
from aria_jax.sharding import compile_platform, compiling_for_gpu, mesh_axis_size, on_one_cpu, on_several_devices


def route(x: jax.Array, router_kernel: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x: (T, D). Returns router logits (T, E), top-k weights (T, K) and expert ids (T, K).

    Experts are chosen on the raw logits; the weights are a softmax over the chosen logits only.
    """
    logits = jnp.einsum("td,de->te", x, router_kernel)
    top_logits, top_ids = jax.lax.top_k(logits, top_k)
    weights = jax.nn.softmax(top_logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    return logits, weights, top_ids


def _glu(gate_up: jax.Array) -> jax.Array:
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up


def _same(hidden: jax.Array) -> jax.Array:
    return hidden


def routed_experts_dense(x, weights, expert_ids, gate_up, down, sum_hidden=_same):
    """x: (T, D); weights, expert_ids: (T, K); gate_up: (E, D, 2F); down: (E, F, D) -> (T, D).

    `sum_hidden` completes the up-projection before its gating: the identity, or a sum over the
    mesh when the weights' D is split (each shard then holds x's and the output's slice of D)."""
    num_experts = gate_up.shape[0]
    gate_up, down = dequantized(gate_up, x.dtype), dequantized(down, x.dtype)
    activations = _glu(sum_hidden(jnp.einsum("td,edf->tef", x, gate_up)))
    expert_out = jnp.einsum("tef,efd->ted", activations, down)
    combine = jnp.einsum("tk,tke->te", weights, jax.nn.one_hot(expert_ids, num_experts, dtype=weights.dtype))
    return jnp.einsum("ted,te->td", expert_out, combine)


def routed_experts_sorted(x, weights, expert_ids, gate_up, down, sum_hidden=_same):
    """Same contract as `routed_experts_dense`; dropless sort + grouped matmul."""
    gate_up, down = dequantized(gate_up, x.dtype), dequantized(down, x.dtype)
    return _sorted_pairs(
        x,
        weights,
        expert_ids,
        gate_up.shape[0],
        lambda rows, sizes: _glu(sum_hidden(jax.lax.ragged_dot(rows, gate_up, sizes))),
        lambda rows, sizes: jax.lax.ragged_dot(rows, down, sizes),
    )


def routed_experts_stacked_gpu(x, weights, expert_ids, gate_up, down, sum_hidden=_same, layer=0):
    """Same contract, for weights stacked over layers, (L, E, D, 2F) and (L, E, F, D), on GPU: the
    pairs sorted by expert through `stacked_grouped_matmul_gpu`, which reads each expert's weights
    where they lie in the stack (XLA's ragged_dot would take a copy of the layer's experts)."""
    return _sorted_pairs(
        x,
        weights,
        expert_ids,
        gate_up.shape[1],
        lambda rows, sizes: _glu(sum_hidden(stacked_grouped_matmul_gpu(rows, gate_up, layer, sizes))),
        lambda rows, sizes: stacked_grouped_matmul_gpu(rows, down, layer, sizes),
    )


def routed_experts_in_stack(layer: int | jax.Array, interpret: bool = False):
    """The routed experts for weights stacked over layers, (L, E, D, 2F) and (L, E, F, D), on TPU
    kernels that read `layer`'s experts where they lie, only those that hold rows. A decode step
    (`layer` an int: the layers run unrolled) of up to FUSED_MAX_TOKENS tokens: `fused_experts`,
    unsorted, unless the up-projection's partial sums are added over the mesh before the gating
    or the experts are quantized. Otherwise the pairs sorted by expert: up to IN_STACK_MAX_PAIRS
    of them, and quantized experts (read as stored), through `stacked_grouped_matmul`; more (a
    prompt's) through `row_tiled_grouped_matmul`, its gating fused (`layer` may be a loop's
    index). `interpret`: run them in Pallas' interpreter, on any platform."""

    def run(x, weights, expert_ids, gate_up, down, sum_hidden=_same):
        unrolled, quantized = isinstance(layer, int), isinstance(gate_up, QuantizedArray)
        few_pairs = unrolled and expert_ids.size <= IN_STACK_MAX_PAIRS
        if few_pairs and expert_ids.shape[0] <= FUSED_MAX_TOKENS and sum_hidden is _same and not quantized:
            num_experts, top_k = gate_up.shape[1], expert_ids.shape[1]
            # ids past the local experts (pairs routed to another shard) select no column
            combine = jnp.einsum("tk,tke->te", weights, jax.nn.one_hot(expert_ids, num_experts, dtype=weights.dtype))
            return fused_experts(x, combine, gate_up, down, layer, top_k, jax.nn.silu, interpret).astype(x.dtype)
        if few_pairs or (unrolled and quantized):

            def gated(rows, sizes):
                return _glu(sum_hidden(stacked_grouped_matmul(rows, gate_up, layer, sizes, interpret)))

            def projected(rows, sizes):
                return stacked_grouped_matmul(rows, down, layer, sizes, interpret)

        else:
            # the gating fused, unless the up-projection's partial sums are added over the mesh before it
            activation = jax.nn.silu if sum_hidden is _same else None

            def gated(rows, sizes):
                out = row_tiled_grouped_matmul(rows, gate_up, layer, sizes, activation, interpret=interpret)
                return out if activation else _glu(sum_hidden(out))

            def projected(rows, sizes):
                return row_tiled_grouped_matmul(rows, down, layer, sizes, interpret=interpret)

        return _sorted_pairs(x, weights, expert_ids, gate_up.shape[1], gated, projected)

    return run


# Up to this many (token, slot) pairs of several slots (a decode step's), `_sorted_pairs` puts its
# results back in order by a scatter and weighs them by a matmul K deep per token: the fewest
# operations, each a few microseconds whatever its size. More pairs (a prompt's), or one slot (the
# receiving side of `experts_by_dispatch`), go back by a gather and are summed slot-major, which
# moves the fewest bytes (`slot_weighted_sum`); for a decode step's pairs that is more operations
# (v5e 2x4, expert=2,tensor=4, batch-1 decode: 4.59 against 4.47 ms a token).
SCATTERED_MAX_PAIRS = 512


def _sorted_pairs(x, weights, expert_ids, num_experts, gated_projection, down_projection):
    """The (token, slot) pairs sorted by expert, each expert's rows through its gated
    up-projection and its down-projection (`*_projection(rows, group_sizes)`: grouped matmuls),
    then back in order and weighted."""
    num_tokens, top_k = expert_ids.shape
    flat_expert_ids = expert_ids.reshape(-1)  # (T*K,)
    order = jnp.argsort(flat_expert_ids, stable=True)  # rows grouped by expert
    group_sizes = jnp.bincount(flat_expert_ids, length=num_experts).astype(jnp.int32)
    x_sorted = x[order // top_k]  # (T*K, D)
    activations = gated_projection(x_sorted, group_sizes)
    out_sorted = down_projection(activations, group_sizes)  # (T*K, D)
    if top_k > 1 and order.size <= SCATTERED_MAX_PAIRS:
        out = jnp.zeros_like(out_sorted).at[order].set(out_sorted, unique_indices=True)
        return jnp.einsum("tkd,tk->td", out.reshape(num_tokens, top_k, -1), weights)
    # Back in order by one gather of the rows (scattering them is two passes on TPU), slot-major
    sorted_row = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype), unique_indices=True)
    return slot_weighted_sum(out_sorted[sorted_row.reshape(num_tokens, top_k).T], weights.T)


def slot_weighted_sum(rows: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_k weights[k, t] * rows[k, t, :], accumulated in float32. Slot-major (K, T, D) rows
    need no relayout (token-major (T, K, D) pads K to a sublane tile on TPU, a copy), and the sum
    is elementwise, not a matmul K deep per token: one term per slot, so that the conversions
    fuse into the sum instead of writing a float32 copy of the rows."""
    terms = (rows[k].astype(jnp.float32) * weights[k, :, None].astype(jnp.float32) for k in range(rows.shape[0]))
    return functools.reduce(jnp.add, terms).astype(jnp.result_type(rows.dtype, weights.dtype))


def routed_experts_gathered(x, weights, expert_ids, gate_up, down, sum_hidden=_same, layer=None):
    """Same contract; gathers each (token, slot)'s expert weights. Reads only the chosen experts,
    so it suits decode, where tokens x top-k is small next to the number of experts. The slot
    stays a batch dimension of both matmuls: folding it into the output dimension makes XLA
    transpose the gathered weights, a second copy of them. `layer`: the weights are stacked over
    layers, (L, E, D, 2F) and (L, E, F, D), and the gather takes this layer's experts from them."""

    def chosen(experts):
        return dequantized(experts[expert_ids] if layer is None else experts[layer, expert_ids], x.dtype)

    x_per_slot = jnp.broadcast_to(x[:, None, :], (*expert_ids.shape, x.shape[-1]))
    activations = _glu(sum_hidden(jnp.einsum("tkd,tkdf->tkf", x_per_slot, chosen(gate_up))))
    out = jnp.einsum("tkf,tkfd->tkd", activations, chosen(down))
    return jnp.einsum("tkd,tk->td", out, weights)


# Row blocks of the looped backend. An expert's rows run as blocks of the largest, and the rest
# as one block of the smallest of these that holds it. On XLA:CPU a block costs a fixed part
# (reading the expert's weights) plus a part per row: few wasted rows and few blocks matter more
# than few compiled matmul shapes.
LOOP_BLOCKS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128)


@flax.struct.dataclass
class _BlockPlan:
    """The (token, slot) pairs laid out by expert, each expert's rows padded to whole blocks, so
    that no block reaches into another expert's rows; the blocks, grouped by size.

    `row_of_pair` (P,): each pair's row in the layout (pairs for no local expert: `rows`, a row
    no block covers); `block_expert`, `block_row` (blocks,): each block's expert and first row,
    the blocks of each size together, sizes in LOOP_BLOCKS' order; `size_first`, `size_count`
    (len(LOOP_BLOCKS),): where each size's blocks begin in them, and how many there are."""

    row_of_pair: jax.Array
    block_expert: jax.Array
    block_row: jax.Array
    size_first: jax.Array
    size_count: jax.Array
    num_pairs: int = flax.struct.field(pytree_node=False)
    rows: int = flax.struct.field(pytree_node=False)


def _used_sizes(num_pairs: int) -> tuple[int, ...]:
    """The block sizes that `num_pairs` rows can need: a size is used for a rest larger than the
    size before it."""
    return tuple(size for size, before in zip(LOOP_BLOCKS, (0, *LOOP_BLOCKS)) if before < num_pairs)


def _block_plan(expert_ids: jax.Array, num_experts: int) -> _BlockPlan:
    flat_ids = expert_ids.reshape(-1)
    num_pairs, largest = flat_ids.shape[0], LOOP_BLOCKS[-1]
    sizes = jnp.asarray(LOOP_BLOCKS)
    # static bounds: each expert wastes less than the widest gap between block sizes
    widest_gap = max(b - a for a, b in zip((0, *LOOP_BLOCKS), LOOP_BLOCKS))
    rows = max(num_pairs + num_experts * (widest_gap - 1), _used_sizes(num_pairs)[-1])
    max_blocks = num_experts + num_pairs // largest

    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)  # ids past the experts: none
    whole, rest = group_sizes // largest, group_sizes % largest
    rest_size_index = jnp.sum(sizes[None, :] < rest[:, None], axis=1)  # smallest size holding the rest
    padded = whole * largest + jnp.where(rest > 0, sizes[rest_size_index], 0)
    padded_start = jnp.cumsum(padded) - padded

    order = jnp.argsort(flat_ids, stable=True)  # pairs grouped by expert
    sorted_ids = flat_ids[order]
    group_start = jnp.cumsum(group_sizes) - group_sizes
    local = sorted_ids < num_experts
    safe_ids = jnp.where(local, sorted_ids, 0)
    row_sorted = jnp.where(local, padded_start[safe_ids] + jnp.arange(num_pairs) - group_start[safe_ids], rows)
    row_of_pair = jnp.zeros((num_pairs,), jnp.int32).at[order].set(row_sorted, unique_indices=True)

    blocks_per_expert = whole + (rest > 0)
    blocks_end = jnp.cumsum(blocks_per_expert)
    block = jnp.arange(max_blocks)
    expert = jnp.minimum(jnp.searchsorted(blocks_end, block, side="right"), num_experts - 1)
    nth = block - (blocks_end - blocks_per_expert)[expert]
    size_index = jnp.where(nth < whole[expert], len(LOOP_BLOCKS) - 1, rest_size_index[expert])
    size_index = jnp.where(block < blocks_end[-1], size_index, len(LOOP_BLOCKS))  # past the last: none
    by_size = jnp.argsort(size_index, stable=True)
    size_count = jnp.bincount(size_index, length=len(LOOP_BLOCKS)).astype(jnp.int32)
    return _BlockPlan(
        num_pairs=num_pairs,
        row_of_pair=row_of_pair,
        block_expert=expert[by_size],
        block_row=(padded_start[expert] + nth * largest)[by_size],
        size_first=jnp.cumsum(size_count) - size_count,
        size_count=size_count,
        rows=rows,
    )


def _each_block(plan: _BlockPlan, run, carry):
    """`carry = run(carry, expert, row, size)` for every block (`size` static): a loop per block
    size, no branches (XLA:CPU ran an expert's matmuls half again as slowly in a `lax.switch`
    branch as in a loop's body)."""
    for index, size in enumerate(_used_sizes(plan.num_pairs)):

        def one_block(block, carry, size=size):
            return run(carry, plan.block_expert[block], plan.block_row[block], size)

        first = plan.size_first[index]
        carry = jax.lax.fori_loop(first, first + plan.size_count[index], one_block, carry)
    return carry


def _expert_mlp(rows, gate_up, down):
    return _glu(rows @ gate_up) @ down


def _laid_out(values: jax.Array, plan: _BlockPlan) -> jax.Array:
    """(P, ...) pair values at their rows of the layout, zeros elsewhere; one row more, past the
    blocks, where pairs for no local expert go."""
    layout = jnp.zeros((plan.rows + 1, *values.shape[1:]), values.dtype)
    return layout.at[plan.row_of_pair].set(values, unique_indices=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def routed_experts_looped(x, weights, expert_ids, gate_up, down, layer=None):
    """Same contract; the pairs laid out by expert (`_BlockPlan`), then loops of dense matmuls
    over blocks of each expert's rows. Experts with no rows cost nothing; a block's padding rows
    are zeros, their results unread. Gradients loop over the same blocks (`_looped_backward`).
    `layer`: as in `routed_experts_gathered`; each block's expert is taken from the stacks."""
    if layer is not None:
        gate_up, down = _LayerView(gate_up, layer), _LayerView(down, layer)
    num_tokens, top_k = expert_ids.shape
    plan = _block_plan(expert_ids, gate_up.shape[0])
    x_laid_out = _laid_out(jnp.repeat(x, top_k, axis=0), plan)

    def run(out, expert, row, size):
        rows = jax.lax.dynamic_slice_in_dim(x_laid_out, row, size)
        y = _expert_mlp(rows, dequantized(gate_up[expert], x.dtype), dequantized(down[expert], x.dtype))
        return jax.lax.dynamic_update_slice_in_dim(out, y, row, 0)

    out = _each_block(plan, run, jnp.zeros_like(x_laid_out))[plan.row_of_pair]
    return jnp.einsum("tkd,tk->td", out.reshape(num_tokens, top_k, -1), weights)


class _LayerView:
    """One layer of weights stacked over layers: `view[expert]` is `stack[layer, expert]`, one
    slice of the stack (indexing the layer first would copy the whole layer's experts)."""

    def __init__(self, stack: jax.Array, layer: int):
        self.stack, self.layer = stack, layer
        self.shape = stack.shape[1:]

    def __getitem__(self, expert):
        return self.stack[self.layer, expert]


def _looped_forward(x, weights, expert_ids, gate_up, down, layer):
    saved = (x, weights, expert_ids, gate_up, down)
    return routed_experts_looped(x, weights, expert_ids, gate_up, down, layer), saved


def _looped_backward(layer, saved, cotangent):
    """The gradients block by block, as the forward pass ran: each block's expert MLP again, its
    vjp for the rows' and the expert's gradients, and each row's routing-weight gradient (its
    output against the cotangent). Padding rows have zero inputs and cotangents: they add nothing."""
    x, weights, expert_ids, gate_up, down = saved
    if isinstance(gate_up, QuantizedArray) or jax.sharding.get_abstract_mesh().manual_axes:
        # Stored integers have no gradient. Inside shard_map, weights that the shards share need
        # their gradients summed over the shards: the sorted backend's autodiff does that.
        return _sorted_backward(layer, saved, cotangent)
    num_tokens, top_k = expert_ids.shape
    layer_gate_up = gate_up if layer is None else _LayerView(gate_up, layer)
    layer_down = down if layer is None else _LayerView(down, layer)
    plan = _block_plan(expert_ids, layer_gate_up.shape[0])
    x_laid_out = _laid_out(jnp.repeat(x, top_k, axis=0), plan)
    cotangent_laid_out = _laid_out(jnp.repeat(cotangent, top_k, axis=0), plan)
    weight_laid_out = _laid_out(weights.reshape(-1), plan)

    def run(carry, expert, row, size):
        d_x, d_weight, d_gate_up, d_down = carry
        rows = jax.lax.dynamic_slice_in_dim(x_laid_out, row, size)
        expert_gate_up, expert_down = layer_gate_up[expert].astype(x.dtype), layer_down[expert].astype(x.dtype)
        y, mlp_vjp = jax.vjp(_expert_mlp, rows, expert_gate_up, expert_down)
        row_cotangent = jax.lax.dynamic_slice_in_dim(cotangent_laid_out, row, size)
        row_weight = jax.lax.dynamic_slice_in_dim(weight_laid_out, row, size)
        d_rows, d_expert_gate_up, d_expert_down = mlp_vjp(row_cotangent * row_weight[:, None])
        d_row_weight = jnp.einsum("rd,rd->r", y, row_cotangent)
        return (
            jax.lax.dynamic_update_slice_in_dim(d_x, d_rows, row, 0),
            jax.lax.dynamic_update_slice_in_dim(d_weight, d_row_weight, row, 0),
            d_gate_up.at[expert].add(d_expert_gate_up),
            d_down.at[expert].add(d_expert_down),
        )

    zeros = tuple(
        jnp.zeros(shape, x.dtype)
        for shape in (x_laid_out.shape, x_laid_out.shape[:1], layer_gate_up.shape, layer_down.shape)
    )
    d_x_laid_out, d_weight_laid_out, d_gate_up, d_down = _each_block(plan, run, zeros)
    d_x = d_x_laid_out[plan.row_of_pair].reshape(num_tokens, top_k, -1).sum(axis=1)
    d_weights = d_weight_laid_out[plan.row_of_pair].reshape(num_tokens, top_k).astype(weights.dtype)
    if layer is not None:
        d_gate_up, d_down = jnp.zeros_like(gate_up).at[layer].set(d_gate_up), jnp.zeros_like(down).at[layer].set(d_down)
    return d_x.astype(x.dtype), d_weights, None, d_gate_up.astype(gate_up.dtype), d_down.astype(down.dtype)


def _sorted_backward(layer, saved, cotangent):
    x, weights, expert_ids, gate_up, down = saved

    def sorted_backend(x, w, gu, dn):
        if layer is not None:
            gu, dn = gu[layer], dn[layer]
        return routed_experts_sorted(x, w, expert_ids, gu, dn)

    _, vjp = jax.vjp(sorted_backend, x, weights, gate_up, down)
    d_x, d_weights, d_gate_up, d_down = vjp(cotangent)
    return d_x, d_weights, None, d_gate_up, d_down


routed_experts_looped.defvjp(_looped_forward, _looped_backward)


def routed_experts_auto(x, weights, expert_ids, gate_up, down, sum_hidden=_same, layer=None):
    """By the platform the program is compiled for. TPU and GPU: the grouped matmul, whose
    kernel runs each expert's rows on the matrix units and skips experts with none; on GPU, with
    the experts stacked over layers (`layer`, an int or a loop's index), fewer pairs than experts
    take gathered weights read in the stack, and more our Triton grouped matmul that reads in the
    stack (XLA:GPU's ragged_dot would take a copy of the layer's experts, and multiplies every
    row by every expert: a dense matmul over all of them). CPU: gathered
    weights for a few (token, slot) pairs (decode), else the looped backend (a gather copies
    slowly on CPU, so from a few tokens on, batched decode included, the loop is faster).
    `layer`: as in `routed_experts_gathered`. Quantized experts on GPU take the CPU's backends:
    the grouped matmul would take a layer's experts dequantized, a float copy of them all (which
    the compiler hoists out of decode's loop, for every layer at once), and XLA:GPU multiplies
    every row by every expert. For many pairs the loop reads the layer's experts dequantized
    once: on int4 blocks XLA:GPU lays the whole stack of experts out again for its matmuls."""
    few_pairs = expert_ids.size < gate_up.shape[-3] // 4
    if compiling_for_gpu() and isinstance(gate_up, QuantizedArray) and sum_hidden is _same:
        if few_pairs:
            return routed_experts_gathered(x, weights, expert_ids, gate_up, down, sum_hidden, layer)
        if layer is not None:
            gate_up, down = gate_up[layer], down[layer]
        return routed_experts_looped(x, weights, expert_ids, dequantized(gate_up, x.dtype), dequantized(down, x.dtype))
    if compiling_for_gpu() and layer is not None and expert_ids.size < gate_up.shape[-3]:
        return routed_experts_gathered(x, weights, expert_ids, gate_up, down, sum_hidden, layer)
    if compiling_for_gpu() and layer is not None and gpu_tiles_fit(gate_up) and gpu_tiles_fit(down):
        return routed_experts_stacked_gpu(x, weights, expert_ids, gate_up, down, sum_hidden, layer)
    if compile_platform() != "cpu" or (sum_hidden is not _same and not few_pairs):
        # the grouped matmul; on CPU too when a collective completes the up-projection, which
        # cannot run inside the looped backend's loops of data-dependent length
        if layer is not None:
            gate_up, down = gate_up[layer], down[layer]
        return routed_experts_sorted(x, weights, expert_ids, gate_up, down, sum_hidden)
    if few_pairs:
        return routed_experts_gathered(x, weights, expert_ids, gate_up, down, sum_hidden, layer)
    return routed_experts_looped(x, weights, expert_ids, gate_up, down, layer)


# The backends that take weights stacked over layers and a `layer` to read in them.
READ_IN_STACK = (routed_experts_gathered, routed_experts_looped, routed_experts_auto)


def shared_experts(x, gate, up, down, act, sum_hidden=_same):
    """The always-on experts: x (T, D); gate, up (D, S); down (S, D) -> (T, D)."""
    hidden = act(sum_hidden(jnp.einsum("td,ds->ts", x, gate))) * sum_hidden(jnp.einsum("td,ds->ts", x, up))
    return jnp.einsum("ts,sd->td", hidden, down)


def experts_over_mesh(backend, act, x, weights, expert_ids, gate_up, down, shared):
    """Routed and shared experts over the current mesh. The `expert` axis splits the routed
    experts (each shard holds E/n of them) and the shared experts' width; the `tensor` axis splits
    the model dimension D of both. Each shard runs `backend` on the (token, slot) pairs routed to
    its own experts, and its slice of the shared experts, with its slice of D: up-projections'
    partial sums are added over `tensor` before the gating, and the shards' outputs (their slices
    of D) summed over `expert` in one all-reduce. Tokens are split over `data` and replicated over
    the other axes. Dropless: pairs routed to another shard get weight 0 and the id one past the
    local experts, a group that the grouped matmul skips and that gathers clamp (their zero
    weight removes them).

    `shared`: (gate, up, down) of the shared experts, (D, S), (D, S), (S, D)."""
    mesh = jax.sharding.get_abstract_mesh()
    tensor = mesh_axis_size(mesh, "tensor")
    model_dim = "tensor" if tensor > 1 and x.shape[-1] % tensor == 0 else None
    layers = (None,) * (gate_up.ndim - 3)  # a leading layer axis: weights stacked over layers
    # Manual over every mesh axis (a Pallas kernel cannot be partitioned by the compiler): token
    # rows split over `data` when they divide.
    data = mesh_axis_size(mesh, "data")
    rows = "data" if data > 1 and x.shape[0] % data == 0 else None
    if model_dim and backend is routed_experts_looped:
        backend = routed_experts_sorted  # its loops cannot hold the collective over `tensor`
    # Added in float32 and rounded once, as one matmul over the whole of D would be.
    sum_hidden = (lambda h: jax.lax.psum(h.astype(jnp.float32), "tensor").astype(h.dtype)) if model_dim else _same

    def local_experts(x, weights, expert_ids, gate_up, down, shared_gate, shared_up, shared_down):
        # x varies over the shards from here: JAX marks argsort's indices as the same on every
        # shard, so the sorted backend's x[order] would be transposed as psum-then-scatter with
        # one shard's order, a wrong gradient for x; varying, each shard scatters its own.
        x = jax.lax.pcast(x, "expert", to="varying")
        num_local = gate_up.shape[len(layers)]
        local_ids = expert_ids - jax.lax.axis_index("expert") * num_local
        here = (local_ids >= 0) & (local_ids < num_local)
        args = (x, jnp.where(here, weights, 0), jnp.where(here, local_ids, num_local), gate_up, down)
        routed = backend(*args, sum_hidden) if model_dim else backend(*args)
        out = routed.astype(jnp.float32) + shared_experts(x, shared_gate, shared_up, shared_down, act, sum_hidden)
        # Summed in float32 and rounded once (XLA:CPU also cannot compile a bf16 all-reduce).
        return jax.lax.psum(out.astype(jnp.float32), "expert").astype(x.dtype)

    width = P(model_dim, "expert")
    return jax.shard_map(
        local_experts,
        axis_names=set(mesh.axis_names),
        in_specs=(
            P(rows, model_dim),
            P(rows),
            P(rows),
            spec_for(gate_up, P(*layers, "expert", model_dim, None)),
            spec_for(down, P(*layers, "expert", None, model_dim)),
            width,
            width,
            P("expert", model_dim),
        ),
        out_specs=P(rows, model_dim),
    )(x, weights, expert_ids, gate_up, down, *shared)


# Rows a shard sends each other shard per round of `experts_by_dispatch`, as a multiple of an even
# share of its (token, slot) pairs: room for uneven routing before another round is needed.
DISPATCH_SLACK = 1.5


def can_dispatch(num_tokens: int) -> bool:
    """Whether `experts_by_dispatch` applies on the current mesh: an expert axis of several
    shards, no `tensor` split, and tokens that divide over `data` x `expert`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh_axis_size(mesh, "expert") < 2 or mesh_axis_size(mesh, "tensor") > 1:
        return False
    return num_tokens % (mesh_axis_size(mesh, "data") * mesh_axis_size(mesh, "expert")) == 0


def experts_by_dispatch(backend, act, x, weights, expert_ids, gate_up, down, shared):
    """`experts_over_mesh` without redundant work, for many tokens (prefill): the tokens are split
    over `data` x `expert`, each shard sends each (token, slot) pair to the shard holding its
    expert (an all-to-all), runs `backend` on the rows it received for its own experts, and sends
    the results back (a second all-to-all). Per-chip work falls with the number of shards.

    Buffers are static: per round a shard sends at most `capacity` rows to each shard, DISPATCH_SLACK
    times an even share. Pairs past it go in further rounds, as many as the most loaded shard
    needs, so nothing is dropped whatever the routing. The rounds are a loop of data-dependent
    length: no reverse mode, so training keeps `experts_over_mesh`. Shared experts run on each
    shard's own tokens, their weights gathered whole."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = mesh_axis_size(mesh, "expert")
    rows = ("data", "expert") if mesh_axis_size(mesh, "data") > 1 else ("expert",)
    layers = (None,) * (gate_up.ndim - 3)  # a leading layer axis: weights stacked over layers

    def local_tokens(x, weights, expert_ids, gate_up, down, shared_gate, shared_up, shared_down):
        num_tokens, top_k = expert_ids.shape
        num_local = gate_up.shape[-3]
        num_pairs = num_tokens * top_k
        capacity = math.ceil(num_pairs * DISPATCH_SLACK / shards)
        destination = (expert_ids // num_local).reshape(-1)  # (P,) shard of each pair
        is_destination = destination[:, None] == jnp.arange(shards)
        rank = jnp.take_along_axis(jnp.cumsum(is_destination, axis=0) - 1, destination[:, None], axis=1)[:, 0]
        busiest = jax.lax.pmax(jnp.max(jnp.sum(is_destination, axis=0)), tuple(mesh.axis_names))
        rounds = -(-busiest // capacity)
        pair_ids = (expert_ids % num_local).reshape(-1)
        slots = shards * capacity

        def exchange(buffer):  # (slots, ...): block s of `capacity` slots goes to (comes from) shard s
            parts = buffer.reshape(shards, capacity, *buffer.shape[1:])
            return jax.lax.all_to_all(parts, "expert", 0, 0).reshape(buffer.shape)

        def one_round(state):
            round_index, out = state
            slot = rank - round_index * capacity
            in_round = (slot >= 0) & (slot < capacity)
            target = jnp.where(in_round, destination * capacity + slot, slots)  # past the end: dropped
            pair_of_slot = (
                jnp.full((slots,), num_pairs, jnp.int32)
                .at[target]
                .set(jnp.arange(num_pairs, dtype=jnp.int32), mode="drop")
            )
            filled = pair_of_slot < num_pairs
            pair_of_slot = jnp.minimum(pair_of_slot, num_pairs - 1)
            # Empty slots carry the id one past the local experts: a group the backends skip (or
            # whose rows they compute and nobody reads).
            received = exchange(x[pair_of_slot // top_k])
            received_ids = exchange(jnp.where(filled, pair_ids[pair_of_slot], num_local))
            done = backend(received, jnp.ones((slots, 1), x.dtype), received_ids[:, None], gate_up, down)
            returned = exchange(done)[jnp.minimum(target, slots - 1).reshape(num_tokens, top_k).T]
            slot_weights = jnp.where(in_round, flat_weights, 0).reshape(num_tokens, top_k).T
            return round_index + 1, out + slot_weighted_sum(returned, slot_weights).astype(out.dtype)

        flat_weights = weights.reshape(-1)
        no_output = jnp.zeros_like(x)  # varies over the shards, as x
        _, routed = jax.lax.while_loop(lambda state: state[0] < rounds, one_round, (jnp.int32(0), no_output))
        return routed + shared_experts(x, shared_gate, shared_up, shared_down, act)

    return jax.shard_map(
        local_tokens,
        axis_names=set(mesh.axis_names),
        in_specs=(
            P(rows),
            P(rows),
            P(rows),
            spec_for(gate_up, P(*layers, "expert")),
            spec_for(down, P(*layers, "expert")),
            P(),
            P(),
            P(),
        ),
        out_specs=P(rows),
    )(x, weights, expert_ids, gate_up, down, *shared)


ROUTED_EXPERT_BACKENDS = {
    "dense": routed_experts_dense,
    "ragged_dot": routed_experts_sorted,
    "looped": routed_experts_looped,
    "gathered": routed_experts_gathered,
    "auto": routed_experts_auto,
}


# Decode steps of at most this many tokens run their experts fused (`fused_experts`). With 32
# (v6e 2x4, expert=8) the TPU compiler moved each layer's KV cache into VMEM and back around
# attention, 2.8 ms of a 10 ms step; up to 8 the fused kernel was faster on every chip measured.
FUSED_MAX_TOKENS = 8

# The in-stack kernel multiplies every row by each expert that holds some: for decode's few
# (token, slot) pairs. More pairs (a prompt's) take the row-tiled kernel.
IN_STACK_MAX_PAIRS = 512


class MoE(nn.Module):
    """`layer_index`: for generation, an int where the layers run unrolled (decode), a loop's
    index where they run in a loop (a prompt's prefill). The routed experts' params are then the
    whole stacks over layers, (L, E, D, 2F) and (L, E, F, D), and this layer's experts are read
    inside them: in place by the TPU kernels; on GPU, for fewer (token, slot) pairs than a shard
    has experts, by gathering the chosen ones (XLA:GPU fuses the gather into the matmul), for
    more by our Triton grouped matmul; sliced out elsewhere. `dispatch`: on a mesh, send tokens
    to their experts' shards (`experts_by_dispatch`) where it applies; inference only (prefill)."""

    config: AriaTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    layer_index: int | None = None
    dispatch: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
        """x (..., D). `token_mask` (x's leading shape): which tokens are real, if known. On one
        CPU device padding tokens are then routed to no expert (their outputs are the shared
        experts' alone): the looped backend skips them."""
        cfg = self.config
        d, e, f, s = cfg.hidden_size, cfg.moe_num_experts, cfg.intermediate_size, cfg.shared_expert_size

        def weight(name, shape, axes, num_expert_dims=0):
            """The weight in the compute dtype. Routed experts (num_expert_dims) stay quantized
            for the backends that read some of them (CPU, GPU), unless an adapter is added to
            them. On TPU the grouped matmul takes them all: dequantized here, where XLA fuses it
            with taking the layer's slice out of the stacks."""
            value = param_with_axes(self, name, default_kernel_init, shape, axes, self.param_dtype)
            if (
                num_expert_dims
                and isinstance(value, QuantizedArray)
                and compile_platform() != "tpu"
                and not self.has_variable("lora", name + "_lora_a")
            ):
                return value
            return adapted(self, name, dequantized(value, self.dtype), num_expert_dims)

        router = weight("router", (d, e), ("embed", "experts_logits"))
        backend = ROUTED_EXPERT_BACKENDS[cfg.moe_backend]
        on_mesh = on_several_devices()
        if self.layer_index is None:
            gate_up = weight("experts_gate_up", (e, d, 2 * f), ROUTED_EXPERT_AXES["experts_gate_up"], 1)
            down = weight("experts_down", (e, f, d), ROUTED_EXPERT_AXES["experts_down"], 1)
        else:  # no adapters here: generation runs on params alone
            layers = (cfg.num_hidden_layers,)
            gate_up = param_with_axes(
                self,
                "experts_gate_up",
                default_kernel_init,
                layers + (e, d, 2 * f),
                ("layers", *ROUTED_EXPERT_AXES["experts_gate_up"]),
                self.param_dtype,
            )
            down = param_with_axes(
                self,
                "experts_down",
                default_kernel_init,
                layers + (e, f, d),
                ("layers", *ROUTED_EXPERT_AXES["experts_down"]),
                self.param_dtype,
            )
            pairs = math.prod(x.shape[:-1]) * cfg.moe_topk
            quantized = isinstance(gate_up, QuantizedArray)
            if (
                compile_platform() == "tpu"
                and cfg.moe_backend in ("auto", "ragged_dot")
                and (pairs <= IN_STACK_MAX_PAIRS and isinstance(self.layer_index, int) or not quantized)
            ):
                backend = routed_experts_in_stack(self.layer_index)
            elif (backend is routed_experts_auto and compiling_for_gpu()) or (
                backend in READ_IN_STACK and isinstance(self.layer_index, int) and not on_mesh
            ):
                backend = functools.partial(backend, layer=self.layer_index)
            else:
                gate_up, down = gate_up[self.layer_index], down[self.layer_index]
            # quantized experts stay so: each backend dequantizes the experts it reads
            gate_up, down = (w if isinstance(w, QuantizedArray) else w.astype(self.dtype) for w in (gate_up, down))

        batch_shape = x.shape[:-1]
        tokens = x.reshape(-1, d)
        with jax.named_scope("router"):
            router_logits, top_weights, top_ids = route(tokens, router, cfg.moe_topk)
            # Kept only when the caller asks for "intermediates": training's auxiliary losses.
            self.sow("intermediates", "router_logits", router_logits)
            if token_mask is not None and on_one_cpu():
                top_ids = jnp.where(token_mask.reshape(-1, 1), top_ids, e)
        act = ACTIVATIONS[cfg.hidden_act]
        shared = (
            weight("shared_gate", (d, s), ("expert_embed", "shared_mlp")),
            weight("shared_up", (d, s), ("expert_embed", "shared_mlp")),
            weight("shared_down", (s, d), ("shared_mlp", "expert_embed")),
        )
        if self.dispatch and can_dispatch(tokens.shape[0]):
            with jax.named_scope("experts"):
                out = experts_by_dispatch(backend, act, tokens, top_weights, top_ids, gate_up, down, shared)
        elif on_mesh:
            with jax.named_scope("experts"):
                out = experts_over_mesh(backend, act, tokens, top_weights, top_ids, gate_up, down, shared)
        else:
            with jax.named_scope("routed_experts"):
                routed = backend(tokens, top_weights, top_ids, gate_up, down)
            with jax.named_scope("shared_experts"):
                out = routed + shared_experts(tokens, *shared, act)
        return out.reshape(*batch_shape, d)
