"""Which params hold one matrix per routed expert, and along which axes: stated once here.

`MoE` declares its routed experts' params with these logical axes (behind a leading "layers"
axis when stacked); checkpoint chunking, quantization, LoRA, the decode path and the benchmark's
byte counts find the experts through this table instead of naming the weights themselves.
"""

# One layer's slice of each weight is (experts, in, out): gate and up projections side by side
# in `experts_gate_up`, then `experts_down`.
ROUTED_EXPERT_AXES = {
    "experts_gate_up": ("experts", "expert_embed", "expert_mlp"),
    "experts_down": ("experts", "expert_mlp", "expert_embed"),
}
EXPERT_AXIS, INPUT_AXIS = 0, 1


def is_routed_expert_weight(name: str) -> bool:
    """Whether the param called `name` (its path's last part) holds a matrix per routed expert."""
    return name in ROUTED_EXPERT_AXES
