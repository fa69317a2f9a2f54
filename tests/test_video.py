"""Video input: frame sampling, decoding (PyAV and Pillow), timestamps, the processor's video
items, and the demo model answering about the frame a video item sampled.

The test clip is drawn here: 24 frames of 112 x 112 at 4 frames per second; frames 0-11 show
three red circles, frames 12-23 three blue squares, and within each half the shapes move one
pixel right per frame. So every frame can be told apart by pixel statistics (colour, filled
area, centroid) even after a lossy codec, and each test can check exactly which source frames
were sampled.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

import aria_jax
from aria_jax import demo_task, video
from aria_jax.video import VideoDecoderError, VideoError, frame_timestamp, load_video, sample_frame_indices
from repo_paths import DEMO_MODEL


SIZE, NUM_FRAMES, FPS = 112, 24, 4
HALF = NUM_FRAMES // 2
SIDE = 28
BOXES = ((6, 8, 6 + SIDE, 8 + SIDE), (62, 10, 62 + SIDE, 10 + SIDE), (34, 66, 34 + SIDE, 66 + SIDE))
# Mean x of the shapes' pixels in frame 0 (each box covers columns left .. left + SIDE - 1).
BASE_CENTROID_X = np.mean([left + (SIDE - 1) / 2 for left, _, _, _ in BOXES])


def clip_frame(index: int) -> Image.Image:
    """Frame `index` of the test clip, drawn with the demo task's renderer."""
    shape, color = ("circle", "red") if index < HALF else ("square", "blue")
    shift = index % HALF
    boxes = tuple((left + shift, top, right + shift, bottom) for left, top, right, bottom in BOXES)
    return demo_task.render(demo_task.Scene(shape, color, "white", boxes, SIZE))


def identify(frame: Image.Image) -> int:
    """Which clip frame this is, from its pixels: colour and filled area give the half (and must
    agree), the centroid's shift gives the frame within the half."""
    rgb = np.asarray(frame.convert("RGB"), dtype=np.int64)
    assert rgb.shape == (SIZE, SIZE, 3)
    drawn = np.abs(rgb - 255).sum(axis=-1) > 150  # not the white background
    red, _, blue = rgb[drawn].mean(axis=0)
    fill = drawn.sum() / (len(BOXES) * SIDE * SIDE)  # a circle fills pi / 4 of its box
    first_half = red > blue
    assert first_half == (fill < 0.9), (red, blue, fill)
    shift = np.nonzero(drawn)[1].mean() - BASE_CENTROID_X
    assert abs(shift - round(shift)) < 0.3, shift
    return int(round(shift)) + (0 if first_half else HALF)


MP4_ENCODERS = ("libx264", "mpeg4")  # H.264, else MPEG-4 part 2: whichever the PyAV wheel has
WEBM_ENCODERS = ("libvpx-vp9", "libvpx")


def available_encoder(candidates: tuple[str, ...]) -> str | None:
    """The first of `candidates` the installed PyAV can encode with, else None."""
    av = pytest.importorskip("av")
    for name in candidates:
        try:
            av.codec.Codec(name, "w")
            return name
        except ValueError:
            continue
    return None


def write_video(path, frames: list[Image.Image], encoder: str | None = None) -> str:
    """Encodes the frames at FPS frames per second, yuv420p (with an mp4 encoder by default)."""
    import av

    encoder = encoder or available_encoder(MP4_ENCODERS)
    if encoder is None:
        pytest.skip(f"the installed PyAV has none of the encoders {MP4_ENCODERS}")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=FPS)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    return str(path)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, str]:
    """The test clip as mp4, webm (when PyAV has a VP8 / VP9 encoder), animated GIF and WebP."""
    folder = tmp_path_factory.mktemp("clips")
    frames = [clip_frame(i) for i in range(NUM_FRAMES)]
    paths = {"mp4": write_video(folder / "clip.mp4", frames)}
    webm_encoder = available_encoder(WEBM_ENCODERS)
    if webm_encoder:  # WebM stores no frame count: the decoder counts the packets
        paths["webm"] = write_video(folder / "clip.webm", frames, webm_encoder)
    for kind in ("gif", "webp"):
        paths[kind] = str(folder / f"clip.{kind}")
        frames[0].save(paths[kind], save_all=True, append_images=frames[1:], duration=1000 // FPS, loop=0)
    return paths


@pytest.fixture(scope="module")
def processor():
    return aria_jax.AriaProcessor.from_pretrained(DEMO_MODEL)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------
# Sampling and timestamps
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "total, num_frames, expected",
    [
        (24, 8, [1, 4, 7, 10, 13, 16, 19, 22]),  # the middle of each stretch of 3 frames
        (24, 3, [4, 12, 20]),
        (10, 3, [1, 5, 8]),
        (100, 1, [50]),
        (1, 1, [0]),
        (7, None, [0, 1, 2, 3, 3, 4, 5, 6]),  # None -> 8 frames, more than the video has
        (7, 0, [0, 1, 2, 3, 3, 4, 5, 6]),  # <= 0 -> 8 as well
        (16, -1, [1, 3, 5, 7, 9, 11, 13, 15]),
        (2, 4, [0, 0, 1, 1]),  # more asked than there are: indices repeat
        (3, 5, [0, 0, 1, 2, 2]),
    ],
)
def test_sample_frame_indices(total, num_frames, expected):
    assert sample_frame_indices(total, num_frames) == expected


def test_sample_frame_indices_is_the_midpoint_rule_in_floats():
    """Each index is floor(total * (2i + 1) / (2 n)), the frame at the middle of the i-th of n
    equal stretches, computed in floats as Aria's notebook does: where that value is a whole
    number, the float product can land just below it (4 frames, 98 asked: frame 24 -> 0, not 1)."""
    for total in range(1, 60):
        for count in range(1, 40):
            for i, index in enumerate(sample_frame_indices(total, count)):
                exact_twice = total * (2 * i + 1)  # 2 n times the exact midpoint
                floor = exact_twice // (2 * count)
                assert index == floor or (exact_twice % (2 * count) == 0 and index == floor - 1)
    assert sample_frame_indices(4, 98)[24] == 0
    with pytest.raises(ValueError, match="no frames"):
        sample_frame_indices(0, 8)
    with pytest.raises(ValueError, match="num_frames must be an integer"):
        sample_frame_indices(10, 2.5)


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "[00:00]"),
        (0.99, "[00:00]"),
        (59.999, "[00:59]"),
        (60, "[01:00]"),
        (61.5, "[01:01]"),
        (599, "[09:59]"),
        (4503.2, "[75:03]"),
        (6000, "[100:00]"),
    ],
)
def test_frame_timestamp(seconds, text):
    assert frame_timestamp(seconds) == text


def test_frame_timestamp_rejects_negative_times():
    with pytest.raises(ValueError, match=">= 0"):
        frame_timestamp(-1)


# ------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------


def test_test_clip_frames_identify_themselves():
    assert [identify(clip_frame(i)) for i in range(NUM_FRAMES)] == list(range(NUM_FRAMES))


@pytest.mark.parametrize("kind", ["mp4", "webm", "gif", "webp"])
@pytest.mark.parametrize("num_frames", [8, 3, 30])
def test_load_video_returns_the_sampled_frames(clips, kind, num_frames):
    if kind not in clips:
        pytest.skip(f"no {kind} encoder in the installed PyAV")
    loaded = load_video(clips[kind], num_frames=num_frames)
    expected = sample_frame_indices(NUM_FRAMES, num_frames)
    assert loaded.indices == expected
    assert [identify(frame) for frame in loaded.frames] == expected
    assert all(frame.mode == "RGB" and frame.size == (SIZE, SIZE) for frame in loaded.frames)
    np.testing.assert_allclose(loaded.timestamps, [i / FPS for i in expected], rtol=0, atol=1e-9)


def test_load_video_default_is_eight_frames(clips):
    loaded = load_video(clips["mp4"])
    assert loaded.indices == [1, 4, 7, 10, 13, 16, 19, 22]
    assert [frame_timestamp(t) for t in loaded.timestamps] == [
        "[00:00]",
        "[00:01]",
        "[00:01]",
        "[00:02]",
        "[00:03]",
        "[00:04]",
        "[00:04]",
        "[00:05]",
    ]


def test_load_video_from_a_list_of_frames():
    frames = [clip_frame(i) for i in range(NUM_FRAMES)]
    arrays = [np.asarray(frame) for frame in frames]
    for source in (frames, arrays, np.stack(arrays)):
        loaded = load_video(source, num_frames=3, fps=2.0)
        assert loaded.indices == [4, 12, 20]
        for frame, index in zip(loaded.frames, loaded.indices):
            np.testing.assert_array_equal(np.asarray(frame), arrays[index])
        assert loaded.timestamps == [2.0, 6.0, 10.0]
    assert load_video(frames[:2], num_frames=2).timestamps == [0.0, 1.0]  # default 1 frame per second


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "missing.mp4"
    with pytest.raises(VideoError) as excinfo:
        load_video(path)
    message = one_line_error(excinfo)
    assert str(path) in message and "no such file" in message


@pytest.mark.parametrize("name", ["corrupt.mp4", "corrupt.gif"])
def test_corrupt_file(tmp_path, name):
    pytest.importorskip("av")
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError) as excinfo:
        load_video(path)
    message = one_line_error(excinfo)
    assert str(path) in message and "corrupt" in message


def test_pyav_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"never decoded")
    with pytest.raises(VideoDecoderError) as excinfo:
        load_video(path)
    message = one_line_error(excinfo)
    assert str(path) in message and 'pip install "aria-jax[video]"' in message
    gif = tmp_path / "clip.gif"
    clip_frame(0).save(gif, save_all=True, append_images=[clip_frame(12)], duration=1000)
    assert load_video(gif, num_frames=2).indices == [0, 1]  # Pillow formats need no PyAV


def test_empty_frame_list():
    with pytest.raises(VideoError) as excinfo:
        load_video([])
    assert "empty list of frames" in one_line_error(excinfo)


def test_still_image_is_not_a_video(tmp_path):
    path = tmp_path / "still.png"
    clip_frame(0).save(path)
    with pytest.raises(VideoError) as excinfo:
        load_video(path)
    message = one_line_error(excinfo)
    assert str(path) in message and "still PNG image" in message and '{"type": "image"}' in message


# ------------------------------------------------------------------------------------------
# The processor's video items
# ------------------------------------------------------------------------------------------


def ask(*content, question="What shape is in the image?") -> list[dict]:
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


def frame_item(text: str) -> list[dict]:
    return [{"type": "text", "text": text}, {"type": "image"}, {"type": "text", "text": "\n"}]


def test_video_item_renders_timestamps_and_one_image_per_frame(processor, clips):
    frames = [clip_frame(0), clip_frame(HALF)]
    from_list = ask({"type": "video", "video": frames}, question="What happens?")  # all frames, 1 fps
    expected = (
        "<|im_start|>user\n"
        "[00:00]<fim_prefix><|img|><fim_suffix>\n"
        "[00:01]<fim_prefix><|img|><fim_suffix>\n"
        "What happens?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert processor.apply_chat_template(from_list, add_generation_prompt=True) == expected

    # A file: 2 of 24 frames at 4 fps are frames 6 and 18, at 1.5 s and 4.5 s.
    from_file = ask({"type": "video", "path": clips["mp4"], "num_frames": 2}, question="What happens?")
    assert processor.apply_chat_template(from_file, add_generation_prompt=True) == (
        "<|im_start|>user\n"
        "[00:01]<fim_prefix><|img|><fim_suffix>\n"
        "[00:04]<fim_prefix><|img|><fim_suffix>\n"
        "What happens?<|im_end|>\n<|im_start|>assistant\n"
    )
    messages, images = processor.prepare_messages(from_file)
    assert messages == [
        {
            "role": "user",
            "content": [*frame_item("[00:01]"), *frame_item("[00:04]"), {"type": "text", "text": "What happens?"}],
        }
    ]
    assert [identify(image) for image in images] == [6, 18]
    assert from_file[0]["content"][0]["type"] == "video"  # the caller's messages are left as they were


def test_rendering_then_encoding_decodes_the_file_once(processor, clips, monkeypatch):
    processor.video_cache.clear()
    calls = []
    monkeypatch.setattr(video, "load_video", lambda *args: calls.append(args) or load_video(*args))
    messages = ask({"type": "video", "path": clips["mp4"], "num_frames": 3})
    processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor.from_messages(messages)
    assert len(calls) == 1 and inputs["pixel_values"].shape[0] == 3
    os.utime(clips["mp4"], ns=(0, 0))  # a changed file is decoded again
    processor.from_messages(messages)
    assert len(calls) == 2


def test_from_messages_puts_frames_among_the_images_in_order(processor):
    frames = [clip_frame(i) for i in range(NUM_FRAMES)]
    first, last = clip_frame(3), clip_frame(20)  # passed images, told apart from the frames by index
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "video", "video": frames, "num_frames": 3, "fps": FPS},
                {"type": "image", "image": last},
                {"type": "text", "text": "What changed?"},
            ],
        }
    ]
    inputs = processor.from_messages(messages, images=[first])
    expected_images = [first, frames[4], frames[12], frames[20], last]
    expected = processor.image_processor(expected_images)
    np.testing.assert_array_equal(inputs["pixel_values"], expected["pixel_values"])
    np.testing.assert_array_equal(inputs["pixel_mask"], expected["pixel_mask"])
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.count("<|img|>") == 5 and "[00:01]<fim_prefix><|img|><fim_suffix>\n[00:03]" in prompt
    direct = processor(text=prompt, images=expected_images)
    for key in ("input_ids", "attention_mask", "num_crops"):
        np.testing.assert_array_equal(inputs[key], direct[key])
    _, images = processor.prepare_messages(messages, images=[first])
    assert [identify(image) for image in images] == [3, 4, 12, 20, 20]


def test_from_messages_image_count_errors(processor):
    messages = ask({"type": "image"}, {"type": "video", "video": [clip_frame(0)]})
    with pytest.raises(ValueError, match=r"1 image item\(s\) without an image of their own .* but 0 image\(s\)"):
        processor.from_messages(messages)
    with pytest.raises(ValueError, match=r"1 image item\(s\) .* but 2 image\(s\)"):
        processor.from_messages(messages, images=[clip_frame(1), clip_frame(2)])
    with pytest.raises(VideoError, match="empty list of frames"):
        processor.apply_chat_template(ask({"type": "video", "video": []}))
    with pytest.raises(ValueError, match='needs "path"'):
        processor.apply_chat_template(ask({"type": "video"}))


# ------------------------------------------------------------------------------------------
# The demo model sees the sampled frame
# ------------------------------------------------------------------------------------------


def test_demo_model_answers_about_the_sampled_frame(processor, tmp_path):
    """A clip of three red circles then three blue squares, cut in two halves; one frame
    sampled from each half (its middle) must be what the model describes. The scenes are static
    and in the layout of the demo task's three-shape examples, which the model reads reliably
    (it misreads some lone shapes, and the shapes of the moving test clip at a few positions)."""
    layout = ((10, 10, 40, 40), (70, 14, 100, 44), (40, 70, 70, 100))
    circles = demo_task.render(demo_task.Scene("circle", "red", "white", layout, SIZE))
    squares = demo_task.render(demo_task.Scene("square", "blue", "white", layout, SIZE))
    first_half = write_video(tmp_path / "first_half.mp4", [circles] * HALF)
    second_half = write_video(tmp_path / "second_half.mp4", [squares] * HALF)
    conversations = [ask({"type": "video", "path": path, "num_frames": 1}) for path in (first_half, second_half)]
    inputs = processor.from_messages(conversations)
    model = aria_jax.AriaForConditionalGeneration.from_pretrained(DEMO_MODEL)
    sequences = model.generate(**inputs, max_new_tokens=4)
    replies = processor.batch_decode(sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    replies = [reply.split(demo_task.END_OF_TURN)[0] for reply in replies]
    assert [demo_task.answers_match(reply, answer) for reply, answer in zip(replies, ("circle", "square"))] == [
        True,
        True,
    ], replies
