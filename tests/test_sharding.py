"""Sharding: the model on a (data, expert, tensor) mesh of 8 CPU devices, and on two processes,
gives the single-device tokens and logits; every device holds only its share of the experts;
layouts that do not fit fail with a LayoutError that says what would.

Multi-device runs are subprocesses (tests/sharding_worker.py): XLA_FLAGS must be set before JAX
starts, and this process has one CPU device. They all start together, in the background, the
first time a test needs one: one process for every 8-device part (layouts, MoE layer, layout
errors), two for the multi-host run. Meanwhile this process computes the single-device
reference that every run is compared with. Most of the time is compilation; the file takes
about 150 s on a 2-core machine.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tempfile

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh

import aria_jax
from aria_jax.config import AriaTextConfig, config_from_pretrained
from aria_jax.host_loop import check_stop_strings, split_stop_strings
from aria_jax.kv_cache import cache_layout
from aria_jax.sharding import LayoutError, check_layout

import sharding_worker as worker
from worker_jobs import Job
from sharding_worker import (
    ENGINE_CASES,
    ENGINE_MAX_LENGTH,
    ENGINE_REQUESTS,
    HOST_CASES,
    HOST_ENGINE_LAYOUT,
    HOST_ENGINE_REQUESTS,
    HOST_ENGINE_SLOTS,
    INT8_CACHE_LAYOUTS,
    LAYOUTS,
    MOE_BACKENDS,
    NEW_TOKENS,
    SPLIT_ATTENTION_CASES,
    SPLIT_CACHE_LAYOUTS,
    TEXT_LAYOUT,
    TINY_RANDOM,
    layout_name,
)

WORKER = os.path.abspath(worker.__file__)
TIMEOUT = 240  # seconds, for every subprocess
LOGIT_TOLERANCE = 1e-5  # max |mesh - single device| <= LOGIT_TOLERANCE * max(1, max |single device|)
NUM_EXPERTS, NUM_HEADS, VOCAB = 8, 4, 512  # models/tiny-random

# What the 8-device process runs (see sharding_worker.main_mesh).
MESH_PARTS = [
    "errors",
    *map(layout_name, LAYOUTS),
    "text",
    "moe",
    "take_rows",
    "gpu_decode_experts",
    "split_cache",
    "quantized",
    "int8_cache",
    "engine",
]


def within_tolerance(diff: float, scale: float) -> bool:
    return diff <= LOGIT_TOLERANCE * max(1.0, scale)


def abstract_mesh(data, expert, tensor) -> AbstractMesh:
    return AbstractMesh((data, expert, tensor), ("data", "expert", "tensor"))


# ----------------------------------------------------------------------------- subprocesses


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def jobs():
    """Every subprocess, started at once; all killed at the end whatever happened."""
    with tempfile.TemporaryDirectory(prefix="aria_sharding_") as directory:
        started: dict[str, Job] = {}
        try:
            started["mesh"] = Job("mesh", WORKER, ["mesh", directory, *MESH_PARTS], 8, directory)
            port = str(free_port())
            for process_id in range(2):
                started[f"host{process_id}"] = Job(
                    f"host{process_id}", WORKER, ["host", str(process_id), port, directory], 2, directory
                )
            yield started
        finally:
            for job in started.values():
                job.kill()


@pytest.fixture(scope="module")
def reference(jobs):
    """The single-device run, in this process (while the subprocesses, started first, run):
    multimodal tokens (with a float and an int8 KV cache) and logits, text-model logits, and
    each engine request's answer from generate alone. The multi-host run with 2 rows is
    compared with the first 2 rows: the same inputs (row 1 is the longest prompt, so both
    batches are padded alike), rows computed independently."""
    processor = aria_jax.AriaProcessor.from_pretrained(TINY_RANDOM)
    inputs = worker.build_inputs(processor)
    model = aria_jax.AriaForConditionalGeneration.from_pretrained(TINY_RANDOM)
    tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, stop_strings=None)
    int8_tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, stop_strings=None, kv_cache_dtype="int8")
    answers = [solo_answer(model, request) for request in worker.engine_requests(processor)]
    logits = np.asarray(model(**inputs).logits)
    rows = {}
    for _, num_rows in HOST_CASES:
        fewer = worker.build_inputs(processor, num_rows)
        for key, value in fewer.items():
            np.testing.assert_array_equal(value, inputs[key][: len(value)], err_msg=key)
        rows[num_rows] = {"tokens": tokens[:num_rows], "logits": logits[:num_rows]}
    ids, mask = worker.text_ids()
    text_logits = np.asarray(aria_jax.AriaTextForCausalLM.from_pretrained(TINY_RANDOM)(ids, mask).logits)
    quantized = {}
    for scheme, _ in worker.QUANTIZED_CASES:
        model = aria_jax.AriaForConditionalGeneration.from_pretrained(
            TINY_RANDOM, quantize=scheme, group_size=worker.QUANTIZED_GROUP
        )
        quantized[scheme] = {
            "tokens": model.generate(**inputs, max_new_tokens=NEW_TOKENS, stop_strings=None),
            "logits": np.asarray(model(**inputs).logits),
        }
    return {
        "inputs": inputs,
        "tokens": tokens,
        "int8_tokens": int8_tokens,
        "logits": logits,
        "rows": rows,
        "text_logits": text_logits,
        "quantized": quantized,
        "answers": answers,
    }


def solo_answer(model, request: dict) -> list[int]:
    """A request's answer from `generate` alone: its new tokens through the first stop id, as an
    engine's completion holds them (generate pads after it)."""
    new_tokens = model.generate(**request)[0, request["input_ids"].shape[1] :].tolist()
    stop_strings = check_stop_strings(request["stop_strings"], model.tokenizer)
    stop_ids = set(split_stop_strings(stop_strings, model.text_config, model.tokenizer)[0].tolist())
    end = next((k + 1 for k, token in enumerate(new_tokens) if token in stop_ids), len(new_tokens))
    return new_tokens[:end]


@pytest.fixture(scope="module")
def mesh_results(jobs, reference):
    """The 8-device process's results."""
    result = jobs["mesh"].result(TIMEOUT)
    assert result["device_count"] == 8
    return result


@pytest.fixture(scope="module")
def host_results(jobs, reference):
    return [jobs[f"host{i}"].result(TIMEOUT) for i in range(2)]


# ----------------------------------------------------------------------------- the batch


def test_reference_batch_is_padded_and_rows_differ(reference):
    mask = np.asarray(reference["inputs"]["attention_mask"])
    assert mask.shape[0] == 4 and (mask == 0).any(), "the batch should need padding"
    assert len(set(mask.sum(1).tolist())) > 1
    new_tokens = reference["tokens"][:, -NEW_TOKENS:]
    assert len({tuple(row) for row in new_tokens.tolist()}) == len(new_tokens), new_tokens


# ----------------------------------------------------------------------------- 8 devices: the model


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_name)
def test_greedy_tokens_match_single_device(mesh_results, reference, layout):
    run = mesh_results["layouts"][layout_name(layout)]
    assert run["mesh"] == {"names": ["data", "expert", "tensor"], "sizes": list(layout), "devices": 8}
    assert run["tokens_type"] == "ndarray"
    np.testing.assert_array_equal(np.array(run["tokens"]), reference["tokens"])


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_name)
def test_logits_match_single_device(mesh_results, reference, layout):
    run = mesh_results["layouts"][layout_name(layout)]
    logits = np.load(run["logits_file"])
    assert logits.shape == reference["logits"].shape
    diff, scale = float(np.abs(logits - reference["logits"]).max()), float(np.abs(reference["logits"]).max())
    assert within_tolerance(diff, scale), f"max |diff| {diff:.3g} at scale {scale:.3g}"


def test_data_axis_splits_the_rows(mesh_results):
    """Four rows on data=2 x expert=2: the logits come out split over rows (and vocab over
    tensor), so the batch-sharded path of attention and KV cache was exercised."""
    spec = mesh_results["layouts"]["2x2x2"]["logits_spec"]
    first = spec[0] if isinstance(spec[0], list) else [spec[0]]
    assert "data" in first, spec


def shard_blocks(param: dict, dim: int) -> dict[tuple[int, int], list[int]]:
    """{(start, stop) along `dim`: devices holding that block}."""
    blocks: dict[tuple[int, int], list[int]] = {}
    for shard in param["shards"]:
        blocks.setdefault(tuple(shard["index"][dim]), []).append(shard["device"])
    return blocks


def assert_split(param: dict, dim: int, axis, parts: int, num_devices: int, other_splits=None) -> None:
    """`param` is split in `parts` equal blocks along `dim` over mesh axis `axis` (a name, or a
    list of names; whole if parts == 1), each device holding one block of exactly that size.
    `other_splits`: {dim: parts} of the other dimensions the param is split along."""
    other_splits = other_splits or {}
    size = param["shape"][dim]
    assert len(param["shards"]) == num_devices
    assert len({shard["device"] for shard in param["shards"]}) == num_devices
    if parts > 1:
        spec = param["spec"][dim]
        assert (spec if isinstance(axis, str) else list(spec)) == axis, param["spec"]
    for shard in param["shards"]:
        expected = list(param["shape"])
        expected[dim] = size // parts
        for other, other_parts in other_splits.items():
            expected[other] //= other_parts
        assert shard["shape"] == expected, (shard, param["spec"])
    blocks = shard_blocks(param, dim)
    assert sorted(blocks) == [(i * size // parts, (i + 1) * size // parts) for i in range(parts)]
    assert all(len(devices) == num_devices // parts for devices in blocks.values())


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_name)
def test_each_device_holds_its_share_of_the_experts(mesh_results, layout):
    _, expert, tensor = layout
    params = mesh_results["layouts"][layout_name(layout)]["params"]
    for name in ("experts_gate_up", "experts_down"):
        # (layers, experts, ...): dim 1 over "expert", 8 / expert experts per device.
        # and their model dimension (gate_up: dim 2, down: dim 3) over "tensor".
        model_dim = 2 if name == "experts_gate_up" else 3
        assert params[name]["shape"][1] == NUM_EXPERTS
        assert_split(params[name], 1, "expert", expert, 8, {model_dim: tensor})
        assert_split(params[name], model_dim, "tensor", tensor, 8, {1: expert})
        per_device = math.prod(params[name]["shards"][0]["shape"])
        assert per_device * expert * tensor == math.prod(params[name]["shape"])
    # The shared experts (layers, embed, width): width over "expert", model dimension over "tensor".
    assert_split(params["shared_gate"], 2, "expert", expert, 8, {1: tensor})
    assert_split(params["shared_gate"], 1, "tensor", tensor, 8, {2: expert})
    # q_proj (layers, embed, heads, head_dim): heads over "tensor", model dimension over "expert"
    # (whatever the head count); lm_head (embed, vocab): the vocabulary over every device.
    assert params["q_proj"]["shape"][2] == NUM_HEADS
    assert_split(params["q_proj"], 2, "tensor", tensor, 8, {1: expert})
    assert_split(params["q_proj"], 1, "expert", expert, 8, {2: tensor})
    assert params["lm_head"]["shape"][1] == VOCAB
    assert_split(params["lm_head"], 1, ["tensor", "expert"], tensor * expert, 8)


def test_text_model_on_mesh(mesh_results, reference):
    run = mesh_results["text_model"]
    _, expert, tensor = TEXT_LAYOUT
    logits = np.load(run["logits_file"])
    diff, scale = float(np.abs(logits - reference["text_logits"]).max()), float(np.abs(reference["text_logits"]).max())
    assert within_tolerance(diff, scale), f"max |diff| {diff:.3g} at scale {scale:.3g}"
    assert_split(run["experts_gate_up"], 1, "expert", expert, 8, {2: tensor})
    assert_split(run["q_proj"], 2, "tensor", tensor, 8, {1: expert})


@pytest.mark.parametrize("scheme,layout", worker.QUANTIZED_CASES, ids=[scheme for scheme, _ in worker.QUANTIZED_CASES])
def test_quantized_model_on_mesh_is_the_single_device_one(mesh_results, reference, scheme, layout):
    """Quantized weights sharded like the float ones (values and their scales on the same
    devices, a scale axis of 1 whole): the single-device logits and greedy tokens, which differ
    from the float model's."""
    run, single = mesh_results["quantized"][scheme], reference["quantized"][scheme]
    logits = np.load(run["logits_file"])
    diff, scale = float(np.abs(logits - single["logits"]).max()), float(np.abs(single["logits"]).max())
    assert within_tolerance(diff, scale), f"max |diff| {diff:.3g} at scale {scale:.3g}"
    assert run["tokens"] == single["tokens"].tolist()
    assert float(np.abs(single["logits"] - reference["logits"]).max()) > 1e-3  # quantization is visible
    _, expert, tensor = layout
    assert_split(run["values"], 1, "expert", expert, 8, {2: tensor})
    groups_split = {2: tensor} if scheme == "int4" else {}  # int8: one scale per output column
    assert_split(run["scales"], 1, "expert", expert, 8, groups_split)


# ----------------------------------------------------------------------------- 8 devices: the MoE layer


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_name)
@pytest.mark.parametrize("backend", MOE_BACKENDS)
@pytest.mark.parametrize("routing", ["", " skewed"], ids=["routed", "skewed"])
def test_moe_layer_matches_single_device(mesh_results, backend, layout, routing):
    run = mesh_results["moe"][f"{backend}{routing} {list(layout)}"]
    assert run["scale"] > 0.5, "outputs this small would make the tolerance meaningless"
    assert run["max_diff"] <= 1e-5 * max(1.0, run["scale"]), run
    assert run["shard_map"], "the routed experts should run under shard_map over the expert axis"
    assert not run["all_to_all"], "without dispatch, tokens stay where they are"
    assert_split(run["experts_gate_up"], 0, "expert", layout[1], 8, {1: layout[2]})


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_name)
@pytest.mark.parametrize("backend", MOE_BACKENDS)
@pytest.mark.parametrize("routing", ["", " skewed"], ids=["routed", "skewed"])
def test_moe_token_dispatch_matches_single_device(mesh_results, backend, layout, routing):
    """Prefill's dispatch (tokens sent to their experts' shards, in rounds when one shard gets more
    than a round holds: the skewed router) gives the single-device output; it applies on every
    layout without a `tensor` split."""
    run = mesh_results["moe"][f"dispatch {backend}{routing} {list(layout)}"]
    assert run["scale"] > 0.5
    assert run["max_diff"] <= 1e-5 * max(1.0, run["scale"]), run
    assert run["can_dispatch"] == (layout[2] == 1)
    assert run["all_to_all"] == run["can_dispatch"]


@pytest.mark.parametrize("case", range(len(worker.TAKE_ROWS_CASES)))
def test_rows_of_a_table_split_over_the_mesh(mesh_results, case):
    """A decode step's embeddings from a vocabulary split over tensor x expert: each shard looks
    up the ids in its rows and the rows are summed over the shards (in float32, so a bfloat16 row
    comes back exact); more ids than a shard holds rows take the compiler's lookup."""
    ((_, expert, tensor), ids), result = worker.TAKE_ROWS_CASES[case], mesh_results["take_rows"][case]
    table = np.arange(256 * 4, dtype=np.float32).reshape(256, 4)
    np.testing.assert_array_equal(np.asarray(result["rows"]), table.astype(jax.numpy.bfloat16).astype(np.float32)[ids])
    assert result["dtype"] == "bfloat16"
    assert result["by_shard"] == (np.size(ids) < 256 // (expert * tensor))


@pytest.mark.parametrize(
    "case,layer_copies,kernels", [("1x32", 0, []), ("8x32", 0, ["stacked_grouped_matmul_gpu"] * 2), ("8x24", 1, [])]
)
def test_gpu_decode_reads_its_experts_in_the_stack(mesh_results, case, layer_copies, kernels):
    """By the GPU's rules (run on XLA:CPU), a decode layer's MoE gathers the experts of one
    token's 2 pairs from the stack over layers, no copy of the layer's experts; 8 tokens' 16
    pairs (more than a shard's 4 experts) go through the Triton grouped matmul, which reads them
    in the stack too, for its gated up-projection and its down-projection; where its tiles do not
    divide the experts, they take one shard's slice of the layer. Those without the kernel give
    the single-device layer's output here (the kernel's backend is held to it in test_moe)."""
    result = mesh_results["gpu_decode_experts"][case]
    assert result["layer_copies"] == layer_copies
    assert result["kernels"] == kernels
    if not kernels:
        assert within_tolerance(result["max_diff"], result["scale"]), result


# ----------------------------------------------------------------------------- 8 devices: a cache split over positions


def position_axes(layout):
    """The axes a tiny cache splits its positions over, as its spec names them: those that neither
    its rows (4 or 2 of them, splitting over data x expert only when that divides) nor its 2 heads
    (over tensor) use."""
    axes = [name for name, size in zip(("data", "expert"), layout[:2]) if size > 1]
    return axes[0] if len(axes) == 1 else axes


@pytest.mark.parametrize("case", range(len(SPLIT_ATTENTION_CASES)))
def test_attention_over_a_split_cache_is_the_dense_one(mesh_results, case):
    run = mesh_results["split_cache"]["attention"][case]
    layout = tuple(SPLIT_ATTENTION_CASES[case][0])
    assert run["case"][0] == list(layout)
    assert run["max_diff"] <= 1e-5, run
    assert run["kernel_max_diff"] <= 1e-5, run  # each shard's statistics from the decode kernel
    assert run["cache_diff"] == 0.0, "the new keys and values are written exactly where they belong"
    assert run["cache_spec"][2] == position_axes(layout), run["cache_spec"]


@pytest.mark.parametrize("case", range(len(SPLIT_ATTENTION_CASES)))
def test_attention_over_a_split_int8_cache_is_the_dense_one(mesh_results, case):
    """The same cases over an int8 cache: each shard writes its new positions rounded, with their
    scales (split like the keys), and attends what its cache holds, in dense, blockwise or the
    decode kernel."""
    run = mesh_results["split_cache"]["attention"][case]
    assert run["int8_cache_names"] == ["k", "k_scale", "v", "v_scale"]
    assert run["int8_cache_equal"], "the rounded keys, values and scales are written where they belong"
    assert run["int8_scale_spec"] == run["cache_spec"][:3]
    assert run["int8_max_diff"] <= 1e-5, run
    assert run["int8_kernel_max_diff"] <= 1e-5, run


@pytest.mark.parametrize("layout", INT8_CACHE_LAYOUTS, ids=layout_name)
def test_int8_cache_generation_matches_single_device(mesh_results, reference, layout):
    """Greedy generation with kv_cache_dtype="int8" on 8 devices, the cache's positions whole (the
    generic cached attention) or split over the mesh, gives the one-CPU device's tokens (whose
    decode attends beside the cache)."""
    run = mesh_results["int8_cache"][layout_name(layout)]
    positions = run["cache_spec"][2]
    assert positions == (None if layout == (2, 2, 2) else "expert"), run["cache_spec"]
    np.testing.assert_array_equal(np.array(run["tokens"]), reference["int8_tokens"])


def engine_positions(layout, num_slots: int):
    """The mesh axes an engine's slots split their cache positions over (`kv_cache.cache_layout`):
    decode then attends with `context_parallel`, else the generic cached attention."""
    text = config_from_pretrained(TINY_RANDOM).text_config
    shape = (num_slots, text.num_key_value_heads, ENGINE_MAX_LENGTH, text.head_dim)
    return cache_layout(shape, abstract_mesh(*layout))[2]


def test_engine_requests_reuse_slots_and_one_stops_early(reference):
    """What the engine runs below exercises: more requests than slots, an image, and an answer
    that ends on a stop id before its max_new_tokens (its slot is freed early)."""
    assert all(len(ENGINE_REQUESTS) > num_slots for _, num_slots in ENGINE_CASES)
    assert HOST_ENGINE_REQUESTS > HOST_ENGINE_SLOTS
    assert any(image is not None for _, image, _, _ in ENGINE_REQUESTS[:HOST_ENGINE_REQUESTS])
    lengths = [
        (len(answer), max_new_tokens)
        for answer, (_, _, max_new_tokens, _) in zip(reference["answers"], ENGINE_REQUESTS)
    ]
    assert any(length < max_new_tokens for length, max_new_tokens in lengths[:HOST_ENGINE_REQUESTS]), lengths


@pytest.mark.parametrize("layout,num_slots", ENGINE_CASES, ids=[layout_name(layout) for layout, _ in ENGINE_CASES])
def test_engine_answers_are_generate_alone(mesh_results, reference, layout, num_slots):
    """Continuous batching on 8 devices, its slots' cache positions split over the mesh (each
    row writing its own index in `context_parallel`) or whole (rows over data x expert, heads
    over tensor): every request gets the tokens that generate gives it alone on one device."""
    assert engine_positions(layout, num_slots) == ("expert" if layout == (1, 8, 1) else None)
    assert mesh_results["engine"][layout_name(layout)] == reference["answers"]


def test_decode_kernel_on_rows_and_heads_split_over_the_mesh(mesh_results):
    run = mesh_results["split_cache"]["decode_kernel_by_rows_and_heads"]
    assert run["max_diff"] <= 1e-5, run
    assert run["spec"][0] == "expert" and run["spec"][2] == "tensor", run["spec"]


@pytest.mark.parametrize("layout", SPLIT_CACHE_LAYOUTS, ids=layout_name)
def test_chunked_prefill_into_a_split_cache_is_one_shot_prefill(mesh_results, layout):
    """A prompt prefilled in chunks that straddle the shards' positions, on the mesh, against one
    chunk without a mesh: the same first token and cache. (Generation on these layouts, its cache
    split alike, is held to the single-device tokens by test_greedy_tokens_match_single_device.)"""
    run = mesh_results["split_cache"]["layouts"][layout_name(layout)]
    assert run["prefill_cache_spec"][2] == position_axes(layout), run["prefill_cache_spec"]
    assert run["prefill_tokens_equal"]
    assert run["prefill_cache_diff"] <= 1e-5, run


# ----------------------------------------------------------------------------- layout errors

TWENTY_HEADS = AriaTextConfig(
    vocab_size=640,
    hidden_size=320,
    intermediate_size=40,
    num_hidden_layers=1,
    num_attention_heads=20,
    num_key_value_heads=20,
    moe_num_experts=8,
    moe_topk=2,
    moe_num_shared_experts=1,
)


def test_heads_that_do_not_divide_over_tensor():
    with pytest.raises(LayoutError) as error:
        check_layout(TWENTY_HEADS, abstract_mesh(1, 1, 8))
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "num_attention_heads=20" in message and "tensor=8" in message, message
    suggested = re.search(r"tensor sizes that fit this model: ([\d, ]+)", message)
    assert suggested and [int(n) for n in suggested.group(1).split(",")] == [1, 2, 4], message
    # The example layout it gives fits.
    example = re.search(r"expert=(\d+), tensor=(\d+)", message)
    assert example, message
    expert, tensor = map(int, example.groups())
    assert expert * tensor == 8
    check_layout(TWENTY_HEADS, abstract_mesh(1, expert, tensor))


def test_experts_that_do_not_divide_over_expert():
    with pytest.raises(LayoutError) as error:
        check_layout(TWENTY_HEADS, abstract_mesh(2, 3, 1))
    message = str(error.value)
    assert "moe_num_experts=8" in message and "expert=3" in message, message
    suggested = re.search(r"expert sizes that fit 6 devices: ([\d, ]+)", message)
    assert suggested and [int(n) for n in suggested.group(1).split(",")] == [1, 2], message


def test_check_layout_on_tiny_random():
    config = config_from_pretrained(TINY_RANDOM)
    for layout in LAYOUTS:
        check_layout(config, abstract_mesh(*layout))
    check_layout(config.text_config, abstract_mesh(1, 8, 1))
    with pytest.raises(LayoutError, match=r"num_key_value_heads=2 does not divide over tensor=4"):
        check_layout(config, abstract_mesh(1, 2, 4))
    with pytest.raises(LayoutError, match=r"moe_num_experts=8"):
        check_layout(config.text_config, abstract_mesh(1, 16, 1))


def test_make_mesh_in_this_process():
    """One device here: a mesh of one, and sizes that ask for more devices are refused."""
    mesh = aria_jax.make_mesh()
    assert mesh.axis_names == ("data", "expert", "tensor") and tuple(mesh.axis_sizes) == (1, 1, 1)
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    with pytest.raises(LayoutError, match=r"there are 1\b"):
        aria_jax.make_mesh(expert=3)
    for bad in ({"data": 0}, {"tensor": -1}, {"expert": 1.0}):
        with pytest.raises(LayoutError, match="positive integer"):
            aria_jax.make_mesh(**bad)


def test_layout_errors_on_8_devices(mesh_results):
    errors = mesh_results["errors"]
    for name, error in errors.items():
        assert error["type"] == "LayoutError", (name, error)
    assert "= 3 devices" in errors["make_mesh expert=3"]["message"]
    assert "there are 8" in errors["make_mesh expert=3"]["message"]
    assert "there are 8" in errors["make_mesh 2x2x1"]["message"]
    for name in ("from_pretrained tensor=4", "text from_pretrained tensor=4"):
        assert "num_key_value_heads=2 does not divide over tensor=4" in errors[name]["message"], errors[name]


# ----------------------------------------------------------------------------- two processes

HOST_LAYOUTS = [layout for layout, _ in HOST_CASES]


def check_hosts(host_results, layout) -> list[dict]:
    for process_id, result in enumerate(host_results):
        assert (result["process_index"], result["process_count"]) == (process_id, 2)
        assert (result["device_count"], result["local_device_count"]) == (4, 2)
    return [result["layouts"][layout_name(layout)] for result in host_results]


@pytest.mark.parametrize("layout", HOST_LAYOUTS, ids=layout_name)
def test_two_processes_generate_the_single_process_tokens(host_results, reference, layout):
    """Two processes on 127.0.0.1 (gloo), 2 CPU devices each, one mesh over all four: every
    process reads the same tokens, those of this process on one device."""
    runs = check_hosts(host_results, layout)
    expected = reference["rows"][runs[0]["rows"]]["tokens"]
    for process_id, run in enumerate(runs):
        assert "generate_error" not in run, f"host {process_id}: {run['generate_error']}"
        assert run["tokens_type"] == "ndarray"
        np.testing.assert_array_equal(np.array(run["tokens"]), expected)
    assert runs[0]["tokens"] == runs[1]["tokens"]


@pytest.mark.parametrize("layout", HOST_LAYOUTS, ids=layout_name)
def test_two_processes_logits_and_expert_shards(host_results, reference, layout):
    """The logits (gathered from both hosts) are the single-device ones; each process holds
    only its devices' experts: with expert=4 over two hosts, a different half each."""
    runs = check_hosts(host_results, layout)
    expected = reference["rows"][runs[0]["rows"]]["logits"]
    for run in runs:
        logits = np.load(run["logits_file"])
        assert logits.shape == expected.shape
        diff, scale = float(np.abs(logits - expected).max()), float(np.abs(expected).max())
        assert within_tolerance(diff, scale), f"max |diff| {diff:.3g} at scale {scale:.3g}"
    _, expert, _ = layout
    held = []
    for run in runs:
        gate_up = run["experts_gate_up"]
        assert len(gate_up["shards"]) == 2
        for shard in gate_up["shards"]:
            assert shard["shape"][1] == NUM_EXPERTS // expert
        held.append({tuple(shard["index"][1]) for shard in gate_up["shards"]})
    if expert == 4:
        assert not held[0] & held[1], held
        assert sorted(held[0] | held[1]) == [(2 * i, 2 * i + 2) for i in range(4)]


def test_two_processes_run_the_engine(host_results, reference):
    """Process 0 leads an Engine, broadcasting every round; process 1 runs them and returns from
    follow() when the stop round arrives. The slots' cache splits its positions over both hosts:
    process 0's answers are those of generate alone."""
    leader, follower = check_hosts(host_results, HOST_ENGINE_LAYOUT)
    assert engine_positions(HOST_ENGINE_LAYOUT, HOST_ENGINE_SLOTS) == "expert"
    assert "engine_error" not in leader, leader["engine_error"]
    assert leader["engine_answers"] == reference["answers"][:HOST_ENGINE_REQUESTS]
    assert follower["followed"]
