"""The TPU grouped-matmul kernels that the experts run on (`aria_jax.grouped_matmul`: decode's
for few rows, a prompt's in row tiles), in Pallas' interpreter, held to `jax.lax.ragged_dot` on
the same layer's weights; and the MoE built on them held to the sorted backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aria_jax.grouped_matmul import group_order, row_tiled_grouped_matmul, stacked_grouped_matmul, tile_steps
from aria_jax.hlo_cost import declared_kernel_cost
from aria_jax.hlo_text import parse_instruction
from aria_jax.quantization import Quantization, QuantizedArray
from aria_jax.moe import IN_STACK_MAX_PAIRS, route, routed_experts_in_stack, routed_experts_sorted


def random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize(
    "group_sizes",
    [
        [3, 0, 6, 0, 2],  # empty groups between, and 2 rows past the last group
        [13, 0, 0, 0, 0],  # every row in the first group
        [0, 0, 0, 0, 13],  # every row in the last
        [0, 0, 0, 0, 0],  # no rows at all: all zeros
        [1, 1, 1, 1, 1],
    ],
)
@pytest.mark.parametrize("layer", [0, 2])
def test_kernel_matches_ragged_dot_on_its_layer(group_sizes, layer):
    rows, weights = random((13, 32), 0), random((3, 5, 32, 48), 1)
    sizes = jnp.asarray(group_sizes, jnp.int32)
    out = stacked_grouped_matmul(rows, weights, layer, sizes, interpret=True)
    expected = jax.lax.ragged_dot(rows, weights[layer], sizes)
    assert out.shape == (13, 48)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert not np.asarray(out)[sum(group_sizes) :].any()


def test_kernel_with_column_blocks():
    """Widths of several 128-column blocks (TPU tiles) and a bfloat16 stack."""
    rows, weights = random((24, 128), 2).astype(jnp.bfloat16), random((2, 4, 128, 512), 3).astype(jnp.bfloat16)
    sizes = jnp.asarray([5, 0, 11, 8], jnp.int32)
    out = stacked_grouped_matmul(rows, weights, 1, sizes, interpret=True)
    expected = jax.lax.ragged_dot(rows, weights[1], sizes, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_kernel_reads_quantized_weights(scheme):
    """int8 / int4 weights (int4 in groups of 32 inputs): the products of their dequantized values."""
    quantization = Quantization(scheme, 32)
    values, scales = quantization.quantize(
        np.asarray(random((3, 5, 64, 256), 4)), ("language_model", "layers", "mlp", "experts_down"), (2,)
    )
    weights = QuantizedArray(jnp.asarray(values), jnp.asarray(scales))
    rows, sizes = random((13, 64), 5), jnp.asarray([3, 0, 6, 0, 2], jnp.int32)
    out = stacked_grouped_matmul(rows, weights, 2, sizes, interpret=True)
    expected = jax.lax.ragged_dot(rows, weights[2].dequantize(jnp.float32), sizes)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_group_order_lists_groups_with_rows_first_and_repeats_the_last():
    offsets, active, count = group_order(jnp.asarray([0, 4, 0, 2, 0, 1], jnp.int32))
    assert offsets.tolist() == [0, 0, 4, 4, 6, 6, 7]
    assert count.tolist() == [3]
    assert active.tolist() == [1, 3, 5, 5, 5, 5]  # the tail fetches nothing new


def test_kernel_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"rows \(4, 16\), weights \(2, 3, 32, 8\), layer 0"):
        stacked_grouped_matmul(jnp.zeros((4, 16)), jnp.zeros((2, 3, 32, 8)), 0, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="layer 2"):
        stacked_grouped_matmul(jnp.zeros((4, 32)), jnp.zeros((2, 3, 32, 8)), 2, jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize("num_tokens", [1, 4, 32])
def test_decode_backend_on_the_stack_matches_sorted_backend(num_tokens):
    """What decode runs per layer on TPU: the experts of `layer`, read inside the stack."""
    layers, experts, model, width, top_k = 3, 8, 32, 16, 2
    x = random((num_tokens, model), 4)
    weights, ids = route(x, random((model, experts), 5) * 4, top_k)[1:]
    gate_up, down = random((layers, experts, model, 2 * width), 6), random((layers, experts, width, model), 7)
    out = routed_experts_in_stack(1, interpret=True)(x, weights, ids, gate_up, down)
    expected = np.asarray(routed_experts_sorted(x, weights, ids, gate_up[1], down[1]))
    # Outputs reach ~100 here (unscaled random weights), and an entry near 0 is a difference of
    # such terms: float32 rounding of the two summation orders is relative to that scale.
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6 * scale)


def test_estimate_takes_the_kernels_declared_cost():
    """A kernel that reads one layer's experts out of a stack declares its bytes; the estimate
    takes them instead of the whole stack's size."""
    line = (
        '  %k = bf16[8,3328]{1,0} custom-call(%a, %b), custom_call_target="tpu_custom_call", backend_config='
        '{"custom_call_config": {"body": "TUxJUg==", "cost_estimate":{"flops":"2000","transcendentals":"0",'
        '"bytes_accessed":"138575872","remote_bytes_transferred":"0"}}}'
    )
    assert declared_kernel_cost(parse_instruction(line)) == (2000.0, 138575872.0)
    plain = '  %c = bf16[8,3328]{1,0} custom-call(%a), custom_call_target="ragged-dot-none"'
    assert declared_kernel_cost(parse_instruction(plain)) is None


GROUP_SIZES_OF_700_ROWS = [
    [300, 0, 100, 0, 50],  # empty groups between, groups across tile boundaries, 250 rows past the last
    [700, 0, 0, 0, 0],
    [0, 0, 0, 0, 700],
    [0, 0, 0, 0, 0],  # no rows: all zeros
    [1, 1, 1, 1, 1],
    [128, 128, 0, 0, 100],  # boundaries on tile edges
]


@pytest.mark.parametrize("group_sizes", GROUP_SIZES_OF_700_ROWS)
@pytest.mark.parametrize("steps_outer", [True, False])
def test_row_tiled_kernel_matches_ragged_dot_on_its_layer(group_sizes, steps_outer):
    """700 rows: 6 tiles of 128, the last running past the rows."""
    rows, weights = random((700, 64), 0), random((3, 5, 64, 256), 1)
    sizes = jnp.asarray(group_sizes, jnp.int32)
    for layer in (0, 2):
        out = row_tiled_grouped_matmul(rows, weights, layer, sizes, steps_outer=steps_outer, interpret=True)
        expected = jax.lax.ragged_dot(rows, weights[layer], sizes)
        assert out.shape == (700, 256)
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
        assert not np.asarray(out)[sum(group_sizes) :].any()


@pytest.mark.parametrize("steps_outer", [True, False])
def test_row_tiled_kernel_gates_its_product(steps_outer):
    """With an activation: act(rows @ gate) * (rows @ up), the halves of each group's weights."""
    rows, weights = random((700, 64), 2), random((3, 5, 64, 256), 3)
    sizes = jnp.asarray([300, 0, 100, 0, 50], jnp.int32)
    out = row_tiled_grouped_matmul(rows, weights, 1, sizes, jax.nn.silu, steps_outer, interpret=True)
    gate, up = jnp.split(jax.lax.ragged_dot(rows, weights[1], sizes), 2, axis=-1)
    expected = np.where((np.arange(700) < 450)[:, None], jax.nn.silu(gate) * up, 0.0)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps_outer", [True, False])
def test_row_tiled_kernel_with_column_blocks_in_bfloat16(steps_outer):
    """Weights wider than one block of the kernel's (2048-deep bfloat16: 2 blocks of 1024
    columns; gated, 2 of 512 per half), 2,200 rows in tiles of 256, gated and not."""
    rows = random((2200, 2048), 4).astype(jnp.bfloat16)
    weights = (random((2, 3, 2048, 2048), 5) / 40).astype(jnp.bfloat16)
    sizes = jnp.asarray([900, 0, 1250], jnp.int32)
    expected = jax.lax.ragged_dot(rows, weights[1], sizes, preferred_element_type=jnp.float32)
    out = row_tiled_grouped_matmul(rows, weights, 1, sizes, steps_outer=steps_outer, interpret=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected), rtol=2e-2, atol=2e-2)
    gated = row_tiled_grouped_matmul(rows, weights, 1, sizes, jax.nn.silu, steps_outer, interpret=True)
    gate, up = np.split(np.asarray(expected), 2, axis=-1)
    np.testing.assert_allclose(np.asarray(gated, np.float32), np.asarray(jax.nn.silu(gate)) * up, rtol=5e-2, atol=5e-2)


def test_row_tiled_kernel_reads_the_layer_a_loop_is_at():
    """The layer as a traced loop index: each iteration reads its own layer of the stack."""
    rows, weights = random((300, 32), 6), random((3, 4, 32, 128), 7)
    sizes = jnp.asarray([100, 50, 0, 150], jnp.int32)

    def one_layer(carry, layer):
        return carry, row_tiled_grouped_matmul(rows, weights, layer, sizes, interpret=True)

    _, outs = jax.lax.scan(one_layer, 0, jnp.arange(3))
    for layer in range(3):
        expected = jax.lax.ragged_dot(rows, weights[layer], sizes)
        np.testing.assert_allclose(np.asarray(outs[layer]), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_tile_steps_visit_each_group_of_each_tile_once():
    """Groups [300, 0, 100, 0, 50] over 3 tiles of 256 rows: tile 0 is group 0's, tile 1 holds
    the end of group 0, empty group 1 (nothing computed, nothing fetched), group 2, empty group 3
    and group 4; tile 2 has no rows (zeroed). 3 tiles + 5 groups - 1 steps."""
    tile, group, fetched, flags, offsets = tile_steps(jnp.asarray([300, 0, 100, 0, 50], jnp.int32), 3, 256)
    assert tile.tolist() == [0, 1, 1, 1, 1, 1, 2]
    assert group.tolist() == [0, 0, 1, 2, 3, 4, 4]
    assert fetched.tolist() == [0, 0, 0, 2, 2, 4, 4]
    assert flags.tolist() == [3, 3, 0, 1, 0, 1, 2]  # 1: computes, 2: zeroes its tile's accumulator
    assert offsets.tolist() == [0, 300, 300, 400, 400, 450]


def test_row_tiled_kernel_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"rows \(4, 16\), weights \(2, 3, 32, 8\)"):
        row_tiled_grouped_matmul(jnp.zeros((4, 16)), jnp.zeros((2, 3, 32, 8)), 0, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="layer 2 of a stack of 2"):
        row_tiled_grouped_matmul(jnp.zeros((4, 32)), jnp.zeros((2, 3, 32, 8)), 2, jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize("layer_in_a_loop", [False, True])
def test_prefill_backend_on_the_stack_matches_sorted_backend(layer_in_a_loop):
    """What a prompt's MoE runs per layer on TPU: more pairs than decode's kernel takes, the
    gating fused, the layer an int (the layers unrolled) or a loop's index (the layer scan)."""
    layers, experts, model, width, top_k = 3, 8, 32, 16, 2
    x = random((IN_STACK_MAX_PAIRS, model), 8)  # IN_STACK_MAX_PAIRS x 2 pairs
    weights, ids = route(x, random((model, experts), 9) * 4, top_k)[1:]
    gate_up, down = random((layers, experts, model, 2 * width), 10), random((layers, experts, width, model), 11)
    if layer_in_a_loop:
        outs = jax.lax.map(
            lambda layer: routed_experts_in_stack(layer, interpret=True)(x, weights, ids, gate_up, down),
            jnp.arange(layers),
        )
        out = outs[1]
    else:
        out = routed_experts_in_stack(1, interpret=True)(x, weights, ids, gate_up, down)
    expected = np.asarray(routed_experts_sorted(x, weights, ids, gate_up[1], down[1]))
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6 * scale)
