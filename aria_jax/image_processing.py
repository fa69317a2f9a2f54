"""Aria image preprocessing: images in, `pixel_values` / `pixel_mask` / `num_crops` out.

numpy and Pillow only. The parity oracle is transformers' `AriaImageProcessorPil`
(`transformers/models/aria/image_processing_pil_aria.py`), whose output this module reproduces bit
for bit. (transformers' torchvision-backed `AriaImageProcessor` resizes with torchvision's bicubic,
which differs from PIL's by +-1 on uint8 values, so it is not the oracle.)

Per image:

1. Load and convert to RGB uint8, the way the oracle does (`to_rgb_array`, `load_image_file`).
2. Optionally split into crops: `split_transformers` (transformers' `get_image_patches`) or
   `split_original` (rhymes-ai's original remote-code processor, which adds a global view);
   the two give different crops and crop counts.
3. Each crop: resize keeping the aspect ratio so its long side is `max_image_size` and its short
   side at least `min_image_size` (PIL, bicubic, on uint8), pad right and bottom with black to a
   square, mark the real pixels in `pixel_mask`, then `(pixel / 255 - mean) / std` in float32
   (`do_rescale`, `rescale_factor` and `do_normalize` change that step as in transformers).

Differences from the oracle, on purpose:

- `num_crops` is one count per input image; transformers returns the batch-wide maximum, which
  is wrong whenever split images in one batch have different crop counts.
- Arrays (numpy, torch tensors, anything with `__array__`) must be uint8, (H, W), (H, W, C)
  or (C, H, W) with C in 1..4. The channel axis is the last one when its size is 1..4, else the
  first: the same reading as transformers' except for shapes whose both ends are 1..4 (a 3 x W x 3
  array), which transformers reads as channels first.
- `do_convert_rgb=False` (an option transformers has) gives the same output for RGB inputs;
  any other input is refused, where transformers would pass on a non-RGB array.
- Inputs the oracle rejects are handled: 2-D numpy arrays (grayscale), (H, W, 2) arrays
  (gray + alpha, blended onto white like RGBA arrays), `os.PathLike` paths, and PIL mode "La"
  (un-premultiplied to "LA" first). URLs and base64 strings are not accepted.
- Unreadable files, empty files and images above `PIL.Image.MAX_IMAGE_PIXELS` raise `ImageError`
  (a ValueError with a one-line message naming the file) instead of PIL's errors or warning.

Oracle quirks kept on purpose (parity first):

- A file path is EXIF-transposed and converted with a plain `convert("RGB")`, which drops an
  alpha band (transparent pixels keep whatever colour they store); tRNS transparency survives
  that conversion as one RGB colour, and every pixel of that colour then turns white. An
  in-memory PIL image is not EXIF-transposed, and its alpha is blended onto white.
- 16-bit ("I;16", "I") and float ("F") images are clipped to 0..255 by PIL's conversion (a
  typical 16-bit photo comes out nearly white), not rescaled; "F" values are truncated.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from aria_jax.config import ARIA_CROP_SIZE_TO_QUERIES, read_optional_json


class ImageError(ValueError):
    """An image that cannot be used; the message is one line naming the file (or image) and why."""


# The 19 split shapes (no 1 x 1), in tiles of 490 pixels: transformers' default
# `split_resolutions` (`image_processing_pil_aria.py`) and rhymes-ai's. transformers reads each
# pair as (rows, cols), i.e. (height, width); rhymes-ai's original code reads it as (cols, rows).
# fmt: off
DEFAULT_SPLIT_TILES = (
    (1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (1, 8), (2, 4), (2, 3), (2, 2),
    (2, 1), (3, 1), (3, 2), (4, 1), (4, 2), (5, 1), (6, 1), (7, 1), (8, 1),
)
# fmt: on
SPLIT_TILE_SIZE = 490
DEFAULT_SPLIT_RESOLUTIONS = tuple(
    (rows * SPLIT_TILE_SIZE, cols * SPLIT_TILE_SIZE) for rows, cols in DEFAULT_SPLIT_TILES
)
# The crop sizes transformers' image processor takes whatever its size_conversion says: Aria's.
TRANSFORMERS_CROP_SIZES = tuple(ARIA_CROP_SIZE_TO_QUERIES)
RESCALE_FACTOR = 1 / 255
DEFAULT_MEAN_STD = (0.5, 0.5, 0.5)
TENSOR_TYPES = ("np", "jax", "pt")
SPLIT_MODES = ("transformers", "original")

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"


# --------------------------------------------------------------------------------------------
# Inputs -> RGB uint8 (H, W, 3)
# --------------------------------------------------------------------------------------------


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def load_image_file(path: str | os.PathLike) -> Image.Image:
    """Read an image file like transformers' `load_image`: decode, apply the EXIF orientation,
    `convert("RGB")`. That drops an alpha band, but keeps tRNS transparency as an RGB colour in
    `info["transparency"]` (which `to_rgb_array` then blends onto white, as the oracle does).

    Raises ImageError for a missing, empty, unreadable or over-limit file.
    """
    name = os.fspath(path)

    def fail(problem: str, cause: BaseException | None = None) -> ImageError:
        message = f"cannot read image file {name}: {problem}"
        if cause is not None:
            message += f" ({type(cause).__name__}: {_one_line(cause)})"
        return ImageError(message)

    if not os.path.exists(name):
        raise fail("no such file")
    if not os.path.isfile(name):
        raise fail("not a regular file")
    if os.path.getsize(name) == 0:
        raise fail("the file is empty (0 bytes)")

    limit = Image.MAX_IMAGE_PIXELS
    # PIL only warns between 1x and 2x its limit; we refuse everything above it, so silence
    # the warning here and check the size ourselves (without touching PIL's global setting).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(name) as image:
                width, height = image.size
                if limit is not None and width * height > limit:
                    raise fail(
                        f"image too large, possible decompression bomb: {width}x{height} = "
                        f"{width * height} pixels exceeds PIL.Image.MAX_IMAGE_PIXELS = {limit}"
                    )
                image.load()
                rgb = ImageOps.exif_transpose(image).convert("RGB")
        except ImageError:
            raise
        except Image.DecompressionBombError as err:
            raise fail(f"image too large, possible decompression bomb: {_one_line(err)}") from err
        except Image.UnidentifiedImageError as err:
            raise fail("not a recognized image format, or corrupt", err) from err
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
            raise fail("corrupt or truncated image data", err) from err
    return rgb


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """transformers' `convert_to_rgb` for PIL images: alpha (or palette/tRNS transparency) is
    blended onto white, everything else goes through PIL's `convert("RGB")`."""
    if image.mode == "La":  # premultiplied alpha: PIL cannot convert it to RGB(A) directly
        image = image.convert("LA")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _channels_last(array: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 1); (H, W, C) kept; (C, H, W) -> (H, W, C); C in 1..4, last axis first."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim == 3 and array.shape[2] not in (1, 2, 3, 4) and array.shape[0] in (1, 2, 3, 4):
        return np.moveaxis(array, 0, 2)
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ImageError(
            f"array images must have shape (H, W), (H, W, C) or (C, H, W) with C in 1..4; got {array.shape}"
        )
    return array


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """A uint8 (H, W), (H, W, C) or (C, H, W) array, C in 1..4, to RGB. Alpha is blended onto
    white with transformers' numpy formula (float64, then round)."""
    if array.dtype != np.uint8:
        raise ImageError(f"array images must be uint8 (H, W[, C]) or (C, H, W); got dtype {array.dtype}")
    array = _channels_last(array)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"numpy image has no pixels: shape {array.shape}")
    channels = array.shape[2]
    if channels in (2, 4):
        color, alpha = array[:, :, : channels - 1], array[:, :, channels - 1 :] / 255
        array = np.round(alpha * color + (1 - alpha) * 255).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def to_numpy(value: Any) -> np.ndarray:
    """`value` (numpy, jax, a torch tensor, which is detached and copied to the CPU first, or
    anything `np.asarray` reads) as a numpy array."""
    return np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)


def as_array(image: Any) -> np.ndarray | None:
    """`image` as a numpy array if it is one or has `__array__` (torch / jax tensors, ...), else None."""
    if isinstance(image, np.ndarray):
        return image
    if hasattr(image, "__array__") and not isinstance(image, Image.Image):
        try:
            return to_numpy(image)
        except Exception as err:  # e.g. a tensor on an accelerator that cannot be copied
            raise ImageError(f"cannot read a {type(image).__name__} as an array: {_one_line(err)}") from err
    return None


def to_rgb_array(image: Any, convert_rgb: bool = True) -> np.ndarray:
    """One input image (PIL image, uint8 array or tensor, or file path) as RGB uint8 (H, W, 3).
    `convert_rgb=False` takes only images that are RGB already (PIL mode "RGB", 3 channels; a
    file is read as RGB either way, as transformers' `load_image` does)."""
    if not convert_rgb and not isinstance(image, (str, os.PathLike)):
        array = as_array(image)
        is_rgb = (
            image.mode == "RGB"
            if isinstance(image, Image.Image)
            else array is not None and array.ndim == 3 and _channels_last(array).shape[2] == 3
        )
        if not is_rgb:
            what = (
                f"a {image.mode} image"
                if isinstance(image, Image.Image)
                else f"an array of shape {array.shape}"
                if array is not None
                else f"a {type(image).__name__}"
            )
            raise ImageError(f"do_convert_rgb=False takes RGB images only (3 channels); got {what}")
    if isinstance(image, (str, os.PathLike)):
        return _pil_to_rgb(load_image_file(image))
    if isinstance(image, Image.Image):
        try:
            return _pil_to_rgb(image)
        except (OSError, SyntaxError, ValueError) as err:
            name = getattr(image, "filename", "") or f"a {image.mode} image of size {image.size}"
            raise ImageError(f"cannot convert {name} to RGB: {_one_line(err)}") from err
    array = as_array(image)
    if array is not None:
        return _array_to_rgb(array)
    raise ImageError(
        "images must be PIL images, uint8 arrays (numpy, torch, or anything with __array__) or file paths; "
        f"got {type(image).__name__}"
    )


def is_batch_array(images: Any) -> bool:
    """A 4-D array or tensor: a batch of images."""
    return getattr(images, "ndim", None) == 4 and not isinstance(images, Image.Image)


def _flatten_images(images: Any) -> list:
    """One image, a list of images, a list of lists of images, or a 4-D array -> flat list."""
    if is_batch_array(images):
        return list(as_array(images))
    if not isinstance(images, (list, tuple)):
        return [images]
    flat = []
    for item in images:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return flat


def to_tensors(arrays: dict[str, Any], return_tensors: str | None) -> dict[str, Any]:
    """numpy arrays as `return_tensors` asks: "np" (or None) numpy, "jax" jax arrays, "pt" torch
    tensors (torch is imported only then)."""
    if return_tensors in (None, "np"):
        return arrays
    if return_tensors == "jax":
        import jax.numpy as jnp

        return {key: jnp.asarray(value) for key, value in arrays.items()}
    if return_tensors == "pt":
        import torch

        return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()}
    raise ValueError(f"return_tensors={return_tensors!r}; use one of: {', '.join(TENSOR_TYPES)}")


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def fit_size(height: int, width: int, max_size: int, min_size: int) -> tuple[int, int]:
    """Crop size: long side -> max_size, short side scaled (truncated) but >= min_size, so the
    aspect ratio is not kept when min_size applies."""
    scale = max_size / max(height, width)
    if width >= height:
        return max(int(height * scale), min_size), max_size
    return max_size, max(int(width * scale), min_size)


def select_best_resolution(height: int, width: int, resolutions: Iterable[Sequence[int]]) -> tuple[int, int]:
    """LLaVA-NeXT's choice (transformers): among (height, width) targets, maximise the number of
    image pixels kept after an aspect-preserving fit, then minimise the unused target area."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for target_h, target_w in resolutions:
        scale = min(target_w / width, target_h / height)
        fitted = int(width * scale) * int(height * scale)
        effective = min(fitted, width * height)
        wasted = target_w * target_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (target_h, target_w), effective, wasted
    return best


def fit_inside(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """transformers' `get_patch_output_size`: aspect-preserving fit, the free side rounded up."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def select_split_ratio_original(width: int, height: int, ratios: Iterable[Sequence[int]], tile: int) -> tuple[int, int]:
    """rhymes-ai's `_select_best_resolution`: pairs are (ratio_w, ratio_h); keep the closest
    aspect ratio (first wins), and on an exact tie switch to the later pair iff the image area
    (an np.int32 product, which wraps above 2**31 as in the original) exceeds half its area."""
    aspect = width / height
    with np.errstate(over="ignore"):
        area = np.int32(width) * np.int32(height)
    best, best_diff = (1, 1), float("inf")
    for ratio_w, ratio_h in ratios:
        diff = abs(aspect - ratio_w / ratio_h)
        if diff < best_diff:
            best, best_diff = (ratio_w, ratio_h), diff
        elif diff == best_diff and area > 0.5 * tile * tile * ratio_w * ratio_h:
            best = (ratio_w, ratio_h)
    return best


def _resize(rgb: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """PIL resize of uint8 RGB (what transformers' PIL backend does via `to_pil_image`)."""
    return np.asarray(Image.fromarray(rgb).resize((width, height), resample=resample))


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def split_transformers(
    rgb: np.ndarray, max_size: int, resolutions: Sequence[Sequence[int]], resample: int
) -> list[np.ndarray]:
    """transformers 5: best (height, width) target, aspect-preserving resize, centred black
    padding, then row-major pieces of max_size (edge pieces may be smaller). No global view."""
    height, width = rgb.shape[:2]
    target_h, target_w = select_best_resolution(height, width, resolutions)
    new_h, new_w = fit_inside(height, width, target_h, target_w)
    resized = _resize(rgb, new_h, new_w, resample)
    top, extra_h = divmod(target_h - new_h, 2)
    left, extra_w = divmod(target_w - new_w, 2)
    canvas = np.pad(resized, ((top, top + extra_h), (left, left + extra_w), (0, 0)))
    return [
        canvas[row : row + max_size, col : col + max_size]
        for row in range(0, target_h, max_size)
        for col in range(0, target_w, max_size)
    ]


def split_original(rgb: np.ndarray, max_size: int, ratios: Sequence[Sequence[int]], resample: int) -> list[np.ndarray]:
    """rhymes-ai's original: stretch to (max_size * ratio_w, max_size * ratio_h), cut row-major
    into max_size tiles, and put the whole image first as a global view when there are >1 tiles."""
    height, width = rgb.shape[:2]
    ratio_w, ratio_h = select_split_ratio_original(width, height, ratios, max_size)
    stretched = _resize(rgb, max_size * ratio_h, max_size * ratio_w, resample)
    tiles = []
    for index in range(ratio_w * ratio_h):
        row, col = (index // ratio_w) * max_size, (index % ratio_w) * max_size
        tiles.append(stretched[row : row + max_size, col : col + max_size])
    return [rgb] + tiles if len(tiles) > 1 else tiles


# --------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------


class AriaImageProcessor:
    """Aria's image processor; same output as transformers' `AriaImageProcessorPil`.

    `split_resolutions` are (height, width) pixel targets, as in transformers' config. The
    allowed `max_image_size` values are the keys of `size_to_queries` (crop size -> number of
    projector queries, i.e. image tokens per crop; the checkpoint's `size_conversion`).
    """

    def __init__(
        self,
        max_image_size: int = 980,
        min_image_size: int = 336,
        image_mean: float | Sequence[float] | None = DEFAULT_MEAN_STD,
        image_std: float | Sequence[float] | None = DEFAULT_MEAN_STD,
        split_resolutions: Sequence[Sequence[int]] | None = DEFAULT_SPLIT_RESOLUTIONS,
        size_to_queries: dict[int, int] | None = None,
        resample: int = Image.Resampling.BICUBIC,
        split_image: bool = False,
        do_convert_rgb: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = RESCALE_FACTOR,
        do_normalize: bool = True,
    ):
        queries = ARIA_CROP_SIZE_TO_QUERIES if size_to_queries is None else size_to_queries
        self.size_to_queries = {int(size): int(count) for size, count in queries.items()}
        self.max_image_size = self._check_max_image_size(max_image_size)
        self.min_image_size = int(min_image_size)
        self.image_mean = self._per_channel(DEFAULT_MEAN_STD if image_mean is None else image_mean, "image_mean")
        self.image_std = self._per_channel(DEFAULT_MEAN_STD if image_std is None else image_std, "image_std")
        if split_resolutions is None:  # transformers' default too
            split_resolutions = DEFAULT_SPLIT_RESOLUTIONS
        self.split_resolutions = tuple((int(h), int(w)) for h, w in split_resolutions)
        if not self.split_resolutions:
            raise ValueError("split_resolutions must not be empty")
        self.resample = Image.Resampling(int(resample))
        self.split_image = bool(split_image)
        self.do_convert_rgb = bool(do_convert_rgb)
        self.do_rescale = bool(do_rescale)
        if (
            isinstance(rescale_factor, bool)
            or not isinstance(rescale_factor, (int, float))
            or not math.isfinite(rescale_factor)
        ):
            raise ValueError(f"rescale_factor must be a finite number; got {rescale_factor!r}")
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        # uint8 value -> output float32, per channel, computed exactly as transformers does
        # (rescale in float64 then cast to float32; normalize in float32).
        values = np.arange(256, dtype=np.float64)
        values = (values * self.rescale_factor).astype(np.float32) if self.do_rescale else values.astype(np.float32)
        self._table = np.stack(
            [
                (values - np.float32(mean)) / np.float32(std) if self.do_normalize else values
                for mean, std in zip(self.image_mean, self.image_std)
            ]
        )

    @staticmethod
    def _per_channel(value: float | Sequence[float], name: str) -> tuple[float, float, float]:
        values = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
        if len(values) != 3:
            raise ValueError(f"{name} must be one number or 3 numbers; got {value!r}")
        return tuple(float(v) for v in values)

    @property
    def allowed_sizes(self) -> tuple[int, ...]:
        """Crop sizes: the checkpoint's (size_to_queries) and those transformers' processor takes."""
        return tuple(sorted({*self.size_to_queries, *TRANSFORMERS_CROP_SIZES}))

    def _check_max_image_size(self, size: Any) -> int:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or int(size) not in self.allowed_sizes:
            allowed = ", ".join(str(s) for s in self.allowed_sizes)
            raise ValueError(f"max_image_size={size!r} is not allowed; use one of: {allowed}")
        return int(size)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "AriaImageProcessor":
        """Read a checkpoint directory the way transformers does: the `image_processor` entry of
        processor_config.json if present, else preprocessor_config.json; `size_conversion`
        (allowed crop sizes -> query counts) from either. Missing files mean defaults."""
        directory = os.fspath(model_dir)
        if not os.path.isdir(directory):
            raise ValueError(f"{directory}: not a directory")

        processor = read_optional_json(directory, PROCESSOR_FILE, ValueError)
        settings = processor.get("image_processor")
        source = PROCESSOR_FILE
        if not isinstance(settings, dict):
            settings, source = read_optional_json(directory, IMAGE_PROCESSOR_FILE, ValueError), IMAGE_PROCESSOR_FILE
        where = os.path.join(directory, source)

        kwargs = {}
        for key in (
            "max_image_size",
            "min_image_size",
            "image_mean",
            "image_std",
            "split_resolutions",
            "resample",
            "split_image",
            "do_convert_rgb",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
        ):
            if settings.get(key) is not None:
                kwargs[key] = settings[key]
        conversion = processor.get("size_conversion", settings.get("size_conversion"))
        if conversion is not None:
            kwargs["size_to_queries"] = conversion
        try:
            return cls(**kwargs)
        except (TypeError, ValueError, AttributeError) as err:  # a setting of the wrong type or shape
            raise ValueError(f"{where}: {_one_line(err)}") from None

    # ----------------------------------------------------------------------------------------

    def _original_ratios(self) -> list[tuple[int, int]]:
        """The split list as rhymes-ai reads it: each stored (h, w) pair in 490-pixel tiles,
        taken as (ratio_w, ratio_h)."""
        if any(h % SPLIT_TILE_SIZE or w % SPLIT_TILE_SIZE for h, w in self.split_resolutions):
            raise ValueError(f"split_mode='original' needs split_resolutions in multiples of {SPLIT_TILE_SIZE}")
        return [(h // SPLIT_TILE_SIZE, w // SPLIT_TILE_SIZE) for h, w in self.split_resolutions]

    def crops(self, rgb: np.ndarray, max_image_size: int, split_image: bool, split_mode: str) -> list[np.ndarray]:
        """The uint8 RGB crops of one image, before the per-crop resize."""
        if not split_image:
            return [rgb]
        if split_mode == "transformers":
            return split_transformers(rgb, max_image_size, self.split_resolutions, self.resample)
        return split_original(rgb, max_image_size, self._original_ratios(), self.resample)

    def crop_to_arrays(self, crop: np.ndarray, max_image_size: int) -> tuple[np.ndarray, np.ndarray]:
        """One uint8 RGB crop -> (3, S, S) float32 and (S, S) bool: fit_size, PIL resize, pad right
        and bottom with 0 to S x S, mask the resized area, rescale and normalize."""
        new_h, new_w = fit_size(crop.shape[0], crop.shape[1], max_image_size, self.min_image_size)
        resized = _resize(crop, new_h, new_w, self.resample)
        pad = ((0, max_image_size - new_h), (0, max_image_size - new_w), (0, 0))
        padded = np.pad(resized, pad)
        pixels = np.stack([self._table[c][padded[:, :, c]] for c in range(3)])
        mask = np.zeros((max_image_size, max_image_size), dtype=bool)
        mask[:new_h, :new_w] = True
        return pixels, mask

    def count_crops(
        self,
        height: int,
        width: int,
        max_image_size: int | None = None,
        split_image: bool | None = None,
        split_mode: str = "transformers",
    ) -> int:
        """How many crops an image of this size yields, without touching pixels."""
        size = self._check_max_image_size(self.max_image_size if max_image_size is None else max_image_size)
        self._check_split_mode(split_mode)
        if not (self.split_image if split_image is None else split_image):
            return 1
        if split_mode == "transformers":
            target_h, target_w = select_best_resolution(height, width, self.split_resolutions)
            return math.ceil(target_h / size) * math.ceil(target_w / size)
        ratio_w, ratio_h = select_split_ratio_original(width, height, self._original_ratios(), size)
        tiles = ratio_w * ratio_h
        return tiles + 1 if tiles > 1 else tiles

    @staticmethod
    def _check_split_mode(split_mode: str) -> None:
        if split_mode not in SPLIT_MODES:
            raise ValueError(f"split_mode={split_mode!r}; use one of: {', '.join(SPLIT_MODES)}")

    def __call__(
        self,
        images: Any,
        max_image_size: int | None = None,
        split_image: bool | None = None,
        split_mode: str = "transformers",
        return_tensors: str | None = "np",
    ) -> dict[str, Any]:
        """Preprocess one image or a list of images (PIL images, uint8 arrays or tensors of shape
        (H, W), (H, W, C) or (C, H, W), file paths).

        Returns `pixel_values` (N, 3, S, S) float32, `pixel_mask` (N, S, S) bool and `num_crops`
        (num_images,) int64 with N = num_crops.sum(), as numpy arrays, or as `return_tensors`
        says ("jax", "pt"); the crops of each image are consecutive, in input order.
        `split_image=None` uses the configured default (False).
        """
        size = self._check_max_image_size(self.max_image_size if max_image_size is None else max_image_size)
        split = self.split_image if split_image is None else bool(split_image)
        self._check_split_mode(split_mode)
        if not 0 < self.min_image_size <= size:
            raise ValueError(f"min_image_size={self.min_image_size} must be in 1..max_image_size ({size})")
        inputs = _flatten_images(images)
        if not inputs:
            raise ValueError("no images given")

        pixel_values, pixel_masks, num_crops = [], [], []
        for image in inputs:
            crops = self.crops(to_rgb_array(image, self.do_convert_rgb), size, split, split_mode)
            num_crops.append(len(crops))
            for crop in crops:
                pixels, mask = self.crop_to_arrays(crop, size)
                pixel_values.append(pixels)
                pixel_masks.append(mask)
        return to_tensors(
            {
                "pixel_values": np.stack(pixel_values),
                "pixel_mask": np.stack(pixel_masks),
                "num_crops": np.asarray(num_crops, dtype=np.int64),
            },
            return_tensors,
        )

    def num_image_tokens(self, max_image_size: int | None = None) -> int:
        """Image tokens (projector queries) per crop at this crop size."""
        size = self._check_max_image_size(self.max_image_size if max_image_size is None else max_image_size)
        if size not in self.size_to_queries:
            raise ValueError(f"max_image_size={size} has no query count in size_to_queries {self.size_to_queries}")
        return self.size_to_queries[size]

    def __repr__(self) -> str:
        return (
            f"AriaImageProcessor(max_image_size={self.max_image_size}, "
            f"min_image_size={self.min_image_size}, image_mean={self.image_mean}, "
            f"image_std={self.image_std}, size_to_queries={self.size_to_queries}, "
            f"resample={self.resample.name}, split_image={self.split_image}, "
            f"{len(self.split_resolutions)} split_resolutions)"
        )
