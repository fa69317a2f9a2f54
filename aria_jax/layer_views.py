"""Each decoder layer's params as arrays over the layer stacks' own memory, on one CPU device.

XLA:CPU copies a slice of an array before a matmul reads it: a layer's weights taken out of the
stacks inside a program are copied at every call (prefill) or once per call (decode, ahead of its
steps). On the host the stacks are plain memory, so a layer's slice of each is a NumPy view, and
`jax.device_put` of a view makes a CPU array over that memory without copying it. Programs given
these views read each layer's weights where they lie. The views keep the stacks' buffers alive,
and JAX declines to donate a buffer that is viewed (it copies instead), so neither can be lost.
"""

from __future__ import annotations

import jax
import numpy as np

from aria_jax.modeling import split_off_routed_experts


def on_one_cpu_device(tree) -> bool:
    """Whether every array of `tree` lives on the same single CPU device."""
    devices = {device for leaf in jax.tree.leaves(tree) for device in leaf.devices()}
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def layer_views(text_params: dict, num_layers: int) -> list[dict] | None:
    """`modeling.layer_params(text_params, i)` for every layer i, all but the routed experts (which
    stay stacked: the MoE reads a layer's experts in the stacks) as views of the stacks; None
    unless the params are concrete arrays on one CPU device. Where `device_put` cannot alias a
    slice (memory not aligned as XLA needs; int4 arrays) it copies it: correct, only not free."""
    stacked = text_params["layers"]
    if not all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(stacked)) or not on_one_cpu_device(stacked):
        return None
    per_layer, in_stack = split_off_routed_experts(stacked)
    device = next(iter(jax.tree.leaves(stacked)[0].devices()))
    host = jax.tree.map(np.asarray, per_layer)  # the device buffers themselves, read-only
    return [
        {**layer, "mlp": {**layer["mlp"], **in_stack}}
        for layer in (
            jax.tree.map(lambda stack: jax.device_put(stack[index], device), host) for index in range(num_layers)
        )
    ]
