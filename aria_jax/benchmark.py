"""aria_jax against transformers' PyTorch Aria: the same random weights, the same requests, one run.

The model is the "bench" config: a text decoder of hidden 1024 (8 heads of 128), 4 layers, 64
routed experts (top-6) of width 640 and 2 shared experts, vocabulary 32000; a 4-layer vision
tower of width 384; the projector. transformers builds it with random weights (torch seed 0) and
saves it once into a cache directory; both sides load that directory.

Each side runs in its own subprocess, so peak memory is per framework, and prints one JSON line
that this process reads. A third subprocess measures the machine's limits (memory bandwidth,
float32 matmul FLOP/s, a MoE kernel against a dense matmul chain of the same FLOPs), which give
the bounds printed next to our numbers. The output is a markdown table.

Run: aria-jax bench [--repeats 3] [--only both] [--json results.json]
  or: python -m aria_jax.benchmark [...]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from aria_jax.config import ARIA_CROP_SIZE_TO_QUERIES, ARIA_PATCH_TO_QUERY
from aria_jax.expert_weights import is_routed_expert_weight
from aria_jax.resident_memory import peak_resident_bytes

# ----------------------------------------------------------------------------- the bench model

TEXT_CONFIG = dict(
    vocab_size=32000,
    hidden_size=1024,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=128,
    num_hidden_layers=4,
    moe_num_experts=64,
    moe_topk=6,
    intermediate_size=640,
    moe_num_shared_experts=2,
    max_position_embeddings=4096,
    rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
# image_size is the largest crop's side, as in Aria: its position table (70 x 70) also serves
# 490 px crops, which read every other row and column of it. With image_size 490, the 4900-patch
# entry of the projector map would be invalid.
VISION_CONFIG = dict(
    model_type="idefics3_vision",
    hidden_size=384,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=6,
    patch_size=14,
    image_size=980,
)
PATCH_TO_QUERY = dict(ARIA_PATCH_TO_QUERY)
IMAGE_TOKEN = 9
EOS_TOKEN = PAD_TOKEN = 2
SEED = 0

# ----------------------------------------------------------------------------- the requests

IMAGE_SIDE = 490  # one crop of Aria's smaller size
IMAGE_TOKENS = ARIA_CROP_SIZE_TO_QUERIES[IMAGE_SIDE]
IMAGE_TEXT_TOKENS = 64  # text after the image tokens
DECODE_PROMPT_TOKENS = 64
DECODE_BATCHES = (1, 8)
TEXT_IDS = (10, 30000)  # above the image (9), eos / pad (2) and bos (1) ids


def text_ids(batch: int, length: int, seed: int) -> np.ndarray:
    """Random token ids, the same in every process."""
    return np.random.default_rng(seed).integers(*TEXT_IDS, size=(batch, length), dtype=np.int64)


def decode_prompts(batch: int) -> np.ndarray:
    """`batch` different prompts of DECODE_PROMPT_TOKENS tokens each (equal lengths, no padding).
    Different rows route to different experts: the batch-8 bandwidth bound counts their union."""
    return text_ids(batch, DECODE_PROMPT_TOKENS, seed=100 + batch)


def image_request() -> dict[str, np.ndarray]:
    """One IMAGE_SIDE crop (random normal pixels, all valid) and its IMAGE_TOKENS image tokens, then text."""
    pixels = np.random.default_rng(2).standard_normal((1, 3, IMAGE_SIDE, IMAGE_SIDE)).astype(np.float32)
    ids = np.concatenate([np.full((1, IMAGE_TOKENS), IMAGE_TOKEN), text_ids(1, IMAGE_TEXT_TOKENS, seed=1)], axis=1)
    return {"input_ids": ids, "pixel_values": pixels, "pixel_mask": np.ones((1, IMAGE_SIDE, IMAGE_SIDE), bool)}


# ----------------------------------------------------------------------------- measuring


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def best_of(run, repeats: int):
    """The best seconds of `repeats` calls, and the last call's result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def first_and_best(run, repeats: int):
    """Seconds of the first call (for JAX: compiling included), the best of `repeats` more calls,
    and the last call's result."""
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    return (first, *best_of(run, repeats))


def peak_rss_gb() -> float:
    """This process's peak resident memory."""
    return peak_resident_bytes() / 1e9


def prefill_result(prompt_tokens: int, first: float, best: float, tokens: np.ndarray) -> dict:
    return dict(
        tokens=prompt_tokens,
        seconds=best,
        tokens_per_second=prompt_tokens / best,
        first_call_extra_seconds=first - best,
        first_token=int(tokens[0, -1]),
    )


def measure_generation(generate, settings: dict) -> dict:
    """The timings both sides share. `generate(ids, new_tokens, cache_length=None, **images)`
    returns the prompt followed by exactly `new_tokens` greedy tokens, as a numpy array."""
    repeats, new_tokens, results = settings["repeats"], settings["new_tokens"], {}

    prompt = text_ids(1, settings["prompt_tokens"], seed=0)
    log(f"prefill: {prompt.shape[1]} text tokens")
    first, best, tokens = first_and_best(lambda: generate(prompt, 1), repeats)
    results["prefill_text"] = prefill_result(prompt.shape[1], first, best, tokens)

    if not settings["skip_image"]:
        request = image_request()
        ids, images = request.pop("input_ids"), request
        log(f"prefill: one {IMAGE_SIDE} px image ({IMAGE_TOKENS} tokens) + {IMAGE_TEXT_TOKENS} text tokens")
        first, best, tokens = first_and_best(lambda: generate(ids, 1, **images), repeats)
        results["prefill_image"] = prefill_result(ids.shape[1], first, best, tokens)

    for batch in DECODE_BATCHES:
        prompts = decode_prompts(batch)
        # One cache length for every call, so that they differ by the decode steps only.
        cache_length = settings["decode_cache_length"]
        log(f"decode: batch {batch}, {new_tokens} new tokens")
        first_1, best_1, _ = first_and_best(lambda: generate(prompts, 1, cache_length), repeats)
        # The first call with a decode step compiles the decode loop; the number of new tokens is
        # a traced value, so two tokens compile what the long calls below run.
        first_2, best_2, _ = first_and_best(lambda: generate(prompts, 2, cache_length), 1)
        best_n, tokens = best_of(lambda: generate(prompts, new_tokens, cache_length), repeats)
        decode_seconds = best_n - best_1
        results[f"decode_b{batch}"] = dict(
            batch=batch,
            seconds_1=best_1,
            seconds_n=best_n,
            tokens_per_second=batch * (new_tokens - 1) / decode_seconds if decode_seconds > 0 else None,
            first_call_extra_seconds=(first_1 - best_1) + (first_2 - best_2),
            tokens=tokens[:, prompts.shape[1] :].tolist(),
        )
    return results


# ----------------------------------------------------------------------------- workers (subprocesses)


def build_checkpoint(directory: str) -> dict:
    """The bench model with transformers' own random initialization, saved in hub format."""
    import torch
    import transformers

    config = transformers.AriaConfig(
        text_config=TEXT_CONFIG,
        vision_config=VISION_CONFIG,
        projector_patch_to_query_dict=PATCH_TO_QUERY,
        image_token_index=IMAGE_TOKEN,
    )
    torch.manual_seed(SEED)
    model = transformers.AriaForConditionalGeneration(config).to(torch.float32).eval()
    model.save_pretrained(directory)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def run_machine(settings: dict) -> dict:
    """Memory read bandwidth, matmul FLOP/s and the MoE micro-benchmark, with JAX on the platform."""
    import jax
    import jax.numpy as jnp

    from aria_jax.moe import ROUTED_EXPERT_BACKENDS

    device = jax.devices(settings["platform"])[0]
    dtype = jnp.dtype(settings["dtype"])
    repeats = 5

    def best_seconds(fn, *args):
        args = jax.device_put(args, device)
        _, best, _ = first_and_best(lambda: jax.block_until_ready(fn(*args)), repeats)
        return best

    log("memory bandwidth")
    # Much larger than the L3 cache (480 MiB here), so every byte comes from memory.
    values = jnp.ones((2 * 2**30 // dtype.itemsize,), dtype, device=device)
    seconds = best_seconds(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), values)
    bandwidth = values.nbytes / seconds
    del values

    log("matmul")
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.random.normal(key, (4096, 4096), dtype) for key in keys)
    matmul_flops = 2 * 4096**3 / best_seconds(jax.jit(jnp.matmul), a, b)

    backend_name = settings["moe_backend"] or ("looped" if "looped" in ROUTED_EXPERT_BACKENDS else "ragged_dot")
    log(f"MoE micro-benchmark ({backend_name})")
    moe = moe_micro_benchmark(ROUTED_EXPERT_BACKENDS[backend_name], dtype, best_seconds)
    return dict(
        bandwidth_bytes_per_second=bandwidth,
        matmul_flops_per_second=matmul_flops,
        moe=dict(backend=backend_name, **moe),
        peak_rss_gb=peak_rss_gb(),
    )


def moe_micro_benchmark(backend, dtype, best_seconds) -> dict:
    """Routed experts on 512 tokens (top-6 of 64 experts of width 640, random router) against
    one dense matmul chain of the same FLOPs: (512 * 6, 1024) @ (1024, 1280) -> silu-glu -> @ (640, 1024).
    Only the experts are timed; routing is done beforehand."""
    import jax
    import jax.numpy as jnp

    tokens, hidden, experts, top_k, width = 512, TEXT_CONFIG["hidden_size"], 64, 6, 640
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (tokens, hidden), dtype)
    router = jax.random.normal(keys[1], (hidden, experts), dtype) / hidden**0.5
    gate_up = jax.random.normal(keys[2], (experts, hidden, 2 * width), dtype) / hidden**0.5
    down = jax.random.normal(keys[3], (experts, width, hidden), dtype) / width**0.5
    top_logits, expert_ids = jax.lax.top_k(x @ router, top_k)
    weights = jax.nn.softmax(top_logits.astype(jnp.float32), axis=-1).astype(dtype)

    def dense_chain(rows, w_gate_up, w_down):
        gate, up = jnp.split(rows @ w_gate_up, 2, axis=-1)
        return (jax.nn.silu(gate) * up) @ w_down

    moe_seconds = best_seconds(jax.jit(backend), x, weights, expert_ids, gate_up, down)
    rows = jnp.tile(x, (top_k, 1))
    dense_seconds = best_seconds(jax.jit(dense_chain), rows, gate_up[0], down[0])
    return dict(tokens=tokens, moe_seconds=moe_seconds, dense_seconds=dense_seconds, ratio=moe_seconds / dense_seconds)


def never_stopping(model):
    """Our `generate` takes no eos argument: rows stop on the config's eos ids. The same model
    (same params, no copy) with none, so that every row runs to max_new_tokens."""
    text_config = dataclasses.replace(model.config.text_config, eos_token_id=())
    return type(model)(dataclasses.replace(model.config, text_config=text_config), model.params, model.dtype)


def run_ours(settings: dict) -> dict:
    import aria_jax

    quantize = settings.get("quantize_ours")
    log(f"ours: loading ({settings['dtype']}{', ' + quantize + ' weights' if quantize else ''})")
    start = time.perf_counter()
    model = never_stopping(
        aria_jax.AriaForConditionalGeneration.from_pretrained(
            settings["model_dir"], dtype=settings["dtype"], quantize=quantize
        )
    )
    load_seconds, rss_after_load = time.perf_counter() - start, peak_rss_gb()

    def generate(ids, new_tokens, cache_length=None, **images):
        return model.generate(ids, **images, max_new_tokens=new_tokens, stop_strings=None, max_length=cache_length)

    results = measure_generation(generate, settings)
    batch8 = results["decode_b8"]
    sequences = np.concatenate([decode_prompts(8), np.asarray(batch8["tokens"])], axis=1)
    log("ours: routing of the batch-8 decode")
    batch8["mean_expert_union"] = mean_expert_union(model, sequences, DECODE_PROMPT_TOKENS)
    return dict(
        results,
        load_seconds=load_seconds,
        peak_rss_after_load_gb=rss_after_load,
        decoder_bytes=decoder_bytes(model),
        peak_rss_gb=peak_rss_gb(),
    )


def mean_expert_union(model, sequences: np.ndarray, prompt_len: int) -> float:
    """Distinct experts the batch's rows route to at one decode step, averaged over layers and
    steps. Decode step i (1, 2, ...) runs token i - 1 at position prompt_len + i - 1; one forward
    over the finished sequences gives the same routing, collected from the MoE's sown router logits."""
    import jax

    from aria_jax.modeling import TextDecoder

    decoder = TextDecoder(model.text_config, dtype=model.dtype, param_dtype=model.dtype)
    forward = jax.jit(lambda params, ids: decoder.apply({"params": params}, ids, mutable=["intermediates"])[1])
    state = forward(model.params["language_model"], sequences.astype(np.int32))
    (router_logits,) = state["intermediates"]["layers"]["mlp"]["router_logits"]  # (layers, B * T, E)
    layers, _, experts = router_logits.shape
    batch, length = sequences.shape
    logits = np.asarray(router_logits, np.float32).reshape(layers, batch, length, experts)
    steps = logits[:, :, prompt_len : length - 1]  # (layers, B, steps, E)
    top_k = model.text_config.moe_topk
    chosen = np.zeros(steps.shape, bool)
    np.put_along_axis(chosen, np.argpartition(-steps, top_k - 1, axis=-1)[..., :top_k], True, axis=-1)
    return float(chosen.any(axis=1).sum(axis=-1).mean())


def decoder_bytes(model) -> dict:
    """Bytes of the text decoder's weights, split as the bandwidth bounds need them: `dense` is
    every weight read for each token (one row of the embedding table, lm_head included), routed
    experts excluded; `expert` is one routed expert of one layer."""
    import jax

    dense = expert_total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(model.params["language_model"]):
        name, nbytes = str(getattr(path[-1], "key", path[-1])), leaf.size * leaf.dtype.itemsize
        if name in ("values", "scales"):  # a quantized weight: named by its parent
            name = str(getattr(path[-2], "key", path[-2]))
        if is_routed_expert_weight(name):
            expert_total += nbytes
        elif name == "embed_tokens":
            dense += nbytes // leaf.shape[0]
        else:
            dense += nbytes
    config = model.text_config
    return dict(
        dense=dense,
        expert=expert_total // (config.num_hidden_layers * config.moe_num_experts),
        layers=config.num_hidden_layers,
        experts=config.moe_num_experts,
        top_k=config.moe_topk,
    )


def run_transformers(settings: dict) -> dict:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count())
    device = "cuda" if settings["platform"] == "gpu" else "cpu"
    dtype = getattr(torch, settings["dtype"])
    log(f"transformers: loading ({settings['dtype']} on {device})")
    start = time.perf_counter()
    model = (
        transformers.AriaForConditionalGeneration.from_pretrained(
            settings["model_dir"], dtype=dtype, attn_implementation="eager"
        )
        .to(device)
        .eval()
    )
    load_seconds, rss_after_load = time.perf_counter() - start, peak_rss_gb()

    def generate(ids, new_tokens, cache_length=None, **images):  # the cache grows as needed
        inputs = {"input_ids": torch.from_numpy(ids).to(device)}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if images:
            inputs["pixel_values"] = torch.from_numpy(images["pixel_values"]).to(device, dtype)
            inputs["pixel_mask"] = torch.from_numpy(images["pixel_mask"]).to(device)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=PAD_TOKEN,
                eos_token_id=EOS_TOKEN,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        return out.cpu().numpy()

    results = measure_generation(generate, settings)
    experts = getattr(model.config.text_config, "_experts_implementation", None)
    return dict(
        results,
        load_seconds=load_seconds,
        peak_rss_after_load_gb=rss_after_load,
        experts_implementation=experts,
        matmul_flops_per_second=torch_matmul_flops(device, dtype),
        peak_rss_gb=peak_rss_gb(),
    )


def torch_matmul_flops(device: str, dtype) -> float:
    """torch's matmul rate on the same 4096 x 4096 problem, for reference: its BLAS may be faster
    than XLA's, so transformers can pass the prefill bounds, which come from JAX's rate."""
    import torch

    a, b = (torch.randn(4096, 4096, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    _, best, _ = first_and_best(lambda: (a @ b, sync()), 5)
    return 2 * 4096**3 / best


WORKERS = {"ours": run_ours, "transformers": run_transformers, "machine": run_machine}
RESULT_MARKER = "BENCH-RESULT "


def worker_main(role: str, settings: dict) -> int:
    if role == "build":
        result = build_checkpoint(settings["model_dir"])
    else:
        result = WORKERS[role](settings)
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


JAX_PLATFORM_NAMES = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}


def run_worker(role: str, settings: dict) -> dict | None:
    """Runs one worker in a fresh Python process; its progress goes to our stderr. Returns its
    result, or None (with its exit code reported) if it failed."""
    env = dict(os.environ, JAX_PLATFORMS=JAX_PLATFORM_NAMES[settings["platform"]], TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "aria_jax.benchmark", "--worker", role, "--worker-settings", json.dumps(settings)]
    start, watch = time.perf_counter(), OtherProcessesWatch()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if done.returncode or not lines:
        log(f"{role}: failed (exit code {done.returncode}); its rows are left empty")
        return None
    log(f"{role}: done in {time.perf_counter() - start:.0f} s")
    return dict(json.loads(lines[-1][len(RESULT_MARKER) :]), other_processes_cpu_share=watch.share())


# ----------------------------------------------------------------------------- the cached checkpoint


def config_hash() -> str:
    description = json.dumps([TEXT_CONFIG, VISION_CONFIG, PATCH_TO_QUERY, IMAGE_TOKEN, SEED], sort_keys=True)
    return hashlib.sha256(description.encode()).hexdigest()[:12]


class BuildFailed(Exception):
    """The build worker failed (it has said why); the partial directory is discarded."""


def ensure_checkpoint(cache_dir: str) -> str | None:
    """The bench model's directory, built once. `atomic_directory` renames it into place only when
    complete, so a directory that exists is a whole model."""
    from aria_jax.files import atomic_directory

    directory = os.path.join(os.path.expanduser(cache_dir), f"bench-{config_hash()}")
    if os.path.isdir(directory):
        log(f"model: {directory}")
        return directory
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    log(f"model: building with transformers into {directory} (once)")
    try:
        with atomic_directory(directory) as partial:
            if run_worker("build", {"model_dir": partial, "platform": "cpu"}) is None:
                raise BuildFailed
    except BuildFailed:
        return None
    return directory


# ----------------------------------------------------------------------------- bounds


def text_prefill_flops(tokens: int) -> float:
    """Matmul FLOPs of one prompt of `tokens` tokens in the text decoder: per token and layer,
    2 x (q, k, v, o + router + shared experts + top-k routed experts) weights, plus causal
    attention (scores and values: 4 x hidden x the t + 1 keys token t attends to); lm_head for
    the last token only. Norms, rotary embeddings and softmax are not counted."""
    t = TEXT_CONFIG
    d, attention_width = t["hidden_size"], t["num_attention_heads"] * t["head_dim"]
    kv_width = t["num_key_value_heads"] * t["head_dim"]
    projections = 2 * d * attention_width + 2 * d * kv_width
    router = d * t["moe_num_experts"]
    shared = 3 * d * t["intermediate_size"] * t["moe_num_shared_experts"]
    routed = 3 * d * t["intermediate_size"] * t["moe_topk"]
    attention = 2 * tokens * (tokens + 1) * attention_width  # sum over t of 4 (t + 1) width
    per_layer = 2 * tokens * (projections + router + shared + routed) + attention
    return t["num_hidden_layers"] * per_layer + 2 * d * t["vocab_size"]


def image_flops() -> float:
    """Matmul FLOPs of one 490 px crop through the vision tower (patch embedding; per layer q, k,
    v, o, the MLP and full attention over every patch) and the projector (q, k, v and packed
    in-projections, cross-attention of the queries over the patches, out_proj, linear, the FFN)."""
    v, d_text = VISION_CONFIG, TEXT_CONFIG["hidden_size"]
    d, patch = v["hidden_size"], v["patch_size"]
    patches, queries = (IMAGE_SIDE // patch) ** 2, IMAGE_TOKENS
    patch_embedding = 2 * patches * 3 * patch * patch * d
    layer = 2 * patches * (4 * d * d + 2 * d * v["intermediate_size"]) + 4 * patches * patches * d
    projector = (
        2 * queries * d * d * 4  # q_proj, in-projection of q, out_proj, linear
        + 2 * patches * d * d * 4  # k_proj, v_proj, in-projections of k and v
        + 4 * queries * patches * d  # cross-attention
        + 2 * queries * (d * d_text + d_text * d_text)
    )
    return patch_embedding + v["num_hidden_layers"] * layer + projector


def bounds(machine: dict, ours: dict) -> dict:
    """What the machine allows for each of our rows, in the rows' units."""
    bandwidth, flops_per_second = machine["bandwidth_bytes_per_second"], machine["matmul_flops_per_second"]
    sizes = ours["decoder_bytes"]
    per_token = sizes["dense"] + sizes["layers"] * sizes["top_k"] * sizes["expert"]
    union = ours["decode_b8"]["mean_expert_union"]
    per_step_b8 = sizes["dense"] + sizes["layers"] * union * sizes["expert"]
    result = {
        "decode_b1": dict(tokens_per_second=bandwidth / per_token, bytes_per_step=per_token),
        "decode_b8": dict(
            tokens_per_second=8 * bandwidth / per_step_b8, bytes_per_step=per_step_b8, mean_expert_union=union
        ),
    }
    text = ours["prefill_text"]
    result["prefill_text"] = dict(flops=text_prefill_flops(text["tokens"]))
    if "prefill_image" in ours:
        result["prefill_image"] = dict(flops=image_flops() + text_prefill_flops(ours["prefill_image"]["tokens"]))
    for name in ("prefill_text", "prefill_image"):
        if name in result:
            seconds = result[name]["flops"] / flops_per_second
            result[name].update(seconds=seconds, tokens_per_second=ours[name]["tokens"] / seconds)
    return result


# ----------------------------------------------------------------------------- the report

TARGETS = {"decode_b1": 0.85, "decode_b8": 0.80, "prefill_text": 0.70, "prefill_image": 0.70}
MOE_TARGET = 1.3


def number(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def speedup(ours, theirs, higher_is_better: bool) -> str:
    """How many times better ours is: > 1 means ours is faster (or smaller)."""
    if ours is None or theirs is None:
        return "-"
    return f"{(ours / theirs if higher_is_better else theirs / ours):.2f}x"


def get(results: dict | None, *keys):
    for key in keys:
        if not isinstance(results, dict) or key not in results:
            return None
        results = results[key]
    return results


def quantized_table(quantized: dict | None, ours: dict | None, theirs: dict | None, settings: dict) -> str:
    """`--quantize`: ours with quantized weights against transformers (float32) and ours in float."""
    scheme, prompt, new = settings["quantize"], settings["prompt_tokens"], settings["new_tokens"]
    lines = [
        f"| | ours, {scheme} weights | ours | transformers | speedup vs transformers | speedup vs ours |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def row(label, key, digits, higher_is_better):
        mine, float_ours, other = get(quantized, *key), get(ours, *key), get(theirs, *key)
        lines.append(
            f"| {label} | {number(mine, digits)} | {number(float_ours, digits)} | {number(other, digits)} "
            f"| {speedup(mine, other, higher_is_better)} | {speedup(mine, float_ours, higher_is_better)} |"
        )

    row(f"prefill tokens/s, text ({prompt} tokens, batch 1)", ("prefill_text", "tokens_per_second"), 1, True)
    for batch in DECODE_BATCHES:
        row(
            f"decode tokens/s, batch {batch} ({new} new tokens, greedy)",
            (f"decode_b{batch}", "tokens_per_second"),
            1,
            True,
        )
    row("peak memory (RSS of the process), GB", ("peak_rss_gb",), 2, False)
    if quantized and ours:
        agree = common_prefix(quantized["decode_b1"]["tokens"][0], ours["decode_b1"]["tokens"][0])
        lines.append(f"\nbatch-1 greedy tokens, {scheme} against float weights: the first {agree} of {new} agree")
    return "\n".join(lines)


def table(ours: dict | None, theirs: dict | None, limits: dict, settings: dict) -> str:
    prompt, new = settings["prompt_tokens"], settings["new_tokens"]
    header = (
        "| | ours (aria_jax) | transformers | speedup, ours vs transformers (>1: ours better) "
        "| bound for ours | ours / bound |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|"]

    def row(label, key, digits, higher_is_better, bound_key=None, compare=True):
        mine, other = get(ours, *key), get(theirs, *key) if compare else None
        bound = get(limits, *bound_key) if bound_key else None
        fraction = "-"
        if bound and mine:
            fraction = f"{(mine / bound if higher_is_better else bound / mine):.0%}"
        lines.append(
            f"| {label} | {number(mine, digits)} | {number(other, digits) if compare else '-'} "
            f"| {speedup(mine, other, higher_is_better)} | {number(bound, digits)} | {fraction} |"
        )

    row(
        f"prefill tokens/s, text ({prompt} tokens, batch 1)",
        ("prefill_text", "tokens_per_second"),
        1,
        True,
        ("prefill_text", "tokens_per_second"),
    )
    if not settings["skip_image"]:
        tokens = IMAGE_TOKENS + IMAGE_TEXT_TOKENS
        row(
            f"prefill tokens/s, image (1 image {IMAGE_SIDE} px = {IMAGE_TOKENS} + {IMAGE_TEXT_TOKENS} text "
            f"= {tokens} tokens, batch 1)",
            ("prefill_image", "tokens_per_second"),
            1,
            True,
            ("prefill_image", "tokens_per_second"),
        )
        row("prefill wall time, image, s", ("prefill_image", "seconds"), 3, False, ("prefill_image", "seconds"))
    for batch in DECODE_BATCHES:
        row(
            f"decode tokens/s, batch {batch} ({new} new tokens, greedy)",
            (f"decode_b{batch}", "tokens_per_second"),
            1,
            True,
            (f"decode_b{batch}", "tokens_per_second"),
        )
    row(f"time to first token, text {prompt} tokens, s", ("prefill_text", "seconds"), 3, False)
    compile_rows = [("prefill text", "prefill_text")] + (
        [] if settings["skip_image"] else [("prefill image", "prefill_image")]
    )
    compile_rows += [(f"decode batch {batch}", f"decode_b{batch}") for batch in DECODE_BATCHES]
    for label, name in compile_rows:
        row(
            f"compile time (first call - warm call), {label}, s",
            (name, "first_call_extra_seconds"),
            2,
            False,
            compare=False,
        )
    row("peak memory (RSS of the process), GB", ("peak_rss_gb",), 2, False)
    return "\n".join(lines)


def verdict(reached: float, target: float, at_least: bool = True) -> str:
    met = reached >= target if at_least else reached <= target
    return "met" if met else "NOT met"


def limit_lines(
    machine: dict | None, ours: dict | None, theirs: dict | None, limits: dict, settings: dict
) -> list[str]:
    if machine is None:
        return ["machine limits: not measured (the worker failed)"]
    lines = [
        f"memory bandwidth (jnp.sum over 2 GiB of {settings['dtype']}, best of 5): "
        f"{machine['bandwidth_bytes_per_second'] / 1e9:.1f} GB/s",
        f"matmul 4096x4096 @ 4096x4096 {settings['dtype']} (best of 5): "
        f"{machine['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s",
    ]
    if get(theirs, "matmul_flops_per_second"):
        lines[-1] += f" (torch, for reference: {theirs['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s)"
    moe = machine["moe"]
    lines.append(
        f"MoE micro-benchmark ({moe['backend']}: {moe['tokens']} tokens x hidden 1024, top-6 of 64 experts of width "
        f"640, random router): {moe['moe_seconds'] * 1e3:.1f} ms vs the dense chain of the same FLOPs "
        f"{moe['dense_seconds'] * 1e3:.1f} ms: ratio {moe['ratio']:.2f} (target <= {MOE_TARGET}): "
        f"{verdict(moe['ratio'], MOE_TARGET, at_least=False)}"
    )
    if ours is None:
        return lines
    sizes = ours["decoder_bytes"]
    b1, b8 = limits["decode_b1"], limits["decode_b8"]
    lines += [
        f"decode batch 1 bound: bandwidth / {b1['bytes_per_step'] / 1e6:.0f} MB per token (text decoder weights: "
        f"all but the embedding table, one row of it, {sizes['top_k']} of {sizes['experts']} routed experts per "
        f"layer, lm_head included) = {b1['tokens_per_second']:.1f} tokens/s",
        f"decode batch 8 bound: 8 x bandwidth / {b8['bytes_per_step'] / 1e6:.0f} MB per step (the same weights "
        f"once, with the union of the experts the 8 rows route to: {b8['mean_expert_union']:.1f} of "
        f"{sizes['experts']} per layer on average, from our routing of the decoded tokens) = "
        f"{b8['tokens_per_second']:.1f} tokens/s",
        "prefill bound: counted FLOPs / matmul FLOP/s. Counted per token and layer: 2 x (q, k, v, o + router + "
        "shared experts + 6 routed experts) weights, plus causal attention 4 x hidden x (keys attended); "
        "lm_head for the last token only; the image case adds the vision tower and the projector "
        f"({image_flops() / 1e9:.1f} GFLOP). Norms, rotary and softmax are not counted.",
    ]
    for name, label in (
        ("decode_b1", "decode batch 1"),
        ("decode_b8", "decode batch 8"),
        ("prefill_text", "prefill text"),
        ("prefill_image", "prefill image"),
    ):
        if name not in limits or get(ours, name, "tokens_per_second") is None:
            continue
        reached = ours[name]["tokens_per_second"] / limits[name]["tokens_per_second"]
        what = "of the bandwidth bound" if name.startswith("decode") else "of the matmul FLOP/s"
        lines.append(
            f"target {label}: {reached:.0%} {what} (target >= {TARGETS[name]:.0%}): {verdict(reached, TARGETS[name])}"
        )
    return lines


def common_prefix(a, b) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def note_lines(ours: dict | None, theirs: dict | None, settings: dict) -> list[str]:
    from aria_jax.buckets import bucket_length

    lines = []
    if ours and theirs:
        new = settings["new_tokens"]
        agree = [
            common_prefix(mine, other)
            for batch in DECODE_BATCHES
            for mine, other in zip(ours[f"decode_b{batch}"]["tokens"], theirs[f"decode_b{batch}"]["tokens"])
        ]
        lines.append(
            f"same weights, same greedy tokens: ours and transformers agree on the first {agree[0]} of "
            f"{new} tokens at batch 1, on {np.mean(agree[1:]):.0f} of {new} on average at batch 8"
        )
    if ours and "prefill_image" in ours:
        lines.append(
            f"our image prompt ({IMAGE_TOKENS + IMAGE_TEXT_TOKENS} tokens) runs left-padded to its "
            f"{bucket_length(IMAGE_TOKENS + IMAGE_TEXT_TOKENS)}-token bucket; the rows count "
            f"{IMAGE_TOKENS + IMAGE_TEXT_TOKENS}"
        )
    if theirs:
        lines.append(
            f"transformers: eager attention, experts implementation {theirs.get('experts_implementation')}, "
            f"{os.cpu_count()} torch threads"
        )
    return lines


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def machine_line(settings: dict) -> str:
    versions = ", ".join(f"{name} {installed_version(name)}" for name in ("jax", "torch", "transformers"))
    return (
        f"Machine: {cpu_name()}, {os.cpu_count()} cores; {versions}; {settings['dtype']} on {settings['platform']}; "
        f"best of {settings['repeats']} warm runs"
    )


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy since boot (every process, every core)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time of this process and its finished subprocesses."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class OtherProcessesWatch:
    """The share of the machine's CPU time that other processes take from now on: they slow the
    sides down unevenly, so the report says how busy the machine was while each side ran."""

    def __init__(self):
        self.start, self.busy, self.own = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()

    def share(self) -> float:
        others = (busy_cpu_seconds() - self.busy) - (own_cpu_seconds() - self.own)
        return max(0.0, others) / ((time.perf_counter() - self.start) * os.cpu_count())


DISTURBED_SHARE = 0.05


def contention_line(parts: dict[str, dict | None]) -> str:
    shares = {name: part["other_processes_cpu_share"] for name, part in parts.items() if part}
    listed = ", ".join(f"{name} {share:.0%}" for name, share in shares.items())
    disturbed = [name for name, share in shares.items() if share > DISTURBED_SHARE]
    verdict = f": {', '.join(disturbed)} disturbed, run again on an idle machine" if disturbed else ": idle"
    return f"CPU share of other processes while each part ran: {listed}{verdict}"


def installed_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aria_jax.benchmark",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_options(parser)
    parser.add_argument("--worker", choices=["build", *WORKERS], help=argparse.SUPPRESS)
    parser.add_argument("--worker-settings", help=argparse.SUPPRESS)
    return parser


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--platform",
        choices=["cpu", "gpu", "tpu"],
        default="cpu",
        help="where ours runs: float32 on cpu, bfloat16 on gpu / tpu (transformers: cuda bf16 on gpu)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="warm runs per measurement; the best counts")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated in the decode rows")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="text prompt of the prefill row")
    parser.add_argument("--only", choices=["ours", "transformers", "both"], default="both", help="sides to run")
    parser.add_argument("--skip-image", action="store_true", help="leave out the image prefill row")
    parser.add_argument(
        "--cache-dir",
        default="~/.cache/aria-jax",
        help="where the bench model is saved once (as bench-<hash of its config>)",
    )
    parser.add_argument(
        "--moe-backend",
        default=None,
        help="aria_jax.moe.ROUTED_EXPERT_BACKENDS entry for the MoE micro-benchmark "
        "(default: looped if aria_jax has it, else ragged_dot)",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        default=None,
        help="also run ours with weights quantized so (from_pretrained(quantize=...)): a second table",
    )
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")


def main(argv: list[str] | None = None) -> int:
    # JAX and the model code are imported where used: the `aria-jax` command line imports this module.
    from aria_jax.buckets import bucket_length

    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker, json.loads(args.worker_settings))
    if args.repeats < 1 or args.new_tokens < 2 or args.prompt_tokens < 1:
        raise SystemExit("aria-jax bench: --repeats and --prompt-tokens must be >= 1, --new-tokens >= 2")
    started = time.perf_counter()
    settings = dict(
        platform=args.platform,
        dtype="float32" if args.platform == "cpu" else "bfloat16",
        repeats=args.repeats,
        new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens,
        skip_image=args.skip_image,
        moe_backend=args.moe_backend,
        decode_cache_length=bucket_length(DECODE_PROMPT_TOKENS + args.new_tokens),
        quantize=args.quantize,
    )
    settings["model_dir"] = ensure_checkpoint(args.cache_dir)
    if settings["model_dir"] is None:
        return 1
    machine = run_worker("machine", settings)
    ours = run_worker("ours", settings) if args.only in ("ours", "both") else None
    transformers_runs = args.platform == "cpu" or (args.platform == "gpu" and cuda_available())
    theirs = None
    if args.only in ("transformers", "both") and transformers_runs:
        theirs = run_worker("transformers", settings)
    quantized = None
    if args.quantize and args.only in ("ours", "both"):
        quantized = run_worker("ours", dict(settings, quantize_ours=args.quantize, skip_image=True))
    limits = bounds(machine, ours) if machine and ours else {}

    report = [machine_line(settings), "", table(ours, theirs, limits, settings), ""]
    if args.quantize:
        report += [quantized_table(quantized, ours, theirs, settings), ""]
    report += limit_lines(machine, ours, theirs, limits, settings) + note_lines(ours, theirs, settings)
    total = time.perf_counter() - started
    report += [
        contention_line({"machine": machine, "ours": ours, "transformers": theirs, "ours quantized": quantized}),
        f"total benchmark time: {total:.0f} s",
    ]
    print("\n".join(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    settings=settings,
                    machine=machine,
                    ours=ours,
                    transformers=theirs,
                    bounds=limits,
                    ours_quantized=quantized,
                    total_seconds=total,
                ),
                f,
                indent=1,
            )
    wanted = [machine] + [ours] * (args.only != "transformers") + [theirs] * (args.only != "ours" and transformers_runs)
    wanted += [quantized] * bool(args.quantize and args.only != "transformers")
    return 0 if all(part is not None for part in wanted) else 1


def cuda_available() -> bool:
    """Asked in a subprocess: this process imports neither torch nor JAX."""
    check = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True
    )
    return check.stdout.strip() == "True"


if __name__ == "__main__":
    sys.exit(main())
