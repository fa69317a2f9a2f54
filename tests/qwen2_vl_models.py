"""Tiny Qwen2-VL checkpoints laid out as the hub has them, written with transformers.

`make_tiny_qwen2_vl(directory)` saves a byte-level BPE tokenizer (Qwen2's pipeline, trained
here on generated English, with Qwen2-VL's special tokens appended after the vocabulary as
in the real one), Qwen2-VL-7B-Instruct's chat template, a `Qwen2VLProcessor` whose image
processor allows 4..64 merged tokens per image, and a random float32
`Qwen2VLForConditionalGeneration`. `tiny_qwen2_vl_dir(...)` caches one per argument set in a
temporary directory, for fixtures. `without_autograd`: a module's autouse fixture, once imported.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import tempfile

import pytest

from repo_paths import ROOT

# The tokenizer, chat template and config are the ones scripts/make_tiny_awaker.py builds (a
# script, so loaded by path).
_SCRIPT = os.path.join(ROOT, "scripts", "make_tiny_awaker.py")
_spec = importlib.util.spec_from_file_location("make_tiny_awaker", _SCRIPT)
tiny_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_models)
SPECIAL_TOKENS, CHAT_TEMPLATE = tiny_models.SPECIAL_TOKENS, tiny_models.CHAT_TEMPLATE
MIN_PIXELS, MAX_PIXELS = tiny_models.MIN_PIXELS, tiny_models.MAX_PIXELS
make_tiny_tokenizer = tiny_models.make_tokenizer


@pytest.fixture(scope="module", autouse=True)
def without_autograd():
    """transformers' forward builds no graph in the importing module (and `.numpy()` takes its
    outputs); only there: other tests train with torch."""
    import torch

    with torch.no_grad():
        yield


def tiny_qwen2_vl_config(tokenizer=None, **overrides):
    """The tiny `transformers.Qwen2VLConfig` (`make_tiny_awaker.make_config`); token ids are
    `tokenizer`'s (the tiny one by default)."""
    return tiny_models.make_config(tokenizer or make_tiny_tokenizer(), **overrides)


@contextlib.contextmanager
def _video_processor_optional():
    """transformers' `Qwen2VLProcessor` insists on a video processor, which needs torchvision;
    let `video_processor=None` through its class check (images and text work as usual)."""
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return original(self, argument_name, argument)

    ProcessorMixin.check_argument_for_proper_class = check
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def _transformers_processor(image_processor, tokenizer, chat_template):
    """transformers' `Qwen2VLProcessor`; with torchvision, its video processor takes the image
    processor's pixel bounds (as transformers 4.45's single processor did), else it has none."""
    from transformers import Qwen2VLProcessor
    from transformers.utils import is_torchvision_available

    video_processor = None
    if is_torchvision_available():
        from transformers import Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(
            size=dict(image_processor.size), cap_pixels_per_frame=False, do_sample_frames=False
        )
    with _video_processor_optional():
        return Qwen2VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=chat_template,
        )


def make_tiny_processor():
    """transformers' `Qwen2VLProcessor` over the tiny tokenizer and CHAT_TEMPLATE (its image
    processor is the PIL backend when torchvision is missing)."""
    from transformers import Qwen2VLImageProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return _transformers_processor(image_processor, make_tiny_tokenizer(), CHAT_TEMPLATE)


def load_transformers_processor(directory, image_processor=None):
    """transformers' `Qwen2VLProcessor` assembled from a tiny checkpoint `directory`: the saved
    tokenizer, image processor (`image_processor`, default `Qwen2VLImageProcessor.from_pretrained`)
    and chat template. (Its own `from_pretrained` needs torchvision for the video processor.)"""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    directory = os.fspath(directory)
    image_processor = image_processor or Qwen2VLImageProcessor.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    template_path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(template_path):
        with open(template_path, encoding="utf-8") as file:
            chat_template = file.read()
    else:
        with open(os.path.join(directory, "chat_template.json"), encoding="utf-8") as file:
            chat_template = json.load(file)["chat_template"]
    return _transformers_processor(image_processor, tokenizer, chat_template)


def save_processor(processor, directory) -> None:
    """Writes a transformers `Qwen2VLProcessor` as Qwen2-VL-7B-Instruct's hub repository holds it:
    tokenizer files, preprocessor_config.json and chat_template.json. (`ProcessorMixin.save_pretrained`
    cannot save one without a video processor, and would write chat_template.jinja instead.)"""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    processor.tokenizer._set_processor_class("Qwen2VLProcessor")
    processor.tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    with open(os.path.join(directory, "chat_template.json"), "w", encoding="utf-8") as file:
        json.dump({"chat_template": processor.chat_template}, file, indent=2)


def make_tiny_qwen2_vl(directory, seed: int = 0, tie_word_embeddings: bool = False, **config_overrides) -> str:
    """Saves the tiny processor (tokenizer, image processor, chat template) and a random float32
    `Qwen2VLForConditionalGeneration` (safetensors) into `directory`; returns it as a string."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    directory = os.fspath(directory)
    processor = make_tiny_processor()
    save_processor(processor, directory)
    config = tiny_qwen2_vl_config(processor.tokenizer, tie_word_embeddings=tie_word_embeddings, **config_overrides)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    model.save_pretrained(directory)
    return directory


@functools.cache
def _cached_dir(seed: int, tie_word_embeddings: bool, overrides_json: str) -> str:
    directory = tempfile.mkdtemp(prefix="tiny_qwen2_vl_")
    return make_tiny_qwen2_vl(directory, seed, tie_word_embeddings, **json.loads(overrides_json))


def tiny_qwen2_vl_dir(seed: int = 0, tie_word_embeddings: bool = False, **config_overrides) -> str:
    """`make_tiny_qwen2_vl` into a temporary directory made once per argument set (per process;
    overrides must be JSON values). Treat the directory as read-only."""
    return _cached_dir(seed, tie_word_embeddings, json.dumps(config_overrides, sort_keys=True))


def photo(height: int, width: int, seed: int):
    """A smooth random picture (random noise would make every patch alike to the model)."""
    import numpy as np
    from PIL import Image

    small = np.random.default_rng(seed).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def chat(processor, prompts: list[tuple[str, int]], images: list):
    """transformers processor outputs (torch) for a batch of (text, image count) user turns, left-padded."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}] * count + [{"type": "text", "text": text}]}],
            add_generation_prompt=True,
        )
        for text, count in prompts
    ]
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, images=images or None, padding=True, return_tensors="pt")
