"""Qwen2-VL: the vision tower's merged patches replace the `<|image_pad|>` / `<|video_pad|>`
tokens' embeddings, then the shared text decoder (`aria_jax.modeling.TextDecoder`, here dense,
with q/k/v biases and M-RoPE) runs as it does for Aria.

Images and videos reach the model as vision rows (`vision.vision_rows`): one row per temporal
slice, padded to a common length. `image_rows` / `video_rows` (M,) index the tower's flattened
output (rows x merged tokens) in the order the prompt's image / video tokens take them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from aria_jax.modeling import TextDecoder, merge_image_features
from aria_jax.qwen2_vl.awaker import span_means
from aria_jax.qwen2_vl.config import Qwen2VLConfig
from aria_jax.qwen2_vl.vision import Qwen2VLVisionTower


class Qwen2VLModel(nn.Module):
    """Images, videos and tokens -> logits."""

    config: Qwen2VLConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.visual = Qwen2VLVisionTower(cfg.vision_config, remat=self.remat, **kw)
        self.language_model = TextDecoder(cfg.text_config, remat=self.remat, **kw)

    def vision_features(self, patches, patch_mask, patch_positions) -> jax.Array:
        """Vision rows -> merged features, flattened (rows x merged tokens, D)."""
        with jax.named_scope("visual"):
            merged = self.visual(patches, patch_mask, patch_positions)
        return merged.reshape(-1, merged.shape[-1])

    def input_embeddings(
        self, input_ids, patches=None, patch_mask=None, patch_positions=None, image_rows=None, video_rows=None
    ) -> jax.Array:
        """Token embeddings with the vision features in place of the image and video tokens."""
        embeds = self.language_model.embed(input_ids)
        if patches is None:
            return embeds
        features = self.vision_features(patches, patch_mask, patch_positions)
        for token, rows in ((self.config.image_token_id, image_rows), (self.config.video_token_id, video_rows)):
            if rows is not None:
                embeds = merge_image_features(embeds, input_ids == token, jnp.take(features, rows, axis=0))
        return embeds

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        patches=None,
        patch_mask=None,
        patch_positions=None,
        image_rows=None,
        video_rows=None,
        gate_spans=None,
    ):
        """gate_spans (B, 2): with Awaker's adapters, each row's span of the embeddings whose mean
        its routers read (`awaker.prompt_spans`)."""
        embeds = self.input_embeddings(input_ids, patches, patch_mask, patch_positions, image_rows, video_rows)
        gate_input = None if gate_spans is None else self.gate_inputs(input_ids, embeds, gate_spans, False)[0]
        return self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, gate_input=gate_input
        )

    def gate_inputs(self, input_ids, embeds, gate_spans, plain_after_prompt: bool):
        """Awaker's router inputs (B, D) for the prompt step and for the steps after it: the span
        means of the prompt's embeddings with the image features in (video positions keep the
        video-pad token's embedding: the release writes only images' features there), then, with
        `plain_after_prompt` (the release), of its token embeddings alone."""
        plain = self.language_model.embed(input_ids)
        with_images = jnp.where((input_ids == self.config.video_token_id)[..., None], plain, embeds)
        prompt_gate = span_means(with_images, gate_spans)
        if not plain_after_prompt:
            return prompt_gate, prompt_gate
        return prompt_gate, span_means(plain, gate_spans)


def _init_inputs(config: Qwen2VLConfig):
    """Inputs that touch every parameter: one row of one merge window, one image token (and a
    gate span over it, for Awaker's routers)."""
    vision = config.vision_config
    window = vision.merge_area
    return (
        jnp.full((1, 1), config.image_token_id, jnp.int32),
        None,
        None,
        jnp.zeros((1, window, vision.patch_features), jnp.float32),
        jnp.ones((1, window), bool),
        jnp.zeros((1, window, 2), jnp.int32),
        jnp.zeros((1,), jnp.int32),
        None,
        jnp.array([[0, 1]], jnp.int32) if config.text_config.lora_rank else None,
    )


def qwen2_vl_apply(params, *args, config: Qwen2VLConfig, method: str | None = None, dtype=jnp.float32, **kwargs):
    """`Qwen2VLModel(config).apply` over a params pytree; `method` names a `Qwen2VLModel` method."""
    model = Qwen2VLModel(config, dtype=dtype, param_dtype=dtype)
    return model.apply({"params": params}, *args, method=getattr(Qwen2VLModel, method) if method else None, **kwargs)


def init_qwen2_vl_params(config: Qwen2VLConfig, rng: jax.Array, dtype=jnp.float32):
    variables = Qwen2VLModel(config, dtype=dtype, param_dtype=dtype).init(rng, *_init_inputs(config))
    return nn.meta.unbox(variables["params"])


def qwen2_vl_param_shapes(config: Qwen2VLConfig, dtype=jnp.float32):
    model = Qwen2VLModel(config, dtype=dtype, param_dtype=dtype)
    return jax.eval_shape(model.init, jax.random.key(0), *_init_inputs(config))["params"]
