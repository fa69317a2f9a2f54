"""The text decoder and the whole multimodal model.

`TextDecoder`: embedding, a scanned stack of (attention, MoE) layers, final norm, lm_head.
`AriaModel`: vision tower + projector, whose image features replace the embeddings of the
`<|img|>` tokens, then the text decoder.

Everything here is functional Flax Linen: `Module.apply({"params": params}, ...)`. Layer stacks
are `nn.scan`s, so each layer parameter is stored once, stacked over a leading "layers" axis,
and compile time does not grow with depth.
"""

from __future__ import annotations

import operator

import flax.linen as nn
import jax
import jax.numpy as jnp

from aria_jax.config import AriaConfig, AriaTextConfig
from aria_jax.expert_weights import ROUTED_EXPERT_AXES
from aria_jax.layers import RMSNorm, adapted, default_kernel_init, param_with_axes, rope_cos_sin
from aria_jax.kv_cache import pinned
from aria_jax.quantization import dequantized, project
from aria_jax.mlp import MLP
from aria_jax.moe import MoE
from aria_jax.projector import Projector
from aria_jax.self_attention import Attention
from aria_jax.sharding import constrain, take_rows
from aria_jax.vision import VisionTower, patch_mask_from_pixel_mask


class DecoderLayer(nn.Module):
    """`layer_index`: set when the layers run unrolled (decode); `dispatch`: prefill's token
    dispatch to the experts' shards. See `MoE`."""

    config: AriaTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    layer_index: int | None = None
    dispatch: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, key_mask, cache=None, cache_index=None, gate_input=None):
        """One layer; key_mask (B, S) marks real tokens; `cache` is this layer's slice of the KV
        cache (or None), returned updated. `gate_input`: Awaker's per-sequence router input."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(x, "batch", None, None)
        with jax.named_scope("attention"):
            normed = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
            attended = Attention(cfg, name="self_attn", **kw)(
                normed, cos, sin, key_mask, pinned(cache), cache_index, gate_input
            )
            if cache is not None:
                attended, cache = attended
                cache = pinned(cache)  # in and out alike: a loop carrying it keeps one layout
            x = x + attended
        with jax.named_scope("moe"):
            normed = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
            if cfg.moe_num_experts:
                moe = MoE(cfg, name="mlp", layer_index=self.layer_index, dispatch=self.dispatch, **kw)
                x = x + moe(normed, own_mask(key_mask, cache_index, x.shape[1]))
            else:
                x = x + MLP(cfg, name="mlp", **kw)(normed, gate_input)
        return x, cache


def own_mask(key_mask: jax.Array, cache_index, num_tokens: int) -> jax.Array | None:
    """Which of a prompt's tokens are real (B, T) when it is prefilled at a static place in the
    cache (its slice of the keys' mask), else None. Only generation, which reads the real tokens'
    results alone, is told: a forward pass's logits at padding positions stay transformers'."""
    if isinstance(cache_index, int):
        return key_mask[:, cache_index : cache_index + num_tokens]
    return None


# Collections stacked over the layer axis by the layer scans: the weights, LoRA adapters
# (`aria_jax.lora`) and sown intermediates (the routers' logits, for training's auxiliary losses).
LAYER_COLLECTIONS = {"params": 0, "lora": 0, "intermediates": 0}


class TextDecoder(nn.Module):
    """Token ids (or embeddings) -> logits. `remat` recomputes each layer's activations in the
    backward pass instead of keeping them (training memory); `dispatch` sends tokens to their
    experts' shards on a mesh (inference only: see `moe.experts_by_dispatch`)."""

    config: AriaTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    dispatch: bool = False

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = param_with_axes(
            self,
            "embed_tokens",
            default_kernel_init,
            (cfg.vocab_size, cfg.hidden_size),
            ("vocab", "vocab_embed"),
            self.param_dtype,
        )
        self.layers = nn.scan(
            nn.remat(DecoderLayer, prevent_cse=False) if self.remat else DecoderLayer,
            variable_axes=LAYER_COLLECTIONS,
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
            length=cfg.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, dispatch=self.dispatch, **kw)
        self.norm = RMSNorm(cfg.rms_norm_eps, **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = param_with_axes(
                self,
                "lm_head",
                default_kernel_init,
                (cfg.hidden_size, cfg.vocab_size),
                ("vocab_embed", "vocab"),
                self.param_dtype,
            )

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return take_rows(self.embed_tokens, input_ids, "vocab").astype(self.dtype)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, gate_input=None):
        """input_ids (B, T) or inputs_embeds (B, T, D); attention_mask (B, T) 1 = token, 0 = pad;
        position_ids (B, T) (or (B, T, 3), M-RoPE), by default counting only attended tokens so left
        padding is harmless; gate_input (B, D): Awaker's router input (`qwen2_vl.awaker`)."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        batch, length = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        cos, sin = rope_tables(self.config, position_ids, self.dtype)
        x, _ = self.layers(x, cos, sin, attention_mask.astype(bool), None, None, gate_input)
        return self.logits(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        lm_head = self.embed_tokens.T if self.config.tie_word_embeddings else self.lm_head
        if self.has_variable("lora", "lm_head_lora_a"):
            lm_head = adapted(self, "lm_head", dequantized(lm_head, self.dtype))
        return project(self.norm(hidden), lm_head, self.dtype)

    def cached_step(self, inputs_embeds, key_mask, position_ids, cache, cache_index, gate_input=None):
        """Runs tokens through the decoder against the KV cache and appends them to it.

        inputs_embeds (B, T, D) sit at sequence index `cache_index` (the same for every row);
        key_mask (B, S) marks the cache slots that hold real tokens (or will); position_ids (B, T).
        Returns the logits of the last token (B, V) and the updated cache {"k", "v"}:
        (layers, B, S, K, H) each. The layers are scanned (compiled once): for prefill, where
        the many tokens outweigh copying each layer's weights and cache slice in and out of the
        scan. Decode runs them unrolled (`unrolled_cached_step`)."""
        x = inputs_embeds.astype(self.dtype)
        cos, sin = rope_tables(self.config, position_ids, self.dtype)
        x, cache = self.layers(x, cos, sin, key_mask, cache, cache_index, gate_input)
        return self.logits(x[:, -1]), cache


# Crops through the vision tower at once (`AriaModel.image_features`).
IMAGE_GROUP = 16

# Layer params that decode hands to each layer whole, stacked over layers (see `MoE`).
STACKED_IN_DECODE = tuple(ROUTED_EXPERT_AXES)


def layer_params(params, index: int):
    """Layer `index`'s params out of the decoder's stacks, but for its routed experts, which stay
    stacked over layers (`STACKED_IN_DECODE`): the MoE reads them there."""
    per_layer, in_stack = split_off_routed_experts(params["layers"])
    sliced = jax.tree.map(operator.itemgetter(index), per_layer)
    return {**sliced, "mlp": {**sliced["mlp"], **in_stack}}


def split_off_routed_experts(stacked) -> tuple[dict, dict]:
    """The decoder's stacked layer params as (all but the routed experts, the routed experts)."""
    in_stack = {name: stacked["mlp"][name] for name in STACKED_IN_DECODE if name in stacked["mlp"]}
    return {**stacked, "mlp": {k: v for k, v in stacked["mlp"].items() if k not in in_stack}}, in_stack


def unrolled_cached_step(
    params,
    inputs_embeds,
    key_mask,
    position_ids,
    cache,
    cache_index,
    *,
    config: AriaTextConfig,
    dtype=jnp.float32,
    dispatch: bool = False,
    layers=None,
    gate_input=None,
):
    """`TextDecoder.cached_step` with the layers unrolled, for decode (and, with `dispatch`, a long
    prompt's chunks). cache: one {"k", "v"} of (B, K, S, H) per layer (`kv_cache.per_layer`),
    each written in place and read where it lies; a scan would copy every layer's cache slice in
    and out, every token. `layers`: each layer's `layer_params`, when the caller took them out of
    the stacks already (ahead of a loop over decode steps); by default they are taken here."""
    decoder = TextDecoder(config, dtype=dtype, param_dtype=dtype)
    x = inputs_embeds.astype(dtype)
    cos, sin = rope_tables(config, position_ids, dtype)
    updated = []
    for index, layer_cache in enumerate(cache):
        layer = DecoderLayer(config, dtype=dtype, param_dtype=dtype, layer_index=index, dispatch=dispatch)
        if layers is not None:
            this_layer = layers[index]
        elif dispatch:
            # A prompt's chunks take each layer's experts out of the stacks (copies, for the grouped
            # matmul). Tied to the layer's input, the copies are made as the layer runs; untied,
            # the compiler hoists them out of the loop over chunks and holds every layer's at once.
            stacked, x = jax.lax.optimization_barrier((params["layers"], x))
            this_layer = layer_params({"layers": stacked}, index)
        else:
            this_layer = layer_params(params, index)
        x, layer_cache = layer.apply(
            {"params": this_layer}, x, cos, sin, key_mask, layer_cache, cache_index, gate_input
        )
        updated.append(layer_cache)
    return decoder.apply({"params": params}, x[:, -1], method=TextDecoder.logits), updated


def scanned_cached_step(
    params,
    inputs_embeds,
    key_mask,
    position_ids,
    cache,
    cache_index,
    *,
    config: AriaTextConfig,
    dtype=jnp.float32,
    dispatch: bool = False,
    gate_input=None,
):
    """`TextDecoder.cached_step` (a stacked cache, (layers, ...), the layers in a loop compiled
    once: a prompt's prefill), but for the routed experts, which are not taken out of the stacks:
    the loop's index is each layer's `layer_index`, and on TPU the MoE's kernel reads the layer's
    experts where they lie. A scan of the decoder module copies every layer's slice of them
    (most of the weights) out of the stacks before its grouped matmuls."""
    decoder = TextDecoder(config, dtype=dtype, param_dtype=dtype)
    x = inputs_embeds.astype(dtype)
    cos, sin = rope_tables(config, position_ids, dtype)
    per_layer, in_stack = split_off_routed_experts(params["layers"])

    def one_layer(x, inputs):
        index, this_layer, layer_cache = inputs
        layer = DecoderLayer(config, dtype=dtype, param_dtype=dtype, layer_index=index, dispatch=dispatch)
        this_layer = {**this_layer, "mlp": {**this_layer["mlp"], **in_stack}}
        x, layer_cache = layer.apply(
            {"params": this_layer}, x, cos, sin, key_mask, layer_cache, cache_index, gate_input
        )
        return x, layer_cache

    indices = jnp.arange(config.num_hidden_layers, dtype=jnp.int32)
    x, cache = jax.lax.scan(one_layer, x, (indices, per_layer, cache))
    return decoder.apply({"params": params}, x[:, -1], method=TextDecoder.logits), cache


def rope_tables(config, position_ids: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """The decoder's RoPE cos and sin (B, T, head_dim): position_ids (B, T), or (B, T, 3) with M-RoPE."""
    return rope_cos_sin(position_ids, config.head_dim, config.rope_theta, dtype, config.mrope_section)


def default_position_ids(attention_mask: jax.Array) -> jax.Array:
    """Positions that count attended tokens only: cumsum(mask) - 1, with pads at 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def text_forward(params, config: AriaTextConfig, input_ids, attention_mask=None, position_ids=None, dtype=jnp.float32):
    """Functional forward of the text model: (params pytree, config, inputs) -> logits (B, T, V)."""
    return TextDecoder(config, dtype=dtype, param_dtype=dtype).apply(
        {"params": params}, input_ids, attention_mask, position_ids
    )


def init_text_params(config: AriaTextConfig, rng: jax.Array, dtype=jnp.float32):
    """Random parameters (unboxed) with the same tree the loader fills."""
    model = TextDecoder(config, dtype=dtype, param_dtype=dtype)
    variables = model.init(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.meta.unbox(variables["params"])


def text_param_shapes(config: AriaTextConfig, dtype=jnp.float32):
    """The params tree as `ShapeDtypeStruct`s boxed with logical axis names, without allocating."""
    model = TextDecoder(config, dtype=dtype, param_dtype=dtype)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]


def merge_image_features(embeds: jax.Array, is_image_token: jax.Array, features: jax.Array) -> jax.Array:
    """Writes `features` (M, D), in order, into the positions where `is_image_token` (B, T) is set,
    row-major over batch then sequence. The caller checks that there are exactly M such positions."""
    flat_mask = is_image_token.reshape(-1)
    feature_index = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, features.shape[0] - 1)
    gathered = jnp.take(features, feature_index, axis=0).reshape(embeds.shape)
    return jnp.where(is_image_token[..., None], gathered.astype(embeds.dtype), embeds)


class AriaModel(nn.Module):
    """Images and tokens -> logits."""

    config: AriaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_tower = VisionTower(cfg.vision_config, remat=self.remat, **kw)
        self.multi_modal_projector = Projector(cfg, **kw)
        self.language_model = TextDecoder(cfg.text_config, remat=self.remat, **kw)

    def vision_features(self, pixel_values: jax.Array, pixel_mask: jax.Array | None = None):
        """pixel_values (N, C, S, S), pixel_mask (N, S, S) -> vision tower output (N, P, D_vision)
        and the patch mask (N, P)."""
        n, _, height, width = pixel_values.shape
        patch = self.config.vision_config.patch_size
        if pixel_mask is None:
            patch_mask = jnp.ones((n, height // patch, width // patch), bool)
        else:
            patch_mask = patch_mask_from_pixel_mask(pixel_mask.astype(bool), patch)
        with jax.named_scope("vision_tower"):
            return self.vision_tower(pixel_values, patch_mask), patch_mask.reshape(n, -1)

    def image_features(self, pixel_values: jax.Array, pixel_mask: jax.Array | None = None) -> jax.Array:
        """pixel_values (N, C, S, S), pixel_mask (N, S, S) -> projected features (N, Q, D_text);
        IMAGE_GROUP crops at a time, so that many frames of a video need no more memory than a few."""
        n = pixel_values.shape[0]
        if n <= IMAGE_GROUP:
            return self._crop_features(pixel_values, pixel_mask)
        if pixel_mask is None:
            pixel_mask = jnp.ones((n, *pixel_values.shape[2:]), bool)
        extra = -n % IMAGE_GROUP  # whole blank crops, dropped after
        groups = [
            jnp.concatenate([x, jnp.ones((extra, *x.shape[1:]), x.dtype)]).reshape(-1, IMAGE_GROUP, *x.shape[1:])
            for x in (pixel_values, pixel_mask)
        ]
        over_groups = nn.scan(
            lambda model, carry, group: (carry, model._crop_features(*group)),
            variable_broadcast="params",
            split_rngs={"params": False},
        )
        _, features = over_groups(self, None, tuple(groups))
        return features.reshape(-1, *features.shape[2:])[:n]

    def _crop_features(self, pixel_values: jax.Array, pixel_mask: jax.Array | None) -> jax.Array:
        features, patch_mask = self.vision_features(pixel_values, pixel_mask)
        with jax.named_scope("projector"):
            return self.multi_modal_projector(features, patch_mask)

    def input_embeddings(self, input_ids, pixel_values=None, pixel_mask=None) -> jax.Array:
        """Token embeddings with each crop's image features in place of its `<|img|>` tokens."""
        embeds = self.language_model.embed(input_ids)
        if pixel_values is None:
            return embeds
        features = self.image_features(pixel_values, pixel_mask)
        return merge_image_features(
            embeds, input_ids == self.config.image_token_index, features.reshape(-1, features.shape[-1])
        )

    def __call__(self, input_ids, attention_mask=None, position_ids=None, pixel_values=None, pixel_mask=None):
        embeds = self.input_embeddings(input_ids, pixel_values, pixel_mask)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids)


def _init_inputs(config: AriaConfig):
    """Inputs that touch every parameter: one crop of the largest size and one token."""
    side = max(config.crop_size_to_queries)
    pixel_values = jnp.zeros((1, config.vision_config.num_channels, side, side), jnp.float32)
    return jnp.zeros((1, 1), jnp.int32), None, None, pixel_values


def multimodal_apply(params, *args, config: AriaConfig, method: str | None = None, dtype=jnp.float32):
    """`AriaModel(config).apply` over a params pytree; `method` names an `AriaModel` method."""
    model = AriaModel(config, dtype=dtype, param_dtype=dtype)
    return model.apply({"params": params}, *args, method=getattr(AriaModel, method) if method else None)


def init_multimodal_params(config: AriaConfig, rng: jax.Array, dtype=jnp.float32):
    variables = AriaModel(config, dtype=dtype, param_dtype=dtype).init(rng, *_init_inputs(config))
    return nn.meta.unbox(variables["params"])


def multimodal_param_shapes(config: AriaConfig, dtype=jnp.float32):
    model = AriaModel(config, dtype=dtype, param_dtype=dtype)
    return jax.eval_shape(model.init, jax.random.key(0), *_init_inputs(config))["params"]
