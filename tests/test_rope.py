"""RoPE's rotate_half: on TPU a matmul by a signed permutation, elsewhere slices; the same numbers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from aria_jax import layers


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("head_dim", [128, 80])
def test_the_tpu_rotation_is_the_halves_swapped_and_negated_exactly(monkeypatch, dtype, head_dim):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3, head_dim)) * 100, dtype)
    half = head_dim // 2
    expected = np.concatenate([-np.asarray(x[..., half:]), np.asarray(x[..., :half])], axis=-1)
    np.testing.assert_array_equal(np.asarray(layers.rotate_half(x)), expected)
    monkeypatch.setattr(layers, "compile_platform", lambda: "tpu")
    on_tpu = layers.rotate_half(x)
    assert on_tpu.dtype == dtype
    np.testing.assert_array_equal(np.asarray(on_tpu), expected)
