"""Weight-only int8 and int4 quantization (`aria_jax.quantization`).

The quality test holds the implementation to the scheme itself: the same rounding simulated in
float64 numpy, written here from the scheme's definition (symmetric absmax scales, per output
channel for int8, per group of inputs for int4), gives a KL divergence from the float model that
ours must match within 1.1x. Everything else checks that every path (loaders, MoE backends,
decode) reads the quantized weights as those numbers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aria_jax
from aria_jax.moe import (
    routed_experts_auto,
    routed_experts_dense,
    routed_experts_gathered,
    routed_experts_looped,
    routed_experts_sorted,
)
from aria_jax.quantization import Quantization, QuantizedArray, dequantized, quantize_params
from tiny_models import make_text_model

# The tiny text model: model dimension 64 in two int4 groups of 32, four experts.
TEXT = dict(
    hidden_size=64,
    intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    moe_num_experts=4,
    vocab_size=160,
)
GROUP = 32
LARGEST = {"int8": 127, "int4": 7}

# Each quantized text weight: its input axes (full shape, layer axis first where stacked).
INPUT_AXES = {
    ("layers", "self_attn", "q_proj"): (1,),
    ("layers", "self_attn", "k_proj"): (1,),
    ("layers", "self_attn", "v_proj"): (1,),
    ("layers", "self_attn", "o_proj"): (1, 2),
    ("layers", "mlp", "experts_gate_up"): (2,),
    ("layers", "mlp", "experts_down"): (2,),
    ("layers", "mlp", "shared_gate"): (1,),
    ("layers", "mlp", "shared_up"): (1,),
    ("layers", "mlp", "shared_down"): (1,),
    ("lm_head",): (0,),
}


def simulated_rounding(weight: np.ndarray, input_axes: tuple[int, ...], scheme: str, group: int) -> np.ndarray:
    """The scheme's rounding of one weight in float64: a scale per output channel (int8: over
    all input axes) or per `group` consecutive inputs of the last input axis (int4)."""
    w = weight.astype(np.float64)
    last = input_axes[-1]
    if scheme == "int4" and w.shape[last] > group:
        w = np.moveaxis(w, last, -1)
        grouped = w.reshape(*w.shape[:-1], -1, group)
        scale = np.abs(grouped).max(axis=-1, keepdims=True) / LARGEST[scheme]
        scale = np.where(scale > 0, scale, 1.0)
        rounded = (np.clip(np.round(grouped / scale), -7, 7) * scale).reshape(w.shape)
        return np.moveaxis(rounded, -1, last)
    reduce = input_axes if scheme == "int8" else (last,)
    scale = np.abs(w).max(axis=reduce, keepdims=True) / LARGEST[scheme]
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(w / scale), -LARGEST[scheme], LARGEST[scheme]) * scale


def simulated_params(params: dict, scheme: str, group: int) -> dict:
    flat = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert set(INPUT_AXES) <= set(flat)
    rounded = {
        path: jnp.asarray(simulated_rounding(np.asarray(leaf), INPUT_AXES[path], scheme, group), jnp.float32)
        if path in INPUT_AXES
        else leaf
        for path, leaf in flat.items()
    }
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), list(rounded.values()))


def mean_kl(reference_logits, logits) -> float:
    """Mean over tokens of KL(softmax(reference) || softmax(logits)), in float64."""
    p = jax.nn.log_softmax(np.asarray(reference_logits, np.float64), axis=-1)
    q = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    return float(np.mean(np.sum(np.exp(p) * (p - q), axis=-1)))


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("quantized_text")
    make_text_model(directory, seed=3, **TEXT)
    return directory


@pytest.fixture(scope="module")
def float_model(text_dir):
    return aria_jax.AriaTextForCausalLM.from_pretrained(text_dir)


def prompt_ids(seed=0, shape=(3, 24)):
    return np.random.default_rng(seed).integers(3, TEXT["vocab_size"], size=shape).astype(np.int32)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_kl_is_the_schemes_own_rounding(text_dir, float_model, scheme):
    """Mean per-token KL(float32 || quantized) within 1.1x of the same scheme simulated in
    float64 on the same weights: the implementation adds no error of its own."""
    ids = prompt_ids()
    reference = float_model(ids).logits
    quantized = aria_jax.AriaTextForCausalLM.from_pretrained(text_dir, quantize=scheme, group_size=GROUP)
    simulated = aria_jax.AriaTextForCausalLM(float_model.config, simulated_params(float_model.params, scheme, GROUP))
    kl_ours, kl_simulated = mean_kl(reference, quantized(ids).logits), mean_kl(reference, simulated(ids).logits)
    print(f"{scheme}: mean KL ours {kl_ours:.3e}, simulated {kl_simulated:.3e}")
    assert kl_simulated > 1e-5  # the rounding is visible: the comparison can fail
    assert kl_ours <= 1.1 * kl_simulated and kl_simulated <= 1.1 * kl_ours
    # int4 models compile with the TPU's one-row matmul rewrite (`sharding.COMPILER_OPTIONS`)
    assert quantized.runner.int4_weights == (scheme == "int4") and not float_model.runner.int4_weights


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_weights_take_a_quarter_or_less(float_model, scheme):
    """Stored values in int8 / int4, float32 scales beside them; router, norms and embeddings as they were."""
    params = quantize_params(float_model.params, Quantization(scheme, GROUP), "language_model")
    experts = params["layers"]["mlp"]["experts_gate_up"]
    assert experts["values"].dtype == (jnp.int8 if scheme == "int8" else jnp.int4)
    assert experts["values"].shape == float_model.params["layers"]["mlp"]["experts_gate_up"].shape
    groups = 1 if scheme == "int8" else TEXT["hidden_size"] // GROUP
    assert experts["scales"].shape == (2, TEXT["moe_num_experts"], groups, 2 * TEXT["intermediate_size"])
    assert params["layers"]["self_attn"]["o_proj"]["scales"].shape == (
        (2, 1, 1, 64) if scheme == "int8" else (2, 4, 1, 64)
    )  # o_proj: (layers, heads, head_dim, D)
    for name in ("router",):
        assert params["layers"]["mlp"][name].dtype == jnp.float32
    assert params["embed_tokens"].dtype == jnp.float32


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_every_loader_quantizes_alike(text_dir, float_model, tmp_path, scheme):
    """Quantized while reading the hub files, while restoring a converted checkpoint, and from
    float params in memory: the same values and scales, bit for bit."""
    from convert.conversion import convert_checkpoint

    from_hub = aria_jax.AriaTextForCausalLM.from_pretrained(text_dir, quantize=scheme, group_size=GROUP).params
    convert_checkpoint(text_dir, tmp_path / "converted")
    from_converted = aria_jax.AriaTextForCausalLM.from_pretrained(
        tmp_path / "converted", quantize=scheme, group_size=GROUP
    ).params
    in_memory = quantize_params(float_model.params, Quantization(scheme, GROUP), "language_model")
    for other in (from_converted, in_memory):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), from_hub, other)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_generate_reads_quantized_weights_as_their_values(float_model, scheme):
    """Greedy generation (prefill, then decode reading the experts in the stacks) on quantized
    weights gives the tokens of the float model whose weights are their dequantized values."""
    quantization = Quantization(scheme, GROUP)
    params = quantize_params(float_model.params, quantization, "language_model")
    as_floats = jax.tree.map(
        lambda w: dequantized(w, jnp.float32), _as_arrays(params), is_leaf=lambda x: isinstance(x, QuantizedArray)
    )
    quantized = aria_jax.AriaTextForCausalLM(float_model.config, params)
    dequantized_model = aria_jax.AriaTextForCausalLM(float_model.config, as_floats)
    ids = prompt_ids(1, (2, 12))
    np.testing.assert_allclose(quantized(ids).logits, dequantized_model(ids).logits, atol=1e-4, rtol=1e-4)
    ours = quantized.generate(ids, max_new_tokens=12)
    assert (ours == dequantized_model.generate(ids, max_new_tokens=12)).all()
    assert not (ours == float_model.generate(ids, max_new_tokens=12)).all() or scheme == "int8"


def _as_arrays(params):
    """Quantized entries of a params tree as `QuantizedArray`s."""
    if isinstance(params, dict):
        if params.keys() == {"values", "scales"}:
            return QuantizedArray(params["values"], params["scales"])
        return {name: _as_arrays(child) for name, child in params.items()}
    return params


BACKENDS = {
    "dense": routed_experts_dense,
    "ragged_dot": routed_experts_sorted,
    "gathered": routed_experts_gathered,
    "looped": routed_experts_looped,
    "auto": routed_experts_auto,
}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_moe_backends_read_quantized_experts(backend, scheme):
    """Each routed-expert backend on quantized experts equals the dense reference on their
    dequantized values, and so does each that reads a layer in stacked experts."""
    rng = np.random.default_rng(5)
    tokens, experts, top_k, d, f = 20, 6, 2, 64, 16
    x = jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)]), jnp.int32)
    weights = jax.nn.softmax(jnp.asarray(rng.normal(size=(tokens, top_k)), jnp.float32))
    quantization = Quantization(scheme, GROUP)
    stacks = {}
    for name, shape, input_axis in (("gate_up", (3, experts, d, 2 * f), 2), ("down", (3, experts, f, d), 2)):
        values, scales = quantization.quantize(
            rng.normal(size=shape) / 8, ("language_model", "layers", "mlp", name), (input_axis,)
        )
        stacks[name] = QuantizedArray(jnp.asarray(values), jnp.asarray(scales))
    for layer in range(3):
        gate_up, down = stacks["gate_up"][layer], stacks["down"][layer]
        expected = routed_experts_dense(
            x, weights, ids, dequantized(gate_up, jnp.float32), dequantized(down, jnp.float32)
        )
        got = jax.jit(BACKENDS[backend])(x, weights, ids, gate_up, down)
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=2e-5)
        if backend in ("gathered", "looped", "auto"):
            in_stack = jax.jit(functools.partial(BACKENDS[backend], layer=layer))(
                x, weights, ids, stacks["gate_up"], stacks["down"]
            )
            np.testing.assert_allclose(in_stack, expected, atol=2e-5, rtol=2e-5)


def test_bad_quantization_arguments_are_named(text_dir):
    with pytest.raises(ValueError, match="quantize='int3'"):
        aria_jax.AriaTextForCausalLM.from_pretrained(text_dir, quantize="int3")
    with pytest.raises(ValueError, match="group_size=0"):
        aria_jax.AriaTextForCausalLM.from_pretrained(text_dir, quantize="int4", group_size=0)
    with pytest.raises(ValueError, match="does not divide into groups of 48"):
        aria_jax.AriaTextForCausalLM.from_pretrained(text_dir, quantize="int4", group_size=48)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_conversion_round_trip(text_dir, tmp_path, scheme):
    """`aria-jax convert --quantize` stores values and scales; from_pretrained loads them as
    stored (the same arrays as quantizing while loading the hub files), refuses another scheme,
    and export refuses them: the hub format holds float weights."""
    from convert.conversion import convert_checkpoint, export_checkpoint

    from aria_jax.safetensors_io import CheckpointError

    converted = tmp_path / "converted"
    convert_checkpoint(text_dir, converted, quantize=scheme, group_size=GROUP)
    stored = aria_jax.AriaTextForCausalLM.from_pretrained(converted)
    from_hub = aria_jax.AriaTextForCausalLM.from_pretrained(text_dir, quantize=scheme, group_size=GROUP)
    assert stored.params["layers"]["mlp"]["experts_down"]["values"].dtype == (
        jnp.int8 if scheme == "int8" else jnp.int4
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), stored.params, from_hub.params
    )
    np.testing.assert_array_equal(
        stored.generate(prompt_ids(2, (1, 8)), max_new_tokens=4),
        from_hub.generate(prompt_ids(2, (1, 8)), max_new_tokens=4),
    )
    other = "int4" if scheme == "int8" else "int8"
    with pytest.raises(CheckpointError, match=f"stored quantized as {scheme}"):
        aria_jax.AriaTextForCausalLM.from_pretrained(converted, quantize=other, group_size=GROUP)
    with pytest.raises(CheckpointError, match="export the float conversion"):
        export_checkpoint(converted, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 40])
def test_projection_scales_the_products_as_the_weight(scheme, rows):
    """`project` (lm_head): scales applied to the (grouped) products equal the matmul by the
    dequantized weight, for a few rows and for many (which take the weight dequantized)."""
    from aria_jax.quantization import project

    rng = np.random.default_rng(7)
    values, scales = Quantization(scheme, 16).quantize(rng.normal(size=(64, 48)), ("language_model", "lm_head"), (0,))
    weight = QuantizedArray(jnp.asarray(values), jnp.asarray(scales))
    x = jnp.asarray(rng.normal(size=(2, rows, 64)), jnp.float32)
    expected = jnp.einsum("btd,dn->btn", x, weight.dequantize(jnp.float32))
    np.testing.assert_allclose(project(x, weight, jnp.float32), expected, atol=1e-5, rtol=1e-5)
