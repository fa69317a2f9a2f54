"""`aria-jax plan`: per-device memory of full-width models, compiled without weights."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from aria_jax.config import config_from_pretrained
from aria_jax.modeling import multimodal_param_shapes
from cli_helpers import run_plan, two_layer_config


def figure(output: str, label: str) -> float:
    return float(re.search(rf"{label} +([\d.]+) GB", output).group(1))


def test_full_width_plan_on_8_simulated_devices(tmp_path):
    """Full Aria's widths with 2 layers (notebook 02 plans all 28 of them)."""
    config_file = two_layer_config(tmp_path)
    result = run_plan(
        "--config", config_file, "--mesh", "expert=8", "--dtype", "bfloat16", "--batch", "8", "--max-length", "1024"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "mesh data=1, expert=8, tensor=1" in out

    # Params per device: the routed experts, the shared experts' width, the vocabulary and the
    # decoder attention's model dimension split 8 ways, everything else whole.
    config = config_from_pretrained(config_file)
    shapes = jax.tree_util.tree_leaves_with_path(
        multimodal_param_shapes(config, jnp.bfloat16), is_leaf=lambda x: hasattr(x, "names")
    )
    split_over_expert = {"experts", "shared_mlp", "vocab", "attention_embed"}
    expected = sum(math.prod(p.value.shape) * 2 // (8 if split_over_expert & set(p.names) else 1) for _, p in shapes)
    assert abs(figure(out, "params") - expected / 1e9) < 0.01

    # KV cache: (layers, batch, length, kv heads, head dim) for k and v, rows split over the 8 devices.
    text = config.text_config
    cache = 2 * text.num_hidden_layers * 8 * 1024 * text.num_key_value_heads * text.head_dim * 2 / 8
    assert abs(figure(out, "KV cache") - cache / 1e9) < 0.01

    for step in ("prefill", "decode"):
        line = next(line for line in out.splitlines() if line.strip().startswith(step))
        peak = figure(line, "peak")
        assert figure(line, "arguments") <= peak
        assert 0 < figure(line, "temporaries") < figure(line, r"as compiled here")
    assert re.search(r"fits: v5e \(16 GB\) (yes|no), v6e \(32 GB\) (yes|no), H100 \(80 GB\) yes", out)


def test_plan_reports_a_mesh_that_does_not_fit_the_model():
    result = run_plan("--config", "configs/aria.json", "--mesh", "tensor=8")
    assert result.returncode == 2
    assert "num_attention_heads=20 does not divide over tensor=8" in result.stderr
    assert "Traceback" not in result.stderr


def test_plan_rejects_a_malformed_mesh():
    result = run_plan("--mesh", "experts=8")
    assert result.returncode == 2
    assert "--mesh 'experts=8'" in result.stderr and "Traceback" not in result.stderr
