"""Fine-tuning data: the original Aria repo's dataset format, read, validated and batched.

A dataset is a folder holding `train.jsonl` (and optionally `test.jsonl`); each non-blank line
is one example:

    {"messages": [{"role": "user", "content": [{"type": "image", "text": null},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
     "images": ["images/cat.png"]}

`role` is "system", "user" or "assistant"; `content` is a list of text / image items or a plain
string. The i-th image item stands for `images[i]`, a path relative to the folder that must stay
inside it (symlinks are resolved). Video examples (`"video": {"path": ..., "num_frames": ...}`)
are rejected: frame decoding is not supported yet.

`SFTDataset` reads and checks every line when it is built, so a bad line fails at start-up
with a one-line `DatasetError` naming `file:line`, not after an hour of training. It keeps only
text, image paths and each example's exact token length; images are decoded again when an
example is encoded.

Labels: the conversation is rendered with the processor's chat template and every token is
-100 except the assistant replies, each from just after its `<|im_start|>assistant\\n` up to and
including the `<|im_end|>` that closes it (so the model learns to stop). Image tokens are never
labelled.

Batching (`Batches`): batch `step` is a pure function of (seed, step). Epoch `step // per_epoch`
shuffles with `np.random.default_rng([seed, epoch])`, the step takes a contiguous slice of that
order, and the last `len % batch_size` examples of each epoch's order are dropped. A run resumed
at step k therefore sees exactly the batches an uninterrupted run sees. Rows are right-padded to
the smallest length bucket that fits the longest row, and the image crops of all rows are
padded to a fixed count, so a jitted train step sees few distinct shapes: one compile per
length bucket instead of one per batch.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import numpy as np
from tokenizers import Encoding

from aria_jax.buckets import default_length_buckets
from aria_jax.image_processing import ImageError, load_image_file
from aria_jax.processing import AriaProcessor

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
ITEM_TYPES = ("text", "image")
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
ASSISTANT_PREFIX = f"{TURN_START}assistant\n"


class DatasetError(ValueError):
    """A dataset problem; the message is one line naming the file and (1-based) line."""


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _text_pieces(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    return [item["text"] for item in content if item["type"] == "text"]


def _check_messages(messages: Any, reserved: Sequence[str], fail: Callable[[str], DatasetError]) -> int:
    """Check the `messages` list; returns the number of image items in it."""
    if not isinstance(messages, list) or not messages:
        raise fail('"messages" must be a non-empty list of {"role": ..., "content": ...} objects')
    image_items = 0
    for m, message in enumerate(messages):
        if not isinstance(message, dict):
            raise fail(f"message {m} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise fail(f"message {m}: unknown role {role!r}; use one of: {', '.join(ROLES)}")
        if not isinstance(content, (str, list)):
            raise fail(f'message {m}: "content" must be a string or a list of items')
        for item in content if isinstance(content, list) else []:
            if not isinstance(item, dict):
                raise fail(f"message {m}: a content item is not an object")
            if item.get("type") not in ITEM_TYPES:
                raise fail(
                    f"message {m}: unknown content item type {item.get('type')!r}; use one of: {', '.join(ITEM_TYPES)}"
                )
            if item["type"] == "text" and not isinstance(item.get("text"), str):
                raise fail(f'message {m}: a text item needs a string "text"')
            image_items += item["type"] == "image"
        # Chat markers or image tokens inside the text would be read as structure, shifting
        # the labels or the image placeholders.
        for marker in reserved:
            if any(marker in piece for piece in _text_pieces(content)):
                raise fail(f"message {m}: the text contains the reserved marker {marker!r}")
    if not any(message["role"] == "assistant" for message in messages):
        raise fail("no assistant message, so nothing to learn from")
    return image_items


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant replies in a rendered conversation: after each
    `<|im_start|>assistant\\n`, up to and including the next `<|im_end|>`."""
    spans = []
    start = text.find(ASSISTANT_PREFIX)
    while start >= 0:
        reply = start + len(ASSISTANT_PREFIX)
        end = text.find(TURN_END, reply)
        end = len(text) if end < 0 else end + len(TURN_END)
        spans.append((reply, end))
        start = text.find(ASSISTANT_PREFIX, end)
    return spans


class SFTDataset:
    """Supervised fine-tuning examples from `folder/{split}.jsonl` (see the module docstring).

    `max_image_size` is the crop side (None: the processor's default); `split_image` cuts large
    images into several crops. Every line is validated here, and an example longer than
    `max_length` tokens is an error. `lengths[i]` is example i's exact token count and
    `crop_counts[i]` its total number of image crops.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        processor: AriaProcessor,
        split: str = "train",
        max_image_size: int | None = None,
        split_image: bool = False,
        max_length: int = 2048,
    ):
        self.processor = processor
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, f"{split}.jsonl")
        self.split_image = split_image
        self.max_length = max_length
        # The processor's own resolution of None to a crop size, so batches know the crop
        # side S even when none of their rows has an image.
        self.image_size: int = processor.crop_size(max_image_size)
        self._real_folder = os.path.realpath(self.folder)
        self._reserved = (TURN_START, TURN_END, processor.image_token)

        self._lines: list[int] = []
        self._rendered: list[str] = []
        self._image_paths: list[tuple[str, ...]] = []
        lengths: list[int] = []
        crop_counts: list[int] = []
        if not os.path.isfile(self.path):
            raise DatasetError(f"{self.path}: no such file")
        with open(self.path, "rb") as file:
            for number, raw in enumerate(file, start=1):
                if not raw.strip():
                    continue
                rendered, image_paths, crops, length = self._read_line(raw, number)
                self._lines.append(number)
                self._rendered.append(rendered)
                self._image_paths.append(image_paths)
                crop_counts.append(sum(crops))
                lengths.append(length)
        if not lengths:
            raise DatasetError(f"{self.path}: no examples")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.crop_counts = np.asarray(crop_counts, dtype=np.int64)

    def _fail(self, number: int) -> Callable[[str], DatasetError]:
        return lambda problem: DatasetError(f"{self.path}:{number}: {_one_line(problem)}")

    def _read_line(self, raw: bytes, number: int) -> tuple[str, tuple[str, ...], list[int], int]:
        """Validate one line; returns the rendered conversation, the resolved image paths, each
        image's crop count and the example's token length."""
        fail = self._fail(number)
        try:
            example = json.loads(raw)
        except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8/16/32
            raise fail(f"not valid JSON ({err})") from None
        if not isinstance(example, dict):
            raise fail(f"expected a JSON object, got {type(example).__name__}")
        if example.get("video") is not None:
            raise fail("video examples are not supported yet")
        messages = example.get("messages")
        image_items = _check_messages(messages, self._reserved, fail)
        images = example.get("images")
        images = [] if images is None else images
        if not isinstance(images, list) or not all(isinstance(path, str) for path in images):
            raise fail('"images" must be a list of paths relative to the dataset folder')
        if image_items != len(images):
            raise fail(f'{image_items} image item(s) in "messages" but {len(images)} path(s) in "images"')

        image_paths = tuple(self._resolve_image(path, fail) for path in images)
        crops = []
        for path in image_paths:
            # A full decode (not just the header) so that truncated files fail now; the
            # decoded image is dropped right away.
            try:
                width, height = load_image_file(path).size
            except ImageError as err:
                raise fail(str(err)) from None
            crops.append(
                self.processor.image_processor.count_crops(height, width, self.image_size, split_image=self.split_image)
                if self.split_image
                else 1
            )

        rendered = self.processor.apply_chat_template(messages)
        rendered_turns = len(assistant_spans(rendered))
        assistant_turns = sum(message["role"] == "assistant" for message in messages)
        if rendered_turns != assistant_turns:
            raise fail(
                f"the chat template rendered {rendered_turns} assistant turns for {assistant_turns} assistant messages"
            )
        length = len(self._tokenize(rendered, crops)[1].ids)
        if length > self.max_length:
            raise fail(f"the example is {length} tokens long, more than max_length={self.max_length}")
        return rendered, image_paths, crops, length

    def _resolve_image(self, path: str, fail: Callable[[str], DatasetError]) -> str:
        if os.path.isabs(path):
            raise fail(f"image {path!r} is an absolute path; paths are relative to the dataset folder")
        real = os.path.realpath(os.path.join(self.folder, path))
        if os.path.commonpath([real, self._real_folder]) != self._real_folder:
            raise fail(f"image {path!r} escapes the dataset folder {self.folder}")
        if not os.path.isfile(real):
            raise fail(f"image {path!r} not found ({real})")
        return real

    def _tokenize(self, rendered: str, crops_per_image: Sequence[int]) -> tuple[str, Encoding]:
        """The expansion and tokenizer call of `processor(text=...)`, keeping the character
        offsets that the labels need."""
        expanded = self.processor.expand_image_tokens([rendered], crops_per_image, self.image_size)[0]
        return expanded, self.processor.tokenizer.backend_tokenizer.encode(expanded)

    def __len__(self) -> int:
        return len(self._rendered)

    def encode(self, index: int) -> dict[str, np.ndarray | None]:
        """Example `index` as model inputs: `input_ids` and `labels` (T,) int32, and
        `pixel_values` (N, 3, S, S) float32 / `pixel_mask` (N, S, S) bool (None without images)."""
        paths = self._image_paths[index]
        pixels = (
            self.processor(images=list(paths), max_image_size=self.image_size, split_image=self.split_image)
            if paths
            else {}
        )
        text, encoding = self._tokenize(self._rendered[index], pixels.get("num_crops", []))
        if len(encoding.ids) != self.lengths[index]:
            raise self._fail(self._lines[index])(
                f"the example is now {len(encoding.ids)} tokens long, {self.lengths[index]} when the "
                "dataset was read; did an image change?"
            )

        # Labels come from character offsets, not from searching the ids for the ids of
        # "<|im_start|>assistant\n": the tokenizer may merge that "\n" with the reply's first
        # characters (the tiny model's tokenizer turns "\na" into one token "▁a"), so the
        # prefix's ids need not appear at all. A token is labelled when it covers any character
        # of a reply, so such a merged token counts as the reply's first token.
        ids = np.asarray(encoding.ids, dtype=np.int32)
        starts, ends = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2).T
        labels = np.full_like(ids, IGNORE_INDEX)
        for reply_start, reply_end in assistant_spans(text):
            in_reply = (ends > reply_start) & (starts < reply_end)
            labels[in_reply] = ids[in_reply]
        labels[ids == self.processor.image_token_id] = IGNORE_INDEX
        return {
            "input_ids": ids,
            "labels": labels,
            "pixel_values": pixels.get("pixel_values"),
            "pixel_mask": pixels.get("pixel_mask"),
        }


class Batches:
    """Fixed-shape training batches of an `SFTDataset`; `batch(step)` depends only on
    (seed, step) (see the module docstring).

    `length_buckets` are the allowed padded lengths L (default: `default_length_buckets`).
    `crops_per_batch` (C) is `batch_size` times the largest crop count of any one example, so
    every batch of an image dataset has the same pixel shape.
    """

    def __init__(
        self,
        dataset: SFTDataset,
        batch_size: int,
        seed: int = 0,
        length_buckets: Sequence[int] | None = None,
        shuffle: bool = True,
    ):
        if not 1 <= batch_size <= len(dataset):
            raise ValueError(f"batch_size={batch_size} must be in 1..{len(dataset)} (the dataset size)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.per_epoch = len(dataset) // batch_size
        buckets = default_length_buckets(dataset.max_length) if length_buckets is None else length_buckets
        self.length_buckets = tuple(sorted({int(bucket) for bucket in buckets}))
        longest = int(dataset.lengths.max())
        if not self.length_buckets or self.length_buckets[-1] < longest:
            raise ValueError(
                f"length_buckets {self.length_buckets} must include one >= the longest example ({longest} tokens)"
            )
        self.crops_per_batch = batch_size * int(dataset.crop_counts.max())

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of the rows of batch `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, offset = divmod(step, self.per_epoch)
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return order[offset * self.batch_size : (offset + 1) * self.batch_size]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch `step`: `input_ids`, `attention_mask`, `labels` (B, L) int32, right-padded;
        with images in the dataset also `pixel_values` (C, 3, S, S) float32 and `pixel_mask`
        (C, S, S) bool, the rows' crops in row order followed by padding crops."""
        examples = [self.dataset.encode(int(index)) for index in self.indices(step)]
        longest = max(len(example["input_ids"]) for example in examples)
        length = next(bucket for bucket in self.length_buckets if bucket >= longest)
        shape = (self.batch_size, length)
        input_ids = np.full(shape, self.dataset.processor.pad_token_id, dtype=np.int32)
        attention_mask = np.zeros(shape, dtype=np.int32)
        labels = np.full(shape, IGNORE_INDEX, dtype=np.int32)
        for row, example in enumerate(examples):
            size = len(example["input_ids"])
            input_ids[row, :size] = example["input_ids"]
            attention_mask[row, :size] = 1
            labels[row, :size] = example["labels"]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if not self.crops_per_batch:
            return batch

        # Padding crops are zero images with an all-true mask: finite, valid work for the
        # vision tower (an all-false mask could give NaNs), and their features are never used,
        # since the model writes crop features into the <|img|> positions in order.
        side = self.dataset.image_size
        pixel_values = np.zeros((self.crops_per_batch, 3, side, side), dtype=np.float32)
        pixel_mask = np.ones((self.crops_per_batch, side, side), dtype=bool)
        filled = 0
        for example in examples:
            if example["pixel_values"] is not None:
                count = len(example["pixel_values"])
                pixel_values[filled : filled + count] = example["pixel_values"]
                pixel_mask[filled : filled + count] = example["pixel_mask"]
                filled += count
        batch["pixel_values"] = pixel_values
        batch["pixel_mask"] = pixel_mask
        return batch
