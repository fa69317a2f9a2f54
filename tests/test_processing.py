"""aria_jax.processing.AriaProcessor against transformers 5's AriaProcessor.

transformers' image processor only accepts crop sizes 490 and 980, so the parity checkpoint is
built here at Aria's real sizes (size_conversion {490: 128, 980: 256}) from the shipped tiny
sentencepiece model, saved with transformers' `AriaProcessor.save_pretrained`. The shipped
models/tiny-random (crop sizes 70 -> 8 and 140 -> 16 queries) is checked for loading in both
libraries, text parity, and our per-image expansion.

Where the two differ on purpose: transformers expands every `<|img|>` by the batch-wide maximum
crop count; we use each image's own count.
"""

from __future__ import annotations

import json
import os
import shutil

from PIL import Image

import numpy as np
import pytest
import transformers

from aria_jax.processing import AriaProcessor
from aria_jax.tokenizer import DEFAULT_CHAT_TEMPLATE
from repo_paths import TINY_RANDOM

IMAGE_TOKEN_ID = 9

TOKENIZER_CONFIG = {
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
}
MODEL_CONFIG = {
    "model_type": "aria",
    "image_token_index": 9,
    "pad_token_id": 2,
    "projector_patch_to_query_dict": {"1225": 128, "4900": 256},
    "text_config": {"model_type": "aria_text", "vocab_size": 512},
    "vision_config": {"patch_size": 14},
}
PROMPT = "<|im_start|>user\n<fim_prefix><|img|><fim_suffix>What is in the picture?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """An Aria-sized (490 / 980) processor checkpoint written by transformers 5."""
    root = tmp_path_factory.mktemp("processor")
    source, out = root / "source", root / "aria"
    source.mkdir()
    shutil.copy(os.path.join(TINY_RANDOM, "tokenizer.model"), source)
    with open(source / "tokenizer_config.json", "w") as f:
        json.dump(TOKENIZER_CONFIG, f)
    tokenizer = transformers.TokenizersBackend.from_pretrained(source, extra_special_tokens={"image_token": "<|img|>"})
    transformers.AriaProcessor(
        image_processor=transformers.AriaImageProcessorPil(), tokenizer=tokenizer, chat_template=DEFAULT_CHAT_TEMPLATE
    ).save_pretrained(out)
    with open(out / "config.json", "w") as f:
        json.dump(MODEL_CONFIG, f)
    return str(out)


@pytest.fixture(scope="module")
def processors(checkpoint):
    return transformers.AriaProcessor.from_pretrained(checkpoint), AriaProcessor.from_pretrained(checkpoint)


def images(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def assert_same_text_inputs(expected, got):
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], expected["attention_mask"])
    assert got["input_ids"].dtype == np.int32 and got["attention_mask"].dtype == np.int32


def image_runs(row: np.ndarray) -> list[int]:
    """Lengths of the runs of consecutive image tokens in one row of input_ids."""
    runs, current = [], 0
    for token in row.tolist() + [-1]:
        if token == IMAGE_TOKEN_ID:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


@pytest.mark.parametrize("size", [490, 980])
def test_single_image_matches_transformers(processors, size):
    ref, ours = processors
    image = images((60, 90))
    expected = ref(text=PROMPT, images=image, max_image_size=size, return_tensors="np")
    got = ours(text=PROMPT, images=image, max_image_size=size)
    assert_same_text_inputs(expected, got)
    queries = {490: 128, 980: 256}[size]
    assert image_runs(got["input_ids"][0]) == [queries]
    assert got["pixel_values"].shape == (1, 3, size, size) and got["pixel_values"].dtype == np.float32
    assert got["pixel_mask"].shape == (1, size, size) and got["pixel_mask"].dtype == bool
    np.testing.assert_array_equal(got["pixel_mask"], expected["pixel_mask"])
    assert got["num_crops"].tolist() == [1]


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_with_equal_crop_counts_matches_transformers(processors, side):
    ref, ours = processors
    prompts = [PROMPT, "<|img|> and <|img|>: compare the two images, please.", "no image here"]
    batch = images((40, 70), (90, 30), (50, 50))
    expected = ref(text=prompts, images=batch, max_image_size=490, padding=True, padding_side=side, return_tensors="np")
    got = ours(text=prompts, images=batch, max_image_size=490, padding_side=side)
    assert_same_text_inputs(expected, got)
    assert got["attention_mask"].sum(axis=1).tolist() == [
        len(ours.tokenizer.encode(p)) for p in ours.expand_image_tokens(prompts, [1, 1, 1], 490)
    ]
    pad_columns = got["attention_mask"] == 0
    assert pad_columns.any() and (got["input_ids"][pad_columns] == ours.pad_token_id).all()
    # per-prompt nested images give the same result as the flat list
    nested = ours(text=prompts, images=[batch[:1], batch[1:], []], max_image_size=490, padding_side=side)
    np.testing.assert_array_equal(nested["input_ids"], got["input_ids"])


def test_split_images_with_equal_crop_counts_match_transformers(processors):
    ref, ours = processors
    prompts = ["<|img|> first", "second <|img|>"]
    batch = images((100, 400), (110, 430))  # same aspect: both split 1 x 2 at 490
    expected = ref(
        text=prompts,
        images=batch,
        max_image_size=490,
        split_image=True,
        padding=True,
        padding_side="left",
        return_tensors="np",
    )
    got = ours(text=prompts, images=batch, max_image_size=490, split_image=True)
    assert got["num_crops"].tolist() == [2, 2]
    assert_same_text_inputs(expected, got)
    assert [image_runs(row) for row in got["input_ids"]] == [[256], [256]]


def test_each_image_is_expanded_by_its_own_crop_count(processors):
    ref, ours = processors
    prompts = ["wide <|img|> then square <|img|> end", "tall <|img|>"]
    batch = images((300, 2400), (600, 600), (800, 120))  # 1 x 7, 2 x 2 and 2 x 1 crops of 490
    got = ours(text=prompts, images=batch, max_image_size=490, split_image=True)
    crops = got["num_crops"].tolist()
    assert len(set(crops)) > 1, crops  # the point of the test: different crop counts in one batch
    assert got["pixel_values"].shape[0] == sum(crops)
    assert [image_runs(row) for row in got["input_ids"]] == [[128 * crops[0], 128 * crops[1]], [128 * crops[2]]]
    # transformers gives every image the batch maximum instead (a feature count mismatch later)
    expected = ref(
        text=prompts,
        images=batch,
        max_image_size=490,
        split_image=True,
        padding=True,
        padding_side="left",
        return_tensors="np",
    )
    assert int((expected["input_ids"] == IMAGE_TOKEN_ID).sum()) == 3 * 128 * max(crops) != sum(crops) * 128


def test_placeholder_image_count_mismatch_names_both_counts(processors):
    _, ours = processors
    two = images((30, 30), (30, 30))
    with pytest.raises(ValueError, match=r"1 <\|img\|> placeholder\(s\) but 2 image\(s\)"):
        ours(text="<|img|> only one", images=two, max_image_size=490)
    with pytest.raises(ValueError, match=r"3 <\|img\|> placeholder\(s\) but 2 image\(s\)"):
        ours(text=["<|img|><|img|>", "<|img|>"], images=two, max_image_size=490)
    with pytest.raises(ValueError, match=r"1 <\|img\|> placeholder\(s\) but 0 image\(s\)"):
        ours(text="<|img|> but no image")
    with pytest.raises(ValueError, match=r"prompt 1 has 0 <\|img\|> placeholder\(s\) but 1 image\(s\)"):
        ours(text=["<|img|>", "none"], images=[two[:1], two[1:]], max_image_size=490)
    with pytest.raises(ValueError, match="max_image_size=700 is not allowed; use one of: 490, 980"):
        ours(text="<|img|>", images=two[:1], max_image_size=700)


def test_text_helpers_match_transformers(processors):
    ref, ours = processors
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]},
        {"role": "assistant", "content": "a cat"},
    ]
    for generation_prompt in (False, True):
        assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == ref.apply_chat_template(
            messages, add_generation_prompt=generation_prompt
        )
    ids = ours(text=[PROMPT.replace("<|img|>", ""), "hi <|im_end|>"])["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids[0], skip_special_tokens=skip) == ref.decode(ids[0], skip_special_tokens=skip)
    assert ours.size_to_queries == ref.size_conversion == {490: 128, 980: 256}
    assert ours.image_token_id == ref.image_token_id == IMAGE_TOKEN_ID
    assert ours.pad_token_id == ref.tokenizer.pad_token_id


def test_shipped_tiny_model_loads_in_both_libraries():
    ref = transformers.AriaProcessor.from_pretrained(TINY_RANDOM)
    ours = AriaProcessor.from_pretrained(TINY_RANDOM)
    assert ref.size_conversion == ours.size_to_queries == {70: 8, 140: 16}
    assert ref.image_token_id == ours.image_token_id == IMAGE_TOKEN_ID
    assert ref.chat_template == ours.chat_template == DEFAULT_CHAT_TEMPLATE
    assert ref.image_processor.max_image_size == ours.image_processor.max_image_size == 140
    assert ref.image_processor.min_image_size == ours.image_processor.min_image_size == 28
    # text side identical (transformers' image processor rejects 70 / 140, so no images there)
    prompts = [
        ours.apply_chat_template([{"role": "user", "content": "Hello, tiny model!"}], add_generation_prompt=True),
        "  two  spaces\tand a tab",
        "",
    ]
    expected = ref(text=prompts, padding=True, padding_side="left", return_tensors="np")
    assert_same_text_inputs(expected, ours(text=prompts))
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_RANDOM)
    for text in prompts + ["日本語 😀 café", "<|im_start|>x<|img|>y<|im_end|>", "a\r\nb  c"]:
        assert ours.tokenizer.encode(text) == reference_tokenizer.encode(text)
    # our expansion at the tiny crop sizes: 8 / 16 tokens per crop, per image
    for size, queries in ((70, 8), (140, 16)):
        got = ours(
            text=["<|img|>a", "b <|img|> c <|img|>"], images=images((50, 90), (40, 40), (90, 20)), max_image_size=size
        )
        assert [image_runs(row) for row in got["input_ids"]] == [[queries], [queries, queries]]
        assert got["pixel_values"].shape == (3, 3, size, size)
    split = ours(text=["<|img|>", "<|img|>"], images=images((50, 300), (60, 60)), max_image_size=70, split_image=True)
    crops = split["num_crops"].tolist()
    assert crops[0] > crops[1] and [image_runs(row) for row in split["input_ids"]] == [[8 * crops[0]], [8 * crops[1]]]
    with pytest.raises(ValueError, match="use one of: 70, 140"):
        ours(text="<|img|>", images=images((20, 20)), max_image_size=980)


# ----------------------------------------------------------------------------- padding, truncation, tensors

PADDING_CASES = [
    dict(padding=True),
    dict(padding="longest"),
    dict(padding="max_length", max_length=300),
    dict(padding="longest", truncation=True, max_length=140),
    dict(padding="max_length", truncation=True, max_length=135),
]


@pytest.mark.parametrize("options", PADDING_CASES, ids=lambda options: "-".join(map(str, options.values())))
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_and_truncation_match_transformers(processors, options, side):
    ref, ours = processors
    prompts = [PROMPT, "one <|img|> and a much longer tail of plain text words after the image token"]
    batch = images((40, 70), (90, 30))
    expected = ref(text=prompts, images=batch, max_image_size=490, padding_side=side, return_tensors="np", **options)
    got = ours(text=prompts, images=batch, max_image_size=490, padding_side=side, **options)
    assert_same_text_inputs(expected, got)
    if options.get("max_length"):
        assert got["input_ids"].shape[1] == options["max_length"] or options["padding"] == "longest"


def test_no_padding_gives_lists_as_transformers(processors):
    ref, ours = processors
    prompts = ["<|img|> first prompt", "second"]
    batch = images((40, 70))
    expected = ref(text=prompts, images=batch, max_image_size=490, padding=False)
    got = ours(text=prompts, images=batch, max_image_size=490, padding=False, return_tensors=None)
    assert got["input_ids"] == expected["input_ids"] and got["attention_mask"] == expected["attention_mask"]
    assert len(got["input_ids"][0]) != len(got["input_ids"][1])
    with pytest.raises(ValueError, match="padding=False cannot make return_tensors='np' arrays"):
        ours(text=prompts, images=batch, max_image_size=490, padding=False)


def test_truncating_image_tokens_is_an_error(processors):
    ref, ours = processors
    prompts = ["<|img|> first", "a few words then <|img|>"]
    batch = images((40, 70), (30, 30))
    with pytest.raises(ValueError):
        ref(text=prompts, images=batch, max_image_size=490, padding=True, truncation=True, max_length=10)
    with pytest.raises(ValueError, match=r"max_length=10 cuts row 0's image tokens \(10 of 128 kept\)"):
        ours(text=prompts, images=batch, max_image_size=490, truncation=True, max_length=10)
    # without truncation max_length only pads: rows longer than it stay whole
    got = ours(text=prompts, images=batch, max_image_size=490, padding="max_length", max_length=10, return_tensors=None)
    expected = ref(text=prompts, images=batch, max_image_size=490, padding="max_length", max_length=10)
    assert got["input_ids"] == expected["input_ids"] and min(len(row) for row in got["input_ids"]) > 10


@pytest.mark.parametrize(
    "bad,message",
    [
        (dict(padding="max_length"), "padding='max_length' needs max_length"),
        (dict(padding="both"), "padding='both'"),
        (dict(truncation="sideways", max_length=4), "truncation='sideways'"),
        (dict(max_length=0), "max_length must be a positive int"),
        (dict(return_tensors="tf"), "return_tensors='tf'"),
        (dict(images_kwargs={"do_resize": True}), "unsupported option.*do_resize"),
    ],
)
def test_bad_text_options_are_named(processors, bad, message):
    _, ours = processors
    with pytest.raises(ValueError, match=message):
        ours(text="hello", **bad)


def test_return_tensors_jax_and_pt(processors):
    import jax
    import torch

    _, ours = processors
    prompts, batch = ["<|img|> a", "b <|img|> c d"], images((40, 70), (50, 50))
    arrays = ours(text=prompts, images=batch, max_image_size=490)
    as_jax = ours(text=prompts, images=batch, max_image_size=490, return_tensors="jax")
    as_torch = ours(text=prompts, images=batch, max_image_size=490, return_tensors="pt")
    assert set(arrays) == set(as_jax) == set(as_torch)
    for key, value in arrays.items():
        assert isinstance(as_jax[key], jax.Array) and isinstance(as_torch[key], torch.Tensor)
        np.testing.assert_array_equal(np.asarray(as_jax[key]), value)
        np.testing.assert_array_equal(as_torch[key].numpy(), value)
    # images_kwargs / text_kwargs, as transformers takes them
    nested = ours(text=prompts, images=batch, images_kwargs={"max_image_size": 490}, text_kwargs={"padding": True})
    np.testing.assert_array_equal(nested["input_ids"], arrays["input_ids"])


CHAT = [{"role": "user", "content": [{"type": "text", "text": "What is shown in this image?"}]}]


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(padding=True),
        dict(padding="max_length", max_length=50),
        dict(truncation=True, max_length=5),
        dict(padding="longest", truncation=True, max_length=20, return_tensors="np"),
    ],
    ids=lambda options: "-".join(map(str, options.values())) or "defaults",
)
def test_tokenized_chat_template_matches_transformers(processors, options):
    ref, ours = processors
    batch = [CHAT, CHAT + [{"role": "assistant", "content": "a cat"}] + CHAT]
    kwargs = dict(add_generation_prompt=True, tokenize=True, padding_side="left", **options)
    expected, got = ref.apply_chat_template(batch, **kwargs), ours.apply_chat_template(batch, **kwargs)
    assert type(got) is type(expected) and as_lists(got) == as_lists(expected)
    single = dict(add_generation_prompt=True, tokenize=True)
    assert ours.apply_chat_template(CHAT, **single) == ref.apply_chat_template(CHAT, **single)
    expected = ref.apply_chat_template(batch, return_dict=True, **kwargs)
    got = ours.apply_chat_template(batch, return_dict=True, **kwargs)
    assert set(got) == {"input_ids", "attention_mask"}
    assert as_lists(got["attention_mask"]) == as_lists(expected["attention_mask"])


def as_lists(rows):
    return [list(map(int, row)) for row in rows]


def test_tokenized_chat_template_with_an_image(processors, tmp_path):
    ref, ours = processors
    path = tmp_path / "image.png"
    Image.fromarray(images((60, 80))[0]).save(path)
    messages = [{"role": "user", "content": [{"type": "image", "url": str(path)}, {"type": "text", "text": "hi"}]}]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, max_image_size=490, return_tensors="np")
    expected, got = ref.apply_chat_template(messages, **kwargs), ours.apply_chat_template(messages, **kwargs)
    assert_same_text_inputs(expected, got)
    np.testing.assert_array_equal(got["pixel_values"], expected["pixel_values"])


# ----------------------------------------------------------------------------- decode_replies


def test_decode_replies(processors):
    _, ours = processors
    tokenizer = ours.tokenizer
    inputs = ours(text=[PROMPT.replace("<|img|>", ""), "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"])
    answers = ["A red square.", "Hello there"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    new = [
        tokenizer.encode(answers[0], add_special_tokens=False)
        + [end]
        + tokenizer.encode("junk", add_special_tokens=False),
        tokenizer.encode(answers[1], add_special_tokens=False),
    ]
    width = max(len(row) for row in new)
    new = np.asarray([row + [ours.pad_token_id] * (width - len(row)) for row in new], np.int32)
    assert ours.pad_token_id in tokenizer.all_special_ids  # padding decodes to nothing
    tokens = np.concatenate([inputs["input_ids"], new], axis=1)
    expected = [
        tokenizer.decode(row, skip_special_tokens=True) for row in [new[0, : new[0].tolist().index(end)], new[1]]
    ]
    assert expected == answers
    assert ours.decode_replies(tokens, inputs) == answers  # generate's output: prompt + new tokens
    assert ours.decode_replies(new, inputs) == answers  # the new tokens only
    assert ours.decode_replies(new) == answers
    import jax.numpy as jnp
    import torch

    assert (
        ours.decode_replies(jnp.asarray(tokens), inputs)
        == ours.decode_replies(torch.from_numpy(tokens), inputs)
        == answers
    )
    assert ours.decode_replies(tokens, inputs, stop_token_ids=[new[1, 1]]) == [answers[0], tokenizer.decode(new[1, :1])]
    with pytest.raises(ValueError, match="tokens has 1 rows but inputs has 2 prompts"):
        ours.decode_replies(tokens[:1], inputs)
