"""Hostile inputs to the media side (video, processor, tokenizer and chat template, config):
each is refused quickly with a one-line ValueError subclass that names the argument (or file)
and the value, instead of a hang, a raw TypeError / OverflowError / jinja error, or a silent
pass. Issue 15, items 4, 8, 9 and 11, and the cases found beside them.

The model directories are copies of the shipped tiny models without their weights: everything
here fails (or is checked) before weights would load.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from aria_jax import processing, tokenizer as tokenizer_module, video
from aria_jax.cli import main as cli_main
from aria_jax.config import AriaConfig, AriaTextConfig, AriaVisionConfig, ConfigError, config_from_pretrained
from aria_jax.image_processing import ImageError
from aria_jax.processing import AriaProcessor
from aria_jax.tokenizer import AriaTokenizer, TokenizerError
from repo_paths import DEMO_MODEL, ROOT, TINY_RANDOM

FAST = 1.0  # seconds: a refusal happens before any decoding


def without_weights(source: str, destination) -> str:
    """The model directory's config, tokenizer and processor files, in `destination`."""
    os.makedirs(destination, exist_ok=True)
    for name in os.listdir(source):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(source, name), destination)
    return str(destination)


def edit_json(path, change) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    change(data)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def processor() -> AriaProcessor:
    return AriaProcessor.from_pretrained(DEMO_MODEL)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    """A 3-frame animated GIF."""
    path = tmp_path_factory.mktemp("clip") / "clip.gif"
    frames = [Image.new("RGB", (32, 32), color) for color in ("red", "green", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=250, loop=0)
    return str(path)


@pytest.fixture
def no_decoding(monkeypatch):
    """Any attempt to open a video file fails the test."""

    def decode(*args):
        raise AssertionError(f"a video was decoded: {args}")

    monkeypatch.setattr(video, "_load_video_file", decode)


def ask(*content) -> list[dict]:
    return [{"role": "user", "content": [*content, {"type": "text", "text": "What happens?"}]}]


def timed(call):
    start = time.perf_counter()
    try:
        call()
    finally:
        elapsed = time.perf_counter() - start
        assert elapsed < FAST, f"took {elapsed:.2f} s"


# ------------------------------------------------------------------------------------------
# Item 4: too many frames fail fast, before decoding
# ------------------------------------------------------------------------------------------


def test_load_video_bounds_num_frames_before_decoding(clip, no_decoding):
    frames = [np.zeros((8, 8, 3), np.uint8)] * 3
    for source in (frames, clip):
        with pytest.raises(video.VideoArgumentError) as raised:
            timed(lambda: video.load_video(source, num_frames=10**6))
        assert "num_frames=1000000" in one_line(raised) and "512" in one_line(raised)
    assert video.MAX_NUM_FRAMES == 512
    assert len(video.load_video(frames, num_frames=video.MAX_NUM_FRAMES).frames) == 512  # the limit itself is allowed
    with pytest.raises(video.VideoArgumentError, match="513"):
        video.load_video(frames, num_frames=video.MAX_NUM_FRAMES + 1)


@pytest.mark.parametrize("source", ["file", "list"])
def test_processor_refuses_frames_beyond_the_context_before_decoding(processor, clip, no_decoding, source):
    item = (
        {"type": "video", "path": clip}
        if source == "file"
        else {"type": "video", "video": [np.zeros((8, 8, 3), np.uint8)] * 3}
    )
    assert processor.context_length == 256 and processor.size_to_queries == {112: 16}
    for call in (processor.from_messages, processor.apply_chat_template, processor.prepare_messages):
        with pytest.raises(processing.ProcessorError) as raised:
            timed(lambda: call(ask({**item, "num_frames": 100000})))
        message = one_line(raised)
        assert "num_frames=100000" in message and "256 tokens" in message and "at most 16 frames" in message, message
    with pytest.raises(processing.ProcessorError, match="num_frames=17"):
        processor.from_messages(ask({**item, "num_frames": 17}))


def test_frames_of_several_videos_share_the_context(processor, clip):
    frames = [np.zeros((8, 8, 3), np.uint8)] * 3
    messages, images = processor.prepare_messages(
        ask({"type": "video", "path": clip, "num_frames": 10}, {"type": "video", "video": frames, "num_frames": 6})
    )
    assert len(images) == 16  # exactly the 256 / 16 frames that fit
    with pytest.raises(processing.ProcessorError, match=r"num_frames=7, .* at most 6 more frames"):
        processor.prepare_messages(
            ask({"type": "video", "path": clip, "num_frames": 10}, {"type": "video", "video": frames, "num_frames": 7})
        )
    # a list of frames without num_frames asks for all of them
    with pytest.raises(processing.ProcessorError, match="all 21 frames of the list"):
        processor.prepare_messages(ask({"type": "video", "video": frames * 7}))


def test_context_length_comes_from_config_json(tmp_path):
    model = without_weights(DEMO_MODEL, tmp_path / "model")
    edit_json(os.path.join(model, "config.json"), lambda d: d["text_config"].update(max_position_embeddings=64))
    assert AriaProcessor.from_pretrained(model).context_length == 64
    edit_json(os.path.join(model, "config.json"), lambda d: d["text_config"].pop("max_position_embeddings"))
    assert AriaProcessor.from_pretrained(model).context_length == AriaTextConfig.max_position_embeddings
    os.remove(os.path.join(model, "config.json"))
    assert AriaProcessor.from_pretrained(model).context_length is None  # a tokenizer-only directory
    with pytest.raises(processing.ProcessorError, match="context_length"):
        AriaProcessor(None, AriaTokenizer.from_pretrained(model), context_length=True)


@pytest.mark.parametrize(
    "item, error, words",
    [
        ({"num_frames": "3"}, "VideoArgumentError", ["num_frames", "'3'"]),
        ({"num_frames": 2.0}, "VideoArgumentError", ["num_frames", "2.0"]),
        ({"num_frames": True}, "VideoArgumentError", ["num_frames", "True"]),
        ({"fps": float("inf")}, "VideoArgumentError", ["fps", "inf"]),
        ({"fps": "4"}, "VideoArgumentError", ["fps", "'4'"]),
        ({"path": 5, "video": None}, "ProcessorError", ["path", "int"]),
    ],
)
def test_bad_video_items(processor, item, error, words):
    base = {"type": "video", "video": [np.zeros((8, 8, 3), np.uint8)] * 3}
    with pytest.raises(ValueError) as raised:
        processor.from_messages(ask({**base, **item}))
    assert all(word in one_line(raised) for word in words), one_line(raised)
    assert type(raised.value).__name__ == error  # one type per kind of problem


def test_video_functions_refuse_bad_arguments():
    with pytest.raises(video.VideoArgumentError, match="got int"):
        video.load_video(5)
    with pytest.raises(video.VideoArgumentError, match="inf"):
        video.frame_timestamp(float("inf"))
    with pytest.raises(video.VideoArgumentError, match="'1'"):
        video.frame_timestamp("1")
    with pytest.raises(video.VideoArgumentError, match="got int"):
        video.VideoCache().load(5)


# ------------------------------------------------------------------------------------------
# Item 8: chat templates that do not compile name their file; rendering errors are ValueErrors
# ------------------------------------------------------------------------------------------

BROKEN_TEMPLATE = "{% for message in messages %}\n{{ message['role'] }\n{% endfor %}"


def test_broken_chat_template_jinja_names_file_and_line(tmp_path, capsys):
    model = without_weights(DEMO_MODEL, tmp_path / "model")
    template = os.path.join(model, "chat_template.jinja")
    with open(template, "w", encoding="utf-8") as f:
        f.write(BROKEN_TEMPLATE)
    for load in (AriaTokenizer.from_pretrained, AriaProcessor.from_pretrained):
        with pytest.raises(TokenizerError) as raised:
            load(model)
        assert one_line(raised).startswith(f"{template}: line 2: ")
    assert cli_main(["generate", "--model", model, "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == f"aria-jax: error: {template}: line 2: unexpected '}}'\n"


def test_broken_chat_template_in_tokenizer_config_names_that_file(tmp_path):
    model = without_weights(TINY_RANDOM, tmp_path / "model")
    os.remove(os.path.join(model, "chat_template.jinja"))
    config = os.path.join(model, "tokenizer_config.json")
    edit_json(config, lambda d: d.update(chat_template=BROKEN_TEMPLATE))
    with pytest.raises(TokenizerError) as raised:
        AriaTokenizer.from_pretrained(model)
    assert one_line(raised).startswith(f"{config}: chat_template: line 2: ")
    for template in (5, [{"template": "{{ x }}"}]):
        edit_json(config, lambda d: d.update(chat_template=template))
        with pytest.raises(TokenizerError, match=f"{config}: chat_template: "):
            AriaTokenizer.from_pretrained(model)
    edit_json(config, lambda d: d.pop("chat_template"))
    edit_json(os.path.join(model, "processor_config.json"), lambda d: d.update(chat_template="{{"))
    with pytest.raises(TokenizerError, match="processor_config.json: chat_template: line 1: "):
        AriaProcessor.from_pretrained(model)


@pytest.mark.parametrize(
    "template, words",
    [
        ("{{ messages[0].nothing.deeper }}", ["chat template", "'dict object' has no attribute 'nothing'"]),
        ("{{ raise_exception('roles must\nalternate') }}", ["chat template: roles must alternate"]),
        ("{{ 1 / 0 }}", ["chat template: division by zero"]),
        ("{{ messages.__class__.__mro__ }}", ["chat template", "unsafe"]),
    ],
)
def test_errors_while_rendering_are_one_line_value_errors(processor, template, words):
    messages = [{"role": "user", "content": "hi"}]
    for apply in (processor.apply_chat_template, processor.tokenizer.apply_chat_template):
        with pytest.raises(tokenizer_module.ChatTemplateError) as raised:
            apply(messages, chat_template=template)
        assert all(word in one_line(raised) for word in words), one_line(raised)


@pytest.mark.parametrize(
    "messages, words",
    [
        ([{"content": "hi"}], ["message 0", "'role'"]),
        (["hi"], ["message 0", "'hi'"]),
        ([{"role": "user", "content": "hi"}, 5], ["message 1", "5"]),
        ("hi", ["messages", "str"]),
    ],
)
def test_malformed_messages(processor, messages, words):
    for apply in (processor.apply_chat_template, processor.tokenizer.apply_chat_template):
        with pytest.raises(tokenizer_module.ChatTemplateError) as raised:
            apply(messages)
        assert all(word in one_line(raised) for word in words), one_line(raised)
    with pytest.raises(tokenizer_module.ChatTemplateError, match="must be a string, got int"):
        processor.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=5)


@pytest.mark.parametrize(
    "content, words",
    [
        (5, ["message 0", "content", "int"]),
        (["hi"], ["message 0", "content item", "'hi'"]),
        ([{"text": "hi"}], ["message 0", '"type"']),
    ],
)
def test_processor_refuses_content_it_would_drop(processor, content, words):
    with pytest.raises(processing.ProcessorError) as raised:
        processor.from_messages([{"role": "user", "content": content}])
    assert all(word in one_line(raised) for word in words), one_line(raised)


# ------------------------------------------------------------------------------------------
# Item 9: config values the implementation cannot hold
# ------------------------------------------------------------------------------------------

TEXT = {
    "model_type": "aria_text",
    "vocab_size": 448,
    "hidden_size": 128,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "moe_num_experts": 8,
    "moe_topk": 2,
    "max_position_embeddings": 256,
}
NESTED = {
    "text_config": TEXT,
    "vision_config": {"image_size": 112, "hidden_size": 128, "num_attention_heads": 4},
    "projector_patch_to_query_dict": {"64": 16},
}


@pytest.mark.parametrize(
    "changes, field, value",
    [
        ({"vocab_size": 10**12}, "vocab_size", "1000000000000"),
        ({"vocab_size": 2**31}, "vocab_size", "2147483648"),
        ({"max_position_embeddings": 2**31}, "max_position_embeddings", "2147483648"),
        ({"num_hidden_layers": True}, "num_hidden_layers", "True"),
        ({"moe_num_shared_experts": True}, "moe_num_shared_experts", "True"),
        ({"moe_num_shared_experts": 2**31}, "moe_num_shared_experts", "2147483648"),
        ({"hidden_size": "128", "num_key_value_heads": 4}, "hidden_size", "'128'"),
        ({"rope_theta": float("inf")}, "rope_theta", "inf"),
        ({"rope_theta": float("nan")}, "rope_theta", "nan"),
        ({"rope_theta": 10**400}, "rope_theta", "1000000"),
        ({"rope_theta": "1e4"}, "rope_theta", "'1e4'"),
        ({"rope_parameters": {"rope_theta": float("inf")}}, "rope_theta", "inf"),
        ({"rope_parameters": "default"}, "rope_parameters", "'default'"),
        ({"rms_norm_eps": float("inf")}, "rms_norm_eps", "inf"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps", "nan"),
        ({"rms_norm_eps": "1e-6"}, "rms_norm_eps", "'1e-6'"),
        ({"eos_token_id": 10**12}, "eos_token_id", "1000000000000"),
        ({"eos_token_id": "2"}, "eos_token_id", "'2'"),
        ({"eos_token_id": 2.0}, "eos_token_id", "2.0"),
        ({"eos_token_id": [2, True]}, "eos_token_id", "True"),
        ({"bos_token_id": -5}, "bos_token_id", "-5"),
        ({"pad_token_id": 2**40}, "pad_token_id", "1099511627776"),
    ],
)
def test_text_config_values_beyond_the_implementation(changes, field, value):
    with pytest.raises(ConfigError) as raised:
        AriaTextConfig.from_hf_dict({**TEXT, **changes})
    message = one_line(raised)
    assert field in message and value in message, message


@pytest.mark.parametrize(
    "changes, field, value",
    [
        ({"layer_norm_eps": float("nan")}, "vision_config.layer_norm_eps", "nan"),
        ({"layer_norm_eps": float("inf")}, "vision_config.layer_norm_eps", "inf"),
        ({"hidden_act": "relu6"}, "vision_config.hidden_act", "relu6"),
        ({"num_channels": 4}, "vision_config.num_channels", "4"),
        ({"num_hidden_layers": True}, "vision_config.num_hidden_layers", "True"),
        ({"image_size": 14 * 153391690}, "vision_config.image_size", "2147483660"),  # a multiple of 14 past 2**31
    ],
)
def test_vision_config_values_beyond_the_implementation(changes, field, value):
    d = copy.deepcopy(NESTED)
    d["vision_config"].update(changes)
    with pytest.raises(ConfigError) as raised:
        AriaConfig.from_hf_dict(d)
    message = one_line(raised)
    assert field in message and value in message, message


@pytest.mark.parametrize(
    "changes, field, value",
    [
        ({"text_config": "aria"}, "text_config", "'aria'"),
        ({"text_config": None}, "text_config", "None"),
        ({"vision_config": [1]}, "vision_config", "[1]"),
        ({"projector_patch_to_query_dict": [64, 16]}, "projector_patch_to_query_dict", "[64, 16]"),
        ({"projector_patch_to_query_dict": {"sixty-four": 16}}, "projector_patch_to_query_dict", "sixty-four"),
        ({"projector_patch_to_query_dict": {"64": 16.5}}, "projector_patch_to_query_dict", "16.5"),
        ({"projector_patch_to_query_dict": {"64": 2**31}}, "projector_patch_to_query_dict", "2147483648"),
        ({"image_token_index": True}, "image_token_index", "True"),
        ({"image_token_index": "9"}, "image_token_index", "'9'"),
        ({"pad_token_id": 2**31}, "pad_token_id", "2147483648"),
    ],
)
def test_multimodal_config_values_beyond_the_implementation(changes, field, value):
    with pytest.raises(ConfigError) as raised:
        AriaConfig.from_hf_dict({**copy.deepcopy(NESTED), **changes})
    message = one_line(raised)
    assert field in message and value in message, message


def test_config_that_is_not_an_object():
    with pytest.raises(ConfigError, match=r"config=\[1, 2\]: must be a JSON object"):
        AriaConfig.from_hf_dict([1, 2])
    with pytest.raises(ConfigError, match="text_config=3"):
        AriaTextConfig.from_hf_dict(3)


def test_the_bounds_themselves_are_allowed():
    text = AriaTextConfig.from_hf_dict(
        {
            **TEXT,
            "vocab_size": 2**31 - 1,
            "eos_token_id": [0, 2**31 - 1],
            "max_position_embeddings": 2**31 - 1,
            "rope_theta": 1e300,
        }
    )
    assert text.vocab_size == 2**31 - 1 and text.eos_token_id == (0, 2**31 - 1) and text.rope_theta == 1e300
    assert AriaVisionConfig(layer_norm_eps=1e-300).layer_norm_eps == 1e-300
    assert AriaConfig.from_hf_dict(copy.deepcopy(NESTED)).projector_patch_to_query == ((64, 16),)


def test_config_json_nested_too_deep_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="config.json: unreadable JSON"):
        config_from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda d: d.update(text_config="aria"), ConfigError, ["config.json", "text_config", "str"]),
        (lambda d: d.update(vision_config="siglip"), ConfigError, ["vision_config", "'siglip'"]),
        (
            lambda d: d.update(projector_patch_to_query_dict={"10000000000": 16}),
            ConfigError,
            ["projector_patch_to_query_dict", "10000000000"],
        ),
        (
            lambda d: d["text_config"].update(max_position_embeddings="256"),
            ConfigError,
            ["max_position_embeddings", "'256'"],
        ),
    ],
)
def test_processor_reads_config_json_safely(tmp_path, change, error, words):
    model = without_weights(DEMO_MODEL, tmp_path / "model")
    edit_json(os.path.join(model, "config.json"), change)
    with pytest.raises(error) as raised:
        AriaProcessor.from_pretrained(model)
    assert all(word in one_line(raised) for word in words), one_line(raised)


def test_processor_config_of_the_wrong_shape_names_the_file(tmp_path):
    model = without_weights(DEMO_MODEL, tmp_path / "model")
    edit_json(os.path.join(model, "processor_config.json"), lambda d: d.update(size_conversion=[112, 16]))
    with pytest.raises(ValueError, match="processor_config.json: ") as raised:
        AriaProcessor.from_pretrained(model)
    one_line(raised)


# ------------------------------------------------------------------------------------------
# Item 11: text that is not valid Unicode
# ------------------------------------------------------------------------------------------


def test_lone_surrogates_are_named_by_position_and_code_point(processor):
    tok = processor.tokenizer
    cases = [
        (lambda: tok.encode("ab\udcffc"), "text is not valid Unicode: lone surrogate U+DCFF at position 2"),
        (lambda: tok(["fine", "x\ud800"]), "texts[1] is not valid Unicode: lone surrogate U+D800 at position 1"),
        (lambda: processor(text="\udcfe"), "text is not valid Unicode: lone surrogate U+DCFE at position 0"),
        (
            lambda: processor(text=["ok", "a\udcff"]),
            "text[1] is not valid Unicode: lone surrogate U+DCFF at position 1",
        ),
        (
            lambda: tok.apply_chat_template([{"role": "user", "content": "\udcff"}], tokenize=True),
            "lone surrogate U+DCFF",
        ),
        (
            lambda: processor.from_messages([{"role": "user", "content": [{"type": "text", "text": "hi \udcff"}]}]),
            "message 0 item 0 text is not valid Unicode: lone surrogate U+DCFF at position 3",
        ),
        (
            lambda: processor.apply_chat_template([{"role": "user", "content": "\udcff"}]),
            "message 0 content is not valid Unicode",
        ),
    ]
    for call, expected in cases:
        with pytest.raises(TokenizerError) as raised:
            call()
        assert expected in one_line(raised), one_line(raised)
    assert tok.decode(tok.encode("café 😀 日本")) == "café 😀 日本"  # valid text outside the BMP is fine


def test_cli_prompt_of_invalid_utf8_bytes_is_a_one_line_error():
    result = subprocess.run(
        [
            os.fsencode(sys.executable),
            b"-m",
            b"aria_jax.cli",
            b"generate",
            b"--model",
            os.fsencode(DEMO_MODEL),
            b"--prompt",
            b"\xff\xfe",
        ],
        capture_output=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(b"aria-jax: error: ") and result.stderr.count(b"\n") == 1, result.stderr
    assert b"--prompt is not valid Unicode: lone surrogate U+DCFF at position 0" in result.stderr
    assert b"Traceback" not in result.stderr
    assert result.stdout == b""


# ------------------------------------------------------------------------------------------
# Beside the items: other arguments that crashed with a raw exception
# ------------------------------------------------------------------------------------------


def test_tokenizer_arguments(processor):
    tok = processor.tokenizer
    with pytest.raises(TokenizerError, match="texts must be a str or a list of str, got int"):
        tok(5)
    with pytest.raises(TokenizerError, match="texts\\[0\\] must be a str, got int"):
        tok([5])
    with pytest.raises(TokenizerError, match="max_length.*'5'"):
        tok(["a"], padding="max_length", max_length="5")
    with pytest.raises(TokenizerError, match="text must be a str, got bytes"):
        tok.encode(b"hi")
    assert tok.decode([5, 2**40, 6]) == tok.decode([5, 6])  # an unknown id is dropped, however large
    for ids in ([2**70], "abc", [[1], [2, 3]]):
        with pytest.raises(TokenizerError, match="ids must be integer token ids"):
            tok.decode(ids)


def test_processor_arguments(processor):
    with pytest.raises(processing.ProcessorError, match="got int"):
        processor(text=5)
    with pytest.raises(processing.ProcessorError, match="got bytes in the list"):
        processor(text=["a", b"b"])
    with pytest.raises(processing.ProcessorError, match="max_image_size=10000000000 is not allowed"):
        timed(lambda: processor(text="<|img|>", images=[np.zeros((8, 8, 3), np.uint8)], max_image_size=10**10))
    with pytest.raises(ImageError, match="got int"):
        processor(text="<|img|>", images=[5])
