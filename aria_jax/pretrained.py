"""User-facing model classes: thin holders of (config, params, compiled functions).

All computation is in the functional modules (`modeling.py`, `device_loop.py`); these classes load
weights, keep them, check inputs on the host (so a bad request fails with a clear message and
leaves the model untouched), and call jitted functions.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from aria_jax.checkpoint import Manifest, is_converted, loaded_quantization, restore_params
from aria_jax.config import AriaConfig, AriaTextConfig, config_from_pretrained, text_config_from_pretrained
from aria_jax.host_loop import Generator, Request, RequestError, check_request, shorten
from aria_jax.modeling import (
    TextDecoder,
    init_multimodal_params,
    init_text_params,
    multimodal_apply,
    multimodal_param_shapes,
    text_forward,
    text_param_shapes,
)
from aria_jax.projector import queries_for_patches
from aria_jax.quantization import DEFAULT_GROUP_SIZE, Quantization, quantize_params, quantized_shapes
from aria_jax.sharding import MeshRunner, check_layout, param_sharding_for
from aria_jax.weights import ARIA_KEYS, COMPONENTS, HubCheckpoint, KeyTable, load_params

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype:
    name = dtype if isinstance(dtype, str) else getattr(jnp.dtype(dtype), "name", None)
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


@flax.struct.dataclass
class CausalLMOutput:
    logits: jax.Array


def shape_tree(boxed_shapes) -> dict:
    """An `eval_shape`d params tree (boxed with logical names) as tuples of shapes."""
    return jax.tree_util.tree_map(lambda p: tuple(p.value.shape), boxed_shapes, is_leaf=lambda x: hasattr(x, "names"))


def param_shapes(config: AriaTextConfig, dtype) -> dict:
    """The text params tree as tuples of shapes, for the loader."""
    return shape_tree(text_param_shapes(config, dtype))


def open_weights(path) -> HubCheckpoint | str:
    """A converted checkpoint's path as is; a hub checkpoint opened, so that pickles and
    unreadable files are refused before anything else is read."""
    return os.fspath(path) if is_converted(path) else HubCheckpoint(path)


def load_or_restore(
    weights: HubCheckpoint | str,
    config,
    boxed_shapes: dict,
    dtype,
    components: tuple[str, ...],
    mesh=None,
    quantization: Quantization | None = None,
    table: KeyTable = ARIA_KEYS,
) -> dict:
    """Params of `components` ({component: boxed shapes}), each built directly in its sharding
    on `mesh` (or on device 0): no device or host ever holds more than its share. With
    `quantization`, the weights it covers are quantized as they are read (a checkpoint converted
    with `--quantize` loads as stored). `table`: the model family's hub key table."""
    if not isinstance(weights, HubCheckpoint):
        quantization = loaded_quantization(Manifest.read(weights), quantization)
    sharding_for = None
    if mesh is not None:
        check_layout(config, mesh, quantization)
        sharding_for = param_sharding_for(quantized_shapes(boxed_shapes, quantization), mesh)
    shapes = shape_tree(boxed_shapes)
    if isinstance(weights, HubCheckpoint):
        return load_params(weights, shapes, dtype, components, sharding_for, quantization, table)
    return restore_params(weights, shapes, dtype, components, sharding_for, quantization)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A generation request checked on the host (`_Pretrained.prompt`), ready to embed."""

    ids: np.ndarray  # (B, T) the prompt as given
    padded_ids: np.ndarray  # (B, bucket) left-padded (`Generator.pad_prompt`)
    padded_mask: np.ndarray  # (B, bucket)
    # The model family's image inputs, checked and ready for its embedding (`_checked_media`):
    # Aria's pixel_values (crops padded to a power of two) and pixel_mask; Qwen2-VL's vision rows.
    media: dict[str, np.ndarray]
    request: Request
    # (B, bucket, 3) M-RoPE positions of the padded prompt (Qwen2-VL); None: the count of real tokens.
    position_ids: np.ndarray | None = None


class _Pretrained:
    """What every model class shares: dtype, tokenizer, input checks, generate and stream.

    A family names its image inputs in `MEDIA_ARGUMENTS` (in positional order, after input_ids
    and attention_mask), checks them in `_checked_media` and embeds them in `_embedded`."""

    text_config: AriaTextConfig
    MEDIA_ARGUMENTS: tuple[str, ...] = ()

    def __init__(self, dtype, tokenizer=None, mesh=None):
        self.dtype = resolve_dtype(dtype)
        self.tokenizer = tokenizer
        self.mesh = mesh
        int4_weights = any(leaf.dtype == jnp.int4 for leaf in jax.tree.leaves(self.params))
        self._run = MeshRunner(mesh, int4_weights)
        self._generator = Generator(self.text_config, self.dtype, tokenizer, self._run)

    @property
    def runner(self) -> MeshRunner:
        """Runs the model's programs on its mesh, compiled with its platform's options."""
        return self._run

    # Whether the family's tokenizer is byte-level (GPT-2 / Qwen2 style) rather than Aria's.
    BYTE_LEVEL_TOKENIZER = False

    @classmethod
    def _load_tokenizer(cls, path):
        """The checkpoint's tokenizer if it ships one (needed for stop strings and streaming)."""
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        if not any(os.path.isfile(os.path.join(directory, name)) for name in ("tokenizer.json", "tokenizer.model")):
            return None
        from aria_jax.tokenizer import AriaTokenizer

        return AriaTokenizer.from_pretrained(directory, byte_level=cls.BYTE_LEVEL_TOKENIZER)

    def _checked_media(self, ids: np.ndarray, **media) -> dict[str, np.ndarray]:
        """The image inputs (`MEDIA_ARGUMENTS`) checked against the image tokens of `ids` (a bad one
        raises `RequestError`), as `_embedded` takes them; {} without images."""
        raise NotImplementedError

    def _embedded(self, ids, **media) -> jax.Array:
        raise NotImplementedError

    def _prompt_positions(self, padded_ids: np.ndarray, padded_mask: np.ndarray, media: dict) -> np.ndarray | None:
        """The padded prompt's position ids, when they are not the count of real tokens."""
        return None

    def _jitted(self, apply, method: str | None = None, **jit_options):
        """`apply(params, ..., config=, method=, dtype=)` (a family's functional apply) jitted for
        this model's config and dtype, run on its mesh."""
        function = functools.partial(apply, config=self.config, method=method, dtype=self.dtype)
        return self._run.jit(function, **jit_options)

    @property
    def text_params(self):
        """The decoder's params: what `generator`'s prefill and decode take."""
        return self._text_params

    @property
    def generator(self) -> Generator:
        """The compiled prefill and decode, and the host loop that `generate` and `stream` run."""
        return self._generator

    def generation_functions(self) -> tuple:
        """The jitted functions `generate` and `stream` call, in order: the prompt embedding
        (token ids, and images for the multimodal model), prefill and decode. `aria-jax plan`
        compiles these very functions."""
        return self._embed_prompt, self._generator.prefill, self._generator.decode

    def prompt(self, input_ids, attention_mask=None, *media, **settings) -> Prompt:
        """Checks a generation request on the host (`generate`'s arguments; a bad one raises
        `RequestError` naming it) and pads its prompt to the bucket, without running anything."""
        named_media = {name: settings.pop(name) for name in self.MEDIA_ARGUMENTS if name in settings}
        media = bind_media(self.MEDIA_ARGUMENTS, "prompt", media, named_media)
        ids, mask, _ = self._check_text(input_ids, attention_mask, None)
        empty_rows = np.flatnonzero(~mask.any(axis=1))
        if empty_rows.size:
            raise RequestError(f"attention_mask row {empty_rows[0]} is all zeros: that row has no prompt to answer")
        request = check_request(ids.shape[0], ids.shape[1], self.text_config, self.tokenizer, **settings)
        media = self._checked_media(ids, **media)
        padded_ids, padded_mask = self._generator.pad_prompt(ids, mask)
        positions = self._prompt_positions(padded_ids, padded_mask, media)
        return Prompt(ids, padded_ids, padded_mask, media, request, positions)

    def prefill_inputs(self, prompt: Prompt, embeds: jax.Array) -> dict:
        """What prefill takes besides the embeddings and mask (`device_loop.prefill`): the prompt's
        position ids when they are not the count of real tokens."""
        return {} if prompt.position_ids is None else {"position_ids": prompt.position_ids}

    def prompt_embeddings(self, prompt: Prompt) -> jax.Array:
        """The padded prompt's embeddings (B, T, D), image features in place of image tokens."""
        return self._embedded(prompt.padded_ids, **prompt.media)

    def _prepare(self, input_ids, attention_mask, media: tuple, named_media: dict, settings: dict):
        """Checks the request, pads the prompt to its bucket and embeds it (images merged)."""
        prompt = self.prompt(input_ids, attention_mask, *media, **named_media, **settings)
        return prompt, self.prompt_embeddings(prompt)

    def generate(
        self,
        input_ids,
        attention_mask=None,
        *media,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        stop_strings=(),
        max_length: int | None = None,
        kv_cache_dtype: str | None = None,
        **named_media,
    ) -> np.ndarray:
        """`media`: the model's image inputs, by position or name (`MEDIA_ARGUMENTS`): Aria's
        pixel_values, pixel_mask, num_crops (accepted, not needed); Qwen2-VL's pixel_values,
        image_grid_thw. Returns (B, T + max_new_tokens) int32: the prompt, then the new tokens, then the pad
        id once a row has stopped. The config's eos ids always stop a row. `stop_strings` (a str
        is one stop string, or a list of them) stop it too, in addition to `<|im_end|>`, the
        model's end of turn, which stops by default when the checkpoint ships a tokenizer (stop
        strings need one); `stop_strings=None` turns every stop string off, `<|im_end|>`
        included. temperature, top_k (an integer, 0: off) and top_p may be one value or one per
        row; `seed` is an integer in [0, 2**64) (row r uses seed + r, which must stay in range)
        or one per row. `kv_cache_dtype="int8"` keeps the KV cache in int8 with a scale per token
        and head (about half a bfloat16 cache's memory; `aria_jax.kv_cache`). A bad argument
        raises `RequestError` naming it, before anything runs."""
        prompt, embeds = self._prepare(
            input_ids,
            attention_mask,
            media,
            named_media,
            dict(
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                stop_strings=stop_strings,
                kv_cache_dtype=kv_cache_dtype,
            ),
        )
        new_tokens = self._generator.generate(
            self._text_params,
            embeds,
            prompt.padded_mask,
            prompt.request,
            max_length,
            self.prefill_inputs(prompt, embeds),
        )
        return np.concatenate([prompt.ids, new_tokens], axis=1)

    def stream(
        self,
        input_ids,
        attention_mask=None,
        *media,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        stop_strings=(),
        max_length: int | None = None,
        kv_cache_dtype: str | None = None,
        **named_media,
    ):
        """Like `generate` (the same arguments, stop strings and errors), but yields the
        answer's text as it is produced: a str per piece for one prompt, a tuple of str (one per
        row) for a batch. The text ends before the first stop string."""
        prompt, embeds = self._prepare(
            input_ids,
            attention_mask,
            media,
            named_media,
            dict(
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                stop_strings=stop_strings,
                kv_cache_dtype=kv_cache_dtype,
            ),
        )
        return self._generator.stream(
            self._text_params,
            embeds,
            prompt.padded_mask,
            prompt.request,
            max_length,
            self.prefill_inputs(prompt, embeds),
        )

    def _check_text(self, input_ids, attention_mask, position_ids):
        ids = as_array("input_ids", input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise RequestError(f"input_ids must be a (batch, length) integer array, got shape {ids.shape} {ids.dtype}")
        if not ids.size:
            raise RequestError(
                f"input_ids has shape {ids.shape}: a prompt needs at least one row of at least one token"
            )
        vocab = self.text_config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            bad = ids[(ids < 0) | (ids >= vocab)][0]
            raise RequestError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab})")
        mask = np.ones(ids.shape, np.int32) if attention_mask is None else as_array("attention_mask", attention_mask)
        if mask.shape != ids.shape:
            raise RequestError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
        valid = np.isin(mask, (0, 1)) if mask.dtype.kind in "biuf" else np.zeros(mask.shape, bool)
        if not valid.all():
            row, column = np.argwhere(~valid)[0]
            raise RequestError(f"attention_mask row {row} holds {mask[row, column].item()!r}: must be 0 (padding) or 1")
        if position_ids is not None:
            position_ids = as_array("position_ids", position_ids)
            if position_ids.shape != ids.shape or not np.issubdtype(position_ids.dtype, np.integer):
                raise RequestError(
                    f"position_ids must be an integer array of input_ids' shape {ids.shape}, "
                    f"got {position_ids.shape} {position_ids.dtype}"
                )
            position_ids = position_ids.astype(np.int32)
        return ids.astype(np.int32), mask.astype(np.int32), position_ids


def bind_media(names: tuple[str, ...], call: str, positional: tuple, named: dict) -> dict:
    """A family's image arguments (`names`, in positional order) bound to what a call passed, as
    Python binds arguments."""
    if len(positional) > len(names):
        raise TypeError(f"{call}() takes at most {len(names)} image arguments after attention_mask: {', '.join(names)}")
    bound = dict(zip(names, positional))
    for name, value in named.items():
        if name not in names:
            raise TypeError(f"{call}() got an unexpected keyword argument {name!r}")
        if name in bound:
            raise TypeError(f"{call}() got multiple values for argument {name!r}")
        bound[name] = value
    return bound


def as_array(name: str, value) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError):  # ragged nesting
        raise RequestError(f"{name}={shorten(value)}: not a rectangular array") from None


class AriaTextForCausalLM(_Pretrained):
    """The Aria MoE decoder alone: token ids -> logits, and greedy generation."""

    MEDIA_ARGUMENTS = ("pixel_values", "pixel_mask", "num_crops")  # none taken: a clear error

    def __init__(self, config: AriaTextConfig, params: dict, dtype="float32", tokenizer=None, mesh=None):
        self.config = self.text_config = config
        self.params = params
        super().__init__(dtype, tokenizer, mesh)
        self._forward = self._run.jit(functools.partial(text_forward, config=config, dtype=self.dtype))
        self._embed = self._run.jit(
            lambda params, ids: TextDecoder(config, dtype=self.dtype, param_dtype=self.dtype).apply(
                {"params": params}, ids, method=TextDecoder.embed
            )
        )
        self._embed_prompt = self._embed

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype="float32", mesh=None, quantize=None, group_size: int = DEFAULT_GROUP_SIZE
    ) -> "AriaTextForCausalLM":
        """Loads the text model of a hub-format directory (text-only or multimodal checkpoint,
        transformers or original rhymes-ai naming) or of a converted checkpoint; with `mesh`
        (`aria_jax.make_mesh`), every param is built directly in its sharding. `quantize`:
        None, "int8" or "int4" (in groups of `group_size` inputs), see `aria_jax.quantization`."""
        jdtype = resolve_dtype(dtype)
        quantization = Quantization.of(quantize, group_size)
        weights = open_weights(path)
        config = text_config_from_pretrained(path)
        shapes = {"language_model": text_param_shapes(config, jdtype)}
        params = load_or_restore(weights, config, shapes, jdtype, ("language_model",), mesh, quantization)[
            "language_model"
        ]
        return cls(config, params, jdtype, cls._load_tokenizer(os.fspath(path)), mesh)

    @classmethod
    def from_random(
        cls, config: AriaTextConfig, seed: int = 0, dtype="float32", quantize=None, group_size: int = DEFAULT_GROUP_SIZE
    ) -> "AriaTextForCausalLM":
        jdtype = resolve_dtype(dtype)
        params = init_text_params(config, jax.random.key(seed), jdtype)
        return cls(config, quantize_params(params, Quantization.of(quantize, group_size), "language_model"), jdtype)

    def __call__(self, input_ids, attention_mask=None, position_ids=None) -> CausalLMOutput:
        ids, mask, positions = self._check_text(input_ids, attention_mask, position_ids)
        return CausalLMOutput(self._forward(self.params, input_ids=ids, attention_mask=mask, position_ids=positions))

    @property
    def _text_params(self):
        return self.params

    def _checked_media(self, ids, pixel_values=None, pixel_mask=None, num_crops=None):
        if pixel_values is not None:
            raise RequestError("AriaTextForCausalLM takes no images; use AriaForConditionalGeneration")
        return {}

    def _embedded(self, ids):
        return self._embed(self.params, ids)


class AriaForConditionalGeneration(_Pretrained):
    """The whole model: images and tokens -> logits, and greedy generation."""

    MEDIA_ARGUMENTS = ("pixel_values", "pixel_mask", "num_crops")

    def __init__(self, config: AriaConfig, params: dict, dtype="float32", tokenizer=None, mesh=None):
        self.config = config
        self.text_config = config.text_config
        self.params = params
        super().__init__(dtype, tokenizer, mesh)
        self._forward = self._jitted(multimodal_apply)
        self._embeddings = self._jitted(multimodal_apply, "input_embeddings")
        self._vision_features = self._jitted(multimodal_apply, "vision_features")
        self._image_features = self._jitted(multimodal_apply, "image_features")
        self._embed_prompt = self._embeddings

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype="float32",
        mesh=None,
        quantize=None,
        group_size: int = DEFAULT_GROUP_SIZE,
        quantize_vision: bool = False,
    ) -> "AriaForConditionalGeneration":
        """Loads every weight of a multimodal hub-format directory (transformers or original
        rhymes-ai naming) or of a converted checkpoint; with `mesh` (`aria_jax.make_mesh`), every
        param is built directly in its sharding. The vision tower's zero `post_layernorm` is not
        used, so not loaded. `quantize`: None, "int8" or "int4" (in groups of `group_size`
        inputs) for the decoder's weights, and the vision tower's and projector's too with
        `quantize_vision` (see `aria_jax.quantization`)."""
        jdtype = resolve_dtype(dtype)
        quantization = Quantization.of(quantize, group_size, quantize_vision)
        weights = open_weights(path)
        config = config_from_pretrained(path)
        params = load_or_restore(
            weights, config, multimodal_param_shapes(config, jdtype), jdtype, COMPONENTS, mesh, quantization
        )
        return cls(config, params, jdtype, cls._load_tokenizer(os.fspath(path)), mesh)

    @classmethod
    def from_random(
        cls,
        config: AriaConfig,
        seed: int = 0,
        dtype="float32",
        quantize=None,
        group_size: int = DEFAULT_GROUP_SIZE,
        quantize_vision: bool = False,
    ) -> "AriaForConditionalGeneration":
        jdtype = resolve_dtype(dtype)
        params = init_multimodal_params(config, jax.random.key(seed), jdtype)
        return cls(config, quantize_params(params, Quantization.of(quantize, group_size, quantize_vision)), jdtype)

    def _check_images(self, ids, pixel_values, pixel_mask):
        num_image_tokens = int((ids == self.config.image_token_index).sum())
        if pixel_values is None:
            if num_image_tokens:
                raise RequestError(f"input_ids hold {num_image_tokens} image tokens but no pixel_values were given")
            return None, None
        pixel_values = np.asarray(pixel_values, np.float32)
        vision = self.config.vision_config
        if (
            pixel_values.ndim != 4
            or pixel_values.shape[1] != vision.num_channels
            or pixel_values.shape[2] != pixel_values.shape[3]
        ):
            raise RequestError(f"pixel_values must be (crops, {vision.num_channels}, S, S), got {pixel_values.shape}")
        crops, _, side, _ = pixel_values.shape
        if side < vision.patch_size:
            raise RequestError(f"pixel_values side {side} is smaller than the patch size {vision.patch_size}")
        queries = queries_for_patches(self.config, (side // vision.patch_size) ** 2)
        if num_image_tokens != crops * queries:
            raise RequestError(
                f"image tokens and image features do not match: input_ids hold {num_image_tokens} image tokens, "
                f"pixel_values give {crops * queries} features ({crops} crops x {queries} queries)"
            )
        if pixel_mask is not None:
            pixel_mask = np.asarray(pixel_mask).astype(bool)
            if pixel_mask.shape != (crops, side, side):
                raise RequestError(f"pixel_mask has shape {pixel_mask.shape}, expected {(crops, side, side)}")
        return pixel_values, pixel_mask

    def __call__(
        self, input_ids, attention_mask=None, position_ids=None, pixel_values=None, pixel_mask=None, num_crops=None
    ) -> CausalLMOutput:
        """Logits (B, T, vocab). `num_crops` (from the processor) is accepted and not needed."""
        ids, mask, positions = self._check_text(input_ids, attention_mask, position_ids)
        pixel_values, pixel_mask = self._check_images(ids, pixel_values, pixel_mask)
        return CausalLMOutput(self._forward(self.params, ids, mask, positions, pixel_values, pixel_mask))

    def vision_features(self, pixel_values, pixel_mask=None) -> jax.Array:
        """The vision tower's output (crops, patches, D_vision), before the projector."""
        return self._vision_features(self.params, np.asarray(pixel_values, np.float32), pixel_mask)[0]

    def image_features(self, pixel_values, pixel_mask=None) -> jax.Array:
        """The projector's output (crops, queries, D_text): what replaces the image tokens."""
        return self._image_features(self.params, np.asarray(pixel_values, np.float32), pixel_mask)

    @property
    def _text_params(self):
        return self.params["language_model"]

    def _checked_media(self, ids, pixel_values=None, pixel_mask=None, num_crops=None):
        pixel_values, pixel_mask = self._check_images(ids, pixel_values, pixel_mask)
        if pixel_values is None:
            return {}
        pixel_values, pixel_mask = pad_crops(pixel_values, pixel_mask)
        return (
            {"pixel_values": pixel_values}
            if pixel_mask is None
            else {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        )

    def _embedded(self, ids, pixel_values=None, pixel_mask=None):
        return self._embeddings(self.params, ids, pixel_values, pixel_mask)


def pad_crops(pixel_values: np.ndarray, pixel_mask: np.ndarray | None):
    """Pads the crop count to a power of two with blank, fully valid crops, so requests with
    different numbers of images reuse compiled code. Their features are never merged: merging
    takes features in order, one per image token, and the real crops come first."""
    crops = pixel_values.shape[0]
    padded = 1 << (crops - 1).bit_length()
    if padded == crops:
        return pixel_values, pixel_mask
    extra = padded - crops
    pixel_values = np.concatenate([pixel_values, np.zeros((extra,) + pixel_values.shape[1:], pixel_values.dtype)])
    if pixel_mask is not None:
        pixel_mask = np.concatenate([pixel_mask, np.ones((extra,) + pixel_mask.shape[1:], bool)])
    return pixel_values, pixel_mask
