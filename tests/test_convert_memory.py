"""`aria-jax convert` holds about one tensor at a time: its peak memory is bounded by the
largest tensor, not by the model.

A synthetic text-only hub checkpoint of more than 2 GB (bf16, several shards, real hub key
names and shapes) whose largest tensor is 128 MiB is converted in a child process; its peak
resident memory must stay under 1.5 GB + 3 x the largest tensor (about 1.9 GB), which is less
than the checkpoint, so a converter that held the whole model fails. A sample of the converted
pieces is then compared bit for bit with the source tensors.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from aria_jax.checkpoint import Manifest
from aria_jax.config import AriaTextConfig
from aria_jax.pretrained import param_shapes
from aria_jax.safetensors_io import SafetensorsWriter
from aria_jax.weights import INDEX_FILE, RULE_FOR_PATH, flatten_tree, hub_key, is_stacked
from repo_paths import ROOT


# A realistic mix of shapes; 9 layers of ~216 MB make 2.08 GB in bf16, the largest tensor
# being the experts' fc1, (64, 1024, 1024) bf16 = 128 MiB.
CONFIG = dict(
    model_type="aria_text",
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=512,
    num_hidden_layers=9,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=128,
    moe_num_experts=64,
    moe_topk=6,
    moe_num_shared_experts=2,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    torch_dtype="bfloat16",
)
MAX_SHARD_BYTES = 500 * 10**6
BOUND_BASE = 1.5e9

# Random bf16 bit patterns with the top exponent bit cleared: every value is finite (|x| < 2).
# Each tensor tiles the pool from its own offset, so no two tensors hold the same data.
POOL_SIZE = (1 << 22) + 17
POOL = np.random.default_rng(0).integers(0, 1 << 16, size=POOL_SIZE, dtype=np.uint16) & 0xBFFF


def tensor_data(number: int, shape: tuple[int, ...]) -> np.ndarray:
    offset = (number * 7919) % (POOL_SIZE // 2)
    return np.resize(POOL[offset:], math.prod(shape)).view(ml_dtypes.bfloat16).reshape(shape)


def flat_param_shapes(config: dict) -> dict:
    return flatten_tree({"language_model": param_shapes(AriaTextConfig.from_hf_dict(config), jnp.float32)})


def hub_tensors(config: dict) -> tuple[list[tuple[str, tuple[int, ...]]], dict]:
    """[(hub key, hub shape)] layer by layer, and {key: (param path, layer)}."""
    shapes = flat_param_shapes(config)
    tensors, where = [], {}
    for path, shape in shapes.items():
        rule = RULE_FOR_PATH[path]
        layers = range(shape[0]) if rule.stacked else [None]
        for layer in layers:
            key = hub_key(rule, layer, text_only=True)
            tensors.append((key, rule.layout.hub_shape(shape[1:] if rule.stacked else shape)))
            where[key] = (path, layer)

    def layer_of(key: str) -> int:
        return int(key.split(".")[2]) if key.startswith("model.layers.") else -1

    tensors.sort(key=lambda t: (layer_of(t[0]), t[0]))
    return tensors, where


def write_hub_checkpoint(directory: str, config: dict) -> tuple[dict, dict, int, int]:
    """Writes config.json, the shards and the index, one tensor in memory at a time.
    Returns {key: tensor number}, {key: (path, layer)}, total bytes and the largest tensor's bytes."""
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    tensors, where = hub_tensors(config)

    def nbytes(shape: tuple[int, ...]) -> int:  # bf16
        return math.prod(shape) * 2

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    for key, shape in tensors:
        if shards[-1] and sum(nbytes(s) for _, s in shards[-1]) + nbytes(shape) > MAX_SHARD_BYTES:
            shards.append([])
        shards[-1].append((key, shape))
    weight_map, numbers = {}, {}
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsWriter(
            os.path.join(directory, name), [(key, ml_dtypes.bfloat16, shape) for key, shape in shard]
        )
        for key, shape in shard:
            numbers[key] = len(numbers)
            writer.write(key, tensor_data(numbers[key], shape))
            weight_map[key] = name
    total = sum(nbytes(shape) for _, shape in tensors)
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    assert len(shards) >= 3
    return numbers, where, total, max(nbytes(shape) for _, shape in tensors)


# Starts the command and prints its exit code and peak RSS (KiB). The command's ru_maxrss starts
# from the memory map it was exec'd from: from this small launcher's, not from pytest's (GBs).
LAUNCHER = """
import os, subprocess, sys, threading
child = subprocess.Popen(sys.argv[2:], stdout=sys.stderr, stderr=subprocess.STDOUT)  # into the log
watchdog = threading.Timer(float(sys.argv[1]), child.kill)
watchdog.start()
_, status, usage = os.wait4(child.pid, 0)
watchdog.cancel()
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def convert_measuring_peak(source: str, destination: str, *extra: str, timeout: float = 600) -> tuple[int, int, str]:
    """Runs `aria-jax convert` in a grandchild (through LAUNCHER); returns its exit code, its own
    peak RSS in bytes (os.wait4 gives that process's rusage alone) and its output."""
    log = destination + ".log"
    command = [sys.executable, "-m", "aria_jax.cli", "convert", source, destination, "--quiet", *extra]
    with open(log, "w") as out:
        launched = subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(timeout), *command],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=out,
            text=True,
            check=True,
        )
    code, peak_kib = map(int, launched.stdout.split())
    with open(log, encoding="utf-8", errors="replace") as f:
        output = f.read()
    return code, peak_kib * 1024, output  # Linux reports KiB


def bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def check_sample(destination: str, numbers: dict, where: dict, dtype) -> None:
    """The unstacked piece and every piece of the first and last layer match the source bit for bit."""
    manifest = Manifest.read(destination)
    assert manifest.dtype == jnp.dtype(dtype)
    manifest.check_covers(flat_param_shapes(CONFIG), ("language_model",))
    last = CONFIG["num_hidden_layers"] - 1
    sample = [piece for piece in manifest.pieces if piece.layer in (None, 0, last)]
    key_of = {value: key for key, value in where.items()}
    checked = set()
    for piece in sample:
        restored = manifest.restore_piece_numpy(piece)
        for path, array in restored.items():
            key = key_of[path, piece.layer if is_stacked(path) else None]
            layout = RULE_FOR_PATH[path].layout
            hub_shape = layout.hub_shape(piece.leaves[path])
            expected = layout.to_param(tensor_data(numbers[key], hub_shape), piece.leaves[path])
            assert array.dtype == np.dtype(dtype), key
            assert array.shape == expected.shape, key
            np.testing.assert_array_equal(bits(array), bits(np.asarray(expected, dtype)), err_msg=key)
            checked.add(key)
        del restored
    expected_keys = {key for key, (_, layer) in where.items() if layer in (None, 0, last)}
    assert checked == expected_keys


def test_convert_peak_memory_is_bounded_by_the_largest_tensor(tmp_path):
    source, destination = str(tmp_path / "hub"), str(tmp_path / "converted")
    try:
        start = time.perf_counter()
        numbers, where, total, largest = write_hub_checkpoint(source, CONFIG)
        bound = BOUND_BASE + 3 * largest
        # Holding the whole model would break the bound: the test can tell.
        assert total > 2e9 and total > bound
        print(
            f"\nsource: {total / 1e9:.2f} GB, largest tensor {largest / 2**20:.0f} MiB, "
            f"written in {time.perf_counter() - start:.1f} s"
        )

        start = time.perf_counter()
        code, peak, output = convert_measuring_peak(source, destination)
        print(f"convert: peak RSS {peak / 1e9:.3f} GB, bound {bound / 1e9:.3f} GB, {time.perf_counter() - start:.1f} s")
        assert code == 0, output
        assert peak <= bound, f"peak RSS {peak / 1e9:.3f} GB > bound {bound / 1e9:.3f} GB"
        check_sample(destination, numbers, where, "bfloat16")
    finally:
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(destination, ignore_errors=True)
