"""Videos as Aria reads them: a few frames sampled evenly, each with its timestamp.

    video = load_video("clip.mp4", num_frames=8)   # Video(frames=[8 RGB PIL images], timestamps=[s, ...])
    frame_timestamp(video.timestamps[1])            # "[00:03]"

Frame `i` of `num_frames` is source frame `int(total / num_frames * (i + 0.5))`, the rule of
Aria's video inference notebook (the middle of each of `num_frames` equal stretches); its
timestamp is `index / fps`. The chat format puts `[mm:ss]`, the frame and a newline per frame
(`aria_jax.processing.AriaProcessor` does that for `{"type": "video"}` items).

Sources:

- animated GIF / WebP / PNG files, decoded with Pillow; the frame rate comes from each frame's
  `duration` (ms): a frame's timestamp is the sum of the durations of the frames before it;
- any other video file (mp4, webm, mkv, avi, mov, ...), decoded with PyAV (`pip install av`, or
  the package's `video` extra), imported only when such a file is read;
- a list of frames (PIL images or uint8 (H, W, 3) arrays, or one (N, H, W, 3) array) with a
  frame rate `fps` (default 1).

Only the sampled frames are kept in memory; decoding stops after the last of them.

A still image (a PNG, JPEG, ... or a one-frame GIF / WebP) is rejected with a `VideoError`
rather than read as a one-frame video: sampling would repeat it `num_frames` times, and it
belongs in an image item. Every error is a `VideoError` (a ValueError) with a one-line message
naming the file; `VideoDecoderError` (a VideoError) when PyAV is needed but not installed, and
`VideoArgumentError` (a VideoError) for a bad argument, such as more than `MAX_NUM_FRAMES` frames.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
import os
import warnings
from typing import Any, Sequence

import numpy as np
from PIL import Image

from aria_jax.image_processing import to_rgb_array

DEFAULT_NUM_FRAMES = 8
# Aria's context is 64K tokens and a frame takes at least 128 of them (one 490-pixel crop), so no
# prompt of Aria's holds more than 512 frames; asking for more is a mistake, refused before any
# frame is decoded (a million frames would otherwise be sampled, and hold their images).
MAX_NUM_FRAMES = 65536 // 128
# Read with Pillow: animated if they have more than one frame, otherwise still images (rejected).
PILLOW_EXTENSIONS = (".gif", ".webp", ".png", ".apng", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
INSTALL_HINT = 'pip install "aria-jax[video]" (or pip install av)'


class VideoError(ValueError):
    """A video that cannot be used; the message is one line naming the file and why."""


class VideoDecoderError(VideoError):
    """No decoder for the video: PyAV is not installed."""


class VideoArgumentError(VideoError):
    """An argument of a video function that is out of range or of the wrong type; the message
    names the argument and its value."""


@dataclasses.dataclass
class Video:
    """Sampled frames of a video: `frames[i]` is source frame `indices[i]` (RGB), shown at
    `timestamps[i]` seconds from the start. All three lists have `num_frames` entries."""

    frames: list[Image.Image]
    timestamps: list[float]
    indices: list[int]


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------------------------
# Sampling and timestamps
# ------------------------------------------------------------------------------------------


def resolve_num_frames(num_frames: int | None) -> int:
    """None or <= 0 means the default of 8 (Aria's dataset rule); anything but an int, or more
    than MAX_NUM_FRAMES, is a VideoArgumentError."""
    if num_frames is None:
        return DEFAULT_NUM_FRAMES
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)):
        raise VideoArgumentError(f"num_frames must be an integer or None, got {num_frames!r}")
    if num_frames > MAX_NUM_FRAMES:
        raise VideoArgumentError(
            f"num_frames={num_frames} is more than the limit of {MAX_NUM_FRAMES} frames "
            f"(Aria's 64K-token context at 128 tokens per frame)"
        )
    return int(num_frames) if num_frames > 0 else DEFAULT_NUM_FRAMES


def sample_frame_indices(num_total_frames: int, num_frames: int | None = DEFAULT_NUM_FRAMES) -> list[int]:
    """The `num_frames` source frame indices Aria samples: `int(total / num_frames * (i + 0.5))`.

    `num_frames` None or <= 0 means 8. With more frames asked than the video has, the rule is
    still followed, so indices repeat (e.g. 2 frames, 4 asked: [0, 0, 1, 1]): the model sees
    the number of frames it was asked for, in order. Computed in floats, as the notebook does:
    where the exact midpoint is a whole number the product can fall just below it and pick the
    frame before (4 frames, 98 asked: i = 24 gives 0, not 1). Raises ValueError for a video
    without frames.
    """
    count = resolve_num_frames(num_frames)
    if (
        isinstance(num_total_frames, bool)
        or not isinstance(num_total_frames, (int, np.integer))
        or num_total_frames <= 0
    ):
        raise VideoArgumentError(f"the video has no frames (num_total_frames={num_total_frames!r})")
    return [int(num_total_frames / count * (i + 0.5)) for i in range(count)]


def frame_timestamp(seconds: float) -> str:
    """ "[mm:ss]" for a time in seconds, truncated to whole seconds as in Aria's notebook; the
    minutes are not wrapped into hours (4503.2 -> "[75:03]")."""
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not 0 <= seconds < math.inf:
        raise VideoArgumentError(f"a frame timestamp must be a finite number >= 0 seconds, got {seconds!r}")
    whole = int(seconds)
    return f"[{whole // 60:02d}:{whole % 60:02d}]"


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------


def load_video(
    source: str | os.PathLike | Sequence[Any], num_frames: int | None = DEFAULT_NUM_FRAMES, fps: float | None = None
) -> Video:
    """Samples `num_frames` frames (see `sample_frame_indices`) from a video file or a list of
    frames. `fps` is the frame rate of a list of frames (default 1.0); files carry their own."""
    resolve_num_frames(num_frames)  # a bad value is a usage error, not a problem with the video
    if isinstance(source, (str, os.PathLike)):
        if fps is not None:
            raise VideoArgumentError("fps applies to a list of frames; a video file has its own frame rate")
        return _load_video_file(os.fspath(source), num_frames)
    if isinstance(source, np.ndarray) and source.ndim == 4:  # (num_frames, H, W, 3)
        source = list(source)
    if isinstance(source, (list, tuple)):
        return _video_from_frames(source, num_frames, 1.0 if fps is None else fps)
    raise VideoArgumentError(f"a video is a file path or a list of frames, got {type(source).__name__}")


def _video_from_frames(frames: Sequence[Any], num_frames: int | None, fps: float) -> Video:
    if not frames:
        raise VideoError("the video is an empty list of frames")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < math.inf:
        raise VideoArgumentError(f"fps must be a finite positive number, got {fps!r}")
    indices = sample_frame_indices(len(frames), num_frames)
    rgb = {}
    for index in sorted(set(indices)):
        try:
            rgb[index] = Image.fromarray(to_rgb_array(frames[index]))
        except (ValueError, TypeError) as err:
            raise VideoError(f"video frame {index}: {_one_line(err)}") from err
    return Video([rgb[i] for i in indices], [i / fps for i in indices], indices)


def _load_video_file(path: str, num_frames: int | None) -> Video:
    if not os.path.exists(path):
        raise VideoError(f"cannot read video file {path}: no such file")
    if not os.path.isfile(path):
        raise VideoError(f"cannot read video file {path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoError(f"cannot read video file {path}: the file is empty (0 bytes)")
    if path.lower().endswith(PILLOW_EXTENSIONS):
        return _load_with_pillow(path, num_frames)
    return _load_with_pyav(path, num_frames)


def _load_with_pillow(path: str, num_frames: int | None) -> Video:
    """Animated GIF / WebP / PNG: frames decoded in order (each one builds on the previous)."""

    def fail(problem: str) -> VideoError:
        return VideoError(f"cannot read video file {path}: {problem}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                total = getattr(image, "n_frames", 1)
                if total <= 1:
                    raise fail(
                        f"a still {image.format} image, not a video; "
                        'pass it as an image item ({"type": "image"}) instead'
                    )
                indices = sample_frame_indices(total, num_frames)
                wanted, last = set(indices), max(indices)
                frames, start_ms, elapsed_ms = {}, {}, 0.0
                for index in range(last + 1):
                    image.seek(index)
                    image.load()  # WebP sets the frame's duration only when the frame is loaded
                    if index in wanted:
                        frames[index] = Image.fromarray(to_rgb_array(image))
                        start_ms[index] = elapsed_ms
                    elapsed_ms += float(image.info.get("duration") or 0)
        except VideoError:
            raise
        except Image.UnidentifiedImageError:
            raise fail("not a recognized image format, or corrupt") from None
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
            raise fail(f"corrupt or truncated ({type(err).__name__}: {_one_line(err)})") from err
    return Video([frames[i] for i in indices], [start_ms[i] / 1000 for i in indices], indices)


def _import_av(path: str):
    try:
        import av
    except ImportError:
        raise VideoDecoderError(f"cannot decode video file {path}: PyAV is not installed; {INSTALL_HINT}") from None
    return av


def _load_with_pyav(path: str, num_frames: int | None) -> Video:
    av = _import_av(path)

    def fail(problem: str, err: BaseException | None = None) -> VideoError:
        cause = f" ({type(err).__name__}: {_one_line(err)})" if err is not None else ""
        return VideoError(f"cannot read video file {path}: {problem}{cause}")

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise fail("no video stream in the file")
            stream = container.streams.video[0]
            # The container's frame count when it has one (mp4, mov); else count the packets
            # (one per frame) without decoding them.
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            rate = stream.average_rate or stream.guessed_rate
        if total <= 0:
            raise fail("no video frames in the file")
        indices = sample_frame_indices(total, num_frames)
        decoded, frames, times = _decode_frames(av, path, set(indices))
        if decoded <= max(indices):  # fewer frames than the container said: sample what is there
            if decoded == 0:
                raise fail("no video frames could be decoded")
            indices = sample_frame_indices(decoded, num_frames)
            _, frames, times = _decode_frames(av, path, set(indices))
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as err:
        raise fail("not a readable video, or corrupt", err) from err
    fps = float(rate) if rate else None
    timestamps = [i / fps if fps else times[i] for i in indices]
    return Video([frames[i] for i in indices], timestamps, indices)


def _decode_frames(av, path: str, wanted: set[int]) -> tuple[int, dict[int, Image.Image], dict[int, float]]:
    """Decodes the first video stream up to the last wanted frame, converting only the wanted
    ones to RGB. Returns (frames decoded, {index: image}, {index: presentation time in s})."""
    frames, times, decoded, last = {}, {}, 0, max(wanted)
    with av.open(path) as container:
        for frame in container.decode(container.streams.video[0]):
            if decoded in wanted:
                frames[decoded] = frame.to_image()
                times[decoded] = max(float(frame.time or 0.0), 0.0)
            decoded += 1
            if decoded > last:
                break
    return decoded, frames, times


# ------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------


class VideoCache:
    """The last few decoded video files, so rendering a prompt and then building the model
    inputs for it decode each video once. Keyed by (real path, num_frames, mtime, size): an
    edited file is decoded again. Videos whose frames exceed `max_bytes` are not kept."""

    def __init__(self, max_videos: int = 4, max_bytes: int = 1 << 30):
        self.max_videos, self.max_bytes = max_videos, max_bytes
        self._videos: collections.OrderedDict[tuple, Video] = collections.OrderedDict()

    def load(self, path: str | os.PathLike, num_frames: int | None = DEFAULT_NUM_FRAMES) -> Video:
        """`load_video(path, num_frames)`, from the cache when the file is unchanged."""
        try:
            name = os.fspath(path)
            stat = os.stat(name)
        except (OSError, TypeError):
            return load_video(path, num_frames)  # load_video names the problem
        key = (os.path.realpath(name), resolve_num_frames(num_frames), stat.st_mtime_ns, stat.st_size)
        if key in self._videos:
            self._videos.move_to_end(key)
            return self._videos[key]
        video = load_video(name, num_frames)
        if _frame_bytes(video) <= self.max_bytes:
            self._videos[key] = video
            while len(self._videos) > self.max_videos or self._cached_bytes() > self.max_bytes:
                self._videos.popitem(last=False)
        return video

    def clear(self) -> None:
        self._videos.clear()

    def __len__(self) -> int:
        return len(self._videos)

    def _cached_bytes(self) -> int:
        return sum(_frame_bytes(video) for video in self._videos.values())


def _frame_bytes(video: Video) -> int:
    """RGB bytes of the distinct frames (repeated indices share one image)."""
    unique = {id(frame): frame for frame in video.frames}.values()
    return sum(frame.width * frame.height * 3 for frame in unique)
