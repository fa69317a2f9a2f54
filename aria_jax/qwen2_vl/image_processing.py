"""Qwen2-VL image preprocessing: images in, flat patches (`pixel_values`) and `image_grid_thw` out.

numpy and Pillow only. The parity oracle is transformers' PIL backend, `Qwen2VLImageProcessorPil`
(`transformers/models/qwen2_vl/image_processing_pil_qwen2_vl.py`), whose float32 output this module
reproduces bit for bit; it computes what transformers 4.45's (slow, numpy + PIL) processor
computed. transformers' default torchvision backend resizes with torchvision's bicubic, which
differs from PIL's by about one uint8 level on some pixels, so it is not the oracle.

Per image:

1. RGB uint8, read as Aria's processor reads inputs (`aria_jax.image_processing.to_rgb_array`:
   PIL images, uint8 arrays or tensors (H, W[, C]) / (C, H, W), file paths; float arrays are
   refused).
2. `smart_resize`: the size whose sides are multiples of patch_size * merge_size (28), closest to
   the image's, with its area within [min_pixels, max_pixels]; PIL resize (bicubic) on uint8.
3. `(pixel * rescale_factor - mean) / std` in float32 (CLIP's mean and std), rescaling in
   float64 first, as transformers does.
4. Patches of patch_size x patch_size, ordered merge window by merge window (row-major over
   windows, row-major inside a window of merge_size x merge_size patches); each patch flattened
   as (channel, temporal, y, x), the image repeated temporal_patch_size times.

`image_grid_thw[i] = (1, H / patch_size, W / patch_size)`; image i takes `t * h * w` rows of
`pixel_values` and `t * h * w / merge_size**2` tokens in the prompt.

Videos (`process_videos`: lists of frames, or (T, H, W, C) arrays) go through the same steps,
frame by frame, as transformers 4.45's image processor took them: this processor's min/max
pixels, the frame count completed to a multiple of temporal_patch_size with copies of the last
frame, `video_grid_thw = (T / temporal_patch_size, h, w)`. transformers 5's separate video
processor (torchvision only) has its own pixel bounds (video_preprocessor_config.json) and
optional frame sampling; frames are not sampled here.

Differences from the oracle, on purpose: array inputs follow Aria's rules (see
`aria_jax.image_processing`: uint8 only, the channel axis read last-first, grayscale and alpha
arrays accepted); `do_resize=False` with sides that are not multiples of 28, and sizes that come
out empty (min_pixels=0), are an ImageError instead of a reshape error.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from aria_jax.config import read_optional_json
from aria_jax.image_processing import (
    IMAGE_PROCESSOR_FILE,
    PROCESSOR_FILE,
    RESCALE_FACTOR,
    ImageError,
    as_array,
    is_batch_array,
    to_rgb_array,
    to_tensors,
)

# OpenAI CLIP's normalization (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """(height, width) to resize to: each side rounded to a multiple of `factor` (Python's round,
    halves to even); above `max_pixels`, both sides scaled down by one factor and floored to
    multiples of `factor` (at least `factor`); below `min_pixels`, scaled up and ceiled. An
    aspect ratio over 200 is an ImageError. Same arithmetic as transformers' `smart_resize`."""
    if height <= 0 or width <= 0:
        raise ImageError(f"image has no pixels: {height}x{width} (height x width)")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image of {height}x{width} (height x width) has aspect ratio {ratio:.1f}; Qwen2-VL takes at most "
            f"{MAX_ASPECT_RATIO}"
        )
    new_height = round(height / factor) * factor
    new_width = round(width / factor) * factor
    if new_height * new_width > max_pixels:
        shrink = math.sqrt((height * width) / max_pixels)
        new_height = max(factor, math.floor(height / shrink / factor) * factor)
        new_width = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_height * new_width < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * grow / factor) * factor
        new_width = math.ceil(width * grow / factor) * factor
    return new_height, new_width


def patchify(pixels: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """(T, C, H, W) frames (T a multiple of temporal_patch_size) -> (T/tp * H/p * W/p, C*tp*p*p)
    rows in transformers' order: temporal group, then merge window (row-major), then patch within
    the window (row-major); each row is (channel, frame, y, x)."""
    frames, channels, height, width = pixels.shape
    groups, rows, cols = frames // temporal_patch_size, height // patch_size, width // patch_size
    blocks = pixels.reshape(
        groups,
        temporal_patch_size,
        channels,
        rows // merge_size,
        merge_size,
        patch_size,
        cols // merge_size,
        merge_size,
        patch_size,
    )
    # -> (group, window row, window col, row in window, col in window, channel, frame, y, x)
    blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return blocks.reshape(groups * rows * cols, channels * temporal_patch_size * patch_size * patch_size)


def _flat_images(images: Any) -> list:
    """One image, a list of images, a list of lists of images (one per prompt), or a 4-D batch."""
    if is_batch_array(images):
        return list(as_array(images))
    if not isinstance(images, (list, tuple)):
        return [images]
    return [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]


def _is_video(value: Any) -> bool:
    """A list of frames or a 4-D array (a frame itself is neither)."""
    return isinstance(value, (list, tuple)) or is_batch_array(value)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(value)


def _per_channel(value: Any, name: str) -> tuple[float, float, float]:
    values = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
    if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be one number or 3 finite numbers; got {value!r}")
    return tuple(float(v) for v in values)


class Qwen2VLImageProcessor:
    """Qwen2-VL's image processor, with transformers' options; same output as transformers'
    `Qwen2VLImageProcessorPil` (see the module docstring).

    `min_pixels` / `max_pixels` bound the resized area; `size={"shortest_edge": ...,
    "longest_edge": ...}` (transformers 5's names for the same two numbers; also accepted as
    {"min_pixels", "max_pixels"}) is the other way to give them, and explicit min/max_pixels win.
    """

    def __init__(
        self,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        size: dict[str, int] | None = None,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: float | Sequence[float] | None = CLIP_MEAN,
        image_std: float | Sequence[float] | None = CLIP_STD,
        do_resize: bool = True,
        resample: int = Image.Resampling.BICUBIC,
        do_rescale: bool = True,
        rescale_factor: float = RESCALE_FACTOR,
        do_normalize: bool = True,
        do_convert_rgb: bool = True,
    ):
        size = dict(size or {})
        unknown = set(size) - {"shortest_edge", "longest_edge", "min_pixels", "max_pixels"}
        if unknown:
            raise ValueError(f"size={size!r}: takes shortest_edge and longest_edge (or min_pixels and max_pixels)")
        if min_pixels is None:
            min_pixels = size.get("shortest_edge", size.get("min_pixels", DEFAULT_MIN_PIXELS))
        if max_pixels is None:
            max_pixels = size.get("longest_edge", size.get("max_pixels", DEFAULT_MAX_PIXELS))
        self.min_pixels = _positive_int(min_pixels, "min_pixels")
        self.max_pixels = _positive_int(max_pixels, "max_pixels")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels} is above max_pixels={self.max_pixels}")
        self.patch_size = _positive_int(patch_size, "patch_size")
        self.temporal_patch_size = _positive_int(temporal_patch_size, "temporal_patch_size")
        self.merge_size = _positive_int(merge_size, "merge_size")
        self.image_mean = _per_channel(CLIP_MEAN if image_mean is None else image_mean, "image_mean")
        self.image_std = _per_channel(CLIP_STD if image_std is None else image_std, "image_std")
        self.do_resize = bool(do_resize)
        self.resample = Image.Resampling(int(resample))
        self.do_rescale = bool(do_rescale)
        if isinstance(rescale_factor, bool) or not isinstance(rescale_factor, (int, float)):
            raise ValueError(f"rescale_factor must be a number; got {rescale_factor!r}")
        if not math.isfinite(rescale_factor):
            raise ValueError(f"rescale_factor must be finite; got {rescale_factor!r}")
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.do_convert_rgb = bool(do_convert_rgb)
        # uint8 value -> float32 output per channel, computed the way transformers does it: the
        # rescale in float64 then cast to float32, the normalization in float32.
        levels = np.arange(256, dtype=np.float64)
        levels = (levels * self.rescale_factor if self.do_rescale else levels).astype(np.float32)
        self._level_to_value = np.stack(
            [
                (levels - np.float32(mean)) / np.float32(std) if self.do_normalize else levels
                for mean, std in zip(self.image_mean, self.image_std)
            ]
        )

    @property
    def size(self) -> dict[str, int]:
        """transformers 5's name for (min_pixels, max_pixels)."""
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merge window, in pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "Qwen2VLImageProcessor":
        """Read a checkpoint directory: the `image_processor` entry of processor_config.json
        (transformers 5) if present, else preprocessor_config.json, with either transformers
        4.45's min_pixels / max_pixels or transformers 5's `size` dict. Missing files mean defaults."""
        directory = os.fspath(model_dir)
        if not os.path.isdir(directory):
            raise ValueError(f"{directory}: not a directory")
        settings = read_optional_json(directory, PROCESSOR_FILE, ValueError).get("image_processor")
        source = PROCESSOR_FILE
        if not isinstance(settings, dict):
            settings = read_optional_json(directory, IMAGE_PROCESSOR_FILE, ValueError)
            source = IMAGE_PROCESSOR_FILE
        keys = (
            "min_pixels",
            "max_pixels",
            "size",
            "patch_size",
            "temporal_patch_size",
            "merge_size",
            "image_mean",
            "image_std",
            "do_resize",
            "resample",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
            "do_convert_rgb",
        )
        kwargs = {key: settings[key] for key in keys if settings.get(key) is not None}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError, AttributeError) as err:  # a setting of the wrong type or shape
            raise ValueError(f"{os.path.join(directory, source)}: {' '.join(str(err).split())}") from None

    # ----------------------------------------------------------------------------------------

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is processed at."""
        if not self.do_resize:
            if height % self.factor or width % self.factor:
                raise ImageError(
                    f"do_resize=False needs image sides that are multiples of {self.factor} "
                    f"(patch_size * merge_size); got {height}x{width} (height x width)"
                )
            return height, width
        new_height, new_width = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        if new_height <= 0 or new_width <= 0:
            raise ImageError(f"image of {height}x{width} (height x width) resizes to {new_height}x{new_width}")
        return new_height, new_width

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """(temporal, height, width) patch grid of one image of this size."""
        new_height, new_width = self.resized_size(height, width)
        return 1, new_height // self.patch_size, new_width // self.patch_size

    def num_image_tokens(self, height: int, width: int) -> int:
        """Prompt tokens one image of this size takes (its patches / merge_size**2)."""
        grid_t, grid_h, grid_w = self.grid_thw(height, width)
        return grid_t * grid_h * grid_w // self.merge_size**2

    def image_to_patches(self, image: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> its (t*h*w, C*T*P*P) float32 patches and (t, h, w) grid."""
        rgb = to_rgb_array(image, self.do_convert_rgb)
        new_height, new_width = self.resized_size(*rgb.shape[:2])
        pixels = self._frames_to_values([rgb], new_height, new_width)
        # A still image is a clip of temporal_patch_size identical frames.
        frames = np.broadcast_to(pixels, (self.temporal_patch_size, *pixels.shape[1:]))
        patches = patchify(frames, self.patch_size, self.merge_size, self.temporal_patch_size)
        return patches, (1, new_height // self.patch_size, new_width // self.patch_size)

    def _frames_to_values(self, frames: list[np.ndarray], height: int, width: int) -> np.ndarray:
        """RGB uint8 frames -> (T, 3, height, width) float32 values, resized if asked."""
        values = []
        for rgb in frames:
            if self.do_resize:
                rgb = np.asarray(Image.fromarray(rgb).resize((width, height), resample=self.resample))
            values.append(np.stack([self._level_to_value[channel][rgb[:, :, channel]] for channel in range(3)]))
        return np.stack(values)

    def video_to_patches(self, frames: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One video (a list of frames, or a (T, H, W[, C]) uint8 array) -> its patches and
        (t, h, w) grid. Every frame is resized to `smart_resize` of the (common) frame size with
        this processor's min/max pixels, as transformers 4.45's image processor did for videos;
        a frame count that is not a multiple of temporal_patch_size is completed by repeating
        the last frame (4.45 and 5 alike)."""
        frames = list(as_array(frames)) if is_batch_array(frames) else frames
        if not isinstance(frames, (list, tuple)) or not frames:
            raise ImageError(f"a video is a non-empty list of frames or a 4-D uint8 array; got {type(frames).__name__}")
        rgb_frames = [to_rgb_array(frame, self.do_convert_rgb) for frame in frames]
        sizes = sorted({frame.shape[:2] for frame in rgb_frames})
        if len(sizes) > 1:
            raise ImageError(f"a video's frames must all have one size; got {', '.join(f'{h}x{w}' for h, w in sizes)}")
        new_height, new_width = self.resized_size(*sizes[0])
        values = self._frames_to_values(rgb_frames, new_height, new_width)
        missing = -len(values) % self.temporal_patch_size
        if missing:
            values = np.concatenate([values, np.repeat(values[-1:], missing, axis=0)])
        patches = patchify(values, self.patch_size, self.merge_size, self.temporal_patch_size)
        grid = (len(values) // self.temporal_patch_size, new_height // self.patch_size, new_width // self.patch_size)
        return patches, grid

    def process_videos(self, videos: Any, return_tensors: str | None = None) -> dict[str, Any]:
        """Preprocess one video or a list of videos (see `video_to_patches`): `pixel_values_videos`
        (sum of t*h*w, 3 * temporal_patch_size * patch_size**2) float32 and `video_grid_thw`
        (num_videos, 3) int64."""
        if is_batch_array(videos) or (isinstance(videos, (list, tuple)) and videos and not _is_video(videos[0])):
            videos = [videos]  # a single video
        if not isinstance(videos, (list, tuple)) or not videos:
            raise ValueError("no videos given")
        all_patches, grids = zip(*(self.video_to_patches(video) for video in videos))
        return to_tensors(
            {"pixel_values_videos": np.concatenate(all_patches), "video_grid_thw": np.asarray(grids, dtype=np.int64)},
            return_tensors,
        )

    def __call__(self, images: Any, return_tensors: str | None = None) -> dict[str, Any]:
        """Preprocess one image or a list of images (also a list of lists, flattened in order).

        Returns `pixel_values` (sum of t*h*w, 3 * temporal_patch_size * patch_size**2) float32
        and `image_grid_thw` (num_images, 3) int64, as numpy arrays (return_tensors None or
        "np"), or "jax" / "pt" tensors; each image's patches are consecutive, in input order."""
        inputs = _flat_images(images)
        if not inputs:
            raise ValueError("no images given")
        all_patches, grids = [], []
        for image in inputs:
            patches, grid = self.image_to_patches(image)
            all_patches.append(patches)
            grids.append(grid)
        return to_tensors(
            {"pixel_values": np.concatenate(all_patches), "image_grid_thw": np.asarray(grids, dtype=np.int64)},
            return_tensors,
        )

    def __repr__(self) -> str:
        return (
            f"Qwen2VLImageProcessor(min_pixels={self.min_pixels}, max_pixels={self.max_pixels}, "
            f"patch_size={self.patch_size}, temporal_patch_size={self.temporal_patch_size}, "
            f"merge_size={self.merge_size}, image_mean={self.image_mean}, image_std={self.image_std}, "
            f"resample={self.resample.name})"
        )
