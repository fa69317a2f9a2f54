"""Small building blocks shared by the text decoder, vision tower and projector."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aria_jax.quantization import QuantizedArray, dequantized, is_quantized
from aria_jax.sharding import compile_platform

# Parameters are kept as plain arrays; logical axis names travel with them at init time
# (`nn.with_logical_partitioning`) so that one rules table can map them onto a mesh.
default_kernel_init = nn.initializers.normal(stddev=0.02)


def param_with_axes(
    module: nn.Module, name: str, init: Callable, shape: tuple[int, ...], axes: tuple[str, ...], dtype
) -> jax.Array | QuantizedArray:
    """The param, or a `QuantizedArray` where the params hold it quantized (`aria_jax.quantization`)."""
    if module.has_variable("params", name):
        stored = module.get_variable("params", name)
        if is_quantized(stored):
            if stored["values"].shape != tuple(shape):
                raise ValueError(
                    f"{module.path}/{name}: quantized values of shape {stored['values'].shape}, expected {tuple(shape)}"
                )
            return QuantizedArray(stored["values"], stored["scales"])
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def lora_delta(a: jax.Array, b: jax.Array, num_expert_dims: int = 0) -> jax.Array:
    """A @ B for a LoRA adapter of a weight (experts..., in dims..., out dims...):
    a is (experts..., in dims..., rank), b is (experts..., rank, out dims...)."""
    experts, rank = a.shape[:num_expert_dims], a.shape[-1]
    in_shape, out_shape = a.shape[num_expert_dims:-1], b.shape[num_expert_dims + 1 :]
    delta = jnp.matmul(a.reshape(*experts, -1, rank), b.reshape(*experts, rank, -1))
    return delta.reshape(*experts, *in_shape, *out_shape)


def adapted(module: nn.Module, name: str, weight: jax.Array, num_expert_dims: int = 0) -> jax.Array:
    """`weight`, plus A @ B when the "lora" collection holds an adapter for it (`{name}_lora_a`,
    `{name}_lora_b`, with the scale alpha / rank already in A; see `aria_jax.lora`). Adding the
    product to the weight works the same for every matmul and MoE backend; inside the layer scan
    it exists for one layer at a time."""
    if not module.has_variable("lora", f"{name}_lora_a"):
        return weight
    a, b = module.get_variable("lora", f"{name}_lora_a"), module.get_variable("lora", f"{name}_lora_b")
    weight = dequantized(weight, a.dtype)
    return weight + lora_delta(a, b, num_expert_dims).astype(weight.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's, in Qwen2-VL's vision tower
}


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to the input dtype before the weight."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


def rope_cos_sin(
    position_ids: jax.Array, head_dim: int, theta: float, dtype, mrope_section: tuple[int, ...] = ()
) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables (B, T, head_dim) for non-interleaved (rotate_half) RoPE, computed in float32.

    M-RoPE (Qwen2-VL, `mrope_section` given): position_ids (B, T, 3) hold a (temporal, height,
    width) position per token, or (B, T) one position for all three (text); the first
    mrope_section[0] rotary frequencies turn with the temporal position, the next
    mrope_section[1] with the height, the rest with the width."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    positions = position_ids.astype(jnp.float32)
    if mrope_section:
        if positions.ndim == 2:
            positions = positions[..., None]
        stream_of_frequency = np.repeat(np.arange(len(mrope_section)), mrope_section)
        freqs = jnp.broadcast_to(positions, (*positions.shape[:2], len(mrope_section)))[..., stream_of_frequency]
        freqs = freqs * inv_freq
    else:
        freqs = positions[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """(-second half, first half) of the last axis. On TPU as a matmul by that signed permutation:
    halves of a 128-lane head move across lanes, which the TPU compiler estimated at 6% of a
    64K-token prefill; the matrix units give the same numbers (one input times +-1 per output)."""
    half = x.shape[-1] // 2
    if compile_platform() != "tpu":
        return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    eye = np.eye(half, dtype=np.float32)
    rotation = np.block([[np.zeros_like(eye), eye], [-eye, np.zeros_like(eye)]])  # row i: where x[i] goes
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None  # float32 exact, not in bf16 passes
    return jnp.einsum("...i,io->...o", x, rotation.astype(x.dtype), precision=precision)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, T, heads, head_dim); cos/sin: (B, T, head_dim)."""
    return x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]


class LayerNorm(nn.Module):
    """LayerNorm with mean and variance in float32 (two-pass, as torch), then weight and bias."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (features,), (self.axis_name,), self.param_dtype)
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (features,), (self.axis_name,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(variance + self.eps)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Linear(nn.Module):
    """x @ kernel (+ bias): kernel is (in dims..., out dims...), the last `in_dims` axes of x contract."""

    out_shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical names of (in dims..., out dims...)
    in_dims: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.in_dims :]
        kernel = dequantized(
            param_with_axes(
                self, "kernel", default_kernel_init, in_shape + self.out_shape, self.axes, self.param_dtype
            ),
            self.dtype,
        )
        contract = tuple(range(x.ndim - self.in_dims, x.ndim))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, ((contract, tuple(range(self.in_dims))), ((), ())))
        if self.use_bias:
            bias = param_with_axes(
                self, "bias", nn.initializers.zeros, self.out_shape, self.axes[self.in_dims :], self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        return y
