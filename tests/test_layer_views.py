"""`layer_views`: on one CPU device, each decoder layer's params over the stacks' own memory.

Generation on one CPU device reads them (`Generator.views`); its parity with transformers is held
in test_generate.py and the parity tests. Here: that the views are the stacks' memory (no
copy), that they hold what slicing the stacks gives, that generation with and without them
agrees, and that they follow the params they were made of."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

import aria_jax
from aria_jax.layer_views import layer_views
from aria_jax.modeling import STACKED_IN_DECODE, layer_params
from repo_paths import TINY_RANDOM
from worker_jobs import worker_env


@pytest.fixture(scope="module")
def model():
    return aria_jax.AriaForConditionalGeneration.from_pretrained(TINY_RANDOM, dtype="float32")


def test_views_are_the_stacks_memory_and_hold_each_layer(model):
    params, layers = model.text_params, model.text_config.num_hidden_layers
    views = layer_views(params, layers)
    assert len(views) == layers
    stack = params["layers"]["self_attn"]["q_proj"]
    layer_bytes = stack.nbytes // layers
    for index, view in enumerate(views):
        expected = layer_params(params, index)
        assert jax.tree.structure(view) == jax.tree.structure(expected)
        for got, want in zip(jax.tree.leaves(view), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        q_proj = view["self_attn"]["q_proj"]
        assert q_proj.unsafe_buffer_pointer() == stack.unsafe_buffer_pointer() + index * layer_bytes
        # the routed experts stay the stacks themselves: the MoE reads a layer's experts in them
        for name in STACKED_IN_DECODE:
            assert view["mlp"][name] is params["layers"]["mlp"][name]


def test_generation_with_views_equals_generation_without(model, monkeypatch):
    ids = np.array([[5, 6, 7, 8, 10, 11, 12]])  # no image token (9)
    with_views = model.generate(ids, max_new_tokens=12, stop_strings=None)
    assert model.generator.views(model.text_params) is not None
    monkeypatch.setattr(type(model.generator), "views", lambda self, params: None)
    without = model.generate(ids, max_new_tokens=12, stop_strings=None)
    np.testing.assert_array_equal(with_views, without)


def test_views_follow_the_params(model):
    generator, params = model.generator, model.text_params
    first = generator.views(params)
    assert generator.views(params) is first  # made once per params
    replaced = jax.tree.map(lambda leaf: leaf + 0, params)
    views = generator.views(replaced)
    assert views is not first
    q_proj = replaced["layers"]["self_attn"]["q_proj"]
    assert views[0]["self_attn"]["q_proj"].unsafe_buffer_pointer() == q_proj.unsafe_buffer_pointer()


def test_no_views_for_abstract_params(model):
    assert layer_views(jax.eval_shape(lambda: model.text_params), model.text_config.num_hidden_layers) is None


# Two fake devices need a process of their own: JAX reads the device count when it starts.
SPREAD_OVER_TWO_DEVICES = """
import jax, numpy as np
from aria_jax.config import AriaTextConfig
from aria_jax.layer_views import layer_views
from aria_jax.modeling import init_text_params
config = AriaTextConfig(vocab_size=64, hidden_size=16, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
    intermediate_size=8, num_hidden_layers=2, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1)
params = init_text_params(config, jax.random.key(0), np.float32)
assert layer_views(params, 2) is not None
mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
spread = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
print("views over two devices:", layer_views(spread, 2))
"""


def test_no_views_for_params_on_several_devices():
    done = subprocess.run(
        [sys.executable, "-c", SPREAD_OVER_TWO_DEVICES], env=worker_env(2), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "views over two devices: None" in done.stdout
