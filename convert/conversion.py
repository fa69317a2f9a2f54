"""`aria-jax convert` (hub safetensors -> converted orbax checkpoint) and `aria-jax export` (back).

Both check everything that can be checked before writing a byte (keys, shapes, config), build
the destination in a hidden sibling directory that is renamed into place at the end, hold one
piece or layer in memory at a time, and report progress over bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import time
import warnings

import numpy as np
from tqdm import tqdm

from aria_jax.config import AriaConfig, AriaTextConfig
from aria_jax.checkpoint import CONVERTED, Manifest, is_whole_conversion, plan_pieces, write_pieces
from aria_jax.export import EXPORTED, MAX_SHARD_BYTES, hub_config, is_exported, write_hub_weights
from aria_jax.safetensors_io import CheckpointError
from aria_jax.files import atomic_directory, copy_side_files, write_json
from aria_jax.families import config_from_directory, key_table_for, param_layout
from aria_jax.pretrained import resolve_dtype, shape_tree
from aria_jax.quantization import DEFAULT_GROUP_SIZE, Quantization
from aria_jax.resident_memory import peak_resident_bytes
from aria_jax.torch_pickle import TorchZipCheckpoint
from aria_jax.weights import HubCheckpoint, KeyTable, flatten_tree, layer_sources, plan_load


class NonFiniteWarning(UserWarning):
    """Weights that hold NaN or infinite values (converted as they are)."""


@dataclasses.dataclass(frozen=True)
class Summary:
    verb: str
    tensors: int
    bytes: int
    seconds: float
    destination: str
    nonfinite: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # key: (NaN, inf) counts

    @property
    def peak_memory_bytes(self) -> int:
        return peak_resident_bytes()

    def line(self) -> str:
        return (
            f"{self.verb} {self.tensors} tensors, {human_bytes(self.bytes)} in {self.seconds:.1f} s, "
            f"peak memory {human_bytes(self.peak_memory_bytes)}: {self.destination}"
        )


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    config: object  # AriaConfig, AriaTextConfig or Qwen2VLConfig (`families`)
    components: tuple[str, ...]
    flat_shapes: dict[tuple[str, ...], tuple[int, ...]]
    table: KeyTable

    @classmethod
    def of(cls, directory: str) -> "ModelLayout":
        config = config_from_directory(directory)
        components, boxed_shapes = param_layout(config)
        return cls(config, components, flatten_tree(shape_tree(boxed_shapes)), key_table_for(config))

    @classmethod
    def for_awaker(cls, base_directory: str, checkpoint, lora_alpha: float | None) -> "ModelLayout":
        """Awaker on the Qwen2-VL base at `base_directory`: its adapters' rank and expert count
        read from the checkpoint's shapes, the routers' span tokens from the base's tokenizer."""
        from aria_jax.qwen2_vl.config import AwakerConfig, AwakerTextConfig, Qwen2VLConfig

        base = config_from_directory(base_directory)
        if not isinstance(base, Qwen2VLConfig) or isinstance(base, AwakerConfig):
            raise CheckpointError(
                f"{base_directory}: --awaker needs the Qwen2-VL base directory, not a {type(base).__name__}'s"
            )
        rank, experts = awaker_adapter_shape(checkpoint)
        ids = special_token_ids(base_directory, ("<|im_start|>", "<|im_end|>"))
        text = AwakerTextConfig(
            **dataclasses.asdict(base.text_config),
            lora_rank=rank,
            lora_alpha=2.0 * rank if lora_alpha is None else float(lora_alpha),
            moe_lora_experts=experts,
        )
        base_fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name != "text_config"}
        config = AwakerConfig(
            text_config=text, im_start_token_id=ids["<|im_start|>"], im_end_token_id=ids["<|im_end|>"], **base_fields
        )
        components, boxed_shapes = param_layout(config)
        return cls(config, components, flatten_tree(shape_tree(boxed_shapes)), key_table_for(config))


AWAKER_LORA_A = re.compile(r"(?:base_model\.model\.)?model\.layers\.0\.self_attn\.q_proj\.lora_A\.default\.weight")
AWAKER_EXPERT_A = re.compile(r"(?:base_model\.model\.)?model\.layers\.0\.self_attn\.o_proj\.lora_moe_A\.(\d+)\.weight")


def awaker_adapter_shape(checkpoint) -> tuple[int, int]:
    """(LoRA rank, routed experts) of an Awaker state dict, from layer 0's keys and shapes."""
    keys = checkpoint.keys()
    lora_a = [key for key in keys if AWAKER_LORA_A.fullmatch(key)]
    experts = {int(match.group(1)) for key in keys if (match := AWAKER_EXPERT_A.fullmatch(key))}
    if not lora_a or not experts:
        raise CheckpointError(
            f"{checkpoint.path}: no Awaker adapters (no layer-0 q_proj.lora_A.default / o_proj.lora_moe_A.<n> keys)"
        )
    if experts != set(range(len(experts))):
        raise CheckpointError(f"{checkpoint.path}: o_proj's experts are numbered {sorted(experts)}, expected 0..n-1")
    return checkpoint.shape(lora_a[0])[0], len(experts)


def special_token_ids(directory: str, tokens: tuple[str, ...]) -> dict[str, int]:
    """The ids the tokenizer at `directory` gives special tokens; an error names a missing one."""
    from aria_jax.tokenizer import AriaTokenizer

    tokenizer = AriaTokenizer.from_pretrained(directory, byte_level=True)
    vocab = tokenizer.get_vocab()
    missing = [token for token in tokens if token not in vocab]
    if missing:
        raise CheckpointError(f"{directory}: the tokenizer has no {missing[0]} token")
    return {token: vocab[token] for token in tokens}


def _progress(total: int, description: str, quiet: bool) -> tqdm:
    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, disable=quiet, dynamic_ncols=True
    )


def count_nonfinite(tensor: np.ndarray) -> tuple[int, int]:
    """(NaN values, infinite values) of a float tensor."""
    return int(np.count_nonzero(np.isnan(tensor))), int(np.count_nonzero(np.isinf(tensor)))


def nonfinite_message(counts: dict[str, tuple[int, int]]) -> str:
    listed = ", ".join(f"{key} ({nan} NaN, {inf} inf)" for key, (nan, inf) in list(counts.items())[:5])
    more = f" and {len(counts) - 5} more" if len(counts) > 5 else ""
    return f"{len(counts)} tensor(s) hold non-finite values: {listed}{more}"


def convert_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    dtype: str | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    strict: bool = False,
    quantize=None,
    group_size: int = DEFAULT_GROUP_SIZE,
    quantize_vision: bool = False,
    awaker: str | os.PathLike | None = None,
    awaker_lora_alpha: float | None = None,
) -> Summary:
    """Converts a hub-format directory (hub or original rhymes-ai naming, one or several
    safetensors files) into a self-contained converted checkpoint at `destination`, with params
    in `dtype` (default: the source's widest float type; with `awaker`, the type most of its bytes
    are in).

    `awaker`: Awaker2.5-VL's `pytorch_model.bin` (all of its weights, base and adapters), read
    without running its pickle (`torch_pickle`); `source` is then the Qwen2-VL base directory,
    which gives the config, tokenizer and processor files. The adapters' rank and expert count
    are read from the weights; their alpha is not stored there: `awaker_lora_alpha`, by default
    twice the rank (the release: rank 256, alpha 512).

    NaN and infinite values are counted per tensor as it streams by: they are converted as they
    are, with a NonFiniteWarning naming the tensors (`Summary.nonfinite` has the counts), or with
    `strict` the first such tensor is a CheckpointError and nothing is written. A destination
    that is, contains or lies inside the source is refused, and `overwrite` replaces only a
    converted checkpoint. `quantize` ("int8" or "int4", see `aria_jax.quantization`) stores the
    weights it covers quantized, their scales beside them."""
    start = time.perf_counter()
    quantization = Quantization.of(quantize, group_size, quantize_vision)
    source = os.fspath(source)
    directory = source if os.path.isdir(source) else os.path.dirname(source)
    if awaker is None:
        checkpoint = HubCheckpoint(source)  # refuses pickles and unreadable files before anything else
        model = ModelLayout.of(directory)
    else:
        checkpoint = TorchZipCheckpoint(awaker)  # refuses any pickle that would run code
        model = ModelLayout.for_awaker(directory, checkpoint, awaker_lora_alpha)
    if quantization and not isinstance(model.config, (AriaConfig, AriaTextConfig)):
        raise ValueError(f"{source}: --quantize is for Aria checkpoints; Qwen2-VL's weights are converted as they are")
    plan = plan_load(checkpoint, model.flat_shapes, model.components, model.table)
    for path, shape in model.flat_shapes.items() if quantization else ():  # a bad group size fails before writing
        if (input_axes := quantization.input_axes(path)) is not None:
            quantization.scales_shape(path, shape, input_axes)
    keys = [s.key for sources in plan.values() for s in sources]
    source_dtypes = [checkpoint.dtype(key) for key in keys]
    if dtype:
        target = np.dtype(resolve_dtype(dtype))
    elif awaker is None:
        target = max(source_dtypes, key=lambda t: t.itemsize)
    else:  # its q/k/v adapters are float32 beside bfloat16 weights: keep the weights' type
        bytes_in = collections.Counter()
        for key, source_dtype in zip(keys, source_dtypes):
            bytes_in[source_dtype] += checkpoint.nbytes(key)
        target = np.dtype(bytes_in.most_common(1)[0][0])
    # A narrowing cast happens on reading; a widening one is left to orbax, so that what is held
    # is never larger than the source tensor.
    held_itemsize = min(target.itemsize, max(t.itemsize for t in source_dtypes))
    largest = max(checkpoint.nbytes(key) for key in keys)
    pieces = plan_pieces(model.flat_shapes, model.components, held_itemsize, largest)
    total = sum(checkpoint.nbytes(key) for key in keys)

    nonfinite: dict[str, tuple[int, int]] = {}
    with (
        _progress(total, "convert", quiet) as bar,
        atomic_directory(
            destination, overwrite, sources=(directory,), replaceable=is_whole_conversion, what=CONVERTED
        ) as partial,
    ):

        def read_tensor(found, shape):
            tensor = checkpoint.read(found.key)
            counts = count_nonfinite(tensor)
            if any(counts):
                if strict:
                    raise CheckpointError(
                        f"{checkpoint.file_path(found.key)}: key {found.key} holds {counts[0]} "
                        f"NaN and {counts[1]} infinite values (refused with strict)"
                    )
                nonfinite[found.key] = counts
            bar.update(tensor.nbytes)
            return found.rule.layout.to_param(tensor, shape)

        def read_leaf(path, layer):
            found = layer_sources(plan[path], layer)
            rule = found[0].rule
            part_shape = rule.part_shape(model.flat_shapes[path])
            param = read_tensor(found[0], part_shape)
            if rule.parts:
                param = np.stack([param] + [read_tensor(source, part_shape) for source in found[1:]])
            input_axes = quantization.input_axes(path, one_layer=layer is not None) if quantization else None
            if input_axes is not None:
                return dict(zip(("values", "scales"), quantization.quantize(param, path, input_axes)))
            narrower = target.itemsize < param.dtype.itemsize
            return param.astype(target) if narrower else np.ascontiguousarray(param)

        write_json(os.path.join(partial, "config.json"), hub_config(model.config, target))
        copy_side_files(directory, partial)
        write_pieces(partial, pieces, read_leaf, target, quantization)
    if nonfinite:
        warnings.warn(nonfinite_message(nonfinite), NonFiniteWarning, stacklevel=2)
    return Summary("converted", len(keys), total, time.perf_counter() - start, os.path.abspath(destination), nonfinite)


def export_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    overwrite: bool = False,
    quiet: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Summary:
    """Writes a converted checkpoint back in hub format (safetensors shards of at most
    `max_shard_bytes` with an index, hub naming, config.json, tokenizer/processor files), so
    that transformers' `from_pretrained(destination)` loads it. A destination that is, contains
    or lies inside the source is refused, and `overwrite` replaces only an earlier export."""
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r}: must be a positive number of bytes")
    start = time.perf_counter()
    source = os.fspath(source)
    manifest = Manifest.read(source)
    if manifest.quantization is not None:
        raise CheckpointError(
            f"{source}: weights stored quantized ({manifest.quantization.scheme}); the hub format "
            "holds float weights, so export the float conversion (convert without --quantize)"
        )
    model = ModelLayout.of(source)
    if any(rule.parts for rule in model.table.rules):
        raise CheckpointError(
            f"{source}: an Awaker checkpoint; export writes hub safetensors, and Awaker's hub form is a "
            "pickle (pytorch_model.bin), which aria-jax does not write"
        )
    manifest.check_covers(model.flat_shapes, model.components)
    pieces = [piece for piece in manifest.pieces if piece.component in model.components]
    total = sum(int(np.prod(shape)) * manifest.dtype.itemsize for piece in pieces for shape in piece.leaves.values())

    with (
        _progress(total, "export", quiet) as bar,
        atomic_directory(destination, overwrite, sources=(source,), replaceable=is_exported, what=EXPORTED) as partial,
    ):
        write_json(os.path.join(partial, "config.json"), hub_config(model.config, manifest.dtype))
        copy_side_files(source, partial)
        tensors = write_hub_weights(
            partial, model.config, pieces, manifest.restore_piece_numpy, manifest.dtype, max_shard_bytes, bar.update
        )
    return Summary("exported", len(tensors), total, time.perf_counter() - start, os.path.abspath(destination))
