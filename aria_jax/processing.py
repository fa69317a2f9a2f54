"""Aria's processor: prompts with `<|img|>` placeholders plus images in, model inputs out.

    processor = AriaProcessor.from_pretrained(path)
    inputs = processor(text=prompts, images=images, max_image_size=980, split_image=False)
    # -> numpy: input_ids (B, T) int32, attention_mask (B, T) int32 (left padding by default),
    #    pixel_values (N, 3, S, S) float32, pixel_mask (N, S, S) bool, num_crops (num_images,)
    answers = processor.decode_replies(model.generate(**inputs), inputs)  # one str per row

Each `<|img|>` in the text (in order across the batch) stands for one image and becomes
`num_crops[i] * queries` image tokens, where `queries = size_to_queries[max_image_size]`
(`AriaConfig.crop_size_to_queries`) and `num_crops[i]` is that image's own crop count. transformers 5
expands every placeholder by the batch-wide maximum crop count instead, which gives a
token / feature count mismatch as soon as split images in one batch have different crop
counts; for batches where all images have the same crop count the ids are identical.

Chat messages go through `apply_chat_template` (the prompt text) or `from_messages` (the model
inputs). Their content items are `{"type": "text", "text": ...}`, `{"type": "image"}` (the
image comes from `images=`, in order, unless the item has its own `"image"` or `"path"`) and
`{"type": "video", "path": PATH, "num_frames": N}` (or `"video": [frames]` with an optional
`"fps"`). A video item becomes, at its place and per sampled frame (see `aria_jax.video`),
`{"type": "text", "text": "[mm:ss]"}`, `{"type": "image"}`, `{"type": "text", "text": "\\n"}`,
the format of Aria's video notebook; the frames are then ordinary images:

    inputs = processor.from_messages([{"role": "user", "content": [
        {"type": "video", "path": "clip.mp4", "num_frames": 8},
        {"type": "text", "text": "What happens in the video?"}]}])

Videos asking for more frames than the model's context holds (config.json's
max_position_embeddings, at the crop size's tokens per frame) are refused before a frame is
decoded. Bad arguments raise `ProcessorError`, text that is not valid Unicode `TokenizerError`,
both ValueErrors naming the argument and value.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from aria_jax.config import (
    ARIA_CROP_SIZE_TO_QUERIES,
    AriaTextConfig,
    AriaVisionConfig,
    ConfigError,
    crop_size_to_queries,
    patch_to_query_pairs,
    read_optional_json,
)
from aria_jax.image_processing import TENSOR_TYPES, as_array, is_batch_array, to_numpy, to_tensors
from aria_jax.tokenizer import AriaTokenizer, check_text, compile_chat_template, pad_batch, render_chat_template
from aria_jax.video import Video, VideoCache, frame_timestamp, load_video, resolve_num_frames

PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
DEFAULT_IMAGE_TOKEN = "<|img|>"
IM_END = "<|im_end|>"
# apply_chat_template(tokenize=True) arguments that go to the processor, not to the template.
PROCESSOR_OPTIONS = (
    "images",
    "max_image_size",
    "split_image",
    "split_mode",
    "padding_side",
    "return_tensors",
    "padding",
    "truncation",
    "max_length",
    "images_kwargs",
    "text_kwargs",
)


class ProcessorError(ValueError):
    """An argument the processor cannot turn into model inputs; the message names it and its value."""


def size_to_queries_from_config(config: dict) -> dict[int, int] | None:
    """Crop size -> image tokens per crop from a multimodal config.json (`AriaConfig.crop_size_to_queries`
    without reading the rest of the model). A map without any usable key, or with a query count
    that is not positive, is a ConfigError."""
    mapping = config.get("projector_patch_to_query_dict")
    if not mapping:
        return None
    vision = AriaVisionConfig.from_hf_dict(config.get("vision_config") or {})
    pairs = patch_to_query_pairs(mapping)
    for patches, queries in pairs:
        if queries <= 0:
            raise ConfigError(
                f"invalid config: projector_patch_to_query_dict has {patches}: {queries}; "
                "a query count must be positive"
            )
    out = crop_size_to_queries(pairs, vision)
    if not out:
        raise ConfigError(
            f"invalid config: projector_patch_to_query_dict={dict(mapping)!r} has no square number "
            f"of patches up to {vision.num_patches_per_side**2} (the vision grid): no crop fits"
        )
    return out


def padding_strategy(padding: Any, max_length: Any) -> str | None:
    """transformers' `padding` values -> "longest", "max_length" or None (no padding)."""
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length <= 0
    ):
        raise ProcessorError(f"max_length must be a positive int or None, got {max_length!r}")
    if padding is True or padding == "longest":
        return "longest"
    if padding == "max_length":
        if max_length is None:
            raise ProcessorError("padding='max_length' needs max_length")
        return "max_length"
    if padding is False or padding is None or padding == "do_not_pad":
        return None
    raise ProcessorError(f"padding={padding!r}: use True, 'longest', 'max_length', False or 'do_not_pad'")


def truncates(truncation: Any) -> bool:
    """transformers' `truncation` values (one sequence: every strategy cuts it) -> whether to cut."""
    if truncation is True or truncation in ("longest_first", "only_first", "only_second"):
        return True
    if truncation is False or truncation is None or truncation == "do_not_truncate":
        return False
    raise ProcessorError(f"truncation={truncation!r}: use True, 'longest_first', False or 'do_not_truncate'")


def _is_image_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _is_batch_of_conversations(messages: Any) -> bool:
    return isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], (list, tuple))


def _item_type(item: Any) -> str | None:
    return item.get("type") if isinstance(item, dict) else None


def _has_video_items(conversation: Sequence[dict]) -> bool:
    return any(
        _item_type(item) == "video"
        for message in conversation
        if isinstance(message, dict) and isinstance(message.get("content"), (list, tuple))
        for item in message["content"]
    )


def _own_image(item: dict) -> Any:
    """The image an image item carries itself ("image": a PIL image / array / path, or "path"),
    else None."""
    for key in ("image", "path", "url"):  # "url": a local file, as transformers' tests pass it
        if item.get(key) is not None:
            return item[key]
    return None


def video_placeholders(timestamps: Sequence[float]) -> list[dict]:
    """Aria's content items for the frames of a video: "[mm:ss]", the frame, a newline, per frame."""
    items = []
    for seconds in timestamps:
        items += [{"type": "text", "text": frame_timestamp(seconds)}, {"type": "image"}, {"type": "text", "text": "\n"}]
    return items


class AriaProcessor:
    """Tokenizer + image processor + Aria's image-token expansion (see the module docstring).

    `size_to_queries` maps the allowed `max_image_size` values to the number of image tokens
    per crop. `pad_token_id` overrides the tokenizer's pad id (default: the tokenizer's pad
    token, else its unk token, as transformers' AriaProcessor does). `context_length` is the
    model's (its max_position_embeddings): video items that ask for more frames than it holds
    are refused before any frame is decoded; None checks nothing.
    """

    def __init__(
        self,
        image_processor: Any,
        tokenizer: AriaTokenizer,
        size_to_queries: dict[int, int] | None = None,
        chat_template: str | None = None,
        pad_token_id: int | None = None,
        context_length: int | None = None,
    ):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        if size_to_queries is None:
            size_to_queries = getattr(image_processor, "size_to_queries", None) or ARIA_CROP_SIZE_TO_QUERIES
        try:
            self.size_to_queries = {int(k): int(v) for k, v in dict(size_to_queries).items()}
        except (TypeError, ValueError):
            self.size_to_queries = {}
        if not self.size_to_queries or min(self.size_to_queries.values()) <= 0:
            raise ProcessorError(f"size_to_queries must map crop sizes to positive query counts, got {size_to_queries}")
        if image_processor is not None and hasattr(image_processor, "size_to_queries"):
            # The image processor validates max_image_size against the same table.
            image_processor.size_to_queries = dict(self.size_to_queries)
        self.chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        self.image_token = getattr(tokenizer, "image_token", None) or DEFAULT_IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id
            if pad_token_id is None:
                pad_token_id = tokenizer.unk_token_id
        self.pad_token_id = pad_token_id
        if context_length is not None and (
            isinstance(context_length, bool) or not isinstance(context_length, int) or context_length <= 0
        ):
            raise ProcessorError(f"context_length must be a positive int or None, got {context_length!r}")
        self.context_length = context_length
        # Rendering a prompt and building its inputs both need the frames: decode once.
        self.video_cache = VideoCache()

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "AriaProcessor":
        """Load from a hub-format checkpoint directory: the tokenizer files, the image processor
        settings (processor_config.json or preprocessor_config.json), the chat template and,
        if present, config.json (which fixes the crop sizes / query counts, the image token id
        and the pad id fallback)."""
        from aria_jax.image_processing import AriaImageProcessor

        directory = os.fspath(path)
        if not os.path.isdir(directory):
            raise ProcessorError(f"{directory}: not a directory")

        tokenizer = AriaTokenizer.from_pretrained(directory)
        image_processor = AriaImageProcessor.from_pretrained(directory)
        processor_config = read_optional_json(directory, PROCESSOR_CONFIG, ProcessorError)
        preprocessor_config = read_optional_json(directory, PREPROCESSOR_CONFIG, ProcessorError)
        model_config = read_optional_json(directory, "config.json", ConfigError)
        text_config = model_config.get("text_config") or model_config
        if not isinstance(text_config, dict):
            raise ConfigError(
                f"{os.path.join(directory, 'config.json')}: text_config must be a JSON object, "
                f"got {type(text_config).__name__}"
            )

        declared = processor_config.get("size_conversion") or preprocessor_config.get("size_conversion")
        try:
            declared = {int(k): int(v) for k, v in declared.items()} if declared else None
        except (AttributeError, TypeError, ValueError):
            raise ProcessorError(
                f"{directory}: size_conversion={declared!r} must map crop sizes to query counts"
            ) from None
        from_model = size_to_queries_from_config(model_config)
        if declared and from_model and declared != from_model:
            raise ProcessorError(
                f"{directory}: the processor's size_conversion {declared} does not match the model's "
                f"projector_patch_to_query_dict (crop size -> queries {from_model})"
            )
        size_to_queries = declared or from_model or ARIA_CROP_SIZE_TO_QUERIES

        # A processor-level template (processor_config.json) overrides the tokenizer's unless a
        # chat_template.jinja exists, which the tokenizer has read already.
        chat_template = None
        if not os.path.isfile(os.path.join(directory, CHAT_TEMPLATE_JINJA)):
            template = processor_config.get("chat_template")
            chat_template = template if isinstance(template, str) else None
            if chat_template is not None:
                compile_chat_template(chat_template, f"{os.path.join(directory, PROCESSOR_CONFIG)}: chat_template")

        # Pad id: the tokenizer's pad (or unk) token, unless that id is outside the model's
        # embedding table (hub Aria's added "<pad>" = 100352 is); then config.json's pad id.
        vocab_size = text_config.get("vocab_size")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        config_pad = model_config.get("pad_token_id", text_config.get("pad_token_id"))
        if pad is None or (isinstance(vocab_size, int) and pad >= vocab_size):
            pad = config_pad
        # The context is the model's, which reads a missing max_position_embeddings as its default.
        context_length = None
        if model_config:
            context_length = text_config.get("max_position_embeddings", AriaTextConfig.max_position_embeddings)
            if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length <= 0:
                raise ConfigError(
                    f"{os.path.join(directory, 'config.json')}: max_position_embeddings="
                    f"{context_length!r} is not a positive integer"
                )
        processor = cls(
            image_processor,
            tokenizer,
            size_to_queries=size_to_queries,
            chat_template=chat_template,
            pad_token_id=pad,
            context_length=context_length,
        )

        image_index = model_config.get("image_token_index", model_config.get("image_token_id"))
        if image_index is not None and processor.image_token_id != image_index:
            raise ProcessorError(
                f"{directory}: the tokenizer maps {processor.image_token} to id {processor.image_token_id}, "
                f"but config.json has image_token_index={image_index}"
            )
        return processor

    # ---------------------------------------------------------------- call

    @property
    def allowed_sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self.size_to_queries))

    def crop_size(self, max_image_size: int | None = None) -> int:
        """The crop size `max_image_size` asks for (None: the checkpoint's default), checked."""
        if max_image_size is None:
            default = getattr(self.image_processor, "max_image_size", None)
            return default if default in self.size_to_queries else max(self.size_to_queries)
        if (
            isinstance(max_image_size, bool)
            or not isinstance(max_image_size, (int, np.integer))
            or int(max_image_size) not in self.size_to_queries
        ):
            allowed = ", ".join(str(s) for s in self.allowed_sizes)
            raise ProcessorError(f"max_image_size={max_image_size!r} is not allowed; use one of: {allowed}")
        return int(max_image_size)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        max_image_size: int | None = None,
        split_image: bool = False,
        split_mode: str = "transformers",
        padding_side: str = "left",
        return_tensors: str | None = "np",
        padding: bool | str = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        images_kwargs: dict | None = None,
        text_kwargs: dict | None = None,
    ) -> dict[str, Any]:
        """Model inputs for a prompt or a batch of prompts (see the module docstring).

        `images` is a flat list of images in placeholder order across the batch (or one image),
        or a list with one list of images per prompt. `max_image_size=None` uses the
        checkpoint's default crop size. Raises ValueError when the number of `<|img|>`
        placeholders and of images differ.

        Text options as transformers' processor takes them (also inside `text_kwargs`, and the
        image options inside `images_kwargs`): `padding` True / "longest" (the default here;
        transformers' is False), "max_length" (to `max_length`) or False / "do_not_pad";
        `truncation=True` cuts each row to `max_length` tokens on the right, and cutting into
        a row's image tokens is an error, as in transformers. `return_tensors`: "np" (int32
        ids and mask), "jax", "pt", or None for lists of ids (pixel arrays stay numpy).
        """
        if images_kwargs or text_kwargs:
            options = {
                "max_image_size": max_image_size,
                "split_image": split_image,
                "split_mode": split_mode,
                "padding_side": padding_side,
                "return_tensors": return_tensors,
                "padding": padding,
                "truncation": truncation,
                "max_length": max_length,
            }
            for group, allowed in (
                (images_kwargs, ("max_image_size", "split_image", "split_mode")),
                (text_kwargs, ("padding_side", "return_tensors", "padding", "truncation", "max_length")),
            ):
                unknown = sorted(set(group or {}) - set(allowed))
                if unknown:
                    raise ProcessorError(
                        f"unsupported option(s) {', '.join(unknown)}; these take: {', '.join(allowed)}"
                    )
                options.update(group or {})
            return self(text, images, **options)
        if return_tensors not in (None, *TENSOR_TYPES):
            raise ProcessorError(f"return_tensors={return_tensors!r}: use one of {', '.join(TENSOR_TYPES)} or None")
        if padding_side not in ("left", "right"):
            raise ProcessorError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        padding_asked, padding = padding, padding_strategy(padding, max_length)
        truncate = truncates(truncation)
        if text is None and images is None:
            raise ProcessorError("pass text, images, or both")
        size = self.crop_size(max_image_size)

        prompts: list[str] | None = None
        if text is not None:
            if isinstance(text, str):
                prompts = [text]
            elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
                prompts = list(text)
            else:
                wrong = text if not isinstance(text, (list, tuple)) else next(t for t in text if not isinstance(t, str))
                raise ProcessorError(
                    f"text must be a string or a list of strings, got {type(wrong).__name__}"
                    f"{'' if wrong is text else ' in the list'}"
                )
            if not prompts:
                raise ProcessorError("text is an empty list")
            for row, prompt in enumerate(prompts):  # before expansion, so positions are the caller's
                check_text(prompt, "text" if isinstance(text, str) else f"text[{row}]")

        flat_images = self._flatten_images(images, prompts)
        if prompts is not None:
            counts = [p.count(self.image_token) for p in prompts]
            if sum(counts) != len(flat_images):
                raise ProcessorError(
                    f"the text has {sum(counts)} {self.image_token} placeholder(s) but {len(flat_images)} "
                    f"image(s) were passed; each image needs exactly one {self.image_token} in the text"
                )

        out: dict[str, Any] = {}
        num_crops: list[int] = []
        if flat_images:
            pixels = self.image_processor(
                flat_images, max_image_size=size, split_image=split_image, split_mode=split_mode
            )
            num_crops = [int(n) for n in np.asarray(pixels["num_crops"]).reshape(-1)]
            if len(num_crops) != len(flat_images):
                raise ProcessorError(
                    f"the image processor returned {len(num_crops)} crop counts for {len(flat_images)} images"
                )
            out["pixel_values"] = np.asarray(pixels["pixel_values"], dtype=np.float32)
            out["pixel_mask"] = np.asarray(pixels["pixel_mask"], dtype=bool)
            out["num_crops"] = np.asarray(num_crops, dtype=np.int64)

        if prompts is not None:
            expanded = self.expand_image_tokens(prompts, num_crops, size)
            ids = [self.tokenizer.encode(p) for p in expanded]
            if truncate and max_length is not None:
                ids = self._truncate(ids, expanded, max_length)
            if padding == "longest":
                ids, mask = pad_batch(ids, self.pad_token_id, max(len(row) for row in ids), padding_side)
            elif padding == "max_length":
                ids, mask = pad_batch(ids, self.pad_token_id, max_length, padding_side)
            else:
                mask = [[1] * len(row) for row in ids]
            if return_tensors is None:
                text_inputs = {"input_ids": ids, "attention_mask": mask}
            else:
                lengths = sorted({len(row) for row in ids})
                if len(lengths) > 1:
                    raise ProcessorError(
                        f"the rows have {lengths[0]} to {lengths[-1]} tokens: padding={padding_asked!r} cannot make "
                        f"return_tensors={return_tensors!r} arrays; use padding=True or return_tensors=None"
                    )
                text_inputs = to_tensors(
                    {
                        "input_ids": np.asarray(ids, dtype=np.int32).reshape(len(ids), -1),
                        "attention_mask": np.asarray(mask, dtype=np.int32).reshape(len(ids), -1),
                    },
                    return_tensors,
                )
            out = {**text_inputs, **out}
        if return_tensors is not None and flat_images:
            out.update(
                to_tensors({key: out[key] for key in ("pixel_values", "pixel_mask", "num_crops")}, return_tensors)
            )
        return out

    def _truncate(self, ids: list[list[int]], expanded: list[str], max_length: int) -> list[list[int]]:
        """Rows cut to `max_length` tokens on the right; a cut through image tokens is an error
        (the image's features would have no place), as transformers' processor checks."""
        ids = [row[:max_length] for row in ids]
        for row, (row_ids, prompt) in enumerate(zip(ids, expanded)):
            kept, wanted = row_ids.count(self.image_token_id), prompt.count(self.image_token)
            if kept != wanted:
                raise ProcessorError(
                    f"truncation to max_length={max_length} cuts row {row}'s image tokens ({kept} of {wanted} "
                    f"kept): raise max_length or turn truncation off"
                )
        return ids

    def expand_image_tokens(self, prompts: Sequence[str], num_crops: Sequence[int], max_image_size: int) -> list[str]:
        """Replace the i-th placeholder (across the batch) by num_crops[i] * queries image tokens."""
        queries = self.size_to_queries[self.crop_size(max_image_size)]
        crops = iter(num_crops)
        expanded = []
        for prompt in prompts:
            parts = prompt.split(self.image_token)
            pieces = [parts[0]]
            for part in parts[1:]:
                pieces.append(self.image_token * (next(crops) * queries))
                pieces.append(part)
            expanded.append("".join(pieces))
        return expanded

    def num_image_tokens(self, num_crops: int, max_image_size: int | None = None) -> int:
        """Image tokens one image with `num_crops` crops takes at this crop size."""
        return int(num_crops) * self.size_to_queries[self.crop_size(max_image_size)]

    def _flatten_images(self, images: Any, prompts: list[str] | None) -> list:
        if images is None:
            return []
        if is_batch_array(images):
            return list(as_array(images))
        if not _is_image_list(images):
            return [images]
        if any(_is_image_list(item) for item in images):
            if not all(_is_image_list(item) for item in images):
                raise ProcessorError("images must be a flat list, or a list with one list of images per prompt")
            if prompts is not None:
                if len(images) != len(prompts):
                    raise ProcessorError(
                        f"images has {len(images)} per-prompt lists but there are {len(prompts)} prompts"
                    )
                for row, (prompt, row_images) in enumerate(zip(prompts, images)):
                    found = prompt.count(self.image_token)
                    if found != len(row_images):
                        raise ProcessorError(
                            f"prompt {row} has {found} {self.image_token} placeholder(s) but "
                            f"{len(row_images)} image(s) were passed for it"
                        )
            return [image for row_images in images for image in row_images]
        return list(images)

    # ---------------------------------------------------------------- text helpers

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    def decode_replies(self, tokens: Any, inputs: dict | None = None, stop_token_ids: Sequence[int] = ()) -> list[str]:
        """Each row's answer text from `generate`'s tokens: the prompt (`inputs["input_ids"]`,
        when the rows start with it) is removed, each row is cut before its first stop token
        (`<|im_end|>`, the tokenizer's eos, and `stop_token_ids`) and decoded without special
        tokens. `tokens` may also be the new tokens only; `inputs=None` takes them as such."""
        rows = to_numpy(tokens)
        if rows.ndim == 1:
            rows = rows[None]
        if rows.ndim != 2 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
            raise ProcessorError(
                f"tokens must be a (batch, length) array of token ids, got shape {rows.shape} of {rows.dtype}"
            )
        if inputs is not None:
            prompt = inputs["input_ids"] if hasattr(inputs, "keys") else inputs  # a dict, or the ids
            prompt = to_numpy(prompt)
            prompt = prompt[None] if prompt.ndim == 1 else prompt
            if prompt.shape[0] != rows.shape[0]:
                raise ProcessorError(f"tokens has {rows.shape[0]} rows but inputs has {prompt.shape[0]} prompts")
            width = prompt.shape[1]
            if rows.shape[1] >= width and np.array_equal(rows[:, :width], prompt):
                rows = rows[:, width:]
        stops = {
            *stop_token_ids,
            *(i for i in (self.tokenizer.convert_tokens_to_ids(IM_END), self.tokenizer.eos_token_id) if i is not None),
        }
        replies = []
        for row in rows.tolist():
            end = next((index for index, token in enumerate(row) if token in stops), len(row))
            # The text cut too: a tokenizer without <|im_end|> as one token spells it in pieces.
            replies.append(self.tokenizer.decode(row[:end], skip_special_tokens=True).split(IM_END)[0])
        return replies

    def apply_chat_template(
        self,
        messages,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        return_dict: bool = False,
        **kwargs,
    ):
        """Render messages with the processor's chat template (as transformers' processor does);
        image items become `<fim_prefix><|img|><fim_suffix>` in Aria's template, video items
        "[mm:ss]" + one image + "\\n" per sampled frame (the file is decoded for the timestamps,
        and kept in `video_cache` for the inputs that follow). One conversation gives a str, a
        list of conversations a list of str.

        `tokenize=True` gives, as transformers' processor does, the processor's inputs for the
        rendered prompts: their `input_ids` (one row per conversation), or everything with
        `return_dict=True`. The processor's options (`padding` (default False here), `truncation`,
        `max_length`, `return_tensors` (default None: lists), `padding_side`, `max_image_size`,
        `images`, ...) are taken from `kwargs`; the rest go to the template."""
        template = chat_template or self.chat_template
        if tokenize:
            options = {key: kwargs.pop(key) for key in list(kwargs) if key in PROCESSOR_OPTIONS}
            options.setdefault("return_tensors", None)  # transformers' defaults on this path: lists, unpadded
            options.setdefault("padding", False)
            inputs = self.from_messages(
                messages,
                add_generation_prompt=add_generation_prompt,
                images=options.pop("images", None),
                chat_template=template,
                template_kwargs=kwargs,
                **options,
            )
            return inputs if return_dict else inputs["input_ids"]
        if _is_batch_of_conversations(messages):
            messages = [self._expand_videos(conversation)[0] for conversation in messages]
        elif isinstance(messages, (list, tuple)) and messages:
            messages = self._expand_videos(messages)[0]
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            template_kwargs={**self.tokenizer.special_tokens_map, **kwargs},
        )

    # ---------------------------------------------------------------- conversations

    def prepare_messages(self, messages: Sequence[dict], images: Any = None) -> tuple[list[dict], list]:
        """One conversation with its video items expanded (see the module docstring), and its
        images in `<|img|>` order: each image item's own "image" / "path", else the next of
        `images` (one image or a list), and each video's frames at the video's place.

        Returns (messages, images). Raises ValueError when the image items without an image of
        their own and `images` differ in number."""
        expanded, slots = self._expand_videos(messages)
        return expanded, self._fill_image_slots(slots, self._flatten_images(images, None))

    def from_messages(
        self,
        messages,
        add_generation_prompt: bool = True,
        images: Any = None,
        chat_template: str | None = None,
        template_kwargs: dict | None = None,
        **kwargs,
    ) -> dict[str, Any]:
        """Model inputs for a conversation, or a list of conversations (one batch row each), as
        `__call__` returns them: video items expanded, the prompt rendered with the chat
        template, images in placeholder order. `images` fills the image items that carry no
        image of their own, in order across the batch (a flat list) or per conversation (a list
        of lists). `kwargs` go to `__call__` (max_image_size, split_image, padding_side, ...)."""
        conversations = list(messages) if _is_batch_of_conversations(messages) else [messages]
        expanded = [self._expand_videos(conversation, kwargs.get("max_image_size")) for conversation in conversations]
        supplied = self._split_images(images, [sum(slot is None for slot in slots) for _, slots in expanded])
        prompts = [
            self.apply_chat_template(
                conversation,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
                **(template_kwargs or {}),
            )
            for conversation, _ in expanded
        ]
        row_images = [self._fill_image_slots(slots, row) for (_, slots), row in zip(expanded, supplied)]
        return self(text=prompts, images=row_images, **kwargs)

    def _split_images(self, images: Any, needed: list[int]) -> list[list]:
        """`images` as one list per conversation: given per conversation (a list of lists), or a
        flat list cut into `needed[i]` images for conversation i."""
        if _is_image_list(images) and images and all(_is_image_list(row) for row in images):
            if len(images) != len(needed):
                raise ProcessorError(
                    f"images has {len(images)} per-conversation lists but there are {len(needed)} conversations"
                )
            return [list(row) for row in images]
        flat = self._flatten_images(images, None)
        if len(flat) != sum(needed):
            raise ProcessorError(
                f"the conversations have {sum(needed)} image item(s) without an image of their own "
                f'("image" or "path") but {len(flat)} image(s) were passed'
            )
        starts = np.cumsum([0, *needed]).tolist()
        return [flat[start:stop] for start, stop in zip(starts, starts[1:])]

    @staticmethod
    def _fill_image_slots(slots: list, supplied: list) -> list:
        """The slots (see `_expand_videos`) with each None replaced by the next supplied image."""
        needed = sum(slot is None for slot in slots)
        if needed != len(supplied):
            raise ProcessorError(
                f"the conversation has {needed} image item(s) without an image of their own "
                f'("image" or "path") but {len(supplied)} image(s) were passed'
            )
        remaining = iter(supplied)
        return [next(remaining) if slot is None else slot for slot in slots]

    def _expand_videos(
        self, conversation: Sequence[dict], max_image_size: int | None = None
    ) -> tuple[list[dict], list]:
        """(messages with each video item replaced by its frame items, one slot per `<|img|>` in
        order: the image it shows, or None for an image item that takes the next passed image).
        A conversation without video items is returned as it is. The videos' frames must fit
        the context at `max_image_size`'s tokens per frame."""
        if not isinstance(conversation, (list, tuple)):
            raise ProcessorError(f"a conversation is a list of message dicts, got {type(conversation).__name__}")
        has_videos = _has_video_items(conversation)
        size = self.crop_size(max_image_size) if has_videos else None
        frames_left = (
            None if self.context_length is None or size is None else self.context_length // self.size_to_queries[size]
        )
        expanded, slots = [], []
        for index, message in enumerate(conversation):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, (list, tuple)):
                if isinstance(content, str):
                    check_text(content, f"message {index} content")  # named here, not in the rendered prompt
                elif content is not None:
                    raise ProcessorError(
                        f"message {index}: content must be a string or a list of items, got {type(content).__name__}"
                    )
                expanded.append(message)  # the chat template checks the rest
                continue
            items = []
            for number, item in enumerate(content):
                kind = _item_type(item)
                if not isinstance(kind, str):
                    raise ProcessorError(
                        f'message {index}: a content item is a dict with a "type" string, '
                        f"got {' '.join(repr(item).split())[:80]}"
                    )
                if isinstance(item.get("text"), str):
                    check_text(item["text"], f"message {index} item {number} text")
                if kind == "video":
                    video = self._load_video_item(item, frames_left, size)
                    items += video_placeholders(video.timestamps)
                    slots += video.frames
                    if frames_left is not None:
                        frames_left -= len(video.frames)
                else:
                    if kind == "image":
                        slots.append(_own_image(item))
                    items.append(item)
            expanded.append({**message, "content": items})
        return (expanded if has_videos else list(conversation)), slots

    def _load_video_item(self, item: dict, frames_left: int | None = None, size: int | None = None) -> Video:
        """The sampled frames of a {"type": "video"} item: a file ("path", or "video" as a path;
        decoded through `video_cache`) or a list of frames ("video", with an optional "fps";
        all of them unless "num_frames" is given). More frames than `frames_left` is a
        ProcessorError, raised before anything is decoded."""
        source = item.get("video")
        path = item.get("path")
        if isinstance(source, (str, os.PathLike)):
            if path is not None:
                raise ProcessorError('a {"type": "video"} item has both "path" and "video"; give one')
            source, path = None, source
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise ProcessorError(f'a {{"type": "video"}} item\'s "path" must be a file path, got {type(path).__name__}')
        num_frames = item.get("num_frames")
        if frames_left is not None:
            self._check_frames_fit(num_frames, source, frames_left, size)
        if path is not None:
            if source is not None or item.get("fps") is not None:
                raise ProcessorError(
                    'a {"type": "video"} item with a "path" takes no "video" frames or "fps"; the file has its own'
                )
            return self.video_cache.load(path, num_frames)
        if isinstance(source, (list, tuple, np.ndarray)):
            return load_video(source, num_frames=len(source) if num_frames is None else num_frames, fps=item.get("fps"))
        raise ProcessorError(
            'a {"type": "video"} item needs "path" (a video file) or "video" (a file or a list of frames)'
        )

    def _check_frames_fit(self, num_frames: Any, frames: Any, frames_left: int, size: int) -> None:
        """A video item's frame count (num_frames, else all of a list of frames) against the
        frames the context has room for, at one crop of `size` per frame (the least a frame takes)."""
        if num_frames is None and isinstance(frames, (list, tuple, np.ndarray)):
            asked, what = len(frames), f"all {len(frames)} frames of the list (no num_frames)"
        elif isinstance(num_frames, (int, np.integer)) and not isinstance(num_frames, bool) and num_frames > 0:
            asked, what = int(num_frames), f"num_frames={num_frames}"
        else:
            asked = resolve_num_frames(num_frames)  # None or <= 0: the default; else a VideoArgumentError
            what = f"num_frames={num_frames!r} (the default of {asked} frames)"
        if asked > frames_left:
            queries = self.size_to_queries[size]
            raise ProcessorError(
                f"a video item asks for {what}, but the model's context of {self.context_length} tokens holds at "
                f"most {frames_left} {'more ' if frames_left < self.context_length // queries else ''}frames "
                f"({queries} image tokens per frame at max_image_size={size})"
            )

    def __repr__(self) -> str:
        return (
            f"AriaProcessor(size_to_queries={self.size_to_queries}, image_token={self.image_token!r} "
            f"(id {self.image_token_id}), pad_token_id={self.pad_token_id},\n  tokenizer={self.tokenizer!r},\n"
            f"  image_processor={self.image_processor!r})"
        )
