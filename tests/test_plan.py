"""`aria-jax plan`: per-device memory of the full-size model, compiled without weights."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp

from aria_jax.config import config_from_pretrained
from aria_jax.modeling import multimodal_param_shapes
from repo_paths import ROOT


def run_plan(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "-m", "aria_jax.cli", "plan", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def figure(output: str, label: str) -> float:
    return float(re.search(rf"{label} +([\d.]+) GB", output).group(1))


def test_full_size_plan_on_8_simulated_devices():
    result = run_plan(
        "--config",
        "configs/aria.json",
        "--mesh",
        "expert=8",
        "--dtype",
        "bfloat16",
        "--batch",
        "8",
        "--max-length",
        "1024",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "mesh data=1, expert=8, tensor=1" in out

    # Params per device: the routed experts, the shared experts' width, the vocabulary and the
    # decoder attention's model dimension split 8 ways, everything else whole.
    config = config_from_pretrained(os.path.join(ROOT, "configs", "aria.json"))
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
