"""Tiny Qwen2-VL checkpoints laid out as the hub has them, written with transformers.

`make_tiny_qwen2_vl(directory)` saves a byte-level BPE tokenizer (Qwen2's pipeline, trained
here on generated English, with Qwen2-VL's special tokens appended after the vocabulary as
in the real one), Qwen2-VL-7B-Instruct's chat template, a `Qwen2VLProcessor` whose image
processor allows 4..64 merged tokens per image, and a random float32
`Qwen2VLForConditionalGeneration`. `tiny_qwen2_vl_dir(...)` caches one per argument set in a
temporary directory, for fixtures.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import tempfile

# The special tokens of Qwen2-VL's tokenizer, in their hub order (ids 151643..151656 there).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL-7B-Instruct's chat_template (chat_template.json on the hub), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BPE_VOCAB_SIZE = 400  # 256 byte symbols + merges; the special tokens come after.
MIN_PIXELS = 56 * 56  # 4 patches of 28x28: one merged token
MAX_PIXELS = 28 * 28 * 64  # at most 64 merged tokens per image


def _english_lines(count: int = 300) -> list[str]:
    """Deterministic plain-English sentences (with digits and punctuation) to train on."""
    subjects = ["The cat", "A small dog", "My neighbour", "The old astronaut", "Every child", "The rocket"]
    verbs = ["looks at", "carries", "describes", "paints", "finds", "remembers", "sees"]
    objects = ["a cup of coffee", "the red door", "two bright stars", "the quiet river", "an image", "this picture"]
    endings = [".", "!", "?", ", then leaves.", " in the morning.", " near the window."]
    lines = []
    for index, (subject, verb, thing, ending) in enumerate(itertools.product(subjects, verbs, objects, endings)):
        if len(lines) == count:
            break
        lines.append(f"{subject} {verb} {thing}{ending} It is {index % 97} o'clock, isn't it?")
    return lines


def make_tiny_tokenizer():
    """A transformers `Qwen2Tokenizer` (Qwen2's normalizer, split regex and byte-level BPE)
    trained on `_english_lines`, with SPECIAL_TOKENS appended; eos `<|im_end|>` and pad
    `<|endoftext|>` as in Qwen2-VL-*-Instruct."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    from tokenizers import Regex

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_english_lines(), trainer=trainer)
    vocab = bpe.get_vocab()
    # Special tokens take the ids right after the BPE vocabulary, in hub order.
    vocab.update({token: len(vocab) + index for index, token in enumerate(SPECIAL_TOKENS)})
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


def tiny_qwen2_vl_config(tokenizer=None, **overrides):
    """The tiny `transformers.Qwen2VLConfig`; token ids are `tokenizer`'s (the tiny one by
    default). `overrides` are top-level config keys; `text_config`/`vision_config` dicts
    are merged into the defaults."""
    from transformers import Qwen2VLConfig

    tokenizer = tokenizer or make_tiny_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        # transformers 5 stores Qwen2-VL's "mrope" as "default" plus mrope_section
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(
        depth=2,
        embed_dim=32,
        num_heads=2,
        hidden_size=64,
        mlp_ratio=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    text_config.update(overrides.pop("text_config", {}) or {})
    vision_config.update(overrides.pop("vision_config", {}) or {})
    settings = dict(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    settings.update(overrides)
    return Qwen2VLConfig(**settings)


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
