"""`aria-jax plan --target`: generation compiled by the real TPU compiler (libtpu, from the `test`
extra), its time estimate read from the optimized HLO, and the roofline beside it."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

from aria_jax import attention as attention_module
from aria_jax import cache_attention_gpu
from aria_jax.accelerators import CHIPS, Chip
from aria_jax.config import AriaTextConfig
from aria_jax.hlo_cost import ProgramCost
from aria_jax.roofline import decode_step_bytes, prefill_flops
from cli_helpers import run_plan, two_layer_config
from repo_paths import ROOT

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="the TPU compiler (libtpu) is not installed: pip install -e '.[test]'",
)


def plan_two_layers(directory, *extra: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    """The 2-layer full-width model planned on v5e:2x2 (expert=4, 2 rows, 16-token prompts, 1024
    positions, bfloat16): the run, its --json plan and its decode program's optimized HLO."""
    result = run_plan(
        "--target",
        "v5e:2x2",
        "--config",
        two_layer_config(directory),
        "--mesh",
        "expert=4",
        "--batch",
        "2",
        "--prompt-length",
        "16",
        "--max-length",
        "1024",
        "--dtype",
        "bfloat16",
        "--json",
        str(directory / "plan.json"),
        "--dump-hlo",
        str(directory / "hlo"),
        *extra,
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads((directory / "plan.json").read_text())
    return result, plan, (directory / "hlo" / "decode.txt").read_text()


@pytest.fixture(scope="module")
def bfloat16_plan(tmp_path_factory):
    """`plan_two_layers` once for the module: read whole by the first test, and the baseline the
    int8-weights test compares with."""
    directory = tmp_path_factory.mktemp("bfloat16_plan")
    return directory, *plan_two_layers(directory)


@needs_libtpu
def test_two_layer_full_width_model_on_v5e_2x2(bfloat16_plan):
    directory, result, plan, decode_hlo = bfloat16_plan
    assert result.stderr == ""  # no libtpu start-up trace, no warnings
    out = result.stdout
    assert "target v5e:2x2: 4 x TPU v5e" in out and "mesh data=1, expert=4, tensor=1" in out
    assert "not timings" in out

    # Each program's optimized HLO, the decode one named so.
    assert sorted(os.listdir(directory / "hlo")) == ["decode.txt", "prefill.txt"]
    assert decode_hlo.startswith("HloModule jit_decode") and '"estimated_cycles"' in decode_hlo
    # Decode reads each layer's experts in place: the fused experts' kernel, once per layer, and
    # no copy of a layer's 16 local experts out of the stack; attention reads the cache (its
    # positions split over the chips) in the decode kernel, once per layer.
    assert decode_hlo.count('custom_call_target="tpu_custom_call"') == 2 + 2
    assert decode_hlo.count("jit(fused_experts)/pallas_call") == 2
    assert not re.search(r"= bf16\[16,2560,3328\]|= bf16\[16,1664,2560\]", decode_hlo)
    # Prefill sends each (token, slot) pair to its expert's chip; decode (2 tokens) does not.
    prefill_hlo = (directory / "hlo" / "prefill.txt").read_text()
    dispatch = re.compile(r" all-to-all\(.*op_name=\"[^\"]*/experts/shard_map/[^\"]*all_to_all\"")
    assert dispatch.search(prefill_hlo) and not dispatch.search(decode_hlo)
    # The results come back slot-major and are summed elementwise: no (tokens, 6, D) rows, whose
    # 6 the TPU layout pads to a tile of 8 (a copy), and no 6-deep matmul per token.
    assert not re.search(r"bf16\[\d+,6,2560\]", prefill_hlo) and "tkd,tk->td" not in prefill_hlo
    # Prefill's loop over the layers reads each layer's experts in the stacks too (the row-tiled
    # kernel, its gating fused: no copy of a layer's 16 local experts, no gating of its own).
    assert prefill_hlo.count("jit(_row_tiled_grouped_matmul)/pallas_call") > 0
    assert not re.search(r"= bf16\[(1,)?16,(2560,3328|3328,2560|1664,2560|2560,1664)\]", prefill_hlo)

    chip = plan["chip"]
    assert (plan["target"], plan["chips"], plan["batch"], plan["prompt_length"], plan["cache_length"]) == (
        "v5e:2x2",
        4,
        2,
        16,
        1024,
    )
    assert chip["hbm_bytes"] == 16 * 2**30 and chip["hbm_bytes_per_second"] == 819e9
    assert [p["name"] for p in plan["programs"]] == ["prefill", "decode"]
    for program in plan["programs"]:
        assert program["refusal"] is None
        for figure in ("arguments", "outputs", "temporaries", "other_weights", "compile_seconds"):
            assert program[figure] > 0, figure
        assert (
            program["peak"]
            == program["arguments"]
            + program["outputs"]
            - program["aliased"]
            + program["temporaries"]
            + program["other_weights"]
        )
        assert program["fits"] == (program["peak"] <= chip["hbm_bytes"])
        estimate, roofline = program["estimate"], program["roofline"]
        assert estimate["seconds"] >= estimate["seconds_cheapest"] > 0
        # the experts' kernels carry no compiler cycles: their declared costs
        assert 0 < estimate["compiler_share"] < 1
        assert program["ratio"] == pytest.approx(estimate["seconds"] / roofline["seconds"])
        assert program["heaviest"] and all(item["seconds"] > 0 for item in program["heaviest"])
        # The table prints the same figures.
        line = next(line for line in out.splitlines() if line.strip().startswith(program["name"]))
        assert f"peak {program['peak'] / 1e9:.2f} GB" in line
        assert f"fits 16.0 GiB: {'yes' if program['fits'] else 'no'}" in line

    prefill, decode = plan["programs"]
    # The cache is donated: decode's state is updated in place.
    assert decode["aliased"] > 0
    # Per token: one decode-loop step, plus the rest of the call spread over the 1007 steps it runs.
    estimate = decode["estimate"]
    assert estimate["steps_per_call"] == 1024 - 16 - 1
    assert estimate["seconds"] == pytest.approx(estimate["step_seconds"] + estimate["call_seconds"] / 1007)
    assert re.search(rf"estimated {estimate['seconds'] * 1e3:.2f} ms per token", out)
    # Rooflines: decode's bytes over all 4 chips' bandwidth, prefill's flops over their peak.
    assert decode["roofline"]["seconds"] == pytest.approx(sum(decode["roofline"]["bytes"].values()) / (4 * 819e9))
    assert prefill["roofline"]["seconds"] == pytest.approx(prefill["roofline"]["flops"] / (4 * 197e12))
    # Prefill does not take the embedding table (it gets embeddings), but the chip holds it.
    assert prefill["other_weights"] > decode["other_weights"]


@needs_libtpu
def test_decode_rows_split_over_the_chips_keep_the_attention_weights_split(tmp_path):
    """4 rows on expert=4: each chip holds one row's cache and attends it in the decode kernel, and
    multiplies all 4 rows by its slice of the attention weights, which no chip gathers whole."""
    result = run_plan(
        "--target",
        "v5e:2x2",
        "--config",
        two_layer_config(tmp_path),
        "--mesh",
        "expert=4",
        "--batch",
        "4",
        "--prompt-length",
        "16",
        "--max-length",
        "64",
        "--dtype",
        "bfloat16",
        "--dump-hlo",
        str(tmp_path / "hlo"),
    )
    assert result.returncode == 0, result.stderr
    decode_hlo = (tmp_path / "hlo" / "decode.txt").read_text()
    assert decode_hlo.count('custom_call_target="tpu_custom_call"') == 2 + 2  # experts, attention
    assert re.search(r"all-reduce[^\n]*self_attn/qkv", decode_hlo)  # the partial sums over the chips
    assert not re.search(r"all-gather[^ ]* = [^\n]*bf16\[(1,)?(2560,20,128|20,128,2560)\]", decode_hlo)


@needs_libtpu
def test_int8_kv_cache_halves_the_decode_cache_on_v5e(bfloat16_plan, tmp_path):
    """`--kv-cache-dtype int8`: decode's KV cache arguments fall to (1 + 4 / head_dim) / 2 of the
    bfloat16 cache's (a byte per number, a float32 scale per 128), everything else alike; the
    decode kernel reads the int8 cache as it lies, with no bfloat16 copy of a layer's cache."""
    layers, batch, kv_heads, length, head_dim, chips = 2, 2, 20, 1024, 128, 4
    result, int8_plan, int8_hlo = plan_two_layers(tmp_path, "--kv-cache-dtype", "int8")
    _, _, bfloat16, bfloat16_hlo = bfloat16_plan
    plans = {"bfloat16": {**bfloat16, "decode_hlo": bfloat16_hlo}, "int8": {**int8_plan, "decode_hlo": int8_hlo}}
    assert "1008 new tokens, int8)" in result.stdout
    assert (plans["bfloat16"]["kv_cache_dtype"], plans["int8"]["kv_cache_dtype"]) == (None, "int8")
    decode = {name: next(p for p in plan["programs"] if p["name"] == "decode") for name, plan in plans.items()}
    # 2 rows do not divide over 4 chips: the positions do (`kv_cache.cache_layout`).
    bf16_cache = 2 * layers * batch * kv_heads * (length // chips) * head_dim * 2
    int8_cache = bf16_cache - (decode["bfloat16"]["arguments"] - decode["int8"]["arguments"])
    assert int8_cache / bf16_cache == pytest.approx((1 + 4 / head_dim) / 2, rel=1e-3)
    roofline = {name: program["roofline"]["bytes"]["KV cache"] for name, program in decode.items()}
    assert roofline["int8"] / roofline["bfloat16"] == pytest.approx((1 + 4 / head_dim) / 2)

    layer_cache = rf"\[{batch},{kv_heads},{length // chips},{head_dim}\]"
    int8_hlo = plans["int8"]["decode_hlo"]
    assert re.search(r"= s8" + layer_cache, int8_hlo)
    assert not re.search(r"= (bf16|f32)" + layer_cache, int8_hlo), "a layer's cache dequantized whole"
    assert re.search(r"= bf16" + layer_cache, plans["bfloat16"]["decode_hlo"])
    # The decode kernel, once per layer, as for the bfloat16 cache.
    assert int8_hlo.count('custom_call_target="tpu_custom_call"') == plans["bfloat16"]["decode_hlo"].count(
        'custom_call_target="tpu_custom_call"'
    )


@needs_libtpu
def test_int8_weights_halve_the_params_and_are_dequantized_inside_their_matmuls(bfloat16_plan, tmp_path):
    """`--quantize int8`: the params count a byte per weight (and a float32 scale per output
    column) in all and per chip; decode's program holds no bfloat16 copy of a weight (its
    temporaries do not grow), and its experts still run in a kernel."""
    result, int8_plan, int8_hlo = plan_two_layers(tmp_path, "--quantize", "int8")
    _, _, bfloat16, bfloat16_hlo = bfloat16_plan
    plans = {"bfloat16": {**bfloat16, "decode_hlo": bfloat16_hlo}, "int8": {**int8_plan, "decode_hlo": int8_hlo}}
    assert "int8 weights, bfloat16 compute" in result.stdout
    assert plans["int8"]["quantization"] == {"scheme": "int8", "group_size": 128, "vision": False}
    # the decoder's linear weights (all but the embedding, the router and the norms) and the
    # vision tower stay in bfloat16: between a half and 60% of the bfloat16 params
    assert 0.5 < plans["int8"]["params_in_all"] / plans["bfloat16"]["params_in_all"] < 0.6
    assert 0.5 < plans["int8"]["params_per_chip"] / plans["bfloat16"]["params_per_chip"] < 0.65
    decode = {name: next(p for p in plan["programs"] if p["name"] == "decode") for name, plan in plans.items()}
    assert decode["int8"]["temporaries"] <= decode["bfloat16"]["temporaries"] + 2**20
    assert (
        decode["int8"]["roofline"]["bytes"]["routed experts"]
        < 0.51 * decode["bfloat16"]["roofline"]["bytes"]["routed experts"]
    )
    assert re.search(r"s8\[2,16,2560,3328\]", plans["int8"]["decode_hlo"])  # (layers, experts / 4, D, 2F)
    # quantized experts run in the grouped-matmul kernel, which reads them as stored, once per
    # projection and layer (bfloat16 ones in the fused kernel, once per layer)
    kernels = {name: re.findall(r"jit\((\w+)\)/pallas_call", plan["decode_hlo"]) for name, plan in plans.items()}
    assert kernels["int8"].count("stacked_grouped_matmul") == 2 * kernels["bfloat16"].count("fused_experts") == 4


def test_unsupported_target_is_a_one_line_error():
    result = run_plan("--target", "v5litepod-8")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "--target 'v5litepod-8' is not supported" in lines[0] and "v5e:2x4" in lines[0] and "h100:8" in lines[0]


# -- the estimate, from HLO text -------------------------------------------------------------------

# An outer loop of 4 iterations found from its induction variable (0, < 4, + 1), holding an inner
# loop whose trip count (5) the compiler recorded; a conditional; a loop of data-dependent length.
NESTED_LOOPS_HLO = """HloModule jit_nested, entry_computation_layout={(f32[8]{0})->f32[8]{0}}, num_partitions=1

%fused_a (q.0: f32[8]) -> f32[8] {
  %q.0 = f32[8]{0} parameter(0)
  ROOT %e.0 = f32[8]{0} exponential(%q.0)
}

%fused_inc (q.1: s32[]) -> s32[] {
  %q.1 = s32[] parameter(0)
  %k.1 = s32[] constant(1)
  ROOT %a.1 = s32[] add(%q.1, %k.1)
}

%fused_cmp (q.2: (s32[], f32[8])) -> pred[] {
  %q.2 = (s32[], f32[8]{0}) parameter(0)
  %i.2 = s32[] get-tuple-element(%q.2), index=0
  %k.2 = s32[] constant(5)
  ROOT %c.2 = pred[] compare(%i.2, %k.2), direction=LT
}

%fused_any (q.3: f32[8]) -> pred[] {
  %q.3 = f32[8]{0} parameter(0)
  %s.3 = f32[] constant(0)
  %r.3 = f32[] reduce(%q.3, %s.3), dimensions={0}, to_apply=%fused_max
  ROOT %c.3 = pred[] compare(%r.3, %s.3), direction=GT
}

%fused_max (m.0: f32[], m.1: f32[]) -> f32[] {
  %m.0 = f32[] parameter(0)
  %m.1 = f32[] parameter(1)
  ROOT %m.2 = f32[] maximum(%m.0, %m.1)
}

%inner_body (p.0: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p.0 = (s32[], f32[8]{0}) parameter(0)
  %i.0 = s32[] get-tuple-element(%p.0), index=0
  %x.0 = f32[8]{0} get-tuple-element(%p.0), index=1
  %work.0 = f32[8]{0} fusion(%x.0), kind=kLoop, calls=%fused_a, backend_config={"flag_configs":[],"window_config":{"estimated_cycles":"7"}}
  %counter.0 = s32[] fusion(%i.0), kind=kLoop, calls=%fused_inc, backend_config={"window_config":{"estimated_cycles":"1"}}
  ROOT %t.0 = (s32[], f32[8]{0}) tuple(%counter.0, %work.0)
}

%inner_condition (p.1: (s32[], f32[8])) -> pred[] {
  %p.1 = (s32[], f32[8]{0}) parameter(0)
  ROOT %c.1 = pred[] fusion(%p.1), kind=kLoop, calls=%fused_cmp, backend_config={"window_config":{"estimated_cycles":"2"}}
}

%outer_body (p.2: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p.2 = (s32[], f32[8]{0}) parameter(0)
  %i.2 = s32[] get-tuple-element(%p.2), index=0
  %x.2 = f32[8]{0} get-tuple-element(%p.2), index=1
  %zero.2 = s32[] constant(0)
  %init.2 = (s32[], f32[8]{0}) tuple(%zero.2, %x.2)
  %inner = (s32[], f32[8]{0}) while(%init.2), condition=%inner_condition, body=%inner_body, backend_config={"known_trip_count":{"n":"5"}}
  %y.2 = f32[8]{0} get-tuple-element(%inner), index=1
  %more.2 = f32[8]{0} fusion(%y.2), kind=kLoop, calls=%fused_a, backend_config={"window_config":{"estimated_cycles":"11"}}
  %one.2 = s32[] constant(1)
  %next.2 = s32[] add(%i.2, %one.2), backend_config={"window_config":{"estimated_cycles":"0"}}
  ROOT %t.2 = (s32[], f32[8]{0}) tuple(%next.2, %more.2)
}

%outer_condition (p.3: (s32[], f32[8])) -> pred[] {
  %p.3 = (s32[], f32[8]{0}) parameter(0)
  %i.3 = s32[] get-tuple-element(%p.3), index=0
  %four.3 = s32[] constant(4)
  ROOT %lt.3 = pred[] compare(%i.3, %four.3), direction=LT, backend_config={"window_config":{"estimated_cycles":"3"}}
}

%cheap_branch (p.4: f32[8]) -> f32[8] {
  %p.4 = f32[8]{0} parameter(0)
  ROOT %b.4 = f32[8]{0} fusion(%p.4), kind=kLoop, calls=%fused_a, backend_config={"window_config":{"estimated_cycles":"10"}}
}

%dear_branch (p.5: f32[8]) -> f32[8] {
  %p.5 = f32[8]{0} parameter(0)
  ROOT %b.5 = f32[8]{0} fusion(%p.5), kind=kLoop, calls=%fused_a, backend_config={"window_config":{"estimated_cycles":"30"}}
}

%data_body (p.6: (pred[], f32[8])) -> (pred[], f32[8]) {
  %p.6 = (pred[], f32[8]{0}) parameter(0)
  %x.6 = f32[8]{0} get-tuple-element(%p.6), index=1
  %w.6 = f32[8]{0} fusion(%x.6), kind=kLoop, calls=%fused_a, backend_config={"window_config":{"estimated_cycles":"100"}}
  %go.6 = pred[] fusion(%w.6), kind=kLoop, calls=%fused_any, backend_config={"window_config":{"estimated_cycles":"4"}}
  ROOT %t.6 = (pred[], f32[8]{0}) tuple(%go.6, %w.6)
}

%data_condition (p.7: (pred[], f32[8])) -> pred[] {
  %p.7 = (pred[], f32[8]{0}) parameter(0)
  ROOT %go.7 = pred[] get-tuple-element(%p.7), index=0
}

ENTRY %main (arg: f32[8]) -> f32[8] {
  %arg = f32[8]{0} parameter(0)
  %start = f32[8]{0} fusion(%arg), kind=kLoop, calls=%fused_a, backend_config={"window_config":{"estimated_cycles":"1000"}}
  %zero = s32[] constant(0)
  %copied = s32[] copy(%zero), backend_config={"window_config":{"estimated_cycles":"0"}}
  %init = (s32[], f32[8]{0}) tuple(%copied, %start)
  %outer = (s32[], f32[8]{0}) while(%init), condition=%outer_condition, body=%outer_body
  %y = f32[8]{0} get-tuple-element(%outer), index=1
  %which = s32[] constant(1)
  %branched = f32[8]{0} conditional(%which, %y, %y), branch_computations={%cheap_branch, %dear_branch}
  %yes = pred[] constant(true)
  %init.9 = (pred[], f32[8]{0}) tuple(%yes, %branched)
  %until = (pred[], f32[8]{0}) while(%init.9), condition=%data_condition, body=%data_body
  ROOT %out = f32[8]{0} get-tuple-element(%until), index=1
}
"""

CYCLE_CLOCK = Chip("one cycle a nanosecond, everything else free", math.inf, math.inf, 0, math.inf, 1e9)
# A chip whose costs are easy to compute by hand: 1 GB/s of HBM and of interconnect, 1 TFLOP/s.
BYTES_AT_1_GB_PER_S = Chip(
    "test", peak_flops=1e12, hbm_bytes_per_second=1e9, hbm_bytes=0, interconnect_bytes_per_second=1e9, clock_hz=1e9
)


def test_cycles_are_summed_with_the_trip_counts_of_nested_loops():
    cost = ProgramCost(NESTED_LOOPS_HLO, CYCLE_CLOCK)
    inner = 5 * (7 + 1 + 2) + 2  # 5 iterations of body + condition, then the last test
    outer = 4 * (inner + 11 + 0 + 3) + 3
    data_loop = 100 + 4  # data-dependent: counted once (its condition is free)
    start = 1000
    total = cost.total
    assert total.seconds * 1e9 == pytest.approx(start + outer + 30 + data_loop)
    assert total.seconds_cheapest * 1e9 == pytest.approx(start + outer + 10 + data_loop)
    assert total.compiler_seconds == total.seconds
    assert total.unknown_trip_loops == 1
    loops = {loop.name: loop for loop in cost.outer_loops()}
    assert sorted(loops) == ["outer", "until"]
    assert loops["outer"].trip_count == 4 and loops["until"].trip_count is None
    assert loops["until"].iteration.seconds * 1e9 == pytest.approx(data_loop)


CUSTOM_CALL_HLO = """HloModule jit_kernels, num_partitions=1

%fused_layer (s.0: bf16[8,1024,512], s.1: s32[]) -> bf16[1,512,1024] {
  %s.0 = bf16[8,1024,512]{2,1,0} parameter(0)
  %s.1 = s32[] parameter(1)
  %viewed = bf16[8,512,1024]{2,1,0} bitcast(%s.0)
  %z = s32[] constant(0)
  ROOT %layer = bf16[1,512,1024]{2,1,0} dynamic-slice(%viewed, %s.1, %z, %z), dynamic_slice_sizes={1,512,1024}
}

ENTRY %main (a: bf16[256,1024], b: bf16[1024,512], w: bf16[8,1024,512], ids: s32[8]) -> (bf16[256,512], bf16[256,512], bf16[1024,512], bf16[1,512,1024]) {
  %a = bf16[256,1024]{1,0} parameter(0)
  %b = bf16[1024,512]{1,0} parameter(1)
  %w = bf16[8,1024,512]{2,1,0} parameter(2)
  %ids = s32[8]{0} parameter(3)
  %kernel = bf16[256,512]{1,0} custom-call(%a, %b), custom_call_target="tpu_custom_call"
  %dot = bf16[256,512]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %zero = s32[] constant(0)
  %slice = bf16[1,1024,512]{2,1,0} dynamic-slice(%w, %one, %zero, %zero), dynamic_slice_sizes={1,1024,512}
  %expert = bf16[1024,512]{1,0} bitcast(%slice)
  %fused = bf16[1,512,1024]{2,1,0} fusion(%w, %one), kind=kLoop, calls=%fused_layer
  ROOT %out = (bf16[256,512]{1,0}, bf16[256,512]{1,0}, bf16[1024,512]{1,0}, bf16[1,512,1024]{2,1,0}) tuple(%kernel, %dot, %expert, %fused)
}
"""


def test_what_the_compiler_does_not_estimate_costs_its_bytes_or_its_flops():
    chip = BYTES_AT_1_GB_PER_S
    cost = ProgramCost(CUSTOM_CALL_HLO, chip)
    kernel_bytes = (256 * 1024 + 1024 * 512 + 256 * 512) * 2  # operands and result, bf16
    dot_flops = 2 * 256 * 512 * 1024
    slice_bytes = 2 * 1024 * 512 * 2  # reads the slice and writes it, not the stack
    fused_slice_bytes = slice_bytes + 4  # the same through a bitcast, and the index
    expected = kernel_bytes / 1e9 + max(kernel_bytes / 1e9, dot_flops / 1e12) + (slice_bytes + fused_slice_bytes) / 1e9
    assert cost.total.seconds == pytest.approx(expected)
    assert cost.total.compiler_seconds == 0
    # Flops decide when they take longer than the bytes.
    compute_bound = dataclasses.replace(chip, peak_flops=1e8)
    assert ProgramCost(CUSTOM_CALL_HLO, compute_bound).total.seconds == pytest.approx(
        kernel_bytes / 1e9 + dot_flops / 1e8 + (slice_bytes + fused_slice_bytes) / 1e9
    )


TRITON_FLASH_HLO = """HloModule jit_attention, num_partitions=1

ENTRY %main (q: bf16[2,512,4,72], k: bf16[2,512,4,72], v: bf16[2,512,4,72], s: s32[2,512]) -> bf16[2,512,4,72] {
  %q = bf16[2,512,4,72]{3,2,1,0} parameter(0)
  %k = bf16[2,512,4,72]{3,2,1,0} parameter(1)
  %v = bf16[2,512,4,72]{3,2,1,0} parameter(2)
  %s = s32[2,512]{1,0} parameter(3)
  ROOT %flash = bf16[2,512,4,72]{3,2,1,0} custom-call(%q, %k, %v, %s), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/SCOPE/jit(mha)/mha_forward/pallas_call"}
}
"""


@pytest.mark.parametrize("causal", [True, False])
def test_tritons_flash_attention_costs_its_two_matmuls(causal):
    """XLA:GPU's Triton calls carry no cost: the flash kernel's flops come from its shapes, the
    head dimension padded to a power of two as the kernel pads it, half of them when causal."""
    scope = attention_module.GPU_FLASH_SCOPE + ("_causal" if causal else "")
    cost = ProgramCost(
        TRITON_FLASH_HLO.replace("SCOPE", scope), dataclasses.replace(BYTES_AT_1_GB_PER_S, peak_flops=1e9)
    )
    flops = 4 * 2 * 4 * 512 * 512 * 128 / (2 if causal else 1)
    assert cost.total.seconds == pytest.approx(flops / 1e9)


TRITON_CACHE_ATTENTION_HLO = """HloModule jit_attention, num_partitions=1

ENTRY %main (p: s32[2], q: bf16[2,4,256,128], k: bf16[2,4,1024,128], v: bf16[2,4,1024,128], m: s32[2,1024]) -> (f32[2,4,256], f32[2,4,256], f32[2,4,256,128]) {
  %p = s32[2]{0} parameter(0)
  %q = bf16[2,4,256,128]{3,2,1,0} parameter(1)
  %k = bf16[2,4,1024,128]{3,2,1,0} parameter(2)
  %v = bf16[2,4,1024,128]{3,2,1,0} parameter(3)
  %m = s32[2,1024]{1,0} parameter(4)
  ROOT %stats = (f32[2,4,256]{2,1,0}, f32[2,4,256]{2,1,0}, f32[2,4,256,128]{3,2,1,0}) custom-call(%p, %q, %k, %v, %m), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/shard_map/gpu_cache_attention/cache_attention_stats_gpu/pallas_call"}
}
"""


def test_tritons_cache_attention_reads_the_cache_once_per_block_of_queries():
    """The cache kernel's Triton call carries no cost: its bytes are the cache (keys, values, mask)
    once for each block of QUERY_BLOCK query rows (the static worst case), plus q and the
    statistics; its flops two matmuls of B x K x R x S x H."""
    blocks = 256 // cache_attention_gpu.QUERY_BLOCK
    cache_bytes = 2 * (2 * 4 * 1024 * 128 * 2) + 2 * 1024 * 4
    own_bytes = 2 * 4 * 256 * 128 * 2 + 2 * (2 * 4 * 256 * 4) + 2 * 4 * 256 * 128 * 4
    by_bytes = ProgramCost(TRITON_CACHE_ATTENTION_HLO, dataclasses.replace(BYTES_AT_1_GB_PER_S, peak_flops=1e30))
    assert by_bytes.total.seconds == pytest.approx((blocks * cache_bytes + own_bytes) / 1e9)
    by_flops = ProgramCost(
        TRITON_CACHE_ATTENTION_HLO, dataclasses.replace(BYTES_AT_1_GB_PER_S, peak_flops=1e9, hbm_bytes_per_second=1e30)
    )
    assert by_flops.total.seconds == pytest.approx(4 * 2 * 4 * 256 * 1024 * 128 / 1e9)


ASYNC_COPIES_HLO = """HloModule jit_copies, num_partitions=1

ENTRY %main (w: bf16[1024,512], v: bf16[256,512]) -> (bf16[1024,512], bf16[256,512]) {
  %w = bf16[1024,512]{1,0} parameter(0)
  %v = bf16[256,512]{1,0} parameter(1)
  %to_vmem = (bf16[1024,512]{1,0:S(1)}, bf16[1024,512]{1,0}, u32[]{:S(2)}) copy-start(%w)
  %in_vmem = bf16[1024,512]{1,0:S(1)} copy-done(%to_vmem)
  %in_hbm = (bf16[256,512]{1,0}, bf16[256,512]{1,0}, u32[]{:S(2)}) copy-start(%v)
  %copied = bf16[256,512]{1,0} copy-done(%in_hbm)
  ROOT %out = (bf16[1024,512]{1,0:S(1)}, bf16[256,512]{1,0}) tuple(%in_vmem, %copied)
}
"""


def test_a_copy_into_vmem_reads_hbm_once():
    """copy-start's shape is (destination, source alias, context): a prefetch of weights into the
    chip's VMEM (S(1)) reads them from HBM and writes no HBM; a copy within HBM reads and writes."""
    cost = ProgramCost(ASYNC_COPIES_HLO, BYTES_AT_1_GB_PER_S)
    seconds = {instruction.name: time for time, instruction in cost.heaviest(10)}
    assert seconds["to_vmem"] == pytest.approx(1024 * 512 * 2 / 1e9)
    assert seconds["in_hbm"] == pytest.approx(2 * 256 * 512 * 2 / 1e9)
    assert cost.total.seconds == pytest.approx((1024 * 512 * 2 + 2 * 256 * 512 * 2) / 1e9)


def compiled_on_the_cpu_host(code: str) -> str:
    """The output of a Python script that compiles for a target, run with JAX on the CPU."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_libtpu
def test_chip_clocks_agree_with_the_compilers_matmul_estimate():
    """Cycles become seconds through CHIPS' clocks: the compiler's estimate of a large bf16 matmul
    must then come out at most at the published peak, and not far below it."""
    code = """
import re, jax, jax.numpy as jnp
from aria_jax.accelerators import CHIPS, parse_target, prepare_environment, target_devices
for name in ("v5e:2x2", "v6e:2x2", "v5p:2x2x1"):
    target = parse_target(name)
    prepare_environment(target)
    device = target_devices(target)[0]
    a = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(device))
    hlo = jax.jit(lambda x, y: x @ y).lower(a, a).compile().as_text()
    cycles = sum(int(c) for c in re.findall(r'"estimated_cycles":"(\\d+)"', hlo))
    chip = CHIPS[target.chip_key]
    print(name, 2 * 4096**3 / (cycles / chip.clock_hz) / chip.peak_flops)
"""
    fractions = dict(line.split() for line in compiled_on_the_cpu_host(code).splitlines())
    assert sorted(fractions) == ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"]
    for name, fraction in fractions.items():
        assert 0.8 <= float(fraction) <= 1.0, (name, fraction)


@needs_libtpu
def test_one_row_matmuls_stay_on_the_matrix_units_in_the_models_programs():
    """The models compile for TPU with COMPILER_OPTIONS: a matmul of one row (decode at batch 1)
    stays a matmul (`convolution` in TPU HLO), where plain jax.jit makes it a product and a sum;
    models with int4 weights keep the product and sum, into which their conversion fuses."""
    code = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from aria_jax.accelerators import parse_target, prepare_environment, target_devices
from aria_jax.sharding import MeshRunner, make_mesh
target = parse_target("v5e:2x2")
prepare_environment(target)
mesh = make_mesh(expert=4, devices=target_devices(target))
runner = MeshRunner(mesh)
assert runner.platform == "tpu"
row = jax.ShapeDtypeStruct((1, 2560), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
weights = jax.ShapeDtypeStruct((2560, 2560), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
int4_runner = MeshRunner(mesh, int4_weights=True)
for name, jitted in (("plain", jax.jit(jnp.matmul)), ("model", runner.jit(jnp.matmul)), ("int4", int4_runner.jit(jnp.matmul))):
    hlo = jitted.trace(row, weights).lower().compile().as_text()
    print(name, " convolution(" in hlo, " reduce(" in hlo)
"""
    assert compiled_on_the_cpu_host(code).split("\n")[:3] == ["plain False True", "model True False", "int4 False True"]


# -- the roofline, by hand -------------------------------------------------------------------------

SMALL = AriaTextConfig(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    moe_num_experts=8,
    moe_topk=2,
    moe_num_shared_experts=2,
)


def test_decode_roofline_counts_what_a_step_must_read():
    d, head, heads, kv_heads, f, shared, experts, vocab, layers = 64, 16, 4, 2, 48, 96, 8, 1000, 3
    attention = d * heads * head * 2 + d * kv_heads * head * 2  # q and o, k and v
    norms = 2 * d
    shared_experts = 3 * d * shared
    router = d * experts
    one_expert = d * 2 * f + f * d
    for batch, touched in ((1, 2), (3, 6), (16, 8)):  # min(experts, batch x top_k)
        parts = decode_step_bytes(SMALL, "bfloat16", batch, cache_length=40)
        assert parts["weights"] == 2 * (layers * (attention + norms + shared_experts + router) + d * vocab + d)
        assert parts["routed experts"] == 2 * layers * touched * one_expert
        assert parts["embedding rows"] == 2 * batch * d
        assert parts["KV cache"] == 2 * 2 * layers * batch * 40 * kv_heads * head
        # int8: a byte per number and a float32 scale per (row, kv head, position)
        int8 = decode_step_bytes(SMALL, "bfloat16", batch, cache_length=40, kv_cache_dtype="int8")
        assert int8["KV cache"] == 2 * layers * batch * 40 * kv_heads * (head + 4)
    assert (
        decode_step_bytes(SMALL, "float32", 1, 40)["weights"]
        == 2 * decode_step_bytes(SMALL, "bfloat16", 1, 40)["weights"]
    )


def test_prefill_roofline_counts_the_flops_of_the_prompt():
    d, head, heads, kv_heads, f, shared, experts, vocab, layers = 64, 16, 4, 2, 48, 96, 8, 1000, 3
    batch, length = 2, 10
    per_token_per_layer = 2 * (
        d * heads * head * 2 + d * kv_heads * head * 2 + 3 * d * shared + d * experts + 2 * (d * 2 * f + f * d)
    )  # top_k = 2 experts
    attention = 2 * 2 * heads * head * (length * (length + 1) // 2) * layers
    expected = batch * length * layers * per_token_per_layer + batch * (2 * d * vocab + attention)
    assert prefill_flops(SMALL, "bfloat16", batch, length) == expected


def test_every_chip_has_the_figures_the_plan_divides_by():
    for key, chip in CHIPS.items():
        assert chip.peak_flops > 0 and chip.hbm_bytes_per_second > 0 and chip.hbm_bytes > 0, key
        assert (chip.clock_hz is None) == (key == "h100"), key
    assert round(CHIPS["v4"].clock_hz / 1e6) == 1049  # the rule reproduces v4's published 1050 MHz


TPU_ATTENTION_SCRIPT = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import aria_jax
from aria_jax.accelerators import parse_target, prepare_environment, target_devices
from aria_jax.attention import attention
target = parse_target("v5e:2x2")
prepare_environment(target)
mesh = aria_jax.make_mesh(1, 4, 1, devices=target_devices(target))
def spec(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))
q, kv, mask, start = spec((4, 2304, 4, 128)), spec((4, 4, 2304, 128)), spec((4, 2304), bool), spec((), jnp.int32)
with jax.set_mesh(mesh):
    whole = jax.jit(lambda q, k, v, m: attention(q, k, v, m, 0)).lower(q, kv, kv, mask).compile().as_text()
    chunk = jax.jit(attention).lower(q, kv, kv, mask, start).compile().as_text()
    step = jax.jit(attention).lower(spec((4, 1, 4, 128)), kv, kv, mask, start).compile().as_text()
kernel = 'custom_call_target="tpu_custom_call"'
print(whole.count(kernel), chunk.count(kernel), " while(" in chunk, "decode_attention_stats" in chunk, step.count(kernel))
"""


@needs_libtpu
def test_long_self_attention_compiles_to_the_flash_kernel_on_tpu():
    """Compiled for v5e with libtpu: a whole sequence past the dense limit runs the Pallas flash
    kernel (under shard_map on the mesh); queries at a traced offset into the cache (a prompt's
    later chunk) run the decode kernel, their rows in blocks (no loop over key blocks in plain
    JAX); so does a decode step's query."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-c", TPU_ATTENTION_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["1", "1", "False", "True", "1"]
