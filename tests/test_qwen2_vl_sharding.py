"""Qwen2-VL and Awaker2.5-VL on a (data, expert, tensor) mesh of 8 CPU devices: loaded with
`from_pretrained(dir, mesh=...)`, they give the single-device logits and greedy tokens for a padded
batch of image and text prompts, with their params split over the mesh; layouts whose axes do not
divide the model fail with a LayoutError that says what would.

The mesh runs are one subprocess (tests/qwen2_vl_sharding_worker.py), started as soon as the
checkpoints and inputs are written; this process computes the single-device reference meanwhile.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
from jax.sharding import AbstractMesh

import awaker_oracle as oracle
import qwen2_vl_sharding_worker as worker
from aria_jax.families import config_from_directory
from aria_jax.sharding import LayoutError, check_layout
from convert.conversion import convert_checkpoint
from qwen2_vl_models import chat, load_transformers_processor, photo, tiny_qwen2_vl_dir
from qwen2_vl_sharding_worker import LAYOUTS, NEW_TOKENS, layout_name
from repo_paths import ROOT
from test_awaker import RANK
from worker_jobs import Job

WORKER = os.path.abspath(worker.__file__)
TIMEOUT = 300  # seconds, for the subprocess
LOGIT_TOLERANCE = 1e-5  # max |mesh - single device| <= LOGIT_TOLERANCE * max(1, max |single device|)
# Four rows, so that they split over data=4: two images in one, one in another, two text-only.
PROMPTS = [("Describe both, please.", 2), ("Hi", 0), ("What is in the picture?", 1), ("Tell me a story.", 0)]
# The tiny Qwen2-VL's vocabulary (397 tokens) padded to divide over tensor=2, as Qwen2-VL-7B's does.
VOCAB_SIZE = 400
RUNS = [(family, layout) for family, layouts in LAYOUTS.items() for layout in layouts]


def axes(entry) -> list[str]:
    """The mesh axes of one dimension of a described spec (None, a name or a list of names)."""
    return [] if entry is None else [entry] if isinstance(entry, str) else list(entry)


def run_id(run) -> str:
    family, layout = run
    return f"{family} {layout_name(layout)}"


@pytest.fixture(scope="module")
def run_directory():
    with tempfile.TemporaryDirectory(prefix="qwen2_vl_sharding_") as directory:
        yield directory


@pytest.fixture(scope="module")
def checkpoints(run_directory) -> dict[str, str]:
    """The tiny Qwen2-VL, and an Awaker built on it (random adapters, converted as released)."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration as Reference

    base = tiny_qwen2_vl_dir(text_config={"vocab_size": VOCAB_SIZE})
    with torch.no_grad():
        adapted = oracle.add_awaker_adapters(Reference.from_pretrained(base, attn_implementation="eager"), RANK, seed=3)
    awaker_bin = os.path.join(run_directory, "pytorch_model.bin")
    oracle.save_awaker_bin(adapted, awaker_bin)
    converted = os.path.join(run_directory, "awaker")
    convert_checkpoint(base, converted, awaker=awaker_bin)
    return {"qwen2_vl": base, "awaker": converted}


@pytest.fixture(scope="module")
def inputs(checkpoints, run_directory) -> dict[str, np.ndarray]:
    processor = load_transformers_processor(checkpoints["qwen2_vl"])
    images = [photo(60, 150, 1), photo(110, 90, 2), photo(80, 120, 0)]
    batch = {name: value.numpy() for name, value in chat(processor, PROMPTS, images).items()}
    np.savez(os.path.join(run_directory, "inputs.npz"), **batch)
    return batch


@pytest.fixture(scope="module")
def job(checkpoints, inputs, run_directory):
    with open(os.path.join(run_directory, "checkpoints.json"), "w") as f:
        json.dump(checkpoints, f)
    started = Job("qwen2_vl_mesh", WORKER, [run_directory], 8, run_directory)
    try:
        yield started
    finally:
        started.kill()


@pytest.fixture(scope="module")
def reference(job, checkpoints, inputs) -> dict:
    """Single-device tokens and logits of each family, computed while the mesh runs."""
    results = {}
    for family, directory in checkpoints.items():
        model = worker.model_class(family).from_pretrained(directory)
        results[family] = {
            "tokens": model.generate(**inputs, max_new_tokens=NEW_TOKENS, stop_strings=None),
            "logits": np.asarray(model(**inputs).logits),
        }
    return results


@pytest.fixture(scope="module")
def mesh_results(job, reference) -> dict:
    result = job.result(TIMEOUT)
    assert result["device_count"] == 8
    return result["runs"]


def test_batch_is_padded_and_rows_differ(reference, inputs):
    mask = inputs["attention_mask"]
    assert mask.shape[0] == 4 and (mask == 0).any() and inputs["image_grid_thw"].shape[0] == 3
    for family in reference:
        new_tokens = reference[family]["tokens"][:, -NEW_TOKENS:]
        assert len({tuple(row) for row in new_tokens.tolist()}) > 1, (family, new_tokens)


@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_greedy_tokens_match_single_device(mesh_results, reference, run):
    family, layout = run
    result = mesh_results[run_id(run)]
    assert result["mesh"] == {"names": ["data", "expert", "tensor"], "sizes": list(layout), "devices": 8}
    np.testing.assert_array_equal(np.array(result["tokens"]), reference[family]["tokens"])


@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_logits_match_single_device(mesh_results, reference, run):
    family, _ = run
    logits, expected = np.load(mesh_results[run_id(run)]["logits_file"]), reference[family]["logits"]
    assert logits.shape == expected.shape
    diff, scale = float(np.abs(logits - expected).max()), float(np.abs(expected).max())
    assert diff <= LOGIT_TOLERANCE * max(1.0, scale), f"max |diff| {diff:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_params_are_split_over_the_mesh(mesh_results, run):
    """Heads, MLP width and vocabulary over tensor (each device holds its half); Awaker's adapters
    split their heads and MLP width alike; the logits' rows over data."""
    family, (_, expert, tensor) = run
    result = mesh_results[run_id(run)]
    params = result["params"]
    # q_proj (layers, model dim, heads, head dim): the heads over tensor, the model dimension over
    # expert (`attention_embed`), each device its share
    layers, width, heads, head_dim = params["q_proj"]["shape"]
    assert axes(params["q_proj"]["spec"][2]) == ["tensor"]
    assert set(axes(params["q_proj"]["spec"][1])) <= {"expert"}
    assert {tuple(shard["shape"]) for shard in params["q_proj"]["shards"]} == {
        (layers, width // expert, heads // tensor, head_dim)
    }
    assert [axes(entry) for entry in params["gate_proj"]["spec"]] == [[], [], ["tensor"]]
    assert "tensor" in axes(params["lm_head"]["spec"][1])
    assert axes(params["vision qkv"]["spec"][3]) == ["tensor"]  # the vision tower's 2 heads
    if family == "awaker":
        assert [axes(entry) for entry in params["gate_proj_experts_b"]["spec"]][-1] == ["tensor"]
        assert axes(params["q_lora_b"]["spec"][2]) == ["tensor"]
    assert "data" in axes(result["logits_spec"][0])


def test_layouts_that_do_not_divide_say_what_would():
    tiny = config_from_directory(tiny_qwen2_vl_dir(text_config={"vocab_size": VOCAB_SIZE}))
    with pytest.raises(LayoutError, match=r"num_key_value_heads=2 does not divide over tensor=4.*data=4, tensor=2"):
        check_layout(tiny, AbstractMesh((2, 1, 4), ("data", "expert", "tensor")))
    full = config_from_directory(os.path.join(ROOT, "configs", "qwen2-vl-7b.json"))
    with pytest.raises(LayoutError, match=r"num_attention_heads=28 does not divide over tensor=8.*1, 2, 4 "):
        check_layout(full, AbstractMesh((1, 1, 8), ("data", "expert", "tensor")))
    check_layout(full, AbstractMesh((2, 1, 4), ("data", "expert", "tensor")))
