"""Converted checkpoints: the params saved with orbax in pieces, restored straight into a mesh.

A converted directory holds config.json, the tokenizer and processor files, the manifest
`aria_jax_checkpoint.json` and `params/`, one orbax checkpoint per piece. A piece is some of a
component's unstacked params, or some of the params of one layer, and holds at most as many
bytes as the largest hub tensor (a larger param is a piece alone). Pieces exist for memory: the
stacked expert weights of full Aria are 30 GB, so the converter holds one piece at a time, and
restoring writes each layer's piece, restored directly into its sharding, into its slot of the
stacked arrays in place. Expert weights are chunked one expert per chunk, so a host restoring
some experts reads only their chunks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from aria_jax.config import read_json_object
from aria_jax.expert_weights import EXPERT_AXIS, is_routed_expert_weight
from aria_jax.files import holds_only, pause_point
from aria_jax.quantization import Quantization, is_quantized
from aria_jax.safetensors_io import CheckpointError
from aria_jax.weights import COMPONENTS, flatten_tree, is_stacked, unflatten_tree

MANIFEST = "aria_jax_checkpoint.json"
FORMAT = "aria-jax orbax pieces"
VERSION = 1
PARAMS_DIR = "params"
CHUNK_BYTES = 64 << 20

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Piece:
    """One orbax checkpoint: `leaves` (param paths, with their per-layer shapes) of one
    component, all of layer `layer` (or all unstacked when None)."""

    directory: str
    component: str
    layer: int | None
    leaves: dict[Path, tuple[int, ...]]

    def to_json(self) -> dict:
        return {
            "directory": self.directory,
            "component": self.component,
            "layer": self.layer,
            "leaves": {"/".join(path): list(shape) for path, shape in self.leaves.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> "Piece":
        leaves = {tuple(name.split("/")): tuple(shape) for name, shape in d["leaves"].items()}
        return cls(d["directory"], d["component"], d["layer"], leaves)


def plan_pieces(
    flat_shapes: dict[Path, tuple[int, ...]], components: tuple[str, ...], itemsize: int, max_piece_bytes: float
) -> list[Piece]:
    """Packs the params of `components` into pieces of at most `max_piece_bytes`, per layer."""
    pieces = []
    for component in components:
        paths = sorted(path for path in flat_shapes if path[0] == component)
        unstacked = {path: flat_shapes[path] for path in paths if not is_stacked(path)}
        stacked = {path: flat_shapes[path][1:] for path in paths if is_stacked(path)}
        groups = [(None, unstacked)]
        if stacked:
            num_layers = flat_shapes[next(iter(stacked))][0]
            groups += [(layer, stacked) for layer in range(num_layers)]
        for layer, leaves in groups:
            name = f"{component}/{'unstacked' if layer is None else f'layer_{layer:03d}'}"
            packed: list[dict[Path, tuple[int, ...]]] = [{}]
            held = 0
            for path, shape in leaves.items():
                size = int(np.prod(shape)) * itemsize
                if packed[-1] and held + size > max_piece_bytes:
                    packed.append({})
                    held = 0
                packed[-1][path] = shape
                held += size
            pieces += [Piece(f"{name}_{k}", component, layer, part) for k, part in enumerate(packed) if part]
    return pieces


def _relative_tree(piece: Piece, leaves: dict[Path, object]) -> dict:
    """The piece's leaves as a tree under its component (orbax's names for them)."""
    return unflatten_tree({path[1:]: value for path, value in leaves.items()})


def write_pieces(
    directory: str,
    pieces: list[Piece],
    read_leaf: Callable[[Path, int | None], np.ndarray | dict],
    dtype,
    quantization: Quantization | None = None,
) -> None:
    """Saves each piece (its leaves from `read_leaf(path, layer)`, cast to `dtype`) and then
    the manifest. One piece is in memory at a time. With `quantization`, `read_leaf` gives the
    weights it covers as {"values", "scales"}, stored as they are."""
    dtype = jnp.dtype(dtype)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False))

    # An OCDBT checkpoint buffers a second copy of every array until it commits; plain zarr
    # streams chunk by chunk, which is what keeps the converter's memory bounded. Expert weights
    # get a chunk per expert (orbax splits `shard_axes` down to 1 first), the rest chunks of
    # at most CHUNK_BYTES.
    def save_args(path: Path, leaf) -> ocp.SaveArgs | dict:
        if is_quantized(leaf):
            return {name: ocp.SaveArgs(dtype=part.dtype, chunk_byte_size=CHUNK_BYTES) for name, part in leaf.items()}
        per_expert = (EXPERT_AXIS,) if is_routed_expert_weight(path[-1]) else ()
        return ocp.SaveArgs(dtype=dtype, chunk_byte_size=CHUNK_BYTES, shard_axes=per_expert)

    for piece in pieces:
        leaves = {path: read_leaf(path, piece.layer) for path in piece.leaves}
        for path, array in leaves.items():
            shape = array["values"].shape if is_quantized(array) else array.shape
            if shape != piece.leaves[path]:
                raise ValueError(f"{'/'.join(path)}: shape {shape}, expected {piece.leaves[path]}")
        tree = _relative_tree(piece, leaves)
        checkpointer.save(
            os.path.join(directory, PARAMS_DIR, piece.directory),
            args=ocp.args.PyTreeSave(
                tree, save_args=_relative_tree(piece, {path: save_args(path, leaf) for path, leaf in leaves.items()})
            ),
        )
        del leaves, tree
        pause_point("convert:piece-saved")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "pieces": [piece.to_json() for piece in pieces],
    }
    if quantization is not None:
        manifest["quantization"] = quantization.to_json()
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)


def is_converted(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def is_whole_conversion(directory: str) -> bool:
    """Whether `directory` is a converted checkpoint (its manifest is written last) holding
    nothing else: what `aria-jax convert --overwrite` may replace."""
    return is_converted(directory) and holds_only(directory, {"config.json", MANIFEST, PARAMS_DIR})


CONVERTED = "a checkpoint written by `aria-jax convert`"


@dataclasses.dataclass(frozen=True)
class Manifest:
    path: str
    dtype: jnp.dtype
    pieces: list[Piece]
    quantization: Quantization | None = None  # how `aria-jax convert --quantize` stored the weights

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Manifest":
        path = os.fspath(path)
        file = os.path.join(path, MANIFEST)
        if not os.path.isfile(file):
            raise CheckpointError(
                f"{path}: not a converted checkpoint (no {MANIFEST}); convert it with `aria-jax convert`"
            )
        d = read_json_object(file, CheckpointError)
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise CheckpointError(
                f"{file}: format {d.get('format')!r} version {d.get('version')!r}, "
                f"expected {FORMAT!r} version {VERSION}"
            )
        try:
            quantization = Quantization(**d["quantization"]) if "quantization" in d else None
            manifest = cls(path, jnp.dtype(d["dtype"]), [Piece.from_json(p) for p in d["pieces"]], quantization)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise CheckpointError(f"{file}: malformed manifest ({err!r})") from None
        for piece in manifest.pieces:
            # Pieces are folders of params/: a path that leads elsewhere is not followed.
            parts = piece.directory.split("/") if isinstance(piece.directory, str) else [None]
            if not all(isinstance(part, str) and part not in ("", ".", "..") and os.sep not in part for part in parts):
                raise CheckpointError(f"{file}: piece directory {piece.directory!r} is not a folder of {PARAMS_DIR}/")
        return manifest

    def piece_directory(self, piece: Piece) -> str:
        return os.path.join(self.path, PARAMS_DIR, piece.directory)

    def check_covers(self, flat_shapes: dict[Path, tuple[int, ...]], components: tuple[str, ...]) -> None:
        """Every param of `components` stored once (per layer) with its shape; nothing else."""
        file = os.path.join(self.path, MANIFEST)
        found: dict[tuple[Path, int | None], tuple[int, ...]] = {}
        for piece in self.pieces:
            if piece.component not in components:
                continue
            for path, shape in piece.leaves.items():
                if (path, piece.layer) in found:
                    raise CheckpointError(f"{file}: {'/'.join(path)} (layer {piece.layer}) is stored twice")
                found[path, piece.layer] = shape
        for path, shape in flat_shapes.items():
            layers = range(shape[0]) if is_stacked(path) else [None]
            expected = shape[1:] if is_stacked(path) else shape
            for layer in layers:
                stored = found.pop((path, layer), None)
                where = "/".join(path) + (f" (layer {layer})" if layer is not None else "")
                if stored is None:
                    raise CheckpointError(f"{file}: missing param {where}")
                if stored != expected:
                    raise CheckpointError(f"{file}: param {where} has shape {stored}, the config says {expected}")
        if found:
            (path, layer), _ = next(iter(found.items()))
            raise CheckpointError(f"{file}: unknown param {'/'.join(path)} (layer {layer})")

    def restore_piece_numpy(self, piece: Piece) -> dict[Path, np.ndarray]:
        """A piece's leaves as host numpy arrays in the stored dtype (for export)."""
        target = _relative_tree(
            piece, {path: jax.ShapeDtypeStruct(shape, self.dtype) for path, shape in piece.leaves.items()}
        )
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        restored = _checkpointer().restore(
            self.piece_directory(piece), args=ocp.args.PyTreeRestore(target, restore_args=restore_args)
        )
        flat = flatten_tree(restored)
        return {(piece.component,) + path: flat[path] for path in flat}


def loaded_quantization(manifest: Manifest, requested: Quantization | None) -> Quantization | None:
    """The quantization a converted checkpoint loads with: as stored (`convert --quantize`), or
    the requested one applied to float weights; a request that the stored weights cannot meet
    is an error."""
    if manifest.quantization is None or requested is None or requested == manifest.quantization:
        return manifest.quantization or requested
    stored = manifest.quantization
    raise CheckpointError(
        f"{manifest.path}: weights stored quantized as {stored.scheme} (group_size "
        f"{stored.group_size}, vision {stored.vision}); they load only as stored (quantize=None "
        f"or {stored.scheme!r} with those settings); convert the hub checkpoint again for another"
    )


@functools.cache
def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


def _layer_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer of a stacked param: the leading layer axis dropped."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return sharding


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: dict, layer_values: dict, layer: jax.Array) -> dict:
    return jax.tree_util.tree_map(lambda s, v: s.at[layer].set(v.astype(s.dtype)), stacked, layer_values)


def restore_params(
    path: str | os.PathLike,
    param_shapes_tree: dict,
    dtype,
    components: tuple[str, ...] = COMPONENTS,
    sharding_for: Callable[[Path], jax.sharding.Sharding] | None = None,
    quantization: Quantization | None = None,
) -> dict:
    """The params of `components` (a tree {component: subtree of shape tuples}) from a converted
    checkpoint, each array in `sharding_for(path)` (default: device 0) and `dtype`. With
    `quantization`, the weights it covers are quantized piece by piece, on the host."""
    manifest = Manifest.read(path)
    flat_shapes = flatten_tree(param_shapes_tree)
    manifest.check_covers(flat_shapes, components)
    quantization = loaded_quantization(manifest, quantization)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    dtype = jnp.dtype(dtype)
    # what each stored param becomes: {path: (shape, dtype)}, two entries for a quantized one
    stored_as: dict[Path, dict[Path, tuple[tuple[int, ...], jnp.dtype]]] = {}
    for p, shape in flat_shapes.items():
        axes = quantization.input_axes(p) if quantization else None
        stored_as[p] = (
            {p: (shape, dtype)}
            if axes is None
            else {
                p + ("values",): (shape, quantization.storage_dtype),
                p + ("scales",): (quantization.scales_shape(p, shape, axes), jnp.dtype(jnp.float32)),
            }
        )
    sharding = {q: sharding_for(q) if sharding_for else default for parts in stored_as.values() for q in parts}

    flat: dict[Path, jax.Array] = {
        q: jax.jit(functools.partial(jnp.zeros, shape, part_dtype), out_shardings=sharding[q])()
        for p in flat_shapes
        if is_stacked(p)
        for q, (shape, part_dtype) in stored_as[p].items()
    }
    for piece in manifest.pieces:
        if piece.component not in components:
            continue
        quantized = {p for p in piece.leaves if len(stored_as[p]) == 2}
        leaf_sharding = {
            q: _layer_sharding(sharding[q]) if piece.layer is not None else sharding[q]
            for p in piece.leaves
            for q in stored_as[p]
        }

        def stored_leaf(p, shape):
            if p in quantized and manifest.quantization is not None:  # stored quantized: restored as stored
                return {
                    q[-1]: jax.ShapeDtypeStruct(
                        part_shape[piece.layer is not None :], part_dtype, sharding=leaf_sharding[q]
                    )
                    for q, (part_shape, part_dtype) in stored_as[p].items()
                }
            # float weights to quantize are restored to the host, whole, and quantized there
            return jax.ShapeDtypeStruct(shape, dtype, sharding=leaf_sharding.get(p))

        target = _relative_tree(piece, {p: stored_leaf(p, shape) for p, shape in piece.leaves.items()})
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        if manifest.quantization is None:
            restore_args = _relative_tree(
                piece,
                {
                    (piece.component,) + p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.float32)
                    if (piece.component,) + p in quantized
                    else arg
                    for p, arg in flatten_tree(restore_args).items()
                },
            )
        try:
            restored = _checkpointer().restore(
                manifest.piece_directory(piece), args=ocp.args.PyTreeRestore(target, restore_args=restore_args)
            )
        except (FileNotFoundError, ValueError) as err:
            raise CheckpointError(
                f"{manifest.piece_directory(piece)}: unreadable piece ({' '.join(str(err).split())[:300]})"
            ) from None
        values = {}
        for p, value in flatten_tree(restored).items():
            p = (piece.component,) + p
            if p not in quantized or manifest.quantization is not None:
                values[p] = value
                continue
            axes = quantization.input_axes(p, one_layer=piece.layer is not None)
            for part, array in zip(("values", "scales"), quantization.quantize(value, p, axes)):
                q = p + (part,)
                values[q] = jax.make_array_from_callback(array.shape, leaf_sharding[q], lambda index, a=array: a[index])
        if piece.layer is None:
            flat.update(values)
        else:
            updated = _set_layer({p: flat[p] for p in values}, values, jnp.int32(piece.layer))
            flat.update(updated)
    return unflatten_tree(flat)
