"""Awaker2.5-VL against the PyTorch oracle (tests/awaker_oracle.py, transformers' Qwen2-VL with the
release's mixture of LoRA experts): a tiny random model saved as the release's pytorch_model.bin,
converted with `aria-jax convert BASE --awaker`, then logits and greedy tokens compared, with both
gate modes, with and without an image, in a padded batch."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

import awaker_oracle as oracle
from aria_jax.qwen2_vl.pretrained import AwakerForConditionalGeneration
from aria_jax.safetensors_io import CheckpointError
from convert.conversion import convert_checkpoint
from qwen2_vl_models import chat, load_transformers_processor, photo, tiny_qwen2_vl_dir, without_autograd  # noqa: F401 (an autouse fixture)


RANK = 4


@pytest.fixture(scope="module")
def awaker(tmp_path_factory):
    """(oracle model, our model, processor, token ids, converted directory) for one tiny Awaker."""
    from transformers import Qwen2VLForConditionalGeneration as Reference

    base = tiny_qwen2_vl_dir()
    theirs = oracle.add_awaker_adapters(Reference.from_pretrained(base, attn_implementation="eager"), RANK, seed=3)
    directory = tmp_path_factory.mktemp("awaker")
    oracle.save_awaker_bin(theirs, directory / "pytorch_model.bin")
    convert_checkpoint(base, directory / "converted", awaker=directory / "pytorch_model.bin")
    ours = AwakerForConditionalGeneration.from_pretrained(directory / "converted")
    processor = load_transformers_processor(base)
    vocab = processor.tokenizer.get_vocab()
    ids = dict(
        vision_start_id=vocab["<|vision_start|>"], im_start_id=vocab["<|im_start|>"], im_end_id=vocab["<|im_end|>"]
    )
    return theirs, ours, processor, ids, directory / "converted"


CASES = {
    "text": ([("Tell me about the weather today.", 0)], []),
    "image": ([("What is in the picture?", 1)], [photo(80, 120, 0)]),
    "padded batch": ([("Describe both, please.", 2), ("Hi", 0)], [photo(60, 150, 1), photo(110, 90, 2)]),
}


def oracle_inputs(inputs, ids):
    return dict(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs.get("pixel_values"),
        image_grid_thw=inputs.get("image_grid_thw"),
        prompt_pos=oracle.prompt_pos(inputs["input_ids"], **ids),
    )


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_the_oracle(awaker, case):
    theirs, ours, processor, ids, _ = awaker
    inputs = chat(processor, *CASES[case])
    expected = oracle.awaker_logits(theirs, **oracle_inputs(inputs, ids)).numpy()
    got = np.asarray(ours(**{name: value.numpy() for name, value in inputs.items()}).logits)
    real = inputs["attention_mask"].numpy().astype(bool)
    np.testing.assert_allclose(got[real], expected[real], rtol=0, atol=1e-4 * np.abs(expected[real]).max())


@pytest.mark.parametrize("gate", ["released", "image_features"])
@pytest.mark.parametrize("case", ["image", "padded batch"])
def test_greedy_tokens_match_the_oracle(awaker, case, gate):
    theirs, ours, processor, ids, _ = awaker
    inputs = chat(processor, *CASES[case])
    length = inputs["input_ids"].shape[1]
    expected = oracle.awaker_generate(theirs, **oracle_inputs(inputs, ids), max_new_tokens=32, gate=gate)[
        :, length:
    ].numpy()
    ours.gate = gate
    try:
        got = ours.generate(
            **{name: value.numpy() for name, value in inputs.items()}, max_new_tokens=32, stop_strings=None
        )
    finally:
        ours.gate = "released"
    eos = set(ours.config.text_config.eos_token_id)
    for row_got, row_expected in zip(got[:, length:], expected):
        stop = next((i + 1 for i, token in enumerate(row_expected) if token in eos), len(row_expected))
        assert stop > 4, "too short to compare: pick another seed"
        assert row_got[:stop].tolist() == row_expected[:stop].tolist()


def test_the_released_gate_changes_routing_after_the_prompt_step(awaker):
    """On an image prompt the two gate modes agree on the first token and part ways after, as the
    oracle's do: the released model routes later steps by the plain token embeddings."""
    theirs, ours, processor, ids, _ = awaker
    inputs = {name: value.numpy() for name, value in chat(processor, *CASES["image"]).items()}
    released = ours.generate(**inputs, max_new_tokens=32, stop_strings=None)
    ours.gate = "image_features"
    try:
        kept = ours.generate(**inputs, max_new_tokens=32, stop_strings=None)
    finally:
        ours.gate = "released"
    length = inputs["input_ids"].shape[1]
    assert released[0, length] == kept[0, length]
    assert released[0, length:].tolist() != kept[0, length:].tolist()


def test_prompt_pos_given_equals_derived(awaker):
    theirs, ours, processor, ids, _ = awaker
    inputs = {name: value.numpy() for name, value in chat(processor, *CASES["padded batch"]).items()}
    spans = oracle.prompt_pos(torch.as_tensor(inputs["input_ids"]), **ids).numpy()
    derived = np.asarray(ours(**inputs).logits)
    given = np.asarray(ours(**inputs, prompt_pos=spans).logits)
    np.testing.assert_array_equal(derived, given)
    shifted = np.asarray(ours(**inputs, prompt_pos=spans + np.array([[1, 0], [0, 0]])).logits)
    assert not np.allclose(shifted[0], derived[0])


def test_a_prompt_without_the_chat_template_is_refused(awaker):
    _, ours, processor, _, _ = awaker
    ids = np.asarray([processor.tokenizer.encode("no turns here")])
    with pytest.raises(Exception, match="prompt_pos"):
        ours.generate(ids, max_new_tokens=2)
    assert ours.generate(ids, prompt_pos=[[0, ids.shape[1]]], max_new_tokens=2).shape == (1, ids.shape[1] + 2)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch awaker_pickle_ran",))


def test_convert_refuses_a_bin_whose_pickle_would_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("pytorch_model/data.pkl", pickle.dumps({"weight": RunsCode()}))
        archive.writestr("pytorch_model/byteorder", "little")
    with pytest.raises(CheckpointError, match="system"):
        convert_checkpoint(tiny_qwen2_vl_dir(), tmp_path / "out", awaker=path)
    assert not (tmp_path / "awaker_pickle_ran").exists()
    assert not (tmp_path / "out").exists()


def test_prompt_spans_follow_awakers_readme():
    """From the first <|vision_start|> when the row holds an image; else (a video alone, or text)
    two past the second <|im_start|>; to the second <|im_end|>."""
    from aria_jax.qwen2_vl.awaker import prompt_spans

    START, END, VISION, IMAGE, VIDEO, PAD = 1, 2, 3, 4, 5, 0
    ids = np.array(
        [
            [PAD, START, 9, END, START, 9, 9, VISION, IMAGE, IMAGE, 9, END, START],
            [START, 9, END, START, 9, 9, VISION, VIDEO, VIDEO, 9, END, START, 9],
            [PAD, PAD, PAD, START, 9, END, START, 9, 9, 9, 9, END, START],
        ]
    )
    tokens = dict(image_token_id=IMAGE, vision_start_token_id=VISION, im_start_token_id=START, im_end_token_id=END)
    assert prompt_spans(ids, **tokens).tolist() == [[7, 11], [5, 10], [8, 11]]
    with pytest.raises(ValueError, match="row 0"):
        prompt_spans(ids[:, 6:], **tokens)


def test_export_and_quantize_say_what_they_do_not_do(awaker, tmp_path):
    from convert.conversion import export_checkpoint

    converted = awaker[-1]
    with pytest.raises(CheckpointError, match="pickle"):
        export_checkpoint(converted, tmp_path / "hub")
    with pytest.raises(ValueError, match="--quantize is for Aria"):
        convert_checkpoint(tiny_qwen2_vl_dir(), tmp_path / "quantized", quantize="int8")
    assert not (tmp_path / "hub").exists() and not (tmp_path / "quantized").exists()
