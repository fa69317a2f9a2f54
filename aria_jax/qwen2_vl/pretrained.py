"""`Qwen2VLForConditionalGeneration`: Qwen2-VL's user-facing model, on the shared machinery
(`aria_jax.pretrained._Pretrained`: input checks, generate, stream, the engine, meshes, loading).

What differs from Aria is on the host: image inputs are the processor's flattened patches and
their grids (checked here against the prompt's image tokens, then cut into vision rows), and the
prompt's positions are M-RoPE's (`rope_index.mrope_positions`), computed for the padded prompt.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from aria_jax.families import key_table_for
from aria_jax.host_loop import RequestError
from aria_jax.pretrained import CausalLMOutput, Prompt, _Pretrained, load_or_restore, open_weights, resolve_dtype
from aria_jax.qwen2_vl.awaker import prompt_spans
from aria_jax.safetensors_io import CheckpointError
from aria_jax.qwen2_vl.config import AwakerConfig, Qwen2VLConfig, qwen2_vl_config_from_pretrained
from aria_jax.qwen2_vl.modeling import init_qwen2_vl_params, qwen2_vl_apply, qwen2_vl_param_shapes
from aria_jax.qwen2_vl.rope_index import mrope_positions
from aria_jax.qwen2_vl.vision import vision_rows
from aria_jax.qwen2_vl.weights import COMPONENTS

# The processor's outputs that carry images and videos; what `_embedded` takes of them.
DEVICE_MEDIA = ("patches", "patch_mask", "patch_positions", "image_rows", "video_rows")


class Qwen2VLForConditionalGeneration(_Pretrained):
    """Images, videos and tokens -> logits, and generation. `generate(**processor_outputs)` works:
    `mm_token_type_ids` is accepted and not needed (the ids say which tokens are images)."""

    MEDIA_ARGUMENTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids")
    BYTE_LEVEL_TOKENIZER = True

    def __init__(self, config: Qwen2VLConfig, params: dict, dtype="float32", tokenizer=None, mesh=None):
        self.config = config
        self.text_config = config.text_config
        self.params = params
        super().__init__(dtype, tokenizer, mesh)
        self._forward = self._jitted(qwen2_vl_apply)
        self._embeddings = self._jitted(qwen2_vl_apply, "input_embeddings")
        self._embed_prompt = self._embeddings

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype="float32", mesh=None) -> "Qwen2VLForConditionalGeneration":
        """Loads a Qwen2-VL checkpoint: a hub-format directory (transformers 4.45 or 5 naming) or
        one converted by `aria-jax convert`; with `mesh`, every param is built in its sharding."""
        config = qwen2_vl_config_from_pretrained(path)
        if isinstance(config, AwakerConfig):
            raise CheckpointError(
                f"{os.fspath(path)}: an Awaker2.5-VL checkpoint (its config.json has an 'awaker' object); "
                "load it with AwakerForConditionalGeneration"
            )
        return cls(*cls._loaded(path, config, dtype, mesh), mesh)

    @classmethod
    def _loaded(cls, path, config: Qwen2VLConfig, dtype, mesh) -> tuple:
        """(config, params, dtype, tokenizer) of the checkpoint at `path`."""
        jdtype = resolve_dtype(dtype)
        shapes = qwen2_vl_param_shapes(config, jdtype)
        weights = open_weights(path)
        params = load_or_restore(weights, config, shapes, jdtype, COMPONENTS, mesh, None, key_table_for(config))
        return config, params, jdtype, cls._load_tokenizer(os.fspath(path))

    @classmethod
    def from_random(cls, config: Qwen2VLConfig, seed: int = 0, dtype="float32") -> "Qwen2VLForConditionalGeneration":
        jdtype = resolve_dtype(dtype)
        params = init_qwen2_vl_params(config, jax.random.key(seed), jdtype)
        return cls(config, params, jdtype)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
    ) -> CausalLMOutput:
        """Logits (B, T, vocab). position_ids: by default M-RoPE's for these ids and grids."""
        ids, mask, _ = self._check_text(input_ids, attention_mask, None)
        media = self._checked_media(ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        positions = self._positions(ids, mask, media, position_ids)
        device_media = {name: media[name] for name in DEVICE_MEDIA if name in media}
        return CausalLMOutput(self._forward(self.params, ids, mask, positions, **device_media))

    def _positions(self, ids, mask, media, position_ids) -> np.ndarray:
        """The given position ids ((B, T, 3), or transformers' (3, B, T)), else M-RoPE's."""
        if position_ids is None:
            return self._prompt_positions(ids, mask, media)
        positions = np.asarray(position_ids)
        if positions.ndim == 3 and positions.shape[0] == 3 and positions.shape[1:] == ids.shape:
            positions = positions.transpose(1, 2, 0)
        if positions.shape not in (ids.shape, (*ids.shape, 3)) or not np.issubdtype(positions.dtype, np.integer):
            raise RequestError(f"position_ids must be integers of shape {ids.shape} or {(*ids.shape, 3)}")
        return positions.astype(np.int32)

    @property
    def _text_params(self):
        return self.params["language_model"]

    def _checked_media(
        self,
        ids,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
    ) -> dict:
        """The images' and videos' patches checked against their grids and the prompt's image and
        video tokens, cut into vision rows (`vision.vision_rows`); the grids are kept for the
        positions."""
        vision = self.config.vision_config
        kinds = []
        for name, token, patches, grids in (
            ("image", self.config.image_token_id, pixel_values, image_grid_thw),
            ("video", self.config.video_token_id, pixel_values_videos, video_grid_thw),
        ):
            num_tokens = int((ids == token).sum())
            if patches is None:
                if num_tokens:
                    raise RequestError(
                        f"input_ids hold {num_tokens} {name} tokens but no {name} pixel values were given"
                    )
                if grids is not None:
                    raise RequestError(f"{name}_grid_thw was given without the {name}s' pixel values")
                continue
            patches, grids = self._check_patches(name, patches, grids)
            expected = int(grids.prod(axis=1).sum()) // vision.merge_area
            if num_tokens != expected:
                raise RequestError(
                    f"{name} tokens and {name} features do not match: input_ids hold {num_tokens} {name} tokens, "
                    f"{name}_grid_thw gives {expected} features"
                )
            check_runs(ids, token, grids.prod(axis=1) // vision.merge_area, name)
            kinds.append((name, patches, grids))
        if not kinds:
            return {}
        all_patches = np.concatenate([patches for _, patches, _ in kinds])
        all_grids = np.concatenate([grids for _, _, grids in kinds])
        patches, patch_mask, patch_positions, counts = vision_rows(all_patches, all_grids, vision.spatial_merge_size)
        patches, patch_mask, patch_positions = pad_rows(patches, patch_mask, patch_positions)
        media = {"patches": patches, "patch_mask": patch_mask, "patch_positions": patch_positions}
        merged_per_row = patches.shape[1] // vision.merge_area
        first_row = 0
        for name, _, grids in kinds:
            rows = int(grids[:, 0].sum())
            media[f"{name}_rows"] = np.concatenate(
                [row * merged_per_row + np.arange(counts[row]) for row in range(first_row, first_row + rows)]
            ).astype(np.int32)
            media[f"{name}_grid_thw"] = grids
            first_row += rows
        return media

    def _check_patches(self, name: str, patches, grids) -> tuple[np.ndarray, np.ndarray]:
        vision = self.config.vision_config
        patches = np.asarray(patches, np.float32)
        if grids is None:
            raise RequestError(f"{name} pixel values were given without {name}_grid_thw")
        grids = np.asarray(grids)
        if grids.ndim != 2 or grids.shape[1] != 3 or not np.issubdtype(grids.dtype, np.integer) or (grids < 1).any():
            raise RequestError(f"{name}_grid_thw must be (n, 3) positive integers (t, h, w), got {grids.tolist()}")
        merge = vision.spatial_merge_size
        if (grids[:, 1:] % merge).any():
            raise RequestError(f"{name}_grid_thw {grids.tolist()}: heights and widths must be multiples of {merge}")
        if patches.ndim != 2 or patches.shape != (int(grids.prod(axis=1).sum()), vision.patch_features):
            raise RequestError(
                f"{name} pixel values must be ({int(grids.prod(axis=1).sum())}, {vision.patch_features}) for "
                f"{name}_grid_thw {grids.tolist()}, got {patches.shape}"
            )
        return patches, grids.astype(np.int64)

    def _prompt_positions(self, padded_ids, padded_mask, media) -> np.ndarray:
        vision = self.config.vision_config
        return mrope_positions(
            padded_ids,
            padded_mask,
            media.get("image_grid_thw"),
            media.get("video_grid_thw"),
            image_token_id=self.config.image_token_id,
            video_token_id=self.config.video_token_id,
            spatial_merge_size=vision.spatial_merge_size,
        )

    def _embedded(self, ids, **media):
        return self._embeddings(self.params, ids, **{name: media[name] for name in DEVICE_MEDIA if name in media})


def check_runs(ids: np.ndarray, token: int, tokens_per_grid: np.ndarray, name: str) -> None:
    """Each run of `token` in the prompt (row by row) is one image's (video's) tokens, in order."""
    runs = []
    for row in ids:
        is_token = np.concatenate([[False], row == token, [False]])
        edges = np.flatnonzero(np.diff(is_token.astype(np.int8)))
        runs.extend((edges[1::2] - edges[::2]).tolist())
    if runs != tokens_per_grid.tolist():
        raise RequestError(
            f"the prompt's runs of {name} tokens are {runs} long; {name}_grid_thw gives {tokens_per_grid.tolist()}"
            f" (one run per {name}, in order)"
        )


def pad_rows(patches: np.ndarray, patch_mask: np.ndarray, patch_positions: np.ndarray):
    """Pads the row count to a power of two with blank, fully valid rows (never read), so that
    requests with different numbers of images reuse compiled code."""
    rows = patches.shape[0]
    extra = (1 << (rows - 1).bit_length()) - rows
    if not extra:
        return patches, patch_mask, patch_positions
    return (
        np.concatenate([patches, np.zeros((extra, *patches.shape[1:]), patches.dtype)]),
        np.concatenate([patch_mask, np.ones((extra, *patch_mask.shape[1:]), bool)]),
        np.concatenate([patch_positions, np.zeros((extra, *patch_positions.shape[1:]), patch_positions.dtype)]),
    )


class AwakerForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Awaker2.5-VL: Qwen2-VL with LoRA on q/k/v and LoRA experts routed once per sequence
    (`awaker`), loaded from a checkpoint that `aria-jax convert BASE --awaker AWAKER.bin` built.

    The routers read the mean of the layer-0 embeddings over each row's prompt span: `prompt_pos`
    (B, 2) [start, end) in the rows as given, or derived from the ids as Awaker's README does
    (`awaker.prompt_spans`). `gate="released"` (the default) reproduces the released model: the
    prompt step routes by the embeddings with the image features in, every later step by the
    plain token embeddings (image positions hold the image-pad token's embedding), so an image
    prompt's routing can change after the first token. `gate="image_features"` keeps the prompt
    step's routing for every step (a deviation from the release; what its code comments suggest
    was meant)."""

    MEDIA_ARGUMENTS = Qwen2VLForConditionalGeneration.MEDIA_ARGUMENTS + ("prompt_pos",)
    GATES = ("released", "image_features")

    def __init__(self, config: AwakerConfig, params: dict, dtype="float32", tokenizer=None, mesh=None, gate="released"):
        if not isinstance(config, AwakerConfig):
            raise TypeError(f"AwakerForConditionalGeneration takes an AwakerConfig, got {type(config).__name__}")
        super().__init__(config, params, dtype, tokenizer, mesh)
        self.gate = gate
        self._gate_inputs = self._jitted(qwen2_vl_apply, "gate_inputs", static_argnames=("plain_after_prompt",))

    @property
    def gate(self) -> str:
        """Where the routers' input comes from after the prompt step: "released" or "image_features"
        (see the class docstring); settable between calls (no recompilation)."""
        return self._gate

    @gate.setter
    def gate(self, gate: str) -> None:
        if gate not in self.GATES:
            raise ValueError(f"gate={gate!r}: one of {', '.join(self.GATES)}")
        self._gate = gate

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype="float32", mesh=None, gate: str = "released"
    ) -> "AwakerForConditionalGeneration":
        """Loads a checkpoint converted with `aria-jax convert BASE_DIR DST --awaker AWAKER.bin`."""
        config = qwen2_vl_config_from_pretrained(path)
        if not isinstance(config, AwakerConfig):
            raise CheckpointError(
                f"{os.fspath(path)}: a Qwen2-VL checkpoint without Awaker's adapters (its config.json has no "
                "'awaker' object); build one with `aria-jax convert BASE_DIR DST --awaker pytorch_model.bin`, "
                "or load this one with Qwen2VLForConditionalGeneration"
            )
        return cls(*cls._loaded(path, config, dtype, mesh), mesh, gate)

    @classmethod
    def from_random(
        cls, config: AwakerConfig, seed: int = 0, dtype="float32", gate: str = "released"
    ) -> "AwakerForConditionalGeneration":
        jdtype = resolve_dtype(dtype)
        return cls(config, init_qwen2_vl_params(config, jax.random.key(seed), jdtype), jdtype, gate=gate)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
        prompt_pos=None,
    ) -> CausalLMOutput:
        """Logits (B, T, vocab), routed by the prompt's embeddings with the image features in
        (the prompt step of generation)."""
        ids, mask, _ = self._check_text(input_ids, attention_mask, None)
        media = self._checked_media(
            ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, prompt_pos=prompt_pos
        )
        positions = self._positions(ids, mask, media, position_ids)
        device_media = {name: media[name] for name in DEVICE_MEDIA if name in media}
        return CausalLMOutput(
            self._forward(self.params, ids, mask, positions, **device_media, gate_spans=media["gate_spans"])
        )

    def _checked_media(self, ids, *args, prompt_pos=None, **kwargs) -> dict:
        media = super()._checked_media(ids, *args, **kwargs)
        if prompt_pos is None:
            try:
                spans = prompt_spans(
                    ids,
                    image_token_id=self.config.image_token_id,
                    vision_start_token_id=self.config.vision_start_token_id,
                    im_start_token_id=self.config.im_start_token_id,
                    im_end_token_id=self.config.im_end_token_id,
                )
            except ValueError as err:
                raise RequestError(f"{err}; or pass prompt_pos") from None
        else:
            spans = np.asarray(prompt_pos)
            batch, length = ids.shape
            if spans.shape != (batch, 2) or not np.issubdtype(spans.dtype, np.integer):
                raise RequestError(f"prompt_pos must be ({batch}, 2) integers [start, end), got {spans.shape}")
            bad = np.flatnonzero((spans[:, 0] < 0) | (spans[:, 0] >= spans[:, 1]) | (spans[:, 1] > length))
            if bad.size:
                raise RequestError(
                    f"prompt_pos row {bad[0]} is {spans[bad[0]].tolist()}: not a non-empty span of the {length} tokens"
                )
        return {**media, "gate_spans": spans.astype(np.int32)}

    def prefill_inputs(self, prompt: Prompt, embeds: jax.Array) -> dict:
        """The M-RoPE positions, and the routers' inputs for the prompt step and the steps after."""
        spans = prompt.media["gate_spans"] + (prompt.padded_ids.shape[1] - prompt.ids.shape[1])  # left padding
        gates = self._gate_inputs(
            self.params, prompt.padded_ids, embeds, spans, plain_after_prompt=self.gate == "released"
        )
        return {**super().prefill_inputs(prompt, embeds), "gate_inputs": gates}
