"""Qwen2-VL's processor: prompts with `<|image_pad|>` placeholders plus images in, model inputs out.

    processor = Qwen2VLProcessor.from_pretrained(path)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image])
    # -> numpy: input_ids (B, T) int32, attention_mask (B, T) int32 (left padding by default),
    #    pixel_values (num_patches, 3 * 2 * 14 * 14) float32, image_grid_thw (num_images, 3) int64
    answers = processor.decode_replies(generated_tokens, inputs)  # one str per row

The chat template (Qwen2-VL-Instruct's) writes `<|vision_start|><|image_pad|><|vision_end|>` for an
image item; the processor then replaces the i-th `<|image_pad|>` of the batch (in reading order)
by `t * h * w / merge_size**2` copies, where (t, h, w) is image i's `image_grid_thw` row: one
token per merge window of patches. transformers' `Qwen2VLProcessor` does the same, so the ids are
identical; `padding=True` and left padding are the defaults here (transformers: no padding, the
tokenizer's side, right), as for Aria's processor, for generation.

Options follow Aria's processor (`aria_jax.processing`): `padding`, `truncation`, `max_length`,
`padding_side`, `return_tensors` ("np", "jax", "pt", or None for lists of ids). Bad arguments
raise `ProcessorError`, unusable images `ImageError`, both ValueErrors naming the problem.

Videos (`videos=`: lists of frames already sampled, or (T, H, W, C) uint8 arrays) fill the
`<|video_pad|>` placeholders the same way, giving `pixel_values_videos` and `video_grid_thw`
(see `Qwen2VLImageProcessor.process_videos` for how they differ from transformers 5's video
processor).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from aria_jax.config import read_optional_json
from aria_jax.image_processing import TENSOR_TYPES, as_array, is_batch_array, to_tensors
from aria_jax.processing import PROCESSOR_CONFIG, AriaProcessor, ProcessorError, padding_strategy, truncates
from aria_jax.qwen2_vl.image_processing import Qwen2VLImageProcessor
from aria_jax.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    AriaTokenizer,
    check_text,
    compile_chat_template,
    pad_batch,
    render_chat_template,
)

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
# apply_chat_template(tokenize=True) arguments that go to the processor, not to the template.
PROCESSOR_OPTIONS = ("images", "videos", "padding_side", "return_tensors", "padding", "truncation", "max_length")
# mm_token_type_ids values, as transformers writes them.
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _image_items(conversation: Any) -> list[dict]:
    """The {"type": "image"} content items of one conversation, in order."""
    if not _is_list(conversation):
        raise ProcessorError(f"a conversation is a list of message dicts, got {type(conversation).__name__}")
    return [
        item
        for message in conversation
        if isinstance(message, dict) and _is_list(message.get("content"))
        for item in message["content"]
        if isinstance(item, dict) and item.get("type") == "image"
    ]


def _own_image(item: dict) -> Any:
    """The image an image item carries ("image": a PIL image / array / path; "url" or "path": a
    local file), else None."""
    return next((item[key] for key in ("image", "url", "path") if item.get(key) is not None), None)


class Qwen2VLProcessor:
    """Tokenizer + Qwen2-VL image processor + the `<|image_pad|>` expansion (module docstring).

    `chat_template` is the checkpoint's (None: the tokenizer's, if the checkpoint has one);
    `pad_token_id` overrides the tokenizer's pad id (default: its pad token, else eos)."""

    def __init__(
        self,
        image_processor: Qwen2VLImageProcessor,
        tokenizer: AriaTokenizer,
        chat_template: str | None = None,
        pad_token_id: int | None = None,
    ):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        if chat_template is None and tokenizer.chat_template is not DEFAULT_CHAT_TEMPLATE:
            chat_template = tokenizer.chat_template  # (DEFAULT_CHAT_TEMPLATE is Aria's fallback, not Qwen's)
        self.chat_template = chat_template
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        if self.image_token_id is None or tokenizer.decode([self.image_token_id]) != self.image_token:
            raise ProcessorError(f"the tokenizer has no {self.image_token} token")
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = pad_token_id

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Qwen2VLProcessor":
        """Load from a hub-format checkpoint directory: the tokenizer files (a byte-level BPE
        tokenizer.json), the image processor settings (processor_config.json or
        preprocessor_config.json), the chat template (chat_template.jinja, processor_config.json,
        tokenizer_config.json or chat_template.json) and, if present, config.json, whose
        image_token_id must be the tokenizer's `<|image_pad|>`."""
        directory = os.fspath(path)
        if not os.path.isdir(directory):
            raise ProcessorError(f"{directory}: not a directory")
        tokenizer = AriaTokenizer.from_pretrained(directory, byte_level=True)
        image_processor = Qwen2VLImageProcessor.from_pretrained(directory)
        # A processor-level template (transformers 5's processor_config.json) is used unless a
        # chat_template.jinja exists, which the tokenizer has read already.
        chat_template = None
        if not os.path.isfile(os.path.join(directory, CHAT_TEMPLATE_JINJA)):
            template = read_optional_json(directory, PROCESSOR_CONFIG, ProcessorError).get("chat_template")
            if isinstance(template, str):
                compile_chat_template(template, f"{os.path.join(directory, PROCESSOR_CONFIG)}: chat_template")
                chat_template = template
        processor = cls(image_processor, tokenizer, chat_template=chat_template)
        model_config = read_optional_json(directory, "config.json", ProcessorError)
        image_token_id = model_config.get("image_token_id")
        if image_token_id is not None and image_token_id != processor.image_token_id:
            raise ProcessorError(
                f"{directory}: the tokenizer maps {processor.image_token} to id {processor.image_token_id}, "
                f"but config.json has image_token_id={image_token_id}"
            )
        return processor

    # ---------------------------------------------------------------- call

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        padding: bool | str = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = "np",
        padding_side: str = "left",
        return_mm_token_type_ids: bool = False,
        videos: Any = None,
    ) -> dict[str, Any]:
        """Model inputs for a prompt or a batch of prompts (see the module docstring).

        `images`: one image, a flat list in placeholder order across the batch, or one list per
        prompt; `videos`: one video (a list of frames or a 4-D uint8 array) or a list of them, in
        `<|video_pad|>` order. Placeholders and images (videos) must agree in number.
        `padding`: True / "longest" (the default), "max_length" (to `max_length`), False /
        "do_not_pad"; `truncation=True` cuts rows to `max_length` on the right (cutting into
        image or video tokens is an error, as in transformers). `return_mm_token_type_ids=True`
        adds transformers' `mm_token_type_ids` (1 at image tokens, 2 at video tokens), which its
        model requires.
        """
        if return_tensors not in (None, *TENSOR_TYPES):
            raise ProcessorError(f"return_tensors={return_tensors!r}: use one of {', '.join(TENSOR_TYPES)} or None")
        if padding_side not in ("left", "right"):
            raise ProcessorError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        padding_asked, padding = padding, padding_strategy(padding, max_length)
        truncate = truncates(truncation)
        if text is None and images is None and videos is None:
            raise ProcessorError("pass text, images or videos, or text with them")
        prompts = self._prompts(text)
        flat_images = self._flat_images(images, prompts)
        video_list = self._video_list(videos)
        if prompts is not None:
            for token, given, what in (
                (self.image_token, len(flat_images), "image"),
                (self.video_token, len(video_list), "video"),
            ):
                found = sum(prompt.count(token) for prompt in prompts)
                if found != given:
                    raise ProcessorError(
                        f"the text has {found} {token} placeholder(s) but {given} {what}(s) were passed; "
                        f"each {what} needs exactly one {token} in the text"
                    )

        out: dict[str, Any] = {}
        if flat_images:
            out.update(self.image_processor(flat_images))
        if video_list:
            out.update(self.image_processor.process_videos(video_list))
        if prompts is not None:
            no_grids = np.zeros((0, 3), np.int64)
            expanded = self.expand_image_tokens(prompts, out.get("image_grid_thw", no_grids))
            expanded = self.expand_image_tokens(expanded, out.get("video_grid_thw", no_grids), self.video_token)
            ids = [self.tokenizer.encode(prompt) for prompt in expanded]
            if truncate and max_length is not None:
                ids = self._truncate_rows(ids, expanded, max_length)
            if padding is not None:
                length = max_length if padding == "max_length" else max(len(row) for row in ids)
                ids, mask = pad_batch(ids, self.pad_token_id, length, padding_side)
            else:
                mask = [[1] * len(row) for row in ids]
            text_inputs = {"input_ids": ids, "attention_mask": mask}
            if return_mm_token_type_ids:
                kinds = {self.image_token_id: IMAGE_TYPE, self.video_token_id: VIDEO_TYPE}
                text_inputs["mm_token_type_ids"] = [[kinds.get(token, TEXT_TYPE) for token in row] for row in ids]
            if return_tensors is not None:
                lengths = sorted({len(row) for row in ids})
                if len(lengths) > 1:
                    raise ProcessorError(
                        f"the rows have {lengths[0]} to {lengths[-1]} tokens: padding={padding_asked!r} cannot make "
                        f"return_tensors={return_tensors!r} arrays; use padding=True or return_tensors=None"
                    )
                text_inputs = {
                    key: np.asarray(rows, np.int32).reshape(len(ids), -1) for key, rows in text_inputs.items()
                }
            out = {**text_inputs, **out}
        if return_tensors is None:  # lists of ids; the pixel arrays stay numpy
            return out
        return to_tensors(out, return_tensors)

    def _video_list(self, videos: Any) -> list:
        """`videos` as a list of videos: one video (a list of frames or a 4-D array) or a list of them."""
        if videos is None:
            return []
        if is_batch_array(videos):
            return [videos]
        if not _is_list(videos):
            raise ProcessorError(
                f"videos must be a video (a list of frames or a 4-D array) or a list of videos, got {type(videos).__name__}"
            )
        if videos and not all(_is_list(video) or is_batch_array(video) for video in videos):
            return [videos]  # the frames of one video
        return list(videos)

    def _truncate_rows(self, ids: list[list[int]], expanded: list[str], max_length: int) -> list[list[int]]:
        """Rows cut to `max_length` tokens on the right; a cut through image or video tokens is an
        error (their features would have no place), as transformers' processor checks."""
        ids = [row[:max_length] for row in ids]
        for row, (row_ids, prompt) in enumerate(zip(ids, expanded)):
            for token, token_id in ((self.image_token, self.image_token_id), (self.video_token, self.video_token_id)):
                kept, wanted = row_ids.count(token_id), prompt.count(token)
                if kept != wanted:
                    raise ProcessorError(
                        f"truncation to max_length={max_length} cuts row {row}'s {token} tokens ({kept} of {wanted} "
                        f"kept): raise max_length or turn truncation off"
                    )
        return ids

    def _prompts(self, text: Any) -> list[str] | None:
        if text is None:
            return None
        if isinstance(text, str):
            return [check_text(text, "text")]
        if not _is_list(text) or not all(isinstance(t, str) for t in text):
            wrong = text if not _is_list(text) else next(t for t in text if not isinstance(t, str))
            raise ProcessorError(
                f"text must be a string or a list of strings, got {type(wrong).__name__}"
                f"{'' if wrong is text else ' in the list'}"
            )
        if not text:
            raise ProcessorError("text is an empty list")
        return [check_text(prompt, f"text[{row}]") for row, prompt in enumerate(text)]

    def _flat_images(self, images: Any, prompts: list[str] | None) -> list:
        """`images` as one flat list in placeholder order; per-prompt lists are checked against
        their prompts' placeholder counts."""
        if images is None:
            return []
        if is_batch_array(images):
            return list(as_array(images))
        if not _is_list(images):
            return [images]
        if not any(_is_list(item) for item in images):
            return list(images)
        if not all(_is_list(item) for item in images):
            raise ProcessorError("images must be a flat list, or a list with one list of images per prompt")
        if prompts is not None:
            if len(images) != len(prompts):
                raise ProcessorError(f"images has {len(images)} per-prompt lists but there are {len(prompts)} prompts")
            for row, (prompt, row_images) in enumerate(zip(prompts, images)):
                if prompt.count(self.image_token) != len(row_images):
                    raise ProcessorError(
                        f"prompt {row} has {prompt.count(self.image_token)} {self.image_token} placeholder(s) but "
                        f"{len(row_images)} image(s) were passed for it"
                    )
        return [image for row_images in images for image in row_images]

    def expand_image_tokens(self, prompts: Sequence[str], grid_thw: Any, token: str | None = None) -> list[str]:
        """Each prompt with the i-th `token` (default `<|image_pad|>`; `<|video_pad|>` with the
        videos' grids) across the batch repeated prod(grid_thw[i]) / merge_size**2 times."""
        token = token or self.image_token
        counts = iter(self.num_image_tokens(grid) for grid in np.asarray(grid_thw).reshape(-1, 3))
        expanded = []
        for prompt in prompts:
            first, *rest = prompt.split(token)
            expanded.append(first + "".join(token * next(counts) + part for part in rest))
        return expanded

    def num_image_tokens(self, grid_thw: Sequence[int]) -> int:
        """Prompt tokens of an image or video with this (t, h, w) patch grid."""
        grid_t, grid_h, grid_w = (int(n) for n in grid_thw)
        return grid_t * grid_h * grid_w // self.image_processor.merge_size**2

    # Aria's: they only need `tokenizer`.
    decode = AriaProcessor.decode
    batch_decode = AriaProcessor.batch_decode
    decode_replies = AriaProcessor.decode_replies

    # ---------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        return_dict: bool = False,
        **kwargs,
    ):
        """Render messages with the checkpoint's chat template, as transformers' processor does
        (the tokenizer's special tokens and `kwargs`, e.g. `add_vision_id=True`, are template
        variables). One conversation gives a str, a list of conversations a list of str.

        `tokenize=True` gives the processor's inputs for the rendered prompts: `input_ids` (one
        row per conversation), or everything with `return_dict=True`. The images are the image
        items' own ("image", "url" or "path") and, for items without one, the next of
        `images=` in order; videos are `videos=`, else the video items' own "video" frames.
        Processor options (`padding` (default False here, as transformers),
        `truncation`, `max_length`, `return_tensors` (default None: lists), `padding_side`) come
        from `kwargs`; the rest go to the template."""
        template = chat_template or self.chat_template
        if template is None:
            raise ProcessorError("this checkpoint has no chat template; pass chat_template=")
        options = {key: kwargs.pop(key) for key in list(kwargs) if key in PROCESSOR_OPTIONS} if tokenize else {}
        rendered = render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            template_kwargs={**self.tokenizer.special_tokens_map, **kwargs},
        )
        if not tokenize:
            return rendered
        batched = isinstance(rendered, list)
        conversations = messages if batched else [messages]
        images = self._conversation_images(conversations, options.pop("images", None))
        if options.get("videos") is None:
            own_videos = [
                item.get("video")
                for conversation in conversations
                for message in conversation
                if isinstance(message, dict) and _is_list(message.get("content"))
                for item in message["content"]
                if isinstance(item, dict) and item.get("type") == "video"
            ]
            for video in own_videos:
                if not (_is_list(video) or is_batch_array(video)):
                    raise ProcessorError(
                        'a {"type": "video"} item needs "video": its frames (a list of images or a 4-D uint8 '
                        f"array; files are not decoded here), got {type(video).__name__}"
                    )
            options["videos"] = own_videos or None
        options.setdefault("return_tensors", None)
        options.setdefault("padding", False)
        inputs = self(text=rendered if batched else [rendered], images=images or None, **options)
        return inputs if return_dict else inputs["input_ids"]

    def _conversation_images(self, conversations: Sequence, supplied: Any) -> list:
        """The images of the conversations' image items in order: each item's own, else the next
        of `supplied` (one image or a flat list)."""
        supplied = [] if supplied is None else self._flat_images(supplied, None)
        items = [item for conversation in conversations for item in _image_items(conversation)]
        needed = sum(_own_image(item) is None for item in items)
        if needed != len(supplied):
            raise ProcessorError(
                f"the conversation(s) have {needed} image item(s) without an image of their own "
                f'("image", "url" or "path") but {len(supplied)} image(s) were passed'
            )
        remaining = iter(supplied)
        return [next(remaining) if _own_image(item) is None else _own_image(item) for item in items]

    def __repr__(self) -> str:
        return (
            f"Qwen2VLProcessor(image_token={self.image_token!r} (id {self.image_token_id}), "
            f"pad_token_id={self.pad_token_id},\n  tokenizer={self.tokenizer!r},\n"
            f"  image_processor={self.image_processor!r})"
        )
