"""aria_jax.tokenizer.AriaTokenizer against transformers 5's tokenizer on the same files.

The test trains a small sentencepiece BPE model (byte fallback, whitespace-only pieces, split
digits, the default nmt_nfkc normalization so the precompiled charsmap is exercised) on a
varied generated corpus, with Aria's special strings as user-defined pieces 3..9, and writes it
in the checkpoint layouts transformers 5 treats differently:

- "spm": tokenizer.model + Aria's tokenizer_config.json (with the chat template), no
  tokenizer.json (transformers builds the pipeline from the proto: no dummy prefix, charsmap +
  Replace normalizer);
- "hub5": what transformers 5's AriaProcessor.save_pretrained writes (tokenizer.json from that
  conversion, extra_special_tokens, image_token, chat_template.jinja);
- "llama_legacy": a tokenizer.json as transformers 4's LlamaConverter wrote hub Aria's
  (legacy: Prepend("▁") normalizer, Strip decoder), plus added_tokens_decoder, no chat template;
- "llama_legacy_maps": the same without added_tokens_decoder, so transformers reads
  special_tokens_map.json and added_tokens.json (a "<pad>" beyond the vocabulary, and a
  normalized added token);
- "spm_maps": tokenizer.model with special_tokens_map.json / added_tokens.json;
- "metaspace": a non-legacy tokenizer.json (Metaspace pre-tokenizer and decoder).

The oracle is `transformers.AutoTokenizer.from_pretrained(dir)` (config.json says "aria").
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil

import jinja2
import numpy as np
import pytest
import sentencepiece
import transformers

from aria_jax.tokenizer import DEFAULT_CHAT_TEMPLATE, AriaTokenizer, ChatTemplateError, TokenizerError

SPECIALS = ["<|im_start|>", "<|im_end|>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>", "<|img|>"]
VOCAB_SIZE = 2000

WORDS = (
    "the quick brown fox jumps over lazy dog image describe picture model token value function "
    "return import class self data train test tensor matrix vector hello world Aria mixture "
    "experts vision language multimodal"
).split()
CJK = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天"
    "而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些"
)
KANA_HANGUL = "こんにちは世界テキストです한국어텍스트입니다"
ARABIC = "مرحبا بالعالم هذا نموذج لغوي كبير يفهم الصور والنصوص العربية".split()
CYRILLIC = "Привет мир это большая языковая модель которая понимает изображения и текст".split()
EMOJI = ["😀", "🎉", "👍🏽", "🇯🇵", "❤️", "👨\u200d👩\u200d👧", "🤖", "✨", "🔥"]
CODE = [
    "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) {\n\ta[i] += 1;\n}",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)",
    "if a == b and c != d:\n        pass",
    "SELECT * FROM users WHERE id = 42;",
    '<div class="x">&nbsp;</div>',
    '{"key": [1, 2, 3]}',
]


def corpus_lines(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        kind = i % 8
        if kind == 0:
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))).capitalize() + ".")
        elif kind == 1:
            lines.append("".join(rng.choice(CJK + KANA_HANGUL) for _ in range(rng.randint(4, 20))))
        elif kind == 2:
            words = ARABIC if rng.random() < 0.5 else CYRILLIC
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))))
        elif kind == 3:
            lines.append(rng.choice(CODE))
        elif kind == 4:
            lines.append(" ".join(str(rng.randint(0, 10 ** rng.randint(1, 8))) for _ in range(rng.randint(1, 6))))
        elif kind == 5:
            lines.append(rng.choice(WORDS) + " " * rng.randint(2, 8) + rng.choice(WORDS) + "\t" + rng.choice(EMOJI))
        elif kind == 6:
            lines.append("    " * rng.randint(1, 3) + " ".join(rng.choice(WORDS) for _ in range(4)))
        else:
            lines.append(
                rng.choice(WORDS).upper() + ", " + rng.choice(WORDS) + "! " + rng.choice(EMOJI) + " café naïve Ωmega"
            )
    return lines


FIXED_PROBES = [
    "",
    " ",
    "  ",
    "\n",
    "\t",
    "Hello world",
    " Hello world",
    "  leading two",
    "trailing  ",
    "a  b   c    d",
    "line1\nline2\n\nline4",
    "tab\tseparated\tvalues",
    "mixed \t \n whitespace",
    "a\r\nb",
    "\r\n\r\n",
    "<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|>",
    "x<|img|>y",
    "<|img|><|img|><|img|>",
    " <|img|> ",
    "<fim_prefix><|img|><fim_suffix>what is this?",
    "<|im_start|> user",
    "text<|im_end|>",
    "<|im_end|>text",
    "<|im_start|",
    "|im_start|>",
    "<|im_start|><|im_start|>x",
    "<s>bos</s>eos<unk>unk",
    "<s> spaced </s>",
    "<pad>",
    "<pad> x",
    "a<pad>b",
    " <pad> <new>x",
    "<new><pad>",
    "x <new>",
    "café",
    "e\u0301",
    "\ufb01\u0301x",
    "ｈｅｌｌｏ\u3000ｗｏｒｌｄ",
    "①②③",
    "x\u00a0y",
    "\u200bzero width",
    "a\u200db",
    "日本語のテキスト",
    "中文文本测试",
    "한국어 텍스트",
    "مرحبا بالعالم",
    "Привет, мир!",
    "Ελληνικά",
    "עברית",
    "😀",
    "👍🏽 ok",
    "🇯🇵🇫🇷",
    "👨\u200d👩\u200d👧 family",
    "❤️",
    "emoji😀inside",
    "\U0001f9ea new emoji",
    "12345",
    "3.14159",
    "1,000,000",
    "0x1F",
    "2024-01-01T00:00:00Z",
    "def f(x):\n    return x\n",
    "\tif (a) {\n\t\tb();\n\t}",
    "```python\nprint('hi')\n```",
    "\u2581already\u2581has\u2581metaspace",
    "<0x41>",
    "<0xZZ>",
    "\x00nul",
    "\x7f",
    "\ufffd",
    "\U0010ffff",
    "ALL CAPS TEXT",
    "MiXeD cAsE",
    "snake_case_name",
    "kebab-case-name",
    "CamelCaseName",
    "a" * 50,
    " " * 17,
    "ab" * 30,
    "\n" * 5,
    "." * 9,
]


def probe_strings() -> list[str]:
    """The fixed edge cases plus 170 generated strings (corpus-like text from a different seed,
    special tokens glued on either side, leading / trailing / repeated whitespace)."""
    rng = random.Random(1)
    pool = corpus_lines(101, 400)
    out = list(FIXED_PROBES)
    for i in range(170):
        a, b, special = rng.choice(pool), rng.choice(pool), rng.choice(SPECIALS)
        form = i % 6
        if form == 0:
            out.append(a)
        elif form == 1:
            out.append(a + special + b)
        elif form == 2:
            out.append(" " * rng.randint(1, 4) + a + " " * rng.randint(0, 3))
        elif form == 3:
            out.append(special + a[: rng.randint(0, len(a))])
        elif form == 4:
            out.append(a[: len(a) // 2] + "\n" + special + "\n" + b)
        else:
            out.append("".join(rng.choice(pool)[:5] + rng.choice(["", " ", "  ", "\t", "\n"]) for _ in range(6)))
    return out


ARIA_TOKENIZER_CONFIG = {
    "add_bos_token": False,
    "add_eos_token": False,
    "add_prefix_space": True,
    "legacy": True,
    "bos_token": None,
    "eos_token": None,
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "tokenizer_class": "LlamaTokenizer",
    "clean_up_tokenization_spaces": False,
    "added_tokens_decoder": {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(["<unk>", "<s>", "</s>"])
    },
}
LEGACY_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ],
}
LEGACY_DECODER = {
    "type": "Sequence",
    "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ],
}
SPECIAL_TOKENS_MAP = {
    "pad_token": "<pad>",
    "image_token": "<|img|>",
    "unk_token": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
}
ADDED_TOKENS = {"<pad>": VOCAB_SIZE, "<new>": VOCAB_SIZE + 1}

METASPACE_PRE_TOKENIZER = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True}
METASPACE_DECODER = {
    "type": "Sequence",
    "decoders": [
        {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ],
}

LAYOUTS = ["spm", "hub5", "llama_legacy", "llama_legacy_maps", "spm_maps", "metaspace"]


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tokenizers")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines(0, 3000)),
        model_writer=model,
        vocab_size=VOCAB_SIZE,
        model_type="bpe",
        user_defined_symbols=SPECIALS,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        num_threads=1,
        character_coverage=0.9995,
        minloglevel=2,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        split_digits=True,
    )
    dirs = {name: str(root / name) for name in LAYOUTS}

    spm = dirs["spm"]
    os.makedirs(spm)
    with open(os.path.join(spm, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    _write_json(os.path.join(spm, "config.json"), {"model_type": "aria"})
    _write_json(
        os.path.join(spm, "tokenizer_config.json"), {**ARIA_TOKENIZER_CONFIG, "chat_template": DEFAULT_CHAT_TEMPLATE}
    )

    # What transformers 5 writes for an Aria processor built from that sentencepiece model.
    tokenizer = transformers.TokenizersBackend.from_pretrained(spm, extra_special_tokens={"image_token": "<|img|>"})
    transformers.AriaProcessor(
        image_processor=transformers.AriaImageProcessorPil(), tokenizer=tokenizer, chat_template=DEFAULT_CHAT_TEMPLATE
    ).save_pretrained(dirs["hub5"])
    shutil.copy(os.path.join(spm, "config.json"), dirs["hub5"])

    # Hub Aria's shape: a transformers-4 LlamaConverter tokenizer.json (legacy prefix space).
    with open(os.path.join(dirs["hub5"], "tokenizer.json"), encoding="utf-8") as f:
        legacy = json.load(f)
    legacy["normalizer"], legacy["decoder"] = LEGACY_NORMALIZER, LEGACY_DECODER
    for token in legacy["added_tokens"]:
        token["special"] = token["id"] < 3
    os.makedirs(dirs["llama_legacy"])
    _write_json(os.path.join(dirs["llama_legacy"], "tokenizer.json"), legacy)
    for name in ("tokenizer.model", "config.json"):
        shutil.copy(os.path.join(spm, name), dirs["llama_legacy"])
    _write_json(os.path.join(dirs["llama_legacy"], "tokenizer_config.json"), ARIA_TOKENIZER_CONFIG)  # no template

    # Non-legacy style: no normalizer, Metaspace pre-tokenizer ("▁" only at the very start,
    # split on "▁") and Metaspace decoder.
    metaspace = dict(legacy, normalizer=None, pre_tokenizer=METASPACE_PRE_TOKENIZER, decoder=METASPACE_DECODER)
    shutil.copytree(dirs["llama_legacy"], dirs["metaspace"])
    _write_json(os.path.join(dirs["metaspace"], "tokenizer.json"), metaspace)

    no_decoder = {k: v for k, v in ARIA_TOKENIZER_CONFIG.items() if k != "added_tokens_decoder"}
    for name, base in (("llama_legacy_maps", "llama_legacy"), ("spm_maps", "spm")):
        shutil.copytree(dirs[base], dirs[name])
        _write_json(os.path.join(dirs[name], "tokenizer_config.json"), no_decoder)
        _write_json(os.path.join(dirs[name], "special_tokens_map.json"), SPECIAL_TOKENS_MAP)
        _write_json(os.path.join(dirs[name], "added_tokens.json"), ADDED_TOKENS)
    return dirs


@pytest.fixture(scope="module")
def pairs(checkpoints) -> dict[str, tuple]:
    return {
        name: (transformers.AutoTokenizer.from_pretrained(path), AriaTokenizer.from_pretrained(path))
        for name, path in checkpoints.items()
    }


PROBES = probe_strings()


def test_probe_set_is_large_and_varied():
    assert len(PROBES) >= 200
    assert "" in PROBES and any(s.startswith("  ") for s in PROBES)
    assert sum(any(t in s for t in SPECIALS) for s in PROBES) >= 50


@pytest.mark.parametrize("layout", LAYOUTS)
def test_encode_matches_transformers(pairs, layout):
    ref, ours = pairs[layout]
    mismatches = [(s, ref.encode(s), ours.encode(s)) for s in PROBES if ref.encode(s) != ours.encode(s)]
    assert not mismatches, mismatches[:3]
    # add_special_tokens=False is the same here (Aria adds no BOS / EOS)
    assert ours.encode("Hello world", add_special_tokens=False) == ref.encode("Hello world", add_special_tokens=False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_matches_transformers(pairs, layout):
    ref, ours = pairs[layout]
    for text in PROBES:
        ids = ref.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (text, skip)
    # Arbitrary id sequences: partial UTF-8 byte runs, added / special ids, ids beyond the vocab.
    rng = np.random.default_rng(0)
    top = len(ref) + 3
    for _ in range(100):
        ids = rng.integers(0, top, size=int(rng.integers(1, 12))).tolist()
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (ids, skip)
    batch = np.asarray([ref.encode("a b c"), ref.encode("<|im_end|>x y")[:5]], dtype=object).tolist()
    assert ours.batch_decode(batch, skip_special_tokens=True) == ref.batch_decode(batch, skip_special_tokens=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_added_tokens_and_special_ids_match_transformers(pairs, layout):
    ref, ours = pairs[layout]

    def flags(decoder):
        return {i: (t.content, t.special, t.lstrip, t.rstrip, t.normalized, t.single_word) for i, t in decoder.items()}

    assert flags(ours.added_tokens_decoder) == flags(ref.added_tokens_decoder)
    # The ids skip_special_tokens drops (tokenizers' special set), seen through decode.
    dropped = {i for i in ref.added_tokens_decoder if ref.decode([i], skip_special_tokens=True) == ""}
    assert set(ours.all_special_ids) == dropped
    for name in ("pad_token_id", "unk_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.special_tokens_map == ref.special_tokens_map
    assert len(ours) == len(ref) and ours.vocab_size == ref.vocab_size
    tokens = SPECIALS + ["<unk>", "<pad>", "\u2581the", "not-a-token"]
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("<|img|>") == 9


def test_layouts_really_differ(pairs):
    """The layouts tokenize differently in transformers 5 (so the parity above means something):
    legacy tokenizer.json prefixes "▁" to each stretch of text, the sentencepiece path never;
    spm_maps' extra special tokens come from the model proto, not special_tokens_map.json."""
    text = "<|im_start|>user\nHello"
    spm_ref, spm_ours = pairs["spm"]
    legacy_ref, legacy_ours = pairs["llama_legacy"]
    assert spm_ref.convert_ids_to_tokens(spm_ref.encode(text))[1] != "\u2581us"
    assert legacy_ref.convert_ids_to_tokens(legacy_ref.encode(text))[1] == "\u2581us"
    assert spm_ours.encode(text) != legacy_ours.encode(text)
    assert spm_ours.encode(text) == spm_ref.encode(text) and legacy_ours.encode(text) == legacy_ref.encode(text)
    # hub5 marks the model-specific image token special: skip_special_tokens drops it, but not
    # <|im_start|> / <|im_end|> (ordinary added tokens in every layout here).
    ref, ours = pairs["hub5"]
    ids = ref.encode("<|im_start|>a<|img|>b<|im_end|>")
    assert (
        ours.decode(ids, skip_special_tokens=True)
        == ref.decode(ids, skip_special_tokens=True)
        == "<|im_start|>ab<|im_end|>"
    )
    assert ours.image_token == "<|img|>" and ours.image_token_id == 9


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_call_pads_like_transformers(pairs, side):
    ref, ours = pairs["hub5"]
    texts = ["<|im_start|>user\nhi<|im_end|>", "a much longer prompt with several words in it", ""]
    expected = ref(texts, padding=True, padding_side=side, return_tensors="np")
    got = ours(texts, padding=True, padding_side=side, return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], expected["attention_mask"])
    assert got["input_ids"].dtype == np.int32
    unpadded = ours(texts)
    assert unpadded["input_ids"] == [ref.encode(t) for t in texts]
    assert unpadded["attention_mask"] == [[1] * len(ref.encode(t)) for t in texts]
    with pytest.raises(ValueError, match="padding"):
        ours(texts, return_tensors="np")


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}],
    [
        {
            "role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "image", "text": None}, {"type": "text", "text": "b"}],
        },
        {"role": "assistant", "content": "It is a cat."},
        {"role": "user", "content": "And the dog?"},
    ],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "  spaced\n\ttext  "}],
    [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "[00:01]"},
                {"type": "image"},
                {"type": "text", "text": "\n"},
                {"type": "text", "text": "[00:02]"},
                {"type": "image"},
                {"type": "text", "text": "\n"},
            ],
        }
    ],
]


@pytest.mark.parametrize("layout", ["hub5", "spm"])
def test_chat_template_matches_transformers(pairs, layout):
    ref, ours = pairs[layout]
    for messages in CONVERSATIONS:
        for generation_prompt in (False, True):
            expected = ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == expected
            expected_ids = ref.apply_chat_template(
                messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
            )
            assert (
                ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
                == expected_ids
            )
    # a batch of conversations renders to a list
    assert ours.apply_chat_template(CONVERSATIONS[:2]) == ref.apply_chat_template(CONVERSATIONS[:2], tokenize=False)


def test_chat_template_reference_example(pairs):
    """The rendered example of rhymes-ai's processor test (tests/test_aria_processor.py in the
    rhymes-ai/Aria GitHub repository), from the default template too."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
    expected = "<|im_start|>user\n<fim_prefix><|img|><fim_suffix>describe the image<|im_end|>\n<|im_start|>assistant\n"
    assert pairs["hub5"][1].apply_chat_template(messages, add_generation_prompt=True) == expected
    # llama_legacy ships no template at all (transformers' tokenizer would refuse): we use Aria's.
    assert pairs["llama_legacy"][1].chat_template == DEFAULT_CHAT_TEMPLATE
    assert pairs["llama_legacy"][1].apply_chat_template(messages, add_generation_prompt=True) == expected


def test_chat_template_environment_matches_transformers(pairs):
    """Sandbox helpers and whitespace control: tojson (non-ASCII kept), namespace, trim_blocks /
    lstrip_blocks, special-token variables, raise_exception."""
    ref, ours = pairs["hub5"]
    template = (
        "{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "    {{ m | tojson }}|{{ m['content'] | tojson(indent=2) }}\n"
        "{% endfor %}\n"
        "{{ ns.n }}|{{ unk_token }}|{{ pad_token }}|{{ image_token }}|{{ bos_token }}\n"
        "{% if messages | length > 3 %}{{ raise_exception('too many: ' ~ messages | length) }}{% endif %}"
    )
    messages = [{"role": "user", "content": "héllo 😀 <b>"}, {"role": "assistant", "content": ["x", 1, None]}]
    assert ours.apply_chat_template(messages, chat_template=template) == ref.apply_chat_template(
        messages, chat_template=template, tokenize=False
    )
    with pytest.raises(ChatTemplateError, match="too many: 4") as raised:
        ours.apply_chat_template(messages * 2, chat_template=template)
    assert isinstance(raised.value.__cause__, jinja2.exceptions.TemplateError)
    with pytest.raises(ChatTemplateError, match="unsafe") as raised:
        ours.apply_chat_template(messages, chat_template="{{ messages.__class__.__mro__ }}")
    assert isinstance(raised.value.__cause__, jinja2.exceptions.SecurityError)


def test_unsupported_tokenizer_json_is_a_clear_error(checkpoints, tmp_path):
    with open(os.path.join(checkpoints["hub5"], "tokenizer.json"), encoding="utf-8") as f:
        data = json.load(f)
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    _write_json(tmp_path / "tokenizer.json", data)
    with pytest.raises(TokenizerError, match="ByteLevel"):
        AriaTokenizer.from_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        AriaTokenizer.from_pretrained(tmp_path / "empty")
