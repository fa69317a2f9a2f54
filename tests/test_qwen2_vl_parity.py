"""Qwen2-VL against transformers' `Qwen2VLForConditionalGeneration` (5.23) on tiny random
checkpoints: logits of text, image, multi-image and padded batch prompts, greedy generation,
both checkpoint namings, tied embeddings."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from aria_jax.qwen2_vl.pretrained import Qwen2VLForConditionalGeneration
from qwen2_vl_models import chat, load_transformers_processor, photo, tiny_qwen2_vl_dir, without_autograd  # noqa: F401 (an autouse fixture)


@pytest.fixture(scope="module")
def tiny():
    directory = tiny_qwen2_vl_dir()
    from transformers import Qwen2VLForConditionalGeneration as Reference

    theirs = Reference.from_pretrained(directory, attn_implementation="eager").eval()
    processor = load_transformers_processor(directory)
    return directory, Qwen2VLForConditionalGeneration.from_pretrained(directory), theirs, processor


def as_numpy(inputs) -> dict:
    return {name: value.numpy() for name, value in inputs.items()}


def assert_logits_close(ours: np.ndarray, theirs: np.ndarray, mask: np.ndarray):
    """float32 agreement on the real tokens, relative to the logits' scale."""
    real = mask.astype(bool)
    scale = np.abs(theirs[real]).max()
    np.testing.assert_allclose(ours[real], theirs[real], rtol=0, atol=1e-4 * scale)


CASES = {
    "text": ([("Say something about the sea.", 0)], []),
    "one image": ([("What is in the picture?", 1)], [photo(80, 120, 0)]),
    "two images": ([("Compare these.", 2)], [photo(60, 200, 1), photo(140, 90, 2)]),
    "padded batch": (
        [("Describe it in detail, please, with colours.", 1), ("Hi", 0), ("And these?", 2)],
        [photo(100, 100, 3), photo(56, 300, 4), photo(90, 60, 5)],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tiny, case):
    _, ours, theirs, processor = tiny
    prompts, images = CASES[case]
    inputs = chat(processor, prompts, images)
    expected = theirs(**inputs).logits.numpy()
    got = np.asarray(ours(**as_numpy(inputs)).logits)
    assert_logits_close(got, expected, inputs["attention_mask"].numpy())


@pytest.mark.parametrize("case", ["one image", "padded batch"])
def test_greedy_tokens_match_transformers(tiny, case):
    """32 new tokens, greedy, identical up to each row's end of turn."""
    _, ours, theirs, processor = tiny
    prompts, images = CASES[case]
    inputs = chat(processor, prompts, images)
    length = inputs["input_ids"].shape[1]
    expected = theirs.generate(**inputs, max_new_tokens=32, do_sample=False)[:, length:].numpy()
    got = ours.generate(**as_numpy(inputs), max_new_tokens=32, stop_strings=None)[:, length:]
    assert_same_answers(got, expected, ours.config.text_config.eos_token_id)


def assert_same_answers(got: np.ndarray, expected: np.ndarray, eos: tuple[int, ...]):
    """Each row's tokens identical up to and including transformers' first end of turn."""
    for row_got, row_expected in zip(got, expected):
        stop = next((i + 1 for i, token in enumerate(row_expected) if token in eos), len(row_expected))
        assert stop >= 8, "too short an answer to compare: pick another prompt"
        assert row_got[:stop].tolist() == row_expected[:stop].tolist()


def test_transformers_5_key_names_load_the_same_params(tiny, tmp_path):
    """transformers 5's in-memory names (`model.language_model.`, `model.visual.`) read as 4.45's."""
    directory, ours, _, _ = tiny
    renamed = tmp_path / "renamed"
    shutil.copytree(directory, renamed)
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    names = {}
    for key in tensors:
        if key.startswith("model."):
            names[key] = "model.language_model." + key[len("model.") :]
        elif key.startswith("visual."):
            names[key] = "model." + key
        else:
            names[key] = key
    save_file({names[key]: value for key, value in tensors.items()}, renamed / "model.safetensors")
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(renamed)
    for path_value, loaded_value in zip(jax_leaves(ours.params), jax_leaves(loaded.params)):
        np.testing.assert_array_equal(path_value, loaded_value)


def jax_leaves(tree):
    import jax

    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def test_tied_embeddings(tmp_path):
    from transformers import Qwen2VLForConditionalGeneration as Reference

    directory = tiny_qwen2_vl_dir(seed=1, tie_word_embeddings=True)
    theirs = Reference.from_pretrained(directory, attn_implementation="eager").eval()
    ours = Qwen2VLForConditionalGeneration.from_pretrained(directory)
    assert "lm_head" not in ours.params["language_model"]
    processor = load_transformers_processor(directory)
    inputs = chat(processor, [("Tell me a story.", 1)], [photo(70, 70, 6)])
    assert_logits_close(
        np.asarray(ours(**as_numpy(inputs)).logits), theirs(**inputs).logits.numpy(), inputs["attention_mask"].numpy()
    )


def test_a_prompt_longer_than_a_prefill_chunk():
    """An image inside a prompt of two prefill chunks (`buckets.PREFILL_CHUNK`): the chunks' M-RoPE
    positions and the image features land where one-shot transformers puts them."""
    from aria_jax.buckets import PREFILL_CHUNK

    from transformers import Qwen2VLForConditionalGeneration as Reference

    directory = tiny_qwen2_vl_dir(seed=2, text_config={"max_position_embeddings": 3 * PREFILL_CHUNK})
    theirs = Reference.from_pretrained(directory, attn_implementation="eager").eval()
    ours = Qwen2VLForConditionalGeneration.from_pretrained(directory)
    processor = load_transformers_processor(directory)
    words = " ".join(["the sea is calm and the sky is clear"] * (PREFILL_CHUNK // 15))
    inputs = chat(processor, [(words + " What is in the picture?", 1)], [photo(90, 130, 7)])
    length = inputs["input_ids"].shape[1]
    assert PREFILL_CHUNK < length <= 2 * PREFILL_CHUNK
    expected = theirs.generate(**inputs, max_new_tokens=8, do_sample=False)[:, length:].numpy()
    got = ours.generate(**as_numpy(inputs), max_new_tokens=8, stop_strings=None)[:, length:]
    assert_same_answers(got, expected, ours.config.text_config.eos_token_id)
