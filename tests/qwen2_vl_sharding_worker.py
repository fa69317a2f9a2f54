"""8-device runs for test_qwen2_vl_sharding.py, in their own process: XLA_FLAGS (the number of fake
CPU devices) must be set before JAX starts, and the pytest process has one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python tests/qwen2_vl_sharding_worker.py OUT_DIR

OUT_DIR holds what the test wrote: `checkpoints.json` ({family: checkpoint directory}) and
`inputs.npz` (the processor's outputs, so that both sides feed the same batch). For every family
and layout the run saves logits as .npy files in OUT_DIR and prints one line `RESULT <json>` on
stdout (last line): greedy tokens and where params and logits live.
"""

from __future__ import annotations

import json
import os
import sys

from sharding_worker import describe, layout_name

# (data, expert, tensor) layouts of 8 devices. The tiny Qwen2-VL's 4 heads, 2 kv heads and 2
# vision heads divide over tensor=2 at most; the expert axis of a dense model splits rows.
LAYOUTS = {"qwen2_vl": [(2, 2, 2)], "awaker": [(4, 1, 2)]}
NEW_TOKENS = 8


def model_class(family: str):
    from aria_jax.qwen2_vl.pretrained import AwakerForConditionalGeneration, Qwen2VLForConditionalGeneration

    return AwakerForConditionalGeneration if family == "awaker" else Qwen2VLForConditionalGeneration


def load_inputs(out_dir: str) -> dict:
    import numpy as np

    with np.load(os.path.join(out_dir, "inputs.npz")) as saved:
        return {name: saved[name] for name in saved.files}


def run_layout(family: str, directory: str, layout, inputs: dict, out_dir: str) -> dict:
    """One family on one layout: greedy tokens, logits (saved to out_dir) and where params live."""
    import numpy as np

    from aria_jax.sharding import make_mesh

    mesh = make_mesh(*layout)
    model = model_class(family).from_pretrained(directory, mesh=mesh)
    layers = model.params["language_model"]["layers"]
    tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, stop_strings=None)
    logits = model(**inputs).logits
    logits_file = os.path.join(out_dir, f"logits_{family}_{layout_name(layout)}.npy")
    np.save(logits_file, np.asarray(logits))
    params = {
        "q_proj": describe(layers["self_attn"]["q_proj"]),
        "gate_proj": describe(layers["mlp"]["gate_proj"]),
        "lm_head": describe(model.params["language_model"]["lm_head"]),
        "vision qkv": describe(model.params["visual"]["layers"]["attn"]["qkv"]["kernel"]),
    }
    if family == "awaker":
        params["gate_proj_experts_b"] = describe(layers["mlp"]["gate_proj_experts_b"])
        params["q_lora_b"] = describe(layers["self_attn"]["q_lora_b"])
    return {
        "mesh": {"names": list(mesh.axis_names), "sizes": list(mesh.axis_sizes), "devices": int(mesh.devices.size)},
        "tokens": np.asarray(tokens).tolist(),
        "logits_file": logits_file,
        "logits_spec": describe(logits)["spec"],
        "params": params,
    }


def main(out_dir: str) -> None:
    import time

    import jax

    with open(os.path.join(out_dir, "checkpoints.json")) as f:
        checkpoints = json.load(f)
    inputs = load_inputs(out_dir)
    results: dict = {"device_count": jax.device_count(), "runs": {}, "seconds": {}}
    for family, directory in checkpoints.items():
        for layout in LAYOUTS[family]:
            start = time.perf_counter()
            name = f"{family} {layout_name(layout)}"
            results["runs"][name] = run_layout(family, directory, layout, inputs, out_dir)
            results["seconds"][name] = round(time.perf_counter() - start, 1)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
