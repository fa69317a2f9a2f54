"""Writes models/tiny-random: a hub-format Aria checkpoint with random weights and a small
sentencepiece tokenizer, so the whole pipeline runs on a fresh machine without a download.

The weights come from transformers' own `AriaForConditionalGeneration.save_pretrained`, so the
files carry the real hub key names. Needs the test extras (torch, transformers).
Run from the repository root:  python scripts/make_tiny_random_model.py
"""

from __future__ import annotations

import inspect
import io
import json
import os
import sys

import sentencepiece
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "models", "tiny-random")
CONFIG = os.path.join(ROOT, "configs", "tiny-random.json")
SEED = 0

# Ids 3..9 so that <|img|> lands on id 9, the image token of every Aria config.
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>", "<|img|>"]


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
        sentence_iterator=iter(training_text().splitlines()), model_writer=model,
        vocab_size=vocab_size, model_type="bpe", user_defined_symbols=SPECIAL_TOKENS,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, num_threads=1,
        add_dummy_prefix=True, character_coverage=1.0, minloglevel=2,
    )
    with open(os.path.join(OUT, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    processor = sentencepiece.SentencePieceProcessor(model_file=os.path.join(OUT, "tokenizer.model"))
    assert processor.piece_to_id("<|img|>") == 9, processor.piece_to_id("<|img|>")


def main() -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny_models import randomize_

    with open(CONFIG) as f:
        config = transformers.AriaConfig(**json.load(f))
    torch.manual_seed(SEED)
    model = transformers.AriaForConditionalGeneration(config).eval()
    randomize_(model, SEED)
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT)
    train_tokenizer(config.text_config.vocab_size)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
