"""Weight-only quantization: int8 per output channel, int4 in groups along the input.

A quantized weight lives in the params tree as {"values", "scales"} in place of its array:
`values` has the weight's shape in int8 or int4; `scales` (float32) has the same rank, each axis
either the weight's (kept: layers, experts, outputs), 1 (int8: the whole input axis shares a
scale) or the number of groups (int4: `group_size` consecutive inputs of the last input axis
share one). The weight is `values * scales`, each scale repeated over its group. Nothing else
about the tree changes, so loading, sharding, checkpoints and `layer_params` treat the two
arrays like any params.

Which params are quantized: the decoder's linear weights (attention, routed and shared experts,
lm_head), and with `vision=True` the vision tower's and projector's. The router, norms,
embeddings, biases and the patch convolution stay in the compute dtype.

In the model a quantized weight is a `QuantizedArray`: indexing its leading (kept) axes indexes
both arrays, so the MoE gathers or slices int8 experts and dequantizes only what it reads;
`dequantized(weight, dtype)` is the weight in `dtype`, written next to its matmul so that the
compiler fuses it there.

Rounding is symmetric, round half to even, in float32 on the host (numpy) for every path that
quantizes (hub loading, converted checkpoints, `quantize_params`), so they agree bit for bit.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from aria_jax.expert_weights import INPUT_AXIS, is_routed_expert_weight

# scheme -> (storage dtype, largest magnitude used: symmetric, so int4 never uses -8)
SCHEMES = {"int8": (np.dtype(np.int8), 127), "int4": (np.dtype(ml_dtypes.int4), 7)}
QUANTIZED_KEYS = frozenset({"values", "scales"})
DEFAULT_GROUP_SIZE = 128


@dataclasses.dataclass(frozen=True)
class Quantization:
    """What `from_pretrained(quantize=...)` and `aria-jax convert --quantize` do to the weights."""

    scheme: str
    group_size: int = DEFAULT_GROUP_SIZE
    vision: bool = False

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantize={self.scheme!r} is not supported; use one of {', '.join(SCHEMES)} or None")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} must be a positive integer")

    @classmethod
    def of(cls, quantize, group_size=DEFAULT_GROUP_SIZE, vision=False) -> "Quantization | None":
        """From the loaders' arguments: None (no quantization), a scheme name, or a Quantization."""
        if quantize is None or isinstance(quantize, Quantization):
            return quantize
        return cls(quantize, group_size, vision)

    @property
    def storage_dtype(self) -> np.dtype:
        return SCHEMES[self.scheme][0]

    def to_json(self) -> dict:
        return {"scheme": self.scheme, "group_size": self.group_size, "vision": self.vision}

    def input_axes(self, path: tuple[str, ...], one_layer: bool = False) -> tuple[int, ...] | None:
        """The axes of param `path` that its matmul contracts (in the whole param, layer axis
        included; with `one_layer`, in one layer's slice of it), or None if this quantization
        leaves it alone."""
        from aria_jax.weights import RULE_FOR_PATH, is_stacked

        rule = RULE_FOR_PATH.get(path)
        if rule is None or (path[0] != "language_model" and not self.vision) or path[-1] == "router":
            return None
        first = 1 if is_stacked(path) and not one_layer else 0
        if rule.layout.kind == "linear":
            return tuple(range(first, first + rule.layout.linear_in_dims))
        if is_routed_expert_weight(path[-1]):
            return (first + INPUT_AXIS,)
        return None

    def group_along(self, size: int, path: tuple[str, ...]) -> int:
        """Inputs per scale along the last input axis: all of them for int8; for int4
        `group_size`, or the whole axis when it is shorter."""
        if self.scheme == "int8" or size <= self.group_size:
            return size
        if size % self.group_size:
            raise ValueError(
                f"{'/'.join(path)}: input axis of {size} does not divide into groups of "
                f"{self.group_size}; pass a group_size that divides it"
            )
        return self.group_size

    def scales_shape(
        self, path: tuple[str, ...], shape: tuple[int, ...], input_axes: tuple[int, ...]
    ) -> tuple[int, ...]:
        last = input_axes[-1]
        scales = [1 if axis in input_axes and self.scheme == "int8" else size for axis, size in enumerate(shape)]
        scales[last] = shape[last] // self.group_along(shape[last], path)
        return tuple(scales)

    def quantize(self, weight: np.ndarray, path: tuple[str, ...], input_axes: tuple[int, ...]):
        """(values, scales) of a float weight (host arrays), as described in the module doc."""
        storage, largest = SCHEMES[self.scheme]
        weight = np.asarray(weight, np.float32)
        scales_shape = self.scales_shape(path, weight.shape, input_axes)
        grouped = weight.reshape(_split_groups(weight.shape, scales_shape))
        absmax = np.max(np.abs(grouped), axis=tuple(range(1, grouped.ndim, 2)), keepdims=True)
        scales = np.where(absmax > 0, absmax / np.float32(largest), np.float32(1)).astype(np.float32)
        values = np.clip(np.round(grouped / scales), -largest, largest).astype(storage)
        return values.reshape(weight.shape), scales.reshape(scales_shape)


def _split_groups(shape, scales_shape) -> tuple[int, ...]:
    """Each axis as (scales' size, inputs per scale)."""
    return tuple(n for size, groups in zip(shape, scales_shape) for n in (groups, size // groups))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A quantized weight inside the model (see the module doc)."""

    values: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    def __getitem__(self, index) -> "QuantizedArray":
        """Indexes leading axes, which values and scales share (layers, experts)."""
        index = index if isinstance(index, tuple) else (index,)
        if any(self.scales.shape[axis] != self.values.shape[axis] for axis in range(len(index))):
            raise IndexError(f"QuantizedArray {self.shape}: only axes kept whole in the scales can be indexed")
        return QuantizedArray(self.values[index], self.scales[index])

    def dequantize(self, dtype) -> jax.Array:
        split = _split_groups(self.values.shape, self.scales.shape)
        scales = self.scales.reshape(_split_groups(self.scales.shape, self.scales.shape))
        return (self.values.astype(dtype).reshape(split) * scales.astype(dtype)).reshape(self.values.shape)


def is_quantized(stored) -> bool:
    """Whether a params-tree entry is a quantized weight ({"values", "scales"})."""
    return isinstance(stored, dict) and stored.keys() == QUANTIZED_KEYS


def dequantized(weight, dtype) -> jax.Array:
    """A weight (array or `QuantizedArray`) in `dtype`."""
    return weight.dequantize(dtype) if isinstance(weight, QuantizedArray) else weight.astype(dtype)


def spec_for(weight, spec):
    """A shard_map spec for `weight` from its values' spec: a scales axis of size 1 is whole,
    a grouped axis splits like the values (its groups must divide over the mesh axis)."""
    if not isinstance(weight, QuantizedArray):
        return spec
    scales = tuple(
        None if groups == 1 else name for name, groups in zip(tuple(spec) + (None,) * weight.ndim, weight.scales.shape)
    )
    return QuantizedArray(spec, jax.sharding.PartitionSpec(*scales))


def quantize_params(params: dict, quantization: Quantization | None, component: str | None = None) -> dict:
    """A float params tree (host or device arrays) with the weights `quantization` covers
    quantized; `component`: the tree is that component's subtree (e.g. "language_model")."""
    if quantization is None:
        return params
    prefix = (component,) if component else ()

    def walk(node, path):
        if isinstance(node, dict):
            return {name: walk(child, path + (name,)) for name, child in node.items()}
        axes = quantization.input_axes(prefix + path)
        if axes is None:
            return node
        values, scales = quantization.quantize(np.asarray(node), prefix + path, axes)
        return {"values": jnp.asarray(values), "scales": jnp.asarray(scales)}

    return walk(params, ())


def quantized_shapes(boxed_shapes: dict, quantization: Quantization | None) -> dict:
    """An `eval_shape`d params tree ({component: subtree}, leaves boxed with logical axis names)
    as `quantization` stores it: each covered weight as {"values", "scales"}, both with the
    weight's names (a scales axis of 1 then stays whole on any mesh)."""
    if quantization is None:
        return boxed_shapes

    def walk(node, path):
        if isinstance(node, dict):
            return {name: walk(child, path + (name,)) for name, child in node.items()}
        shape = node.value.shape
        axes = quantization.input_axes(path)
        if axes is None:
            return node
        scales = quantization.scales_shape(path, shape, axes)
        return {
            "values": node.replace_boxed(jax.ShapeDtypeStruct(shape, quantization.storage_dtype)),
            "scales": node.replace_boxed(jax.ShapeDtypeStruct(scales, jnp.float32)),
        }

    return walk(boxed_shapes, ())


def array_bytes(shape: tuple[int, ...], dtype) -> int:
    """Bytes an array takes on an accelerator, which packs int4 two to a byte."""
    dtype = jnp.dtype(dtype)
    bits = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else 8 * dtype.itemsize
    return -(-math.prod(shape) * bits // 8)


def holds_quantized(params: dict) -> bool:
    """Whether a params tree holds any quantized weight."""
    return any(is_quantized(child) or (isinstance(child, dict) and holds_quantized(child)) for child in params.values())


def dequantize_tree(params: dict, dtype, keep: tuple[str, ...] = ()) -> dict:
    """A params tree with its quantized weights in `dtype`, but those named in `keep`."""

    def entry(name, child):
        if is_quantized(child):
            return child if name in keep else QuantizedArray(**child).dequantize(dtype)
        return dequantize_tree(child, dtype, keep) if isinstance(child, dict) else child

    return {name: entry(name, child) for name, child in params.items()}


def project(x: jax.Array, weight, dtype) -> jax.Array:
    """x (..., D) @ weight (D, N). A quantized weight's scales multiply the products, not the
    weight (for int4, each group's partial sums): its values go into the matmul as stored,
    converted, where XLA would otherwise multiply and keep a dequantized copy of a large weight
    (lm_head's in decode). Many rows of int4 (their partial sums outgrow the weight) take the
    weight dequantized."""
    if not isinstance(weight, QuantizedArray):
        return jnp.einsum("...d,dn->...n", x, weight.astype(dtype))
    groups, (depth, width) = weight.scales.shape[0], weight.shape
    rows = x.size // depth
    if rows * groups > depth:
        return jnp.einsum("...d,dn->...n", x, weight.dequantize(dtype))
    values = weight.values.astype(dtype).reshape(groups, depth // groups, width)
    partial = jnp.einsum("...gk,gkn->...gn", x.reshape(*x.shape[:-1], groups, depth // groups), values)
    return jnp.einsum("...gn,gn->...n", partial, weight.scales.astype(dtype))
