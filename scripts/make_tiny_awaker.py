"""Writes a tiny random Awaker2.5-VL, laid out as the real one is published, so that the whole
Awaker pipeline (convert, load, generate) runs on a fresh machine without a download.

Two things come out, in OUT_DIR:

- `OUT_DIR/base/`: a Qwen2-VL base directory as `Qwen/Qwen2-VL-7B-Instruct` has it on the hub:
  config.json, model.safetensors (a random float32 transformers `Qwen2VLForConditionalGeneration`
  at a tiny size), a byte-level BPE tokenizer (Qwen2's pipeline trained here on generated English,
  with Qwen2-VL's special tokens appended after the vocabulary), preprocessor_config.json and
  Qwen2-VL-7B-Instruct's chat template (chat_template.json). The output layer's rows of the
  single-byte tokens are zero, so that the random replies are made of longer pieces of text.
- `OUT_DIR/pytorch_model.bin`: the full Awaker state dict (`torch.save` of a plain dict of
  tensors) in the release's key layout: `base_model.model.` + transformers 4.45 names (the base
  weights, with an adapted linear's weight under its plain name), plain LoRA on q/k/v_proj
  (`lora_A.default.weight` (r, in), `lora_B.default.weight` (out, r)), LoRA experts "0".."3" and
  the general expert "g" on o_proj, gate_proj, up_proj and down_proj (`lora_moe_A.<n>.weight`,
  `lora_moe_B.<n>.weight`), and the routers on o_proj and gate_proj (`w_gate.weight` (4, in),
  `w_gate.bias` (4,), `ln.weight` (in,)). Every adapter is random and non-zero, so that it
  changes the model's output.

Seeds are fixed. Needs torch and transformers.

    python scripts/make_tiny_awaker.py OUT_DIR [--rank 8] [--seed 0]

or from Python: `make_tiny_awaker(out_dir, rank=8, seed=0)`, which returns
`(base_directory, awaker_bin_path)` as strings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

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

BPE_VOCAB_SIZE = 400  # 256 byte symbols + merges; the special tokens come after
MIN_PIXELS = 56 * 56  # one merged image token at least
MAX_PIXELS = 28 * 28 * 64  # 64 merged image tokens at most
BYTE_SYMBOLS = 256  # the tokenizer's first ids: one byte each
NUM_EXPERTS = 4  # the release's
PREFIX = "base_model.model."
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MOE_TARGETS = ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ROUTER_TARGETS = ("self_attn.o_proj", "mlp.gate_proj")


def _english_lines(count: int = 300) -> list[str]:
    """Deterministic plain-English sentences to train the tokenizer on."""
    subjects = ["The cat", "A small dog", "My neighbour", "The old astronaut", "Every child", "The rocket"]
    verbs = ["looks at", "carries", "describes", "paints", "finds", "remembers", "sees"]
    objects = ["a cup of coffee", "the red door", "two bright stars", "the quiet river", "an image", "this picture"]
    endings = [".", "!", "?", ", then leaves.", " in the morning.", " near the window."]
    combos = itertools.product(subjects, verbs, objects, endings)
    return [
        f"{subject} {verb} {thing}{ending} It is {index % 97} o'clock, isn't it?"
        for index, (subject, verb, thing, ending) in zip(range(count), combos)
    ]


def make_tokenizer():
    """A transformers `Qwen2Tokenizer` (Qwen2's normalizer, split regex and byte-level BPE) with
    Qwen2-VL's special tokens after the BPE vocabulary; eos `<|im_end|>`, pad `<|endoftext|>`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

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


def make_config(tokenizer, **overrides):
    """A tiny `transformers.Qwen2VLConfig` (2 decoder layers of width 64, a 2-block vision tower)
    whose token ids are `tokenizer`'s. `overrides` are top-level config keys; `text_config` and
    `vision_config` dicts are merged into the defaults."""
    from transformers import Qwen2VLConfig

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
    text_config.update(overrides.pop("text_config", None) or {})
    vision_config.update(overrides.pop("vision_config", None) or {})
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
        tie_word_embeddings=False,
    )
    return Qwen2VLConfig(**{**settings, **overrides})


def make_base(directory: str, seed: int = 0):
    """Writes the Qwen2-VL base directory; returns the transformers model (float32, eval mode)."""
    import torch
    import transformers
    from transformers import Qwen2VLForConditionalGeneration

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if transformers.utils.is_torchvision_available():
        from transformers import Qwen2VLImageProcessor
    else:  # the same settings and files, without torchvision
        from transformers import Qwen2VLImageProcessorPil as Qwen2VLImageProcessor

    os.makedirs(directory, exist_ok=True)
    tokenizer = make_tokenizer()
    if hasattr(tokenizer, "_set_processor_class"):
        tokenizer._set_processor_class("Qwen2VLProcessor")
    tokenizer.save_pretrained(directory)
    Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(directory)
    with open(os.path.join(directory, "chat_template.json"), "w", encoding="utf-8") as file:
        json.dump({"chat_template": CHAT_TEMPLATE}, file, indent=2)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(make_config(tokenizer)).to(torch.float32).eval()
    with torch.no_grad():  # no single-byte replies: random text made of the vocabulary's longer pieces
        model.lm_head.weight[:BYTE_SYMBOLS] = 0.0
    model.save_pretrained(directory)
    return model


def release_key(name: str) -> str:
    """A transformers 5 state-dict key -> the release's (`base_model.model.` + 4.45 naming)."""
    for new, old in (("model.visual.", "visual."), ("model.language_model.", "model."), ("lm_head.", "lm_head.")):
        if name.startswith(new):
            return PREFIX + old + name[len(new) :]
    raise KeyError(f"no Awaker name for {name!r}")


def awaker_state_dict(model, rank: int = 8, seed: int = 0, strength: float = 0.3) -> dict:
    """The base weights of `model` plus random Awaker adapters, in the release's key layout.

    With s = alpha / r = 2 (the release's ratio), A ~ N(0, 1/in) and B ~ N(0, (strength / (s
    sqrt(r)))^2), so each adapter's s B A x is about `strength` times x in size; routers:
    w_gate ~ N(0, 4/in), bias ~ N(0, 0.25), ln.weight ~ 1 + N(0, 0.01), which spreads the
    routing over the experts."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    scaling = 2.0

    def normal(shape, std):
        return (torch.randn(shape, generator=generator) * std).to(torch.float32).contiguous()

    state = {release_key(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    layers = model.config.text_config.num_hidden_layers
    for layer in range(layers):
        for target in LORA_TARGETS + MOE_TARGETS:
            key = f"{PREFIX}model.layers.{layer}.{target}"
            fan_out, fan_in = state[key + ".weight"].shape
            names = ["default"] if target in LORA_TARGETS else [*map(str, range(NUM_EXPERTS)), "g"]
            kind = "lora" if target in LORA_TARGETS else "lora_moe"
            for name in names:
                state[f"{key}.{kind}_A.{name}.weight"] = normal((rank, fan_in), fan_in**-0.5)
                state[f"{key}.{kind}_B.{name}.weight"] = normal((fan_out, rank), strength / (scaling * rank**0.5))
            if target in ROUTER_TARGETS:
                state[f"{key}.w_gate.weight"] = normal((NUM_EXPERTS, fan_in), 2.0 * fan_in**-0.5)
                state[f"{key}.w_gate.bias"] = normal((NUM_EXPERTS,), 0.5)
                state[f"{key}.ln.weight"] = 1.0 + normal((fan_in,), 0.1)
    return state


def make_tiny_awaker(out_dir, rank: int = 8, seed: int = 0) -> tuple[str, str]:
    """Writes `out_dir/base/` (the Qwen2-VL base directory) and `out_dir/pytorch_model.bin` (the
    Awaker state dict); returns their paths."""
    import torch

    out_dir = os.fspath(out_dir)
    base = os.path.join(out_dir, "base")
    model = make_base(base, seed)
    path = os.path.join(out_dir, "pytorch_model.bin")
    torch.save(awaker_state_dict(model, rank=rank, seed=seed + 1), path)
    return base, path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="where to write base/ and pytorch_model.bin")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of every adapter (the release: 256)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    base, path = make_tiny_awaker(args.out_dir, args.rank, args.seed)
    print(f"base directory: {base}\nAwaker weights: {path} ({os.path.getsize(path):,} bytes)")


if __name__ == "__main__":
    main()
