"""Decode's fused routed-experts kernel (`aria_jax.fused_experts`), in Pallas' interpreter, held
to every expert computed densely on the same layer of the stacks and combined by the routing weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aria_jax.fused_experts import fused_experts


def random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def every_expert(x, combine, gate_up, down, layer):
    gate, up = jnp.split(jnp.einsum("td,edf->tef", x, gate_up[layer]), 2, axis=-1)
    out = jnp.einsum("tef,efd->ted", jax.nn.silu(gate) * up, down[layer])
    return jnp.einsum("ted,te->td", out, combine)


def routing(num_tokens, num_experts, top_k, seed, absent=()):
    """(T, E) weights: each token's top_k experts of a random draw, never one of `absent`."""
    rng = np.random.default_rng(seed)
    combine = np.zeros((num_tokens, num_experts), np.float32)
    allowed = [e for e in range(num_experts) if e not in absent]
    for token in range(num_tokens):
        chosen = rng.choice(allowed, size=top_k, replace=False)
        combine[token, chosen] = rng.dirichlet(np.ones(top_k))
    return jnp.asarray(combine)


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("num_tokens", [1, 13])
def test_kernel_matches_every_expert_computed_densely(layer, num_tokens):
    """Widths of two 128-column blocks; experts 1 and 3 hold no token (skipped), a token's row past
    the routed ones is zero."""
    layers, experts, model, width, top_k = 3, 5, 64, 256, 2
    x = random((num_tokens, model), 0)
    gate_up = random((layers, experts, model, 2 * width), 1) / model**0.5
    down = random((layers, experts, width, model), 2) / width**0.5
    combine = routing(num_tokens, experts, top_k, 3, absent=(1, 3))
    out = fused_experts(x, combine, gate_up, down, layer, top_k, interpret=True)
    expected = every_expert(x, combine, gate_up, down, layer)
    assert out.shape == (num_tokens, model) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_kernel_in_bfloat16_gates_in_float32():
    layers, experts, model, width, top_k = 2, 4, 128, 384, 3
    x = random((6, model), 4).astype(jnp.bfloat16)
    gate_up = (random((layers, experts, model, 2 * width), 5) / model**0.5).astype(jnp.bfloat16)
    down = (random((layers, experts, width, model), 6) / width**0.5).astype(jnp.bfloat16)
    combine = routing(6, experts, top_k, 7)
    out = fused_experts(x, combine, gate_up, down, 1, top_k, interpret=True)
    expected = every_expert(*(a.astype(jnp.float32) for a in (x, combine, gate_up, down)), 1)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=3e-2, atol=3e-2)


def test_tokens_routed_to_no_expert_here_give_zeros():
    """A shard whose experts no token chose: nothing computed, all zeros."""
    x, gate_up, down = random((3, 32), 8), random((2, 4, 32, 32), 9), random((2, 4, 16, 32), 10)
    out = fused_experts(x, jnp.zeros((3, 4)), gate_up, down, 0, 2, interpret=True)
    assert out.shape == (3, 32) and not np.asarray(out).any()


def test_kernel_refuses_mismatched_shapes():
    x, gate_up, down = jnp.zeros((3, 32)), jnp.zeros((2, 4, 32, 32)), jnp.zeros((2, 4, 16, 32))
    with pytest.raises(ValueError, match=r"combine \(3, 5\)"):
        fused_experts(x, jnp.zeros((3, 5)), gate_up, down, 0, 2)
    with pytest.raises(ValueError, match="layer 2"):
        fused_experts(x, jnp.zeros((3, 4)), gate_up, down, 2, 2)
    with pytest.raises(ValueError, match=r"down \(2, 4, 8, 32\)"):
        fused_experts(x, jnp.zeros((3, 4)), gate_up, jnp.zeros((2, 4, 8, 32)), 0, 2)
