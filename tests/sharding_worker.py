"""Multi-device runs for test_sharding.py, in their own processes: XLA_FLAGS (the number of fake
CPU devices) must be set before JAX starts, and the pytest process has one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python tests/sharding_worker.py mesh OUT_DIR PART...      # errors moe text split_cache 1x8x1 ...
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python tests/sharding_worker.py host PROCESS_ID PORT OUT_DIR   # one of two processes

Each run prints one line `RESULT <json>` on stdout (last line), and saves logits as .npy files in
OUT_DIR; the test compares them with its own single-device run.
`build_inputs` is imported by the test too, so that both sides feed the same batch.
"""

from __future__ import annotations

import json
import os
import sys
from repo_paths import ROOT, SHAPES_PNG, TINY_RANDOM


# (data, expert, tensor) layouts of 8 devices; tiny-random has 8 experts, 4 heads, 2 kv heads.
LAYOUTS = [(1, 8, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2)]
# Two processes x 2 devices, (layout, rows of the batch): experts over both hosts with every row
# on every device (2 rows do not divide over expert=4), then 4 rows split across the hosts.
HOST_CASES = [((1, 4, 1), 2), ((2, 1, 2), 4)]
TEXT_LAYOUT = (1, 4, 2)
# Quantized weights (`from_pretrained(quantize=...)`, int4 in groups of 32: two per model
# dimension of 64) on a layout each: experts over 8, and experts x tensor.
QUANTIZED_CASES = [("int8", (1, 8, 1)), ("int4", (1, 4, 2))]
QUANTIZED_GROUP = 32
# Generation with an int8 KV cache: 4 rows over data x expert and 2 kv heads over tensor leave no
# axis for the positions (the generic cached attention); on expert=8 the positions split.
INT8_CACHE_LAYOUTS = [(2, 2, 2), (1, 8, 1)]
MOE_BACKENDS = ["ragged_dot", "looped", "gathered", "dense", "auto"]
NEW_TOKENS = 8
QUESTIONS = [
    "What is this?",
    "Which shapes are red, and how many of them are there in total?",
    "Describe it.",
    "Count the circles in the picture, please.",
]
# Continuous batching (`aria_jax.engine`), greedy, with more requests than slots so that freed
# slots take new ones: (layout, slots). On expert=8, 2 slots leave the cache's positions split
# over the mesh (each row's write in `context_parallel`); on 2x2x2, 4 slots split over data x
# expert and the heads over tensor, positions whole (`kv_cache.written`).
ENGINE_CASES = [((1, 8, 1), 2), ((2, 2, 2), 4)]
# (question, image: an index into shape_images() or None, max_new_tokens, stop_strings): prompts
# of 39 to 43 tokens, all in one bucket (64: one prefill to compile). "/" is one token, the second
# that tiny-random answers the second question with: that request stops early on a stop id and
# frees its slot.
ENGINE_REQUESTS = [
    ("What is this?", 0, 6, None),
    ("Hi, what can you see in this picture today?", None, 8, "/"),
    ("How many triangles are there on the page?", None, 3, None),
    ("Describe it.", 2, 4, None),
    ("Tell me about the blue square and the red circle.", None, 5, None),
]
ENGINE_MAX_LENGTH = 72  # the prompts' bucket + the most new tokens
ENGINE_DECODE_STEPS = 4
# The two-process engine: process 0 leads and process 1 follows, with the first requests, on a
# HOST_CASES layout where the 2 slots split their cache positions over expert=4, across both hosts.
HOST_ENGINE_LAYOUT, HOST_ENGINE_SLOTS, HOST_ENGINE_REQUESTS = (1, 4, 1), 2, 3


def shape_images():
    """shapes.png, flipped, rotated and grey: four images that differ."""
    from PIL import Image

    image = Image.open(SHAPES_PNG).convert("RGB")
    return [
        image,
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        image.rotate(90),
        image.convert("L").convert("RGB"),
    ]


def build_inputs(processor, num_rows: int = 4):
    """Four different prompts, each with its own image (shapes.png flipped, rotated, grey) and
    question, so every row differs and the batch is left-padded (or the first `num_rows`). Four
    rows, not two: with two, no 8-device layout above splits the rows (data x expert never
    divides 2), and the batch sharding of activations and KV cache would go untested."""
    images = shape_images()
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in QUESTIONS
    ]
    return processor(text=prompts[:num_rows], images=images[:num_rows])


def engine_requests(processor, count: int = len(ENGINE_REQUESTS)) -> list[dict]:
    """ENGINE_REQUESTS (the first `count`) as keyword arguments of both `Engine.submit` and
    `generate`: input_ids (1, T), an image's pixel_values and pixel_mask, max_new_tokens,
    stop_strings."""
    images = shape_images()
    requests = []
    for question, image, max_new_tokens, stop_strings in ENGINE_REQUESTS[:count]:
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(text=[prompt], images=None if image is None else [images[image]])
        request = {"input_ids": inputs["input_ids"], "max_new_tokens": max_new_tokens, "stop_strings": stop_strings}
        if image is not None:
            request.update(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
        requests.append(request)
    return requests


def make_engine(model, num_slots: int):
    from aria_jax.engine import Engine

    return Engine(model, max_batch=num_slots, max_length=ENGINE_MAX_LENGTH, decode_steps=ENGINE_DECODE_STEPS)


def engine_answers(model, requests: list[dict], num_slots: int) -> list[list[int]]:
    """Every request's generated ids (through its stop id) from an Engine of `num_slots` slots
    on `model`, greedy. On several processes, call it on process 0 while the others follow: its
    thread broadcasts the rounds, and a stop round when it ends."""
    engine = make_engine(model, num_slots)
    # All queued before the thread starts: the same rounds on every run.
    handles = [engine.submit(**request) for request in requests]
    with engine:
        return [handle.result().tokens.tolist() for handle in handles]


def text_ids(num_rows: int = 2):
    """Left-padded token ids (and mask) for the text-only model."""
    import numpy as np

    ids = np.array([[2, 2, 2, 1, 40, 41, 42, 43, 44], [1, 100, 7, 300, 21, 22, 23, 24, 25]][:num_rows], np.int32)
    mask = (np.arange(ids.shape[1]) >= np.array([[3], [0]])[:num_rows]).astype(np.int32)
    return ids, mask


def describe(array) -> dict:
    """An array's sharding, as JSON: spec, global shape, and every addressable shard."""
    spec = [list(s) if isinstance(s, tuple) else s for s in array.sharding.spec]
    shards = [
        {
            "device": shard.device.id,
            "shape": list(shard.data.shape),
            "index": [
                [sl.start or 0, size if sl.stop is None else sl.stop] for sl, size in zip(shard.index, array.shape)
            ],
        }
        for shard in array.addressable_shards
    ]
    return {"spec": spec, "shape": list(array.shape), "shards": shards}


def error_of(fn) -> dict:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported to the test, which checks the type
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": None, "message": ""}


def layout_name(layout) -> str:
    return "x".join(map(str, layout))


def run_model_layout(results: dict, layout, out_dir: str) -> None:
    """The multimodal model on one layout: greedy tokens, logits (saved to out_dir, compared by
    the test with its own single-device run) and where the params live."""
    import numpy as np

    import aria_jax

    inputs = build_inputs(aria_jax.AriaProcessor.from_pretrained(TINY_RANDOM))
    mesh = aria_jax.make_mesh(*layout)
    model = aria_jax.AriaForConditionalGeneration.from_pretrained(TINY_RANDOM, mesh=mesh)
    layers = model.params["language_model"]["layers"]
    tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, stop_strings=None)
    logits = model(**inputs).logits
    logits_file = os.path.join(out_dir, f"logits_{layout_name(layout)}.npy")
    np.save(logits_file, np.asarray(logits))
    results.setdefault("layouts", {})[layout_name(layout)] = {
        "mesh": {"names": list(mesh.axis_names), "sizes": list(mesh.axis_sizes), "devices": int(mesh.devices.size)},
        "tokens": np.asarray(tokens).tolist(),
        "tokens_type": type(tokens).__name__,
        "logits_file": logits_file,
        "logits_spec": describe(logits)["spec"],
        "params": {
            "experts_gate_up": describe(layers["mlp"]["experts_gate_up"]),
            "experts_down": describe(layers["mlp"]["experts_down"]),
            "shared_gate": describe(layers["mlp"]["shared_gate"]),
            "q_proj": describe(layers["self_attn"]["q_proj"]),
            "lm_head": describe(model.params["language_model"]["lm_head"]),
        },
    }


def run_int8_cache(results: dict) -> None:
    """The multimodal model generating with kv_cache_dtype="int8" on INT8_CACHE_LAYOUTS: its
    tokens, and where its cache's positions live (`kv_cache.cache_layout`, which picks the path)."""
    import numpy as np

    import aria_jax
    from aria_jax.buckets import bucket_length
    from aria_jax.kv_cache import cache_layout

    inputs = build_inputs(aria_jax.AriaProcessor.from_pretrained(TINY_RANDOM))
    results["int8_cache"] = {}
    for layout in INT8_CACHE_LAYOUTS:
        mesh = aria_jax.make_mesh(*layout)
        model = aria_jax.AriaForConditionalGeneration.from_pretrained(TINY_RANDOM, mesh=mesh)
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, stop_strings=None, kv_cache_dtype="int8")
        text = model.text_config
        cache_shape = (
            len(tokens),
            text.num_key_value_heads,
            bucket_length(bucket_length(inputs["input_ids"].shape[1]) + NEW_TOKENS),
            text.head_dim,
        )
        results["int8_cache"][layout_name(layout)] = {
            "tokens": np.asarray(tokens).tolist(),
            "cache_spec": [list(s) if isinstance(s, tuple) else s for s in cache_layout(cache_shape, mesh)],
        }


def run_engine(results: dict) -> None:
    """ENGINE_REQUESTS through an Engine on each of ENGINE_CASES: every request's answer."""
    import aria_jax

    requests = engine_requests(aria_jax.AriaProcessor.from_pretrained(TINY_RANDOM))
    results["engine"] = {}
    for layout, num_slots in ENGINE_CASES:
        model = aria_jax.AriaForConditionalGeneration.from_pretrained(TINY_RANDOM, mesh=aria_jax.make_mesh(*layout))
        results["engine"][layout_name(layout)] = engine_answers(model, requests, num_slots)


def run_text_model(results: dict, out_dir: str) -> None:
    """The text-only model on (1, 4, 2): its params placed, its logits."""
    import numpy as np

    import aria_jax

    ids, mask = text_ids()
    model = aria_jax.AriaTextForCausalLM.from_pretrained(TINY_RANDOM, mesh=aria_jax.make_mesh(*TEXT_LAYOUT))
    logits_file = os.path.join(out_dir, "text_logits.npy")
    np.save(logits_file, np.asarray(model(ids, mask).logits))
    results["text_model"] = {
        "logits_file": logits_file,
        "experts_gate_up": describe(model.params["layers"]["mlp"]["experts_gate_up"]),
        "q_proj": describe(model.params["layers"]["self_attn"]["q_proj"]),
    }


def run_quantized(results: dict, out_dir: str) -> None:
    """The multimodal model with quantized weights (QUANTIZED_CASES): greedy tokens, logits, and
    where the quantized experts' values and scales live."""
    import numpy as np

    import aria_jax

    inputs = build_inputs(aria_jax.AriaProcessor.from_pretrained(TINY_RANDOM))
    for scheme, layout in QUANTIZED_CASES:
        model = aria_jax.AriaForConditionalGeneration.from_pretrained(
            TINY_RANDOM, mesh=aria_jax.make_mesh(*layout), quantize=scheme, group_size=QUANTIZED_GROUP
        )
        logits_file = os.path.join(out_dir, f"quantized_logits_{scheme}.npy")
        np.save(logits_file, np.asarray(model(**inputs).logits))
        experts = model.params["language_model"]["layers"]["mlp"]["experts_gate_up"]
        results.setdefault("quantized", {})[scheme] = {
            "tokens": np.asarray(model.generate(**inputs, max_new_tokens=NEW_TOKENS, stop_strings=None)).tolist(),
            "logits_file": logits_file,
            "values": describe(experts["values"]),
            "scales": describe(experts["scales"]),
        }


def run_moe_layouts(results: dict) -> None:
    """The MoE layer alone, every backend and layout (one jit per layout runs all backends),
    inputs split over the rows as the decoder pins them; and the jaxpr holds the shard_map (the
    experts really run expert-parallel, not gathered whole by the compiler). Prefill's token
    dispatch too (`dispatch=True`), with routing as the router gives it and with a router that
    sends every token to experts 0 and 1: one shard then receives more pairs than a round holds."""
    import dataclasses
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import aria_jax
    from aria_jax.config import AriaTextConfig
    from aria_jax.moe import MoE, can_dispatch
    from aria_jax.sharding import param_sharding_for

    config = AriaTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        moe_num_experts=8,
        moe_topk=2,
        moe_num_shared_experts=1,
    )
    configs = [dataclasses.replace(config, moe_backend=backend) for backend in MOE_BACKENDS]
    modules = [MoE(c) for c in configs] + [MoE(c, dispatch=True) for c in configs]
    names = MOE_BACKENDS + [f"dispatch {backend}" for backend in MOE_BACKENDS]
    x = jax.random.normal(jax.random.key(1), (8, 3, 32), jnp.float32)
    boxed = jax.eval_shape(lambda: modules[0].init(jax.random.key(0), x))["params"]
    params = jax.tree.map(
        lambda p: p.value if hasattr(p, "value") else p,
        modules[0].init(jax.random.key(0), x)["params"],
        is_leaf=lambda p: hasattr(p, "value"),
    )
    # The init's 0.02 std gives outputs of ~1e-3; x10 brings them to ~1, so that the tolerance
    # means something. Router x8 more: routing far from ties, not flipped by a rounding.
    params = {k: v * (80.0 if k == "router" else 10.0) for k, v in params.items()}
    skewed = dict(params, router=params["router"].at[:, :2].add(jnp.asarray([50.0, 40.0])))

    def apply_one(module, p, x):
        return module.apply({"params": p}, x)

    def apply_all(p, x):
        return [apply_one(m, p, x) for m in modules]

    results["moe"] = {}
    for routing, routing_params in (("", params), (" skewed", skewed)):
        references = [np.asarray(r) for r in jax.jit(apply_all)(routing_params, x)]
        for layout in LAYOUTS:
            mesh = aria_jax.make_mesh(*layout)
            sharding_for = param_sharding_for(boxed, mesh)
            sharded = {k: jax.device_put(v, sharding_for((k,))) for k, v in routing_params.items()}
            xs = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
            with jax.set_mesh(mesh):
                outs = jax.jit(apply_all)(sharded, xs)
                jaxprs = [str(jax.make_jaxpr(functools.partial(apply_one, m))(sharded, xs)) for m in modules]
                dispatches = can_dispatch(x.shape[0] * x.shape[1])
            for name, out, reference, jaxpr in zip(names, outs, references, jaxprs):
                results["moe"][f"{name}{routing} {list(layout)}"] = {
                    "max_diff": float(np.abs(np.asarray(out) - reference).max()),
                    "scale": float(np.abs(reference).max()),
                    "shard_map": "shard_map" in jaxpr,
                    "all_to_all": "all_to_all" in jaxpr,
                    "can_dispatch": dispatches,
                    "experts_gate_up": describe(sharded["experts_gate_up"]),
                }


# Layouts on which a cache of tiny-random's batch (4 rows, 2 kv heads) splits its positions, and
# the split attention's own cases: (layout, batch, kv heads, groups, cache length, queries, index).
SPLIT_CACHE_LAYOUTS = [(1, 8, 1), (2, 4, 1)]
SPLIT_ATTENTION_CASES = [
    ((1, 8, 1), 1, 2, 2, 64, 1, 37),  # a decode step
    ((1, 8, 1), 1, 2, 2, 64, 16, 16),  # a chunk inside one shard's positions
    ((1, 8, 1), 1, 2, 2, 64, 16, 20),  # a chunk across two shards
    ((2, 4, 1), 2, 2, 2, 64, 16, 32),  # positions over two axes
    ((1, 4, 2), 1, 2, 2, 64, 16, 0),  # heads over tensor, positions over expert
    ((1, 8, 1), 1, 2, 2, 512, 64, 128),  # blockwise within each shard
]


# (layout, ids): rows looked up in a 256-row table whose rows split over tensor x expert (32 a
# shard when both multiply to 8): the first and last row of several shards; then more ids than a
# shard holds rows, which take the compiler's lookup.
TAKE_ROWS_CASES = [
    ((1, 8, 1), [[0, 31], [32, 255]]),
    ((1, 4, 2), [[63, 64], [100, 224]]),
    ((2, 2, 2), [[5], [250]]),
    ((1, 8, 1), [list(range(0, 256, 7))]),
]


def run_take_rows(results: dict) -> None:
    """`sharding.take_rows` on a table split over the mesh: the rows it returns, in bfloat16, and
    whether it took the lookup by shard (a shard_map in its program)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import aria_jax
    from aria_jax.sharding import mesh_axes_for, take_rows

    table = np.arange(256 * 4, dtype=np.float32).reshape(256, 4)
    results["take_rows"] = []
    for layout, ids in TAKE_ROWS_CASES:
        mesh = aria_jax.make_mesh(*layout)
        on_mesh = jax.device_put(
            jnp.asarray(table, jnp.bfloat16), NamedSharding(mesh, P(mesh_axes_for("vocab", 256, mesh)))
        )
        with jax.set_mesh(mesh):
            lookup = jax.jit(lambda t, i: take_rows(t, i, "vocab"))
            rows = lookup(on_mesh, jnp.asarray(ids))
            by_shard = "shard_map" in str(jax.make_jaxpr(lookup)(on_mesh, jnp.asarray(ids)))
        results["take_rows"].append(
            {"rows": np.asarray(rows.astype(jnp.float32)).tolist(), "by_shard": by_shard, "dtype": str(rows.dtype)}
        )


def equations(jaxpr):
    """Every equation of a jaxpr, those of the jaxprs inside it too."""
    for equation in jaxpr.eqns:
        yield equation
        for value in equation.params.values():
            for inner in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def output_shapes(jaxpr):
    """The shape of every value a jaxpr's equations make, those of the jaxprs inside them too."""
    for equation in equations(jaxpr):
        yield from (tuple(var.aval.shape) for var in equation.outvars)


def pallas_kernels(jaxpr) -> list[str]:
    """The names of the Pallas kernels a jaxpr calls, in the jaxprs inside it too."""
    return [equation.params["name"] for equation in equations(jaxpr) if equation.primitive.name == "pallas_call"]


# (tokens, the experts' width F): one token's 2 pairs; 8 tokens' 16 pairs, more than a shard's 4
# experts, with tiles that divide the experts (F = 32) and that do not (F = 24).
GPU_DECODE_CASES = [(1, 32), (8, 32), (8, 24)]


def stacked_moe(num_experts: int, num_layers: int, width: int):
    """An MoE config of `num_experts` experts of `width` (model dimension 32, top 2, one shared
    expert) and its generation params, the routed experts stacked over `num_layers` layers,
    scaled up from the initializer's so that differences show."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from aria_jax import moe
    from aria_jax.config import AriaTextConfig

    config = AriaTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=width,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        moe_num_experts=num_experts,
        moe_topk=2,
        moe_num_shared_experts=1,
    )
    params = moe.MoE(config, layer_index=0).init(jax.random.key(0), jnp.zeros((1, 1, 32)))["params"]
    return config, jax.tree.map(lambda p: p * 10.0, nn.meta.unbox(params))


def run_gpu_decode_experts(results: dict) -> None:
    """A decode layer's MoE (`layer_index`: the experts stacked over layers) by the rules for a
    GPU (the compile platform patched to "gpu"): 32 experts, 4 a shard on expert=8, for each of
    GPU_DECODE_CASES. The Pallas kernels it calls, and how many arrays of one layer's experts
    (E, D, 2F) the program makes (a slice out of the stack makes one); where it calls no kernel,
    its outputs (XLA:CPU runs the program) and the single-device layer's."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import aria_jax
    from aria_jax import moe

    results["gpu_decode_experts"] = {}
    layers = {}  # by expert width: (config, params)
    for tokens, width in GPU_DECODE_CASES:
        if width not in layers:
            layers[width] = stacked_moe(32, 2, width)
        config, params = layers[width]
        layer = moe.MoE(config, layer_index=1)
        one_layer = {(32, 32, 2 * width), (4, 32, 2 * width)}  # a layer's experts_gate_up, whole or one shard's
        x = jax.random.normal(jax.random.key(tokens), (tokens, 1, 32), jnp.float32)
        reference = np.asarray(jax.jit(layer.apply)({"params": params}, x))
        platform = moe.compile_platform, moe.compiling_for_gpu
        moe.compile_platform, moe.compiling_for_gpu = (lambda: "gpu"), (lambda: True)
        try:
            with jax.set_mesh(aria_jax.make_mesh(expert=8)):
                jaxpr = jax.make_jaxpr(layer.apply)({"params": params}, x)
                kernels = pallas_kernels(jaxpr.jaxpr)
                # Pallas' interpreter cannot run the Triton kernel under shard_map (its slices mix
                # values that vary over the mesh with ones that do not); tests/test_moe.py runs
                # the same backend on one device.
                out = None if kernels else np.asarray(jax.jit(layer.apply)({"params": params}, x))
        finally:
            moe.compile_platform, moe.compiling_for_gpu = platform
        results["gpu_decode_experts"][f"{tokens}x{width}"] = {
            "max_diff": None if out is None else float(np.abs(out - reference).max()),
            "scale": float(np.abs(reference).max()),
            "layer_copies": sum(shape in one_layer for shape in output_shapes(jaxpr.jaxpr)),
            "kernels": kernels,
        }


def run_split_cache(results: dict) -> None:
    """Caches whose positions split over the mesh (`kv_cache.cache_layout`): the split attention
    against the dense one on random inputs; a prompt prefilled in chunks into a split cache
    against one chunk without a mesh (the model's own generation on these layouts is
    `run_model_layout`'s)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    import aria_jax
    from aria_jax import attention, context_parallel
    from aria_jax.host_loop import check_request

    rng = np.random.default_rng(0)
    results["split_cache"] = {"attention": [], "layouts": {}}
    dense_limit = attention.DENSE_LIMIT
    try:
        for layout, batch, heads, groups, length, queries, index in SPLIT_ATTENTION_CASES:
            attention.DENSE_LIMIT = queries * length // 8 if length > 64 else dense_limit
            q = jnp.asarray(rng.standard_normal((batch, queries, heads * groups, 16)), jnp.float32)
            new = {n: jnp.asarray(rng.standard_normal((batch, heads, queries, 16)), jnp.float32) for n in "kv"}
            cache = {n: jnp.asarray(rng.standard_normal((batch, heads, length, 16)), jnp.float32) for n in "kv"}
            mask = np.ones((batch, length), bool)
            mask[0, :5] = False  # a left-padded row
            expected_cache = {n: jax.lax.dynamic_update_slice(cache[n], new[n], (0, 0, index, 0)) for n in "kv"}
            expected = attention.attention(
                q, expected_cache["k"], expected_cache["v"], jnp.asarray(mask), index, implementation="dense"
            )
            attends = mask[:, : index + queries].cumsum(axis=1)[:, index:] > 0  # queries with a key to attend

            def max_diff(out):
                return float(np.abs(np.asarray(out) - np.asarray(expected))[attends].max())

            with jax.set_mesh(aria_jax.make_mesh(*layout)):
                out, written = jax.jit(context_parallel.attention_over_split_cache)(
                    q, new["k"], new["v"], cache, jnp.asarray(mask), index
                )
                # Each shard's statistics from the TPU decode kernel (Pallas' interpreter here): a
                # decode step's query, or a chunk's in blocks of rows.
                kernel_out = jax.jit(
                    functools.partial(context_parallel.attention_over_split_cache, decode_kernel=True)
                )(q, new["k"], new["v"], cache, jnp.asarray(mask), index)
            results["split_cache"]["attention"].append(
                {
                    "case": [list(layout), batch, heads, groups, length, queries, index],
                    "max_diff": max_diff(out),
                    "kernel_max_diff": max_diff(kernel_out[0]),
                    "cache_diff": max(
                        float(np.abs(np.asarray(written[n]) - np.asarray(expected_cache[n])).max()) for n in "kv"
                    ),
                    "cache_spec": describe(written["k"])["spec"],
                    **split_int8_cache(layout, q, new, cache, mask, index, attends),
                }
            )
    finally:
        attention.DENSE_LIMIT = dense_limit

    # The decode kernel on a cache split by rows (over expert) and heads (over tensor) instead.
    q = jnp.asarray(rng.standard_normal((4, 1, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((4, 2, 64, 16)), jnp.float32) for _ in range(2))
    mask = np.ones((4, 64), bool)
    mask[0, :5] = False
    expected = attention.attention(q, k, v, jnp.asarray(mask), 40, implementation="dense")
    with jax.set_mesh(aria_jax.make_mesh(1, 4, 2)):
        out = jax.jit(lambda *args: attention.attention(*args, 40, implementation="decode"))(q, k, v, jnp.asarray(mask))
    results["split_cache"]["decode_kernel_by_rows_and_heads"] = {
        "max_diff": float(np.abs(np.asarray(out) - np.asarray(expected)).max()),
        "spec": describe(out)["spec"],
    }

    ids, mask = text_ids()

    def prefilled(text, chunk):
        padded_ids, padded_mask = text.generator.pad_prompt(ids, mask)
        embeds = text._embedded(padded_ids)
        request = check_request(
            len(ids),
            ids.shape[1],
            text.config,
            None,
            max_new_tokens=4,
            do_sample=False,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            seed=0,
            stop_strings=None,
        )
        return padded_mask, text.generator.prefill(
            text.text_params,
            embeds,
            jnp.asarray(padded_mask),
            request.sampling,
            request.stop_ids,
            cache_length=32,
            max_new_tokens_capacity=8,
            chunk=chunk,
        )

    padded_mask, whole = prefilled(aria_jax.AriaTextForCausalLM.from_pretrained(TINY_RANDOM), 16)
    real = padded_mask.astype(bool)
    for layout in SPLIT_CACHE_LAYOUTS:
        text = aria_jax.AriaTextForCausalLM.from_pretrained(TINY_RANDOM, mesh=aria_jax.make_mesh(*layout))
        _, chunked = prefilled(text, 8)
        results["split_cache"]["layouts"][layout_name(layout)] = {
            "prefill_cache_spec": describe(chunked.cache[0]["k"])["spec"],
            "prefill_tokens_equal": bool(np.array_equal(np.asarray(chunked.tokens), np.asarray(whole.tokens))),
            "prefill_cache_diff": max(
                float(
                    np.abs(
                        np.asarray(a[n])[:, :, :16].swapaxes(1, 2)[real]
                        - np.asarray(b[n])[:, :, :16].swapaxes(1, 2)[real]
                    ).max()
                )
                for a, b in zip(chunked.cache, whole.cache)
                for n in "kv"
            ),
        }


def split_int8_cache(layout, q, new, cache, mask, index, attends) -> dict:
    """`attention_over_split_cache` over an int8 cache (and with the decode kernel): its writes are the new keys and values rounded, with their scales, and its output
    the dense attention over the keys and values the written cache holds."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    import aria_jax
    from aria_jax import attention, context_parallel
    from aria_jax.kv_cache import from_int8, to_int8

    int8 = {}
    for n in "kv":
        int8[n], int8[f"{n}_scale"] = to_int8(cache[n])
    expected_cache = dict(int8)
    for n in "kv":
        values, scale = to_int8(new[n])
        expected_cache[n] = jax.lax.dynamic_update_slice(int8[n], values, (0, 0, index, 0))
        expected_cache[f"{n}_scale"] = jax.lax.dynamic_update_slice(int8[f"{n}_scale"], scale, (0, 0, index))
    held = [from_int8(expected_cache[n], expected_cache[f"{n}_scale"], jnp.float32) for n in "kv"]
    expected = np.asarray(attention.attention(q, *held, jnp.asarray(mask), index, implementation="dense"))
    with jax.set_mesh(aria_jax.make_mesh(*layout)):
        out, written = jax.jit(context_parallel.attention_over_split_cache)(
            q, new["k"], new["v"], int8, jnp.asarray(mask), index
        )
        kernel_out = jax.jit(functools.partial(context_parallel.attention_over_split_cache, decode_kernel=True))(
            q, new["k"], new["v"], int8, jnp.asarray(mask), index
        )[0]
    return {
        "int8_max_diff": float(np.abs(np.asarray(out) - expected)[attends].max()),
        "int8_kernel_max_diff": float(np.abs(np.asarray(kernel_out) - expected)[attends].max()),
        "int8_cache_equal": all(np.array_equal(np.asarray(written[n]), np.asarray(expected_cache[n])) for n in written),
        "int8_cache_names": sorted(written),
        "int8_scale_spec": describe(written["k_scale"])["spec"],
    }


def run_layout_errors(results: dict) -> None:
    import aria_jax

    results["errors"] = {
        "make_mesh expert=3": error_of(lambda: aria_jax.make_mesh(expert=3)),
        "make_mesh 2x2x1": error_of(lambda: aria_jax.make_mesh(2, 2, 1)),
        # tiny-random: 4 heads but 2 kv heads (and 2 vision heads); tensor=4 does not fit.
        "from_pretrained tensor=4": error_of(
            lambda: aria_jax.AriaForConditionalGeneration.from_pretrained(TINY_RANDOM, mesh=aria_jax.make_mesh(1, 2, 4))
        ),
        "text from_pretrained tensor=4": error_of(
            lambda: aria_jax.AriaTextForCausalLM.from_pretrained(TINY_RANDOM, mesh=aria_jax.make_mesh(1, 2, 4))
        ),
    }


def main_mesh(out_dir: str, parts: list[str]) -> None:
    """Runs `parts` (errors, moe, text, or a layout like 1x8x1) on this process's devices."""
    import time

    import jax

    results: dict = {"device_count": jax.device_count(), "seconds": {}}
    for part in parts:
        start = time.perf_counter()
        if part == "errors":
            run_layout_errors(results)
        elif part == "moe":
            run_moe_layouts(results)
        elif part == "text":
            run_text_model(results, out_dir)
        elif part == "gpu_decode_experts":
            run_gpu_decode_experts(results)
        elif part == "take_rows":
            run_take_rows(results)
        elif part == "split_cache":
            run_split_cache(results)
        elif part == "quantized":
            run_quantized(results, out_dir)
        elif part == "int8_cache":
            run_int8_cache(results)
        elif part == "engine":
            run_engine(results)
        else:
            run_model_layout(results, tuple(int(n) for n in part.split("x")), out_dir)
        results["seconds"][part] = round(time.perf_counter() - start, 1)
    print("RESULT " + json.dumps(results), flush=True)


def main_host(process_id: int, port: int, out_dir: str) -> None:
    """One of two processes: every HOST_CASES run; generate's tokens as this host reads them
    (or the error it raised), the logits gathered from both hosts, this host's expert shards;
    on HOST_ENGINE_LAYOUT, an Engine that process 0 leads and process 1 follows."""
    import aria_jax

    aria_jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    processor = aria_jax.AriaProcessor.from_pretrained(TINY_RANDOM)
    results = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "layouts": {},
    }
    for layout, num_rows in HOST_CASES:
        inputs = build_inputs(processor, num_rows)
        model = aria_jax.AriaForConditionalGeneration.from_pretrained(TINY_RANDOM, mesh=aria_jax.make_mesh(*layout))
        run = results["layouts"][layout_name(layout)] = {"rows": num_rows}
        try:
            tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, stop_strings=None)
            run.update(tokens=np.asarray(tokens).tolist(), tokens_type=type(tokens).__name__)
        except Exception as e:  # noqa: BLE001 - the same on both hosts, so both go on
            run["generate_error"] = f"{type(e).__name__}: {e}"
        logits = multihost_utils.process_allgather(model(**inputs).logits, tiled=True)
        run["logits_file"] = os.path.join(out_dir, f"host{process_id}_logits_{layout_name(layout)}.npy")
        np.save(run["logits_file"], np.asarray(logits))
        run["experts_gate_up"] = describe(model.params["language_model"]["layers"]["mlp"]["experts_gate_up"])
        if layout == HOST_ENGINE_LAYOUT:
            run.update(host_engine(model, engine_requests(processor, HOST_ENGINE_REQUESTS), HOST_ENGINE_SLOTS))
    print("RESULT " + json.dumps(results), flush=True)


def host_engine(model, requests: list[dict], num_slots: int) -> dict:
    """Process 0 leads an Engine through `requests` (its answers, or the error it raised);
    process 1 follows its rounds until the stop round arrives."""
    import jax

    if jax.process_index() != 0:
        make_engine(model, num_slots).follow()
        return {"followed": True}
    try:
        return {"engine_answers": engine_answers(model, requests, num_slots)}
    except Exception as e:  # noqa: BLE001 - reported; the engine's thread has sent the stop round
        return {"engine_error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    if sys.argv[1] == "mesh":
        main_mesh(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "host":
        main_host(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
