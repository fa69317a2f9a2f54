"""A synthetic visual question-answering task for the demo model, and its tokenizer files.

Each image is a plain background with one to three shapes, all of the same type and the same
colour, so every question has exactly one answer:

    rng = np.random.default_rng(0)
    image, question, answer = sample(rng)   # e.g. "How many shapes are there?", "two"
    answers_match("Two.", "two")            # True: exact match after strip, lower, trailing "."

`write_dataset` writes examples in the original Aria repository's fine-tuning format
(train.jsonl + images/), and `write_tokenizer_files` the tokenizer / processor files of the
demo checkpoint: a sentencepiece BPE model trained on `task_texts`, with Aria's special tokens
at their usual ids, readable by `aria_jax.AriaProcessor` and by transformers' AriaProcessor.
Everything is deterministic in its seed and needs only the package's runtime dependencies.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import sentencepiece
from PIL import Image, ImageDraw

from aria_jax.files import atomic_directory, write_json
from aria_jax.image_processing import DEFAULT_SPLIT_TILES
from aria_jax.tokenizer import DEFAULT_CHAT_TEMPLATE, render_chat_template

# ------------------------------------------------------------------------------------------
# Scenes
# ------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle")
# Saturated, far apart in RGB, and none of them close to a background colour.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (130, 40, 170),
    "orange": (250, 120, 0),
}
BACKGROUNDS = {
    "white": (255, 255, 255),
    "light gray": (205, 205, 205),
    "dark gray": (70, 70, 70),
    "beige": (235, 225, 200),
}
MAX_COUNT = 3
# Shape sides as fractions of the image side: 24 to 36 pixels in a 112-pixel image, large
# enough for a 14-pixel patch vision encoder to see their outlines.
MIN_SIDE, MAX_SIDE = 24 / 112, 36 / 112
EDGE_MARGIN = 2  # pixels between a shape and the image border
GAP = 4  # pixels between the bounding boxes of two shapes, so they never touch
# A lone shape's centre is at least this far from both midlines, so its quadrant is clear.
QUADRANT_MARGIN = 8

Box = tuple[int, int, int, int]  # left, top, right, bottom; right and bottom exclusive


@dataclasses.dataclass(frozen=True)
class Scene:
    """What an image shows: `count` shapes of one type and one colour, at `boxes`."""

    shape: str
    color: str
    background: str
    boxes: tuple[Box, ...]
    size: int

    @property
    def count(self) -> int:
        return len(self.boxes)


def quadrant(box: Box, size: int) -> str:
    """ "top left", "top right", "bottom left" or "bottom right": where the box's centre is."""
    left, top, right, bottom = box
    vertical = "top" if top + bottom < size else "bottom"
    horizontal = "left" if left + right < size else "right"
    return f"{vertical} {horizontal}"


def _clear_of_midlines(box: Box, size: int) -> bool:
    left, top, right, bottom = box
    return all(abs((low + high) / 2 - size / 2) >= QUADRANT_MARGIN for low, high in ((left, right), (top, bottom)))


def _apart(a: Box, b: Box) -> bool:
    """At least GAP pixels between the boxes, horizontally or vertically."""
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def sample_scene(rng: np.random.Generator, size: int = 112, count: int | None = None) -> Scene:
    """A random scene: shape type, colour, background, and non-overlapping boxes (rejection
    sampling; a layout that does not fit within 100 tries is started over). `count` shapes, or
    a random number of them."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    if count is None:
        count = int(rng.integers(1, MAX_COUNT + 1))
    elif not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count must be 1 to {MAX_COUNT}, got {count}")
    low, high = round(MIN_SIDE * size), round(MAX_SIDE * size)
    while True:
        boxes: list[Box] = []
        for _ in range(100):
            side = int(rng.integers(low, high + 1))
            left, top = (int(v) for v in rng.integers(EDGE_MARGIN, size - EDGE_MARGIN - side + 1, size=2))
            box = (left, top, left + side, top + side)
            if count == 1 and not _clear_of_midlines(box, size):
                continue
            if all(_apart(box, other) for other in boxes):
                boxes.append(box)
                if len(boxes) == count:
                    return Scene(shape, color, background, tuple(boxes), size)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image. No anti-aliasing: every pixel is the background or the shape
    colour, so the shapes can be counted exactly."""
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = COLORS[scene.color]
    for left, top, right, bottom in scene.boxes:
        corners = (left, top, right - 1, bottom - 1)  # PIL's boxes include their last pixel
        if scene.shape == "circle":
            draw.ellipse(corners, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(corners, fill=fill)
        else:  # pointing up
            draw.polygon([((left + right - 1) / 2, top), (left, bottom - 1), (right - 1, bottom - 1)], fill=fill)
    return image


def draw_scene(rng: np.random.Generator, size: int = 112) -> tuple[Image.Image, Scene]:
    """A random scene and its `size` x `size` image."""
    scene = sample_scene(rng, size)
    return render(scene), scene


# ------------------------------------------------------------------------------------------
# Questions and answers
# ------------------------------------------------------------------------------------------

COUNT_WORDS = ("one", "two", "three")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
ANSWERS = frozenset((*SHAPES, *COLORS, *COUNT_WORDS, *QUADRANTS))

# Phrasings per question type, as format strings over {shape} and {color}; colour questions
# have a singular and a plural form.
QUESTIONS = {
    "shape": ("What shape is in the image?", "Which shape do you see?", "What kind of shape is shown?"),
    "color": ("What color is the shape?", "What color is the {shape}?", "Which color does the shape have?"),
    "colors": ("What color are the shapes?", "What color are the {shape}s?", "Which color do the shapes have?"),
    "count": (
        "How many shapes are there?",
        "How many {shape}s are in the image?",
        "How many {color} {shape}s are in the picture?",
    ),
    "where": ("Where is the {shape}?", "Where is the {color} {shape}?", "In which corner is the {shape}?"),
}
QUESTION_TYPES = ("shape", "color", "count", "where")


def question_kinds(scene: Scene) -> tuple[str, ...]:
    """The question types a scene can answer: "where" only about a lone shape, whose centre
    `sample_scene` keeps clear of the midlines."""
    return QUESTION_TYPES if scene.count == 1 else QUESTION_TYPES[:-1]


def pick_kind(rng: np.random.Generator, kinds: Sequence[str], kind_weights: Mapping[str, float]) -> str:
    """One of `kinds`, drawn in proportion to `kind_weights` (a weight per question type)."""
    unknown = set(kind_weights) - set(QUESTION_TYPES)
    if unknown or any(weight < 0 for weight in kind_weights.values()):
        raise ValueError(f"kind_weights must map question types {QUESTION_TYPES} to weights >= 0, got {kind_weights}")
    weights = np.array([kind_weights.get(kind, 0.0) for kind in kinds], dtype=np.float64)
    if weights.sum() <= 0:
        raise ValueError(f"kind_weights {dict(kind_weights)} give no weight to any of {tuple(kinds)}")
    return kinds[rng.choice(len(kinds), p=weights / weights.sum())]


def make_qa(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> tuple[str, str]:
    """A question about the scene (of type `kind`, else a random one the scene allows) and its
    one-or-two-word answer."""
    kinds = question_kinds(scene)
    if kind is None:
        kind = kinds[rng.integers(len(kinds))]
    elif kind not in kinds:
        raise ValueError(f"no {kind!r} question about a scene of {scene.count} shapes")
    if kind == "color" and scene.count > 1:
        kind = "colors"
    phrasings = QUESTIONS[kind]
    question = phrasings[rng.integers(len(phrasings))].format(shape=scene.shape, color=scene.color)
    answer = {
        "shape": scene.shape,
        "color": scene.color,
        "colors": scene.color,
        "count": COUNT_WORDS[scene.count - 1],
        "where": quadrant(scene.boxes[0], scene.size),
    }[kind]
    return question, answer


def answers_match(predicted: str, answer: str) -> bool:
    """Exact match, ignoring case, surrounding whitespace and a trailing period."""

    def normalize(text: str) -> str:
        return text.strip().lower().removesuffix(".").strip()

    return normalize(predicted) == normalize(answer)


def sample(
    rng: np.random.Generator, size: int = 112, kind: str | None = None, kind_weights: Mapping[str, float] | None = None
) -> tuple[Image.Image, str, str]:
    """One example: (image, question, answer). The question is of type `kind`, or drawn by
    `kind_weights` (a "where" question comes with a lone shape), or else any type the scene
    allows, all equally likely."""
    scene, question, answer = _scene_and_question(rng, size, kind, kind_weights)
    return render(scene), question, answer


def _scene_and_question(
    rng: np.random.Generator, size: int, kind: str | None, kind_weights: Mapping[str, float] | None
) -> tuple[Scene, str, str]:
    if kind is None and kind_weights is not None:
        kind = pick_kind(rng, QUESTION_TYPES, kind_weights)
    scene = sample_scene(rng, size, count=1 if kind == "where" else None)
    return scene, *make_qa(scene, rng, kind)


def sample_chat(
    rng: np.random.Generator, turns: int, size: int = 112, kind_weights: Mapping[str, float] | None = None
) -> tuple[Image.Image, list[tuple[str, str]]]:
    """One image and `turns` (question, answer) pairs about it. Each question's type is drawn by
    `kind_weights` (default: all equally likely) among those the scene allows and not yet asked
    in this round (a round ends when every type has been asked). The first question's type is
    drawn before the scene, so the weights also decide how often a lone shape is shown."""
    if turns < 1:
        raise ValueError(f"a chat has at least one turn, got {turns}")
    kind_weights = dict.fromkeys(QUESTION_TYPES, 1.0) if kind_weights is None else kind_weights
    scene, question, answer = _scene_and_question(rng, size, None, kind_weights)
    allowed = [kind for kind in question_kinds(scene) if kind_weights.get(kind, 0) > 0]
    pairs, asked = [(question, answer)], {question_type(answer)}
    for _ in range(turns - 1):
        if asked.issuperset(allowed):  # every type has been asked: a new round
            asked.clear()
        kind = pick_kind(rng, [kind for kind in allowed if kind not in asked], kind_weights)
        asked.add(kind)
        pairs.append(make_qa(scene, rng, kind))
    return render(scene), pairs


# ------------------------------------------------------------------------------------------
# Dataset files
# ------------------------------------------------------------------------------------------


def conversation(question: str, answer: str) -> list[dict]:
    """One example in Aria's chat format: the image comes before the question."""
    return chat_messages([(question, answer)])


def chat_messages(pairs: Sequence[tuple[str, str | None]]) -> list[dict]:
    """A chat about one image in Aria's chat format: the image comes before the first question;
    a last answer of None leaves the chat at the user's turn (a prompt to generate from)."""
    messages = []
    for turn, (question, answer) in enumerate(pairs):
        image = [{"type": "image", "text": None}] if turn == 0 else []
        messages.append({"role": "user", "content": [*image, {"type": "text", "text": question}]})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _is_dataset(folder: str) -> bool:
    return sorted(os.listdir(folder)) == ["images", "train.jsonl"]


def write_dataset(
    folder: str | os.PathLike,
    num_examples: int,
    seed: int,
    size: int = 112,
    overwrite: bool = False,
    kind_weights: Mapping[str, float] | None = None,
    max_turns: int = 1,
) -> None:
    """`folder/train.jsonl` (one {"messages", "images"} record per line, as the original Aria
    repository's fine-tuning data) and `folder/images/NNNNNN.png`. Written into a temporary
    sibling and renamed into place, so `folder` is either complete or absent.

    By default each example is one question of any type its scene allows (`sample`); with
    `kind_weights` or `max_turns` > 1, a chat of 1 to `max_turns` turns (equally likely) whose
    question types are drawn by `kind_weights` (`sample_chat`)."""
    rng = np.random.default_rng(seed)
    with atomic_directory(
        folder, overwrite=overwrite, replaceable=_is_dataset, what="a data set written by write_dataset"
    ) as partial:
        os.makedirs(os.path.join(partial, "images"))
        with open(os.path.join(partial, "train.jsonl"), "w", encoding="utf-8") as lines:
            for index in range(num_examples):
                if kind_weights is None and max_turns == 1:
                    image, question, answer = sample(rng, size)
                    pairs = [(question, answer)]
                else:
                    image, pairs = sample_chat(rng, int(rng.integers(1, max_turns + 1)), size, kind_weights)
                name = f"images/{index:06d}.png"
                image.save(os.path.join(partial, name), format="PNG")
                record = {"messages": chat_messages(pairs), "images": [name]}
                lines.write(json.dumps(record) + "\n")


def task_texts(num: int, seed: int) -> list[str]:
    """Text to train the tokenizer on, rendered with the chat template as the model reads it:
    `num` sampled examples, then every phrasing with every shape and colour and every answer
    at least once (paired up regardless of meaning; only the words matter here)."""
    rng = np.random.default_rng(seed)
    examples = [make_qa(sample_scene(rng), rng) for _ in range(num)]
    questions = dict.fromkeys(
        phrasing.format(shape=shape, color=color)
        for phrasings in QUESTIONS.values()
        for phrasing in phrasings
        for shape in SHAPES
        for color in COLORS
    )
    examples += zip(questions, itertools.cycle(sorted(ANSWERS)))
    return [render_chat_template(DEFAULT_CHAT_TEMPLATE, conversation(q, a)) for q, a in examples]


# ------------------------------------------------------------------------------------------
# Tokenizer and processor files
# ------------------------------------------------------------------------------------------

# The smallest multiple of 16 at which every word of the task, as it appears in a rendered
# conversation, is one piece (with task_texts of a few hundred examples or more).
VOCAB_SIZE = 448
# Ids 3..9 so that <|img|> lands on id 9, the image token of every Aria config.
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>", "<|img|>"]
IMAGE_TOKEN = "<|img|>"
IMAGE_TOKEN_ID = 9
# Aria's tokenizer_config.json settings: no BOS / EOS added, pad = unk. Ids 0..2 are
# sentencepiece's control pieces; the chat markup tokens are not special (skip_special_tokens
# keeps them), the image token is, as in what transformers' AriaProcessor.save_pretrained writes.
# The class is transformers 5's generic one, which it also writes: named "LlamaTokenizer",
# transformers would build Llama's pipeline (with a prefix space) unless a config.json beside
# the files names the model type "aria".
TOKENIZER_CONFIG = {
    "add_bos_token": False,
    "add_eos_token": False,
    "add_prefix_space": True,
    "legacy": True,
    "bos_token": None,
    "eos_token": None,
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "clean_up_tokenization_spaces": False,
    "tokenizer_class": "TokenizersBackend",
    "added_tokens_decoder": {
        str(index): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": index < 3 or content == IMAGE_TOKEN,
        }
        for index, content in enumerate(["<unk>", "<s>", "</s>", *SPECIAL_TOKENS])
    },
    "image_token": IMAGE_TOKEN,
}
MIN_IMAGE_SIZE = 28  # two 14-pixel patches: the shortest side a crop is resized to


def train_tokenizer(texts: list[str], vocab_size: int) -> bytes:
    """A sentencepiece BPE model (tokenizer.model) with byte fallback and Aria's special tokens;
    one thread and a fixed input order make it byte-identical on every run.

    No normalization (sentencepiece's default NFKC rule would turn the chat template's
    newlines into spaces): a newline stays a token of its own, as in Aria's tokenizer, so the
    answer after "<|im_start|>assistant\n" is tokenized the same whether it is part of a
    training conversation or generated after the prompt."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        user_defined_symbols=SPECIAL_TOKENS,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        num_threads=1,
        add_dummy_prefix=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    image_id = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()).piece_to_id(IMAGE_TOKEN)
    if image_id != IMAGE_TOKEN_ID:
        raise ValueError(f"{IMAGE_TOKEN} got id {image_id}, not {IMAGE_TOKEN_ID}")
    return model.getvalue()


def processor_config(image_size: int, queries_per_crop: int) -> dict:
    """processor_config.json in transformers 5's layout: the image processor settings (one crop
    size, `image_size`; split grids in tiles of that size, as Aria's in tiles of 490) and the
    crop size -> image tokens table."""
    return {
        "image_processor": {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "AriaImageProcessor",
            "max_image_size": image_size,
            "min_image_size": min(MIN_IMAGE_SIZE, image_size),
            "resample": int(Image.Resampling.BICUBIC),
            "rescale_factor": 1 / 255,
            "split_image": False,
            "split_resolutions": [[rows * image_size, cols * image_size] for rows, cols in DEFAULT_SPLIT_TILES],
        },
        "processor_class": "AriaProcessor",
        "size_conversion": {str(image_size): queries_per_crop},
    }


def write_tokenizer_files(
    out_dir: str | os.PathLike, texts: list[str], vocab_size: int, image_size: int, queries_per_crop: int
) -> list[str]:
    """Trains the tokenizer on `texts` and writes tokenizer.model, tokenizer_config.json,
    chat_template.jinja and processor_config.json into `out_dir`; returns their names.
    `queries_per_crop` is the number of image tokens per `image_size` crop (the model's
    projector_patch_to_query_dict entry for (image_size / 14)^2 patches)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(train_tokenizer(texts, vocab_size))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), TOKENIZER_CONFIG)
    with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(DEFAULT_CHAT_TEMPLATE)
    write_json(os.path.join(out_dir, "processor_config.json"), processor_config(image_size, queries_per_crop))
    return ["tokenizer.model", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"]


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------

END_OF_TURN = "<|im_end|>"
# The demo model's score is measured on these questions: drawn with a seed that no training
# example uses (the training data is drawn with seed 0).
EVALUATION_SEED, EVALUATION_QUESTIONS = 1_000_003, 200


def question_type(answer: str) -> str:
    for kind, answers in (("shape", SHAPES), ("color", COLORS), ("count", COUNT_WORDS), ("where", QUADRANTS)):
        if answer in answers:
            return kind
    raise ValueError(f"{answer!r} is not an answer of the task")


def ask(
    model, processor, chats: Sequence[Sequence[tuple[str, str | None]]], images: Sequence[Image.Image]
) -> list[str]:
    """The model's replies to the last question of each chat (each about its image), through
    processor -> generate -> decode as a user would ask them."""
    prompts = [processor.apply_chat_template(chat_messages(chat), add_generation_prompt=True) for chat in chats]
    inputs = processor(text=prompts, images=[[image] for image in images])
    return processor.decode_replies(model.generate(**inputs, max_new_tokens=4), inputs)


def evaluate(
    model, processor, num_questions: int, seed: int, batch_size: int = 50, kinds: Sequence[str] | None = None
) -> dict:
    """Asks `num_questions` freshly drawn questions through processor -> generate -> decode, as a
    user would, and scores the answers by exact match: of the types `kinds` in turn (an equal
    share each), or by default of any type each scene allows (as `sample` draws them; "where"
    questions are then 1 in 12). Returns {"accuracy", "by_type": {type: accuracy}, "failures":
    [(question, expected, answered), ...], "replies": [answered, ...]}."""
    rng = np.random.default_rng(seed)
    examples = [sample(rng, kind=None if kinds is None else kinds[i % len(kinds)]) for i in range(num_questions)]
    correct: dict[str, list[bool]] = {kind: [] for kind in QUESTION_TYPES}
    failures, replies = [], []
    for start in range(0, num_questions, batch_size):
        chunk = examples[start : start + batch_size]
        chats = [[(question, None)] for _, question, _ in chunk]
        replies += ask(model, processor, chats, [image for image, _, _ in chunk])
    for (_, question, answer), reply in zip(examples, replies):
        ok = answers_match(reply, answer)
        correct[question_type(answer)].append(ok)
        if not ok:
            failures.append((question, answer, reply))
    return {
        "accuracy": sum(sum(v) for v in correct.values()) / num_questions,
        "by_type": {kind: sum(v) / len(v) for kind, v in correct.items() if v},
        "failures": failures,
        "replies": replies,
    }


def evaluate_chats(model, processor, num_chats: int, turns: int, seed: int) -> dict:
    """Holds `num_chats` chats of `turns` questions about an image each (drawn in order by
    `sample_chat(rng, turns)`, all types equally likely, from `np.random.default_rng(seed)`),
    every turn asked after the model's own earlier replies, and scores each answer by exact
    match. Returns {"accuracy", "by_turn": [accuracy per turn], "by_type": {type: accuracy},
    "failures": [(chat so far, expected, answered), ...], "replies": [[answered per turn] per chat]}."""
    rng = np.random.default_rng(seed)
    images, all_pairs = zip(*(sample_chat(rng, turns) for _ in range(num_chats)))
    histories: list[list[tuple[str, str | None]]] = [[] for _ in range(num_chats)]
    by_turn, by_type, failures = [], {kind: [] for kind in QUESTION_TYPES}, []
    for turn in range(turns):
        chats = [[*history, (pairs[turn][0], None)] for history, pairs in zip(histories, all_pairs)]
        replies = ask(model, processor, chats, images)
        right = []
        for history, pairs, reply in zip(histories, all_pairs, replies):
            question, answer = pairs[turn]
            ok = answers_match(reply, answer)
            right.append(ok)
            by_type[question_type(answer)].append(ok)
            if not ok:
                failures.append(([*history, (question, None)], answer, reply))
            history.append((question, reply))
        by_turn.append(float(np.mean(right)))
    return {
        "accuracy": float(np.mean(by_turn)),
        "by_turn": by_turn,
        "by_type": {kind: float(np.mean(v)) for kind, v in by_type.items() if v},
        "failures": failures,
        "replies": [[reply for _, reply in history] for history in histories],
    }
