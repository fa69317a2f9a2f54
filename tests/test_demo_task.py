"""The demo task (aria_jax.demo_task): scenes checked against their pixels, questions and answers,
the dataset files, and the demo checkpoint's tokenizer / processor files in both our
AriaProcessor and transformers'."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import transformers
from PIL import Image
from skimage.measure import label, regionprops

from aria_jax import AriaProcessor
from aria_jax.demo_task import (
    ANSWERS,
    BACKGROUNDS,
    COLORS,
    COUNT_WORDS,
    GAP,
    IMAGE_TOKEN_ID,
    MAX_SIDE,
    MIN_SIDE,
    QUADRANT_MARGIN,
    QUADRANTS,
    QUESTION_TYPES,
    QUESTIONS,
    SHAPES,
    VOCAB_SIZE,
    answers_match,
    chat_messages,
    conversation,
    draw_scene,
    make_qa,
    pick_kind,
    quadrant,
    question_type,
    sample,
    sample_chat,
    sample_scene,
    task_texts,
    write_dataset,
    write_tokenizer_files,
)
from aria_jax.files import partial_path
from aria_jax.tokenizer import DEFAULT_CHAT_TEMPLATE

SIZE = 112
QUERIES = 16  # image tokens per 112-pixel crop in these tests
# Pixels covered / bounding-box area: 1 for a square, pi / 4 for a disc, 1 / 2 for a triangle.
FILL_RATIO = {"square": (0.99, 1.0), "circle": (0.74, 0.82), "triangle": (0.47, 0.56)}


def components(image: Image.Image, color: str) -> list:
    """The 8-connected regions of exactly `color`, with (left, top, right, bottom) boxes."""
    mask = (np.asarray(image) == COLORS[color]).all(axis=-1)
    return regionprops(label(mask, connectivity=2))


def box_of(region) -> tuple[int, int, int, int]:
    top, left, bottom, right = region.bbox
    return left, top, right, bottom


# ----------------------------------------------------------------------------------- scenes


def test_scenes_show_what_they_claim():
    counts, shapes = set(), set()
    for seed in range(200):
        image, scene = draw_scene(np.random.default_rng(seed), SIZE)
        pixels = np.asarray(image)
        assert image.mode == "RGB" and image.size == (SIZE, SIZE)
        # every pixel is the background or the shape colour
        is_shape = (pixels == COLORS[scene.color]).all(axis=-1)
        assert (pixels[~is_shape] == BACKGROUNDS[scene.background]).all(), seed
        regions = components(image, scene.color)
        assert len(regions) == scene.count and 1 <= scene.count <= 3, seed
        assert sorted(box_of(r) for r in regions) == sorted(scene.boxes), seed
        for region in regions:
            left, top, right, bottom = box_of(region)
            assert right - left == bottom - top, seed
            assert round(MIN_SIDE * SIZE) <= right - left <= round(MAX_SIDE * SIZE), seed
            assert min(left, top, SIZE - right, SIZE - bottom) >= 1, seed  # off the border
            low, high = FILL_RATIO[scene.shape]
            assert low <= region.area / (right - left) ** 2 <= high, (seed, scene.shape)
        for i, a in enumerate(scene.boxes):  # bounding boxes at least GAP apart along some axis
            for b in scene.boxes[:i]:
                gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                assert gap >= GAP, seed
        counts.add(scene.count)
        shapes.add(scene.shape)
    assert counts == {1, 2, 3} and shapes == set(SHAPES)


def test_where_answers_match_the_pixels():
    asked = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        image, scene = draw_scene(rng, SIZE)
        question, answer = make_qa(scene, rng)
        if answer not in QUADRANTS:
            continue
        asked += 1
        (region,) = components(image, scene.color)
        left, top, right, bottom = box_of(region)
        x, y = (left + right) / 2, (top + bottom) / 2
        assert min(abs(x - SIZE / 2), abs(y - SIZE / 2)) >= QUADRANT_MARGIN, seed
        assert answer == f"{'top' if y < SIZE / 2 else 'bottom'} {'left' if x < SIZE / 2 else 'right'}", seed
    assert asked >= 10


def test_quadrant_is_the_box_centre():
    assert quadrant((10, 10, 40, 40), SIZE) == "top left"
    assert quadrant((70, 10, 100, 40), SIZE) == "top right"
    assert quadrant((10, 70, 40, 100), SIZE) == "bottom left"
    assert quadrant((70, 70, 100, 100), SIZE) == "bottom right"


# ------------------------------------------------------------------------------------ Q / A


def test_questions_and_answers_fit_the_scene():
    fields = {"shape": f"(?P<shape>{'|'.join(SHAPES)})", "color": f"(?P<color>{'|'.join(COLORS)})"}
    phrasings = {
        kind: [
            re.compile(
                re.escape(p.format(shape="SHAPE", color="COLOR"))
                .replace("SHAPE", fields["shape"])
                .replace("COLOR", fields["color"])
                + "$"
            )
            for p in patterns
        ]
        for kind, patterns in QUESTIONS.items()
    }
    seen_kinds, seen_phrasings = set(), set()
    for seed in range(600):
        rng = np.random.default_rng(seed)
        scene = sample_scene(rng, SIZE)
        question, answer = make_qa(scene, rng)
        assert answer in ANSWERS, (question, answer)
        matches = [
            (kind, i, m)
            for kind, patterns in phrasings.items()
            for i, pattern in enumerate(patterns)
            if (m := pattern.match(question))
        ]
        assert len(matches) == 1, question
        kind, index, match = matches[0]
        assert match.groupdict().get("shape", scene.shape) == scene.shape, question
        assert match.groupdict().get("color", scene.color) == scene.color, question
        expected = {
            "shape": scene.shape,
            "color": scene.color,
            "colors": scene.color,
            "count": COUNT_WORDS[scene.count - 1],
            "where": quadrant(scene.boxes[0], SIZE),
        }[kind]
        assert answer == expected, (question, answer, scene)
        if kind in ("color", "where"):
            assert scene.count == 1, question
        if kind == "colors":
            assert scene.count > 1, question
        seen_kinds.add(kind)
        seen_phrasings.add((kind, index))
    assert seen_kinds == set(QUESTIONS)
    assert seen_phrasings == {(kind, i) for kind, patterns in QUESTIONS.items() for i in range(len(patterns))}


def test_sampling_is_deterministic_in_the_seed():
    def examples(seed):
        rng = np.random.default_rng(seed)
        return [
            (np.asarray(image).tobytes(), question, answer)
            for image, question, answer in (sample(rng, SIZE) for _ in range(5))
        ]

    assert examples(7) == examples(7)
    assert examples(7) != examples(8)
    assert task_texts(50, 1) == task_texts(50, 1) != task_texts(50, 2)


def test_kind_weights_set_how_often_each_type_is_asked():
    rng = np.random.default_rng(0)
    weights = {"shape": 3, "color": 1, "count": 3, "where": 2}
    kinds = [question_type(sample(rng, SIZE, kind_weights=weights)[2]) for _ in range(2000)]
    for kind, weight in weights.items():
        assert abs(kinds.count(kind) / len(kinds) - weight / 9) < 0.03, (kind, kinds.count(kind))
    for kind in QUESTION_TYPES:  # a "where" question brings a lone shape of its own
        assert all(question_type(sample(rng, SIZE, kind=kind)[2]) == kind for _ in range(20))
    assert {question_type(sample(rng, SIZE, kind_weights={"where": 1})[2]) for _ in range(50)} == {"where"}

    assert pick_kind(rng, ("shape", "color"), {"color": 1, "where": 5}) == "color"
    with pytest.raises(ValueError, match="'size'"):
        pick_kind(rng, QUESTION_TYPES, {"size": 1})
    with pytest.raises(ValueError, match="no weight to any of"):
        pick_kind(rng, ("shape", "count"), {"where": 1})
    with pytest.raises(ValueError, match="count must be 1 to 3, got 4"):
        sample_scene(rng, SIZE, count=4)


def test_chats_ask_every_type_once_per_round_about_one_scene():
    rng = np.random.default_rng(5)
    rounds_seen = set()
    for _ in range(200):
        image, pairs = sample_chat(rng, 6, SIZE)
        assert len(pairs) == 6
        kinds = [question_type(answer) for _, answer in pairs]
        shape = next(answer for (_, answer), kind in zip(pairs, kinds) if kind == "shape")
        count = COUNT_WORDS.index(next(answer for (_, answer), kind in zip(pairs, kinds) if kind == "count")) + 1
        round_length = 4 if count == 1 else 3  # "where" only about a lone shape
        assert len(set(kinds[:round_length])) == round_length, kinds
        assert len(set(kinds[round_length : 2 * round_length])) == len(kinds[round_length : 2 * round_length]), kinds
        regions = [r for color in COLORS for r in components(image, color)]
        assert len(regions) == count and shape in SHAPES
        for question, answer in pairs:
            assert "{" not in question and answer in ANSWERS
        rounds_seen.add(round_length)
    assert rounds_seen == {3, 4}
    with pytest.raises(ValueError, match="at least one turn"):
        sample_chat(rng, 0)


def test_chat_messages_put_the_image_first_and_may_end_with_a_question():
    pairs = [("What shape is in the image?", "circle"), ("Where is the circle?", None)]
    messages = chat_messages(pairs)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == [
        {"type": "image", "text": None},
        {"type": "text", "text": "What shape is in the image?"},
    ]
    assert messages[2]["content"] == [{"type": "text", "text": "Where is the circle?"}]
    assert chat_messages(pairs[:1]) == conversation("What shape is in the image?", "circle")


@pytest.mark.parametrize(
    "predicted, answer, expected",
    [
        ("circle", "circle", True),
        ("Circle.", "circle", True),
        ("  TOP LEFT \n", "top left", True),
        ("two.", "Two", True),
        ("two", "three", False),
        ("circles", "circle", False),
        ("left top", "top left", False),
        ("", "one", False),
        ("one..", "one", False),
        ("a circle", "circle", False),
    ],
)
def test_answers_match(predicted, answer, expected):
    assert answers_match(predicted, answer) is expected


# ---------------------------------------------------------------------------------- dataset


def test_write_dataset(tmp_path):
    write_dataset(tmp_path / "a", 12, seed=3, size=SIZE)
    rng = np.random.default_rng(3)
    with open(tmp_path / "a" / "train.jsonl", encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == 12
    for index, line in enumerate(lines):
        record = json.loads(line)
        image, question, answer = sample(rng, SIZE)
        assert record == {"messages": conversation(question, answer), "images": [f"images/{index:06d}.png"]}
        assert record["messages"][0]["content"][0] == {"type": "image", "text": None}
        with Image.open(tmp_path / "a" / record["images"][0]) as stored:
            assert stored.mode == "RGB" and np.array_equal(np.asarray(stored), np.asarray(image))
    assert sorted(os.listdir(tmp_path / "a" / "images")) == [f"{i:06d}.png" for i in range(12)]

    write_dataset(tmp_path / "b", 12, seed=3, size=SIZE)
    for name in ["train.jsonl"] + [f"images/{i:06d}.png" for i in range(12)]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert not os.path.exists(partial_path(tmp_path / "a"))
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path / "a", 2, seed=4)
    write_dataset(tmp_path / "a", 2, seed=4, overwrite=True)
    assert len((tmp_path / "a" / "train.jsonl").read_text().splitlines()) == 2


def test_write_dataset_of_chats(tmp_path):
    weights = {"shape": 1, "where": 1}
    write_dataset(tmp_path / "chats", 40, seed=3, size=SIZE, kind_weights=weights, max_turns=3)
    rng = np.random.default_rng(3)
    records = [json.loads(line) for line in (tmp_path / "chats" / "train.jsonl").read_text().splitlines()]
    for index, record in enumerate(records):
        image, pairs = sample_chat(rng, int(rng.integers(1, 4)), SIZE, weights)
        assert record == {"messages": chat_messages(pairs), "images": [f"images/{index:06d}.png"]}
        with Image.open(tmp_path / "chats" / record["images"][0]) as stored:
            assert np.array_equal(np.asarray(stored), np.asarray(image))
    turns = [sum(m["role"] == "assistant" for m in record["messages"]) for record in records]
    assert set(turns) == {1, 2, 3}
    answers = [m["content"][0]["text"] for record in records for m in record["messages"] if m["role"] == "assistant"]
    assert {question_type(answer) for answer in answers} == {"shape", "where"}


# -------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """The tokenizer / processor files plus the config.json entries the processors read."""
    out = tmp_path_factory.mktemp("demo") / "checkpoint"
    write_tokenizer_files(out, task_texts(1000, 0), VOCAB_SIZE, SIZE, QUERIES)
    patches = (SIZE // 14) ** 2
    with open(out / "config.json", "w") as f:
        json.dump(
            {
                "model_type": "aria",
                "image_token_index": IMAGE_TOKEN_ID,
                "pad_token_id": 2,
                "projector_patch_to_query_dict": {str(patches): QUERIES},
                "text_config": {"model_type": "aria_text", "vocab_size": VOCAB_SIZE},
                "vision_config": {"patch_size": 14},
            },
            f,
        )
    return str(out)


@pytest.fixture(scope="module")
def processors(checkpoint):
    return transformers.AriaProcessor.from_pretrained(checkpoint), AriaProcessor.from_pretrained(checkpoint)


def test_tokenizer_files_are_reproducible(checkpoint, tmp_path):
    names = write_tokenizer_files(tmp_path, task_texts(1000, 0), VOCAB_SIZE, SIZE, QUERIES)
    assert sorted(names) == ["chat_template.jinja", "processor_config.json", "tokenizer.model", "tokenizer_config.json"]
    for name in names:
        with open(os.path.join(checkpoint, name), "rb") as f:
            assert f.read() == (tmp_path / name).read_bytes(), name
    assert (tmp_path / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE


def test_both_processors_load_and_agree(processors):
    ref, ours = processors
    assert ours.image_token_id == ref.image_token_id == IMAGE_TOKEN_ID
    assert ours.tokenizer.convert_tokens_to_ids("<|img|>") == IMAGE_TOKEN_ID
    assert ours.size_to_queries == ref.size_conversion == {SIZE: QUERIES}
    assert ours.image_processor.max_image_size == ref.image_processor.max_image_size == SIZE
    assert ours.image_processor.image_mean == ours.image_processor.image_std == (0.5, 0.5, 0.5)
    assert ours.chat_template == ref.chat_template == DEFAULT_CHAT_TEMPLATE
    assert ours.pad_token_id == ref.tokenizer.pad_token_id == 0

    image, question, answer = sample(np.random.default_rng(0), SIZE)
    messages = conversation(question, answer)[:1]
    prompt = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == ref.apply_chat_template(messages, add_generation_prompt=True)
    got = ours(text=prompt, images=[image])
    # transformers' image processor only makes 490 / 980 crops; the token expansion is what
    # input_ids depend on, so give its 490 crops the same number of image tokens.
    ref.size_conversion[490] = QUERIES
    expected = ref(text=prompt, images=[image], max_image_size=490, return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    assert int((got["input_ids"] == IMAGE_TOKEN_ID).sum()) == QUERIES
    assert got["pixel_values"].shape == (1, 3, SIZE, SIZE) and got["pixel_mask"].all()
    np.testing.assert_allclose(got["pixel_values"][0], np.asarray(image).transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)

    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(ours.tokenizer.name_or_path)
    for text in task_texts(100, 5) + ["  two  spaces", "café 日本 😀"]:
        assert ours.tokenizer.encode(text) == reference_tokenizer.encode(text) == ref.tokenizer.encode(text), text


def test_task_text_tokenizes_compactly_and_round_trips(processors):
    _, ours = processors
    tokenizer = ours.tokenizer
    for answer in ANSWERS:  # as the model writes it: right after "assistant\n"
        assert len(tokenizer.encode(answer)) <= 2 * len(answer.split()), answer
    texts = task_texts(200, 9)
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # A conversation tokenizes as its generation prompt followed by the answer, so what the
    # model learns to write after the prompt is what it is asked to write at inference.
    for question, answer in (make_qa(sample_scene(rng), rng) for rng in map(np.random.default_rng, range(50))):
        prompt = ours.apply_chat_template(conversation(question, answer)[:1], add_generation_prompt=True)
        reply = f"{answer}<|im_end|>\n"
        assert tokenizer.encode(prompt + reply) == tokenizer.encode(prompt) + tokenizer.encode(reply), question
