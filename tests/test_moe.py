"""The MoE block's routed-expert paths agree, values and gradients, and the router is
"top-k on raw logits, softmax over the k selected" (transformers'
`transformers.models.aria.modeling_aria.AriaTextTopKRouter`)."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharding_worker import equations, output_shapes, pallas_kernels, stacked_moe

import aria_jax.moe as moe_module
from aria_jax.config import AriaTextConfig
from aria_jax.grouped_matmul_gpu import stacked_grouped_matmul_gpu
from aria_jax.moe import (
    LOOP_BLOCKS,
    MoE,
    route,
    routed_experts_auto,
    routed_experts_dense,
    routed_experts_gathered,
    routed_experts_looped,
    routed_experts_sorted,
    routed_experts_stacked_gpu,
)

FAST_PATHS = {"sorted": routed_experts_sorted, "looped": routed_experts_looped, "gathered": routed_experts_gathered}

TOLERANCE = 1e-5  # max abs diff, float32
HIDDEN, WIDTH = 16, 12


# jax.random compiles its hash for every output shape (~0.4 s each on CPU); drawing every array
# from one fixed-size pool keeps that to a single compile.
POOL_SIZE = 1 << 15
_normal_pool = jax.jit(lambda key: jax.random.normal(key, (POOL_SIZE,), jnp.float32))


def normal(seed: int, shape, scale: float = 1.0) -> np.ndarray:
    """float32 N(0, scale^2) of the given shape, drawn with jax.random."""
    size = int(np.prod(shape))
    assert size <= POOL_SIZE
    return np.asarray(_normal_pool(jax.random.key(seed)))[:size].reshape(shape) * np.float32(scale)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def inputs(seed, num_tokens, num_experts, top_k, expert_ids=None):
    """(x, weights, expert_ids, gate_up, down): random x and expert weights (scaled by 1/sqrt(fan_in)),
    softmax routing weights, and distinct random expert ids per token unless `expert_ids` is given."""
    x = normal(4 * seed, (num_tokens, HIDDEN))
    gate_up = normal(4 * seed + 1, (num_experts, HIDDEN, 2 * WIDTH), HIDDEN**-0.5)
    down = normal(4 * seed + 2, (num_experts, WIDTH, HIDDEN), WIDTH**-0.5)
    routing = normal(4 * seed + 3, (num_tokens, num_experts + top_k))
    if expert_ids is None:
        expert_ids = np.argsort(routing[:, :num_experts], axis=-1)[:, :top_k]  # a random k-subset
    weights = softmax(routing[:, num_experts:])
    return tuple(jnp.asarray(a) for a in (x, weights, np.asarray(expert_ids, np.int32), gate_up, down))


def max_diff(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


def group_sizes(expert_ids, num_experts):
    return np.bincount(np.asarray(expert_ids).reshape(-1), minlength=num_experts)


# Routings where experts get no tokens / every token, built directly.
def _empty_experts(num_tokens):  # E=6, only experts 1 and 4 are used (0, 2, 3, 5 are empty)
    return [[1, 4] if t % 3 else [4, 1] for t in range(num_tokens)]


def _one_expert_takes_all(num_tokens):  # E=5, top-1, every token to expert 3
    return [[3] for _ in range(num_tokens)]


def _one_expert_in_every_token(num_tokens):  # E=4, top-3, expert 0 in every token, last slot varies
    return [[0, 2, 1 + 2 * (t % 2)] for t in range(num_tokens)]


def _last_expert_only(num_tokens):  # E=4, top-1, all to the last expert (groups before it empty)
    return [[3] for _ in range(num_tokens)]


# E=6, top-1, group sizes that sit on and around the looped backend's row blocks (8, 16, 24, ...,
# 64, 80, ..., 128): the largest block plus one row (a second block), the largest exactly, one
# row past a size, a size exactly, an empty first expert and a single-row last one.
BLOCK_BOUNDARY_SIZES = (0, 129, 128, 65, 16, 1)


def _block_boundaries(num_tokens):
    assert num_tokens == sum(BLOCK_BOUNDARY_SIZES) and LOOP_BLOCKS[-1] == 128 and {16, 64, 80} <= set(LOOP_BLOCKS)
    return [[expert] for expert, size in enumerate(BLOCK_BOUNDARY_SIZES) for _ in range(size)][::-1]


CASES = {
    # name: (tokens, experts, top_k, routing builder; None = random routing)
    "t16_e4_k2": (16, 4, 2, None),
    "t33_e8_k1": (33, 8, 1, None),
    "t7_e5_k5_topk_eq_experts": (7, 5, 5, None),
    "t64_e8_k3": (64, 8, 3, None),
    "t1_e6_k2_single_token": (1, 6, 2, None),
    "t12_e6_k2_empty_experts": (12, 6, 2, _empty_experts),
    "t10_e5_k1_one_expert_takes_all": (10, 5, 1, _one_expert_takes_all),
    "t9_e4_k3_one_expert_in_every_token": (9, 4, 3, _one_expert_in_every_token),
    "t8_e4_k1_last_expert_only": (8, 4, 1, _last_expert_only),
    "t339_e6_k1_block_boundaries_empty": (sum(BLOCK_BOUNDARY_SIZES), 6, 1, _block_boundaries),
    "t150_e64_k6_random": (150, 64, 6, None),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    name = request.param
    tokens, experts, top_k, builder = CASES[name]
    args = inputs(list(CASES).index(name), tokens, experts, top_k, None if builder is None else builder(tokens))
    sizes = group_sizes(args[2], experts)
    assert args[2].shape == (tokens, top_k)
    assert all(len(set(row)) == top_k for row in np.asarray(args[2]).tolist())  # distinct per token
    # The constructed cases must really be what their names say.
    if "empty" in name or "only" in name or "takes_all" in name:
        assert (sizes == 0).any(), sizes
    if "takes_all" in name or "every_token" in name:
        assert sizes.max() == tokens, sizes
    assert sizes.sum() == tokens * top_k
    return name, args


@pytest.mark.parametrize("path", list(FAST_PATHS))
def test_fast_paths_equal_dense(case, path):
    name, args = case
    dense = jax.jit(routed_experts_dense)(*args)
    sorted_ = jax.jit(FAST_PATHS[path])(*args)
    assert sorted_.shape == dense.shape == args[0].shape
    assert float(jnp.max(jnp.abs(dense))) > 0.1  # not a trivially-zero comparison
    diff = max_diff(sorted_, dense)
    print(f"[{name}] jitted sorted vs dense max|diff| = {diff:.2e}")
    assert diff <= TOLERANCE, f"{name}: {diff}"


@pytest.mark.parametrize("path", ["looped", "gathered", "auto"])
@pytest.mark.parametrize("case", ["t16_e4_k2", "t12_e6_k2_empty_experts"], indirect=True)
def test_backends_read_a_layer_in_stacked_weights(case, path):
    """With `layer`, a backend takes weights stacked over layers (decode) and reads that layer's
    experts: the same values as on the layer's own weights, and not another layer's."""
    name, (x, weights, expert_ids, gate_up, down) = case
    backend = {**FAST_PATHS, "auto": routed_experts_auto}[path]
    # three layers: the middle one is this case's weights, the others its weights reversed and scaled
    stack_gate_up = jnp.stack([gate_up[::-1], gate_up, 2 * gate_up])
    stack_down = jnp.stack([down[::-1] * 3, down, -down])
    on_layer = jax.jit(backend)(x, weights, expert_ids, gate_up, down)
    for layer in range(3):
        in_stack = jax.jit(functools.partial(backend, layer=layer))(x, weights, expert_ids, stack_gate_up, stack_down)
        expected = (
            on_layer
            if layer == 1
            else jax.jit(backend)(x, weights, expert_ids, stack_gate_up[layer], stack_down[layer])
        )
        assert max_diff(in_stack, expected) <= TOLERANCE, f"{name}, layer {layer}"
    assert max_diff(jax.jit(routed_experts_dense)(x, weights, expert_ids, gate_up, down), on_layer) <= TOLERANCE


@pytest.mark.parametrize("sizes", [[3, 0, 20, 1, 0], [70, 0, 210, 1, 40]], ids=["decode_tiles", "prompt_tiles"])
def test_gpu_grouped_matmul_multiplies_each_groups_rows_in_the_stack(sizes):
    """Triton's kernel (in Pallas' interpreter): groups without rows, a group longer than a tile
    of rows, rows past the last group (zeros), a traced layer, and tiles smaller than the largest
    where those do not divide (depth 32, width 48); a decode step's few rows in tiles of 16, a
    prompt's many (64 a group on average) in tiles of 64."""
    layers, groups, depth, width = 3, 5, 32, 48
    weights = normal(11, (layers, groups, depth, width))
    sizes = np.array(sizes, np.int32)
    rows = normal(12, (int(sizes.sum()) + 4, depth))
    out = jax.jit(stacked_grouped_matmul_gpu)(rows, weights, jnp.int32(2), jnp.asarray(sizes))
    expected = np.zeros((rows.shape[0], width), np.float32)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for group in range(groups):
        expected[bounds[group] : bounds[group + 1]] = rows[bounds[group] : bounds[group + 1]] @ weights[2, group]
    assert max_diff(out, expected) <= TOLERANCE * np.abs(expected).max()
    assert np.all(np.asarray(out)[bounds[-1] :] == 0)


def test_gpu_prefill_reads_each_layers_experts_in_the_stack(monkeypatch):
    """A prompt's layers run in a loop, the layer a traced index. Compiled for a GPU (the platform
    patched; Pallas' interpreter runs the kernel here), each layer's many (token, slot) pairs go
    through the Triton grouped matmul, which reads the stacks in place: no copy of a layer's
    experts, and no dense matmul of every row by every expert (XLA:GPU's ragged_dot). Every
    layer gives the MoE with that layer's experts alone."""
    config, params = stacked_moe(4, 3, 32)
    x = jnp.asarray(normal(31, (2, 80, 32)))  # 320 pairs: a prompt's tiles of 64 rows

    def one_layer(params, layer):
        return {
            **params,
            "experts_gate_up": params["experts_gate_up"][layer],
            "experts_down": params["experts_down"][layer],
        }

    expected = [np.asarray(jax.jit(MoE(config).apply)({"params": one_layer(params, i)}, x)) for i in range(3)]
    monkeypatch.setattr(moe_module, "compile_platform", lambda: "gpu")
    monkeypatch.setattr(moe_module, "compiling_for_gpu", lambda: True)

    def in_loop(params, x, layer):
        return MoE(config, layer_index=layer).apply({"params": params}, x)

    jaxpr = jax.make_jaxpr(in_loop)(params, x, jnp.int32(1)).jaxpr
    assert pallas_kernels(jaxpr) == ["stacked_grouped_matmul_gpu"] * 2
    assert (4, 32, 64) not in output_shapes(jaxpr)  # a layer's experts_gate_up, copied out
    assert not [e for e in equations(jaxpr) if e.primitive.name == "ragged_dot_general"]
    for layer in range(3):
        got = jax.jit(in_loop)(params, x, jnp.int32(layer))
        assert max_diff(got, expected[layer]) <= TOLERANCE * np.abs(expected[layer]).max(), layer


@pytest.mark.parametrize("routing", ["random", "empty_experts", "routed_elsewhere"])
def test_gpu_backend_reads_a_layer_in_stacked_weights(routing):
    """`routed_experts_stacked_gpu` (decode's batches on GPU): each layer of the stack gives the
    dense reference on that layer's experts, with experts that no pair picks, and with pairs
    routed to another shard's experts (the id one past the local ones, weight 0, as
    `experts_over_mesh` hands them over)."""
    tokens, experts, top_k, hidden, width = 12, 6, 2, 16, 16
    x = normal(21, (tokens, hidden))
    stack_gate_up = normal(22, (3, experts, hidden, 2 * width), hidden**-0.5)
    stack_down = normal(23, (3, experts, width, hidden), width**-0.5)
    scores = normal(24, (tokens, experts + top_k))
    expert_ids = np.argsort(scores[:, :experts], axis=-1)[:, :top_k]
    weights = softmax(scores[:, experts:])
    if routing == "empty_experts":
        expert_ids = np.tile([1, 4], (tokens, 1))
    if routing == "routed_elsewhere":
        expert_ids[::3, 0] = experts
        weights[::3, 0] = 0.0
    expert_ids = jnp.asarray(expert_ids, jnp.int32)
    for layer in range(3):
        got = jax.jit(functools.partial(routed_experts_stacked_gpu, layer=layer))(
            x, weights, expert_ids, stack_gate_up, stack_down
        )
        expected = routed_experts_dense(x, weights, expert_ids, stack_gate_up[layer], stack_down[layer])
        assert float(jnp.max(jnp.abs(expected))) > 0.1
        assert max_diff(got, expected) <= TOLERANCE, f"{routing}, layer {layer}"


@pytest.mark.parametrize("case", ["t339_e6_k1_block_boundaries_empty"], indirect=True)
def test_looped_gradients_in_stacked_weights(case):
    """The looped backend's own backward with `layer`: the stack's gradient is the layer's own
    weights' gradient in that layer and zero in the others."""
    name, (x, weights, ids, gate_up, down) = case
    cotangent = jnp.asarray(normal(98, x.shape))
    stack_gate_up, stack_down = jnp.stack([gate_up[::-1], gate_up, 2 * gate_up]), jnp.stack([-down, down, 3 * down])

    def grads(layer, gate_up, down):
        def f(x, weights, gate_up, down):
            return jnp.sum(routed_experts_looped(x, weights, ids, gate_up, down, layer) * cotangent)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(x, weights, gate_up, down)

    in_stack = grads(1, stack_gate_up, stack_down)
    own = grads(None, gate_up, down)
    for what, a, b in zip(("x", "weights"), in_stack[:2], own[:2]):
        assert max_diff(a, b) <= TOLERANCE, f"{name}: d/d{what}"
    for what, stack, layer_grad in zip(("gate_up", "down"), in_stack[2:], own[2:]):
        assert stack.shape == (3, *layer_grad.shape)
        assert max_diff(stack[1], layer_grad) <= TOLERANCE and float(jnp.max(jnp.abs(layer_grad))) > 0.1, what
        assert not jnp.any(stack[0]) and not jnp.any(stack[2]), f"{name}: d/d{what} leaks into other layers"


# Op-by-op (un-jitted) execution compiles every primitive for every shape: two cases suffice.
@pytest.mark.parametrize("case", ["t16_e4_k2", "t12_e6_k2_empty_experts"], indirect=True)
def test_unjitted_sorted_equals_dense(case):
    name, args = case
    diff = max_diff(routed_experts_sorted(*args), jax.jit(routed_experts_dense)(*args))
    print(f"[{name}] eager sorted vs dense max|diff| = {diff:.2e}")
    assert diff <= TOLERANCE, f"{name}: {diff}"


def test_dense_reference_is_the_per_token_sum(case):
    """The dense path itself against a plain per-(token, slot) loop in numpy."""
    name, (x, weights, ids, gate_up, down) = case
    x, weights, ids, gate_up, down = map(np.asarray, (x, weights, ids, gate_up, down))
    expected = np.zeros_like(x)
    width = down.shape[1]
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            z = x[t] @ gate_up[ids[t, k]]
            gate, up = z[:width], z[width:]
            expected[t] += weights[t, k] * ((gate / (1 + np.exp(-gate)) * up) @ down[ids[t, k]])
    diff = max_diff(jax.jit(routed_experts_dense)(x, weights, ids, gate_up, down), expected)
    assert diff <= TOLERANCE, f"{name}: {diff}"


@pytest.mark.parametrize("path", list(FAST_PATHS))
def test_fast_path_gradients_equal_dense(case, path):
    """Gradients w.r.t. x, routing weights and both expert weight tensors (fine-tuning uses them),
    of the outputs summed with random coefficients (a plain sum would not see outputs swapped
    between hidden units), jitted."""
    name, (x, weights, ids, gate_up, down) = case
    cotangent = jnp.asarray(normal(99, x.shape))

    def loss(fn):
        def f(x, weights, gate_up, down):
            return jnp.sum(fn(x, weights, ids, gate_up, down) * cotangent)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))

    ours = loss(FAST_PATHS[path])(x, weights, gate_up, down)
    reference = loss(routed_experts_dense)(x, weights, gate_up, down)
    for what, a, b in zip(("x", "weights", "gate_up", "down"), ours, reference):
        assert a.shape == b.shape
        diff, scale = max_diff(a, b), max(1.0, float(jnp.max(jnp.abs(b))))
        print(f"[{name}] grad {what} max|diff| = {diff:.2e}, max|grad| = {scale:.2e}")
        # a weight's gradient sums over its expert's rows: float32 rounding grows with its size
        assert diff <= TOLERANCE * scale, f"{name}: d/d{what} differs by {diff} (max |grad| {scale})"
    # Unused experts get exactly zero gradient on both paths; used ones get some.
    used = group_sizes(ids, gate_up.shape[0]) > 0
    for grad in (ours[2], ours[3]):
        norms = np.asarray(jnp.max(jnp.abs(grad), axis=(1, 2)))
        assert (norms[~used] == 0).all() and (norms[used] > 0).all(), norms


# ----------------------------------------------------------------------------- router


def numpy_route(x, kernel, top_k):
    logits = x.astype(np.float64) @ kernel.astype(np.float64)
    ids = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]
    top = np.take_along_axis(logits, ids, axis=-1)
    weights = np.exp(top - top.max(-1, keepdims=True))
    return logits, weights / weights.sum(-1, keepdims=True), ids


@pytest.mark.parametrize("tokens,experts,top_k", [(20, 8, 2), (13, 6, 1), (9, 4, 4), (32, 64, 6)])
def test_route_matches_numpy(tokens, experts, top_k):
    x = jnp.asarray(normal(1000 + top_k, (tokens, HIDDEN)))
    kernel = jnp.asarray(normal(2000 + top_k, (HIDDEN, experts)))
    logits, weights, ids = route(x, kernel, top_k)
    ref_logits, ref_weights, ref_ids = numpy_route(np.asarray(x), np.asarray(kernel), top_k)
    # Test-data precondition: no near-ties that float32 rounding could reorder.
    gaps = -np.diff(np.sort(ref_logits, axis=-1)[:, ::-1][:, : min(top_k + 1, experts)], axis=-1)
    assert gaps.size == 0 or gaps.min() > 1e-4, gaps.min()
    assert ids.shape == weights.shape == (tokens, top_k)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    np.testing.assert_allclose(np.asarray(weights), ref_weights, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=0, atol=1e-6)
    if top_k < experts:
        # Not the softmax over all experts, restricted to the chosen ones (that would not sum to 1).
        full = np.exp(ref_logits - ref_logits.max(-1, keepdims=True))
        full /= full.sum(-1, keepdims=True)
        assert np.abs(np.take_along_axis(full, ref_ids, -1) - np.asarray(weights)).max() > 1e-3


# ----------------------------------------------------------------------------- the whole block


def randomized(params, seed, router_scale=4.0):
    """Every weight ~ N(0, 1/fan_in) (the default init's stddev 0.02 makes outputs ~1e-4, too
    small for an absolute tolerance to mean anything); the router a few times larger."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        scale = max(leaf.shape[-2], 1) ** -0.5 * (router_scale if "router" in jax.tree_util.keystr(path) else 1.0)
        out.append(jnp.asarray(normal(seed + i, leaf.shape, scale)))
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.mark.parametrize("experts,top_k,shared", [(4, 2, 2), (6, 1, 1), (3, 3, 0), (8, 3, 1)])
def test_moe_module_backends_agree(experts, top_k, shared):
    """The whole block, same params, moe_backend "dense" vs every other backend."""
    config = AriaTextConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=WIDTH,
        num_hidden_layers=1,
        num_attention_heads=2,
        moe_num_experts=experts,
        moe_topk=top_k,
        moe_num_shared_experts=shared,
        moe_backend="dense",
    )
    x = jnp.asarray(normal(3000 + experts, (2, 11, HIDDEN)))
    shapes = jax.eval_shape(MoE(config).init, jax.random.key(0), x)
    params = randomized(nn.meta.unbox(shapes), 4000 + 100 * experts)

    def apply(backend, params):
        return jax.jit(MoE(dataclasses.replace(config, moe_backend=backend)).apply)(params, x)

    dense = apply("dense", params)
    assert dense.shape == x.shape
    assert float(jnp.max(jnp.abs(dense))) > 0.1
    for backend in ("ragged_dot", "looped", "gathered", "auto"):
        diff = max_diff(apply(backend, params), dense)
        print(f"[E{experts} k{top_k} shared{shared}] {backend} vs dense max|diff| = {diff:.2e}")
        assert diff <= TOLERANCE, f"{backend}: {diff}"
    # One token (decode): "auto" takes the gathered path when top-k < experts.
    one_token = x[:1, :1]
    decode_dense = jax.jit(MoE(config).apply)(params, one_token)
    decode_auto = jax.jit(MoE(dataclasses.replace(config, moe_backend="auto")).apply)(params, one_token)
    assert max_diff(decode_auto, decode_dense) <= TOLERANCE
    # The block is routed + shared: with the routed experts' output zeroed what is left is the
    # shared experts' part (exactly zero without shared experts), and it differs from the whole.
    zeroed = {"params": {**params["params"], "experts_down": jnp.zeros_like(params["params"]["experts_down"])}}
    shared_only = apply("ragged_dot", zeroed)
    if shared:
        assert float(jnp.max(jnp.abs(shared_only))) > 0.1
    else:
        assert float(jnp.max(jnp.abs(shared_only))) == 0.0
    assert max_diff(dense, shared_only) > 0.1


def test_the_params_with_an_expert_axis_are_those_of_the_expert_table():
    """Every param whose logical axes include "experts" is in `ROUTED_EXPERT_AXES`, with the
    table's axes behind the layer axis: what checkpoint chunking, quantization, LoRA and decode
    read from the table is what the model declares."""
    from aria_jax.expert_weights import EXPERT_AXIS, INPUT_AXIS, ROUTED_EXPERT_AXES, is_routed_expert_weight
    from aria_jax.modeling import text_param_shapes

    config = AriaTextConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        moe_num_experts=4,
        moe_topk=2,
    )
    boxed = jax.tree_util.tree_leaves_with_path(text_param_shapes(config), is_leaf=lambda x: hasattr(x, "names"))
    with_expert_axis = {path[-1].key: tuple(leaf.names) for path, leaf in boxed if "experts" in leaf.names}
    assert with_expert_axis == {name: ("layers", *axes) for name, axes in ROUTED_EXPERT_AXES.items()}
    assert not any(is_routed_expert_weight(path[-1].key) for path, leaf in boxed if "experts" not in leaf.names)
    # the axis positions stated beside the table are the table's: (experts, in, out)
    assert all(axes[EXPERT_AXIS] == "experts" and INPUT_AXIS == EXPERT_AXIS + 1 for axes in ROUTED_EXPERT_AXES.values())
