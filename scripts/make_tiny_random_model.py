"""Writes models/tiny-random: a hub-format Aria checkpoint with random weights and a small
sentencepiece tokenizer, so the whole pipeline runs on a fresh machine without a download.

The weights come from transformers' own `AriaForConditionalGeneration.save_pretrained`, so the
files carry the real hub key names; the tokenizer / processor files (tokenizer.json,
tokenizer_config.json, chat_template.jinja, processor_config.json) come from transformers'
`AriaProcessor.save_pretrained`, so they are what a transformers 5 hub checkpoint ships and
transformers' `AriaProcessor.from_pretrained` loads them. Seeds are fixed: re-running rewrites
byte-identical files. Needs the test extras (torch, transformers).
Run from the repository root:  python scripts/make_tiny_random_model.py [--processor-only]
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import shutil
import sys
import tempfile

import sentencepiece
import torch
import transformers

from aria_jax.image_processing import DEFAULT_SPLIT_TILES
from aria_jax.tokenizer import DEFAULT_CHAT_TEMPLATE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "models", "tiny-random")
CONFIG = os.path.join(ROOT, "configs", "tiny-random.json")
SEED = 0

# Ids 3..9 so that <|img|> lands on id 9, the image token of every Aria config.
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>", "<|img|>"]


# Aria's tokenizer_config.json settings (hub repo rhymes-ai/Aria): no BOS / EOS added,
# pad = unk. Ids 0..2 are sentencepiece's control pieces.
TOKENIZER_CONFIG = {
    "add_bos_token": False,
    "add_eos_token": False,
    "add_prefix_space": True,
    "legacy": True,
    "bos_token": None,
    "eos_token": None,
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "clean_up_tokenization_spaces": False,
    "tokenizer_class": "LlamaTokenizer",
    "added_tokens_decoder": {
        str(index): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for index, content in enumerate(["<unk>", "<s>", "</s>"])
    },
}
# The tiny model's crops: 70 px (5 x 5 patches of 14 -> 8 queries) and 140 px (10 x 10 -> 16),
# the analogues of Aria's 490 / 980; images are split into Aria's grids of 70 px tiles (Aria: 490).
MIN_IMAGE_SIZE = 28
SPLIT_TILE = 70


def training_text() -> str:
    """English prose to fit the tokenizer on: docstrings of a few standard library modules."""
    import argparse, collections, functools, json as json_module, pathlib, textwrap  # noqa: E401

    parts = []
    for module in (argparse, collections, functools, json_module, pathlib, textwrap):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(doc)
    return "\n".join(line for line in "\n".join(parts).splitlines() if line.strip())


def train_tokenizer(vocab_size: int) -> None:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text().splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        user_defined_symbols=SPECIAL_TOKENS,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        num_threads=1,
        add_dummy_prefix=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    with open(os.path.join(OUT, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    processor = sentencepiece.SentencePieceProcessor(model_file=os.path.join(OUT, "tokenizer.model"))
    assert processor.piece_to_id("<|img|>") == 9, processor.piece_to_id("<|img|>")


def size_conversion(config: transformers.AriaConfig) -> dict[int, int]:
    """Crop size -> image tokens per crop: a crop of side S has (S / patch_size)^2 patches."""
    patch = config.vision_config.patch_size
    return {
        int(round(int(patches) ** 0.5)) * patch: int(queries)
        for patches, queries in config.projector_patch_to_query_dict.items()
    }


def write_processor_files(config: transformers.AriaConfig) -> None:
    """tokenizer.json, tokenizer_config.json, chat_template.jinja and processor_config.json,
    written by transformers' AriaProcessor.save_pretrained from OUT/tokenizer.model."""
    sizes = size_conversion(config)
    with tempfile.TemporaryDirectory() as source:
        shutil.copy(os.path.join(OUT, "tokenizer.model"), source)
        with open(os.path.join(source, "tokenizer_config.json"), "w") as f:
            json.dump(TOKENIZER_CONFIG, f)
        tokenizer = transformers.TokenizersBackend.from_pretrained(
            source, extra_special_tokens={"image_token": "<|img|>"}
        )
    image_processor = transformers.AriaImageProcessorPil(
        max_image_size=max(sizes),
        min_image_size=MIN_IMAGE_SIZE,
        split_resolutions=[[rows * SPLIT_TILE, cols * SPLIT_TILE] for rows, cols in DEFAULT_SPLIT_TILES],
    )
    processor = transformers.AriaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=DEFAULT_CHAT_TEMPLATE, size_conversion=sizes
    )
    processor.save_pretrained(OUT)
    assert tokenizer.convert_tokens_to_ids("<|img|>") == config.image_token_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--processor-only",
        action="store_true",
        help="only (re)write the tokenizer / processor files, not the weights or tokenizer.model",
    )
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny_models import randomize_

    with open(CONFIG) as f:
        config = transformers.AriaConfig(**json.load(f))
    os.makedirs(OUT, exist_ok=True)
    if not args.processor_only:
        torch.manual_seed(SEED)
        model = transformers.AriaForConditionalGeneration(config).eval()
        randomize_(model, SEED)
        model.save_pretrained(OUT)
        train_tokenizer(config.text_config.vocab_size)
    write_processor_files(config)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
