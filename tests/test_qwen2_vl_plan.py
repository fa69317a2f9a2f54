"""`aria-jax plan` for Qwen2-VL and Awaker2.5-VL: the shipped configs, the host-CPU plan and a real
TPU compile (`--target v5e:2x2`) of 1-layer full-width models, and the dense decoder's roofline."""

from __future__ import annotations

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import pytest

from aria_jax.families import config_from_directory, param_layout
from aria_jax.qwen2_vl.config import AwakerConfig, Qwen2VLConfig
from aria_jax.roofline import decode_step_bytes
from repo_paths import ROOT
from test_plan import figure
from cli_helpers import run_plan
from test_plan_target import needs_libtpu

CONFIGS = {"qwen2_vl": "qwen2-vl-7b.json", "awaker": "awaker2.5-vl.json"}
# 4 rows: a router input (B, D), whole or split over data=2 or tensor=2, is then told apart from a
# 1-layer model's stacked (1, D) norm scales.
BATCH, PROMPT, CACHE = 4, 16, 64


def config_path(family: str) -> str:
    return os.path.join(ROOT, "configs", CONFIGS[family])


def param_count(config, predicate=lambda path: True) -> int:
    leaves = jax.tree_util.tree_leaves_with_path(param_layout(config)[1], is_leaf=lambda x: hasattr(x, "names"))
    return sum(
        math.prod(leaf.value.shape)
        for path, leaf in leaves
        if predicate("/".join(str(getattr(key, "key", key)) for key in path))
    )


def one_layer_config(directory, family: str) -> str:
    """The family's shipped config at full width with 1 decoder and 1 vision layer."""
    with open(config_path(family)) as f:
        config = json.load(f)
    config["num_hidden_layers"] = 1
    config["vision_config"]["depth"] = 1
    path = os.path.join(directory, f"{family}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def test_shipped_configs_load_with_the_7b_sizes():
    qwen2_vl, awaker = (config_from_directory(config_path(family)) for family in CONFIGS)
    assert type(qwen2_vl) is Qwen2VLConfig and isinstance(awaker, AwakerConfig)
    text = qwen2_vl.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        3584,
        28,
        28,
        4,
    )
    assert text.mrope_section == (16, 24, 24) and text.rope_theta == 1e6 and not text.tie_word_embeddings
    assert awaker.text_config.lora_rank == 256 and awaker.text_config.lora_scale == 2.0
    assert (awaker.im_start_token_id, awaker.im_end_token_id) == (151644, 151645)
    assert round(param_count(qwen2_vl) / 1e9, 2) == 8.29
    # Awaker's adapters: ~99.6M per layer on top of Qwen2-VL-7B.
    adapters = param_count(awaker) - param_count(qwen2_vl)
    assert adapters == param_count(awaker, lambda path: re.search(r"_(lora|experts|router)_", path) is not None)
    assert 99.5e6 < adapters / 28 < 99.7e6


def test_dense_decode_roofline_reads_every_weight_and_the_chosen_adapters():
    qwen2_vl, awaker = (config_from_directory(config_path(family)) for family in CONFIGS)
    text = qwen2_vl.text_config
    parts = decode_step_bytes(qwen2_vl, jnp.bfloat16, 1, 2048)
    assert set(parts) == {"weights", "embedding rows", "KV cache"}
    embedding = text.vocab_size * text.hidden_size
    assert parts["weights"] == 2 * (param_count(qwen2_vl, lambda path: path.startswith("language_model/")) - embedding)
    assert parts["KV cache"] == 2 * 28 * 2048 * 4 * 128 * 2
    # Awaker: of each projection's 5 adapters, the one the row chose and "g" (batch 1); all 5 at batch 32.
    adapter_bytes = 2 * param_count(awaker, lambda path: re.search(r"_experts_[ab]$", path) is not None)
    one, many = (decode_step_bytes(awaker, jnp.bfloat16, batch, 2048) for batch in (1, 32))
    assert one["LoRA experts"] == adapter_bytes * 2 // 5 and many["LoRA experts"] == adapter_bytes
    assert one["weights"] > parts["weights"]  # q/k/v LoRA and routers, always read


def test_host_plan_of_a_one_layer_full_width_qwen2_vl(tmp_path):
    result = run_plan(
        "--config",
        one_layer_config(tmp_path, "qwen2_vl"),
        "--batch",
        str(BATCH),
        "--prompt-length",
        str(PROMPT),
        "--max-length",
        str(CACHE),
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "mesh data=2, expert=1, tensor=4" in out  # the dense default
    # KV cache: (layers, batch, length, kv heads, head dim) for k and v; 4 kv heads over tensor=4, rows over data=2.
    assert figure(out, "KV cache") == pytest.approx(2 * 1 * BATCH * CACHE * 4 * 128 * 2 / 8 / 1e9, abs=0.01)
    for step in ("prefill", "decode"):
        line = next(line for line in out.splitlines() if line.strip().startswith(step))
        assert 0 < figure(line, "arguments") <= figure(line, "peak")


def test_plan_reports_heads_that_do_not_divide_over_tensor():
    result = run_plan("--config", os.path.join("configs", CONFIGS["qwen2_vl"]), "--mesh", "tensor=8")
    assert result.returncode == 2
    assert "num_attention_heads=28 does not divide over tensor=8" in result.stderr
    assert "for example data=2, tensor=4" in result.stderr and "Traceback" not in result.stderr


def test_moe_backend_is_refused_for_a_dense_model():
    result = run_plan("--config", os.path.join("configs", CONFIGS["awaker"]), "--moe-backend", "looped")
    assert result.returncode == 2 and "dense model" in result.stderr


@needs_libtpu
@pytest.mark.parametrize("family", ["awaker"])  # Qwen2-VL's programs and Awaker's router inputs: one compile
def test_one_layer_full_width_model_on_v5e_2x2(tmp_path, family):
    result = run_plan(
        "--target",
        "v5e:2x2",
        "--config",
        one_layer_config(tmp_path, family),
        "--mesh",
        "data=2,tensor=2",
        "--batch",
        str(BATCH),
        "--prompt-length",
        str(PROMPT),
        "--max-length",
        str(CACHE),
        "--json",
        str(tmp_path / "plan.json"),
        "--dump-hlo",
        str(tmp_path / "hlo"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert "target v5e:2x2: 4 x TPU v5e" in out and "mesh data=2, expert=1, tensor=2" in out
    assert "moe_backend" not in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    config = config_from_directory(one_layer_config(tmp_path, family))
    assert plan["params_in_all"] == 2 * param_count(config)
    assert plan["moe_backend"] is None
    assert [p["name"] for p in plan["programs"]] == ["prefill", "decode"]
    for program in plan["programs"]:
        assert program["compiled"] and program["fits"] and program["refusal"] is None
        assert program["estimate"]["seconds"] > 0 and program["ratio"] > 0
    prefill, decode = plan["programs"]
    expected = {"weights", "embedding rows", "KV cache"} | ({"LoRA experts"} if family == "awaker" else set())
    assert set(decode["roofline"]["bytes"]) == expected
    assert decode["aliased"] > 0  # the cache, updated in place
    # Prefill takes M-RoPE's (B, T, 3) positions; Awaker's also its two (B, D) router inputs.
    prefill_hlo = (tmp_path / "hlo" / "prefill.txt").read_text()
    entry = prefill_hlo[prefill_hlo.index("ENTRY") :].split("\n\n")[0]
    assert re.search(rf"s32\[{BATCH},{PROMPT},3\]", entry)
    router_inputs = len(re.findall(rf"= bf16\[({BATCH}|{BATCH // 2}),(3584|1792)\]\S* parameter\(", entry))
    assert router_inputs == (2 if family == "awaker" else 0)
