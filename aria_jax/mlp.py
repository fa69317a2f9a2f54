"""The dense gated MLP of decoders without experts (Qwen2's): down(act(x @ gate) * (x @ up))."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from aria_jax.qwen2_vl import awaker
from aria_jax.layers import ACTIVATIONS, adapted, default_kernel_init, param_with_axes
from aria_jax.quantization import dequantized


class MLP(nn.Module):
    """x (..., D) -> (..., D). The width splits over the mesh's `tensor` axis ("mlp")."""

    config: object  # a text config: hidden_size, intermediate_size, hidden_act
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, gate_input: jax.Array | None = None) -> jax.Array:
        """`gate_input` (B, D): the per-sequence input of Awaker's router (`qwen2_vl.awaker`),
        for configs with its adapters; its gate_proj router routes up_proj and down_proj too."""
        cfg = self.config
        d, f = cfg.hidden_size, cfg.intermediate_size

        def kernel(name, shape, axes):
            weight = param_with_axes(self, name, default_kernel_init, shape, axes, self.param_dtype)
            return adapted(self, name, dequantized(weight, self.dtype))

        gate = kernel("gate_proj", (d, f), ("embed", "mlp"))
        up = kernel("up_proj", (d, f), ("embed", "mlp"))
        down = kernel("down_proj", (f, d), ("mlp", "embed"))
        x = x.astype(self.dtype)
        gated, lifted = jnp.einsum("...d,df->...f", x, gate), jnp.einsum("...d,df->...f", x, up)
        if cfg.lora_rank:
            routing = awaker.route(self, "gate_proj", gate_input, cfg)
            gated = awaker.plus(gated, awaker.experts_term(self, "gate_proj", x, f, routing, cfg, "embed", "mlp"))
            lifted = awaker.plus(lifted, awaker.experts_term(self, "up_proj", x, f, routing, cfg, "embed", "mlp"))
        hidden = ACTIVATIONS[cfg.hidden_act](gated) * lifted
        out = jnp.einsum("...f,fd->...d", hidden, down)
        if cfg.lora_rank:
            out = awaker.plus(out, awaker.experts_term(self, "down_proj", hidden, d, routing, cfg, "mlp", "embed"))
        return out
