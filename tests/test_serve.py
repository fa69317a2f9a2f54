"""`aria-jax serve` through OpenAI's own Python client: image chat, streaming, stop strings and
seeds give what `generate()` gives each request alone, under many concurrent clients too; every
error has OpenAI's shape and status and the server keeps serving; a client that disconnects
mid-stream frees its slot; a 200-request soak loses nothing and changes no answer.

The server runs in this process (uvicorn on a thread, 127.0.0.1, a free port) over an engine
on the tiny random model; `tests/test_readme_and_cli.py` runs the README's client example
against the real command."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import random
import shutil
import socket
import threading
import time

import httpx2
import openai
import pytest
import uvicorn
from PIL import Image

import aria_jax
from aria_jax.engine import Engine
from aria_jax.server import create_app

from repo_paths import SHAPES_PNG, TINY_RANDOM

MODEL_NAME = "tiny-random"
SLOTS, MAX_LENGTH = 4, 128


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An app served by uvicorn on a thread of this process, until `close()`."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def tiny():
    model = aria_jax.AriaForConditionalGeneration.from_pretrained(TINY_RANDOM)
    return model, aria_jax.AriaProcessor.from_pretrained(TINY_RANDOM)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("media")
    shutil.copy(SHAPES_PNG, directory / "shapes.png")
    (directory / "notes.txt").write_text("not an image")
    return directory


@pytest.fixture(scope="module")
def served(tiny, media_dir):
    model, processor = tiny
    engine = Engine(model, max_batch=SLOTS, max_length=MAX_LENGTH, max_queue=64)
    engine.warm_up()
    server = Server(create_app(engine, processor, MODEL_NAME, allowed_media_dir=str(media_dir)))
    with engine:
        yield server, engine
    server.close()


@pytest.fixture(scope="module")
def client(served):
    server, _ = served
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(question: str, images: list) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": question}]}


def solo(tiny, messages: list[dict], images: list, **settings) -> tuple[str, int, int]:
    """What generate() answers the conversation alone: (text, completion tokens, prompt tokens)."""
    model, processor = tiny
    aria = [
        {
            "role": m["role"],
            "content": [
                {"type": "image"} if part["type"] == "image_url" else part
                for part in (
                    m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
                )
            ],
        }
        for m in messages
    ]
    inputs = processor.from_messages(aria, images=images or None)
    prompt_tokens = inputs["input_ids"].shape[1]
    new = model.generate(**inputs, **settings, max_length=MAX_LENGTH)[0, prompt_tokens:]
    stop_ids = {*model.text_config.eos_token_id, processor.tokenizer.encode("<|im_end|>")[0]}
    completion_tokens = next((k + 1 for k, token in enumerate(new) if token in stop_ids), len(new))
    text = model.generator.answer_text(new, stop_ids, tuple(settings.get("stop_strings", ())))
    return text, completion_tokens, prompt_tokens


SHAPES = Image.open(SHAPES_PNG).convert("RGB")


def test_image_chat_is_generate_alone(tiny, client):
    messages = [image_message("What shape is in the middle?", [SHAPES])]
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=12)
    text, completion_tokens, prompt_tokens = solo(tiny, messages, [SHAPES], max_new_tokens=12)
    (choice,) = response.choices
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == ("length" if completion_tokens == 12 else "stop")
    assert response.model == MODEL_NAME and response.object == "chat.completion"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert response.usage.total_tokens == prompt_tokens + completion_tokens


def test_streaming_joins_to_the_answer_and_ends_with_done(tiny, served, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about shapes"}]
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        temperature=0,
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text, completion_tokens, _ = solo(tiny, messages, [], max_new_tokens=30)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2 and "".join(pieces) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length" if completion_tokens == 30 else "stop"
    ]
    assert chunks[-1].usage.completion_tokens == completion_tokens and not chunks[-1].choices
    # on the wire: server-sent events, the last one `data: [DONE]`
    server, _ = served
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 5, "stream": True}
    with httpx2.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and all(json.loads(e[6:])["id"] for e in events[:-1])


def test_stop_strings_seeds_and_plain_completions(tiny, client):
    model, processor = tiny
    messages = [{"role": "user", "content": "Count with me"}]
    full, _, _ = solo(tiny, messages, [], max_new_tokens=40)
    # printable text past the middle that is not one token (single-token stop strings stop on
    # that token only, in generate() as here)
    stop = next(
        full[k : k + 3]
        for k in range(len(full) // 2, len(full) - 3)
        if full[k : k + 3].isascii()
        and full[k : k + 3].isprintable()
        and full[k : k + 3].strip() == full[k : k + 3]
        and len(processor.tokenizer.encode(full[k : k + 3], add_special_tokens=False)) > 1
    )
    cut = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, temperature=0, max_tokens=40, stop=[stop, "zzzz"]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == solo(tiny, messages, [], max_new_tokens=40, stop_strings=[stop, "zzzz"])[0]
    assert stop not in cut.choices[0].message.content

    sampled = [
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            temperature=0.9,
            top_p=0.95,
            max_tokens=20,
            seed=seed,
            extra_body={"top_k": 50},
        )
        .choices[0]
        .message.content
        for seed in (11, 11, 12)
    ]
    assert sampled[0] == sampled[1] != sampled[2]
    assert (
        sampled[0]
        == solo(tiny, messages, [], max_new_tokens=20, do_sample=True, temperature=0.9, top_p=0.95, top_k=50, seed=11)[
            0
        ]
    )

    completion = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=10, temperature=0)
    inputs = processor(text="Once upon a time")
    new = model.generate(**inputs, max_new_tokens=10, max_length=MAX_LENGTH)[0, inputs["input_ids"].shape[1] :]
    assert completion.choices[0].text == model.generator.answer_text(
        new, set(model.text_config.eos_token_id) | {processor.tokenizer.encode("<|im_end|>")[0]}, ()
    )
    assert completion.object == "text_completion" and completion.usage.prompt_tokens == inputs["input_ids"].shape[1]
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_concurrent_clients_each_get_their_solo_answer(tiny, client):
    """Twelve clients at once (three times the slots), mixed images, prompt lengths and answer
    lengths, greedy and seeded: each answer is that request's generate() alone."""
    rotated = SHAPES.rotate(90)
    cases = []
    for index in range(12):
        images = [[], [SHAPES], [SHAPES, rotated]][index % 3]
        question = "Compare." if len(images) == 2 else "Describe " + " and ".join(["the picture"] * (1 + index % 2))
        settings = dict(max_new_tokens=[3, 9, 17, 33][index % 4])
        if index % 5 == 4:
            settings.update(do_sample=True, temperature=0.7, seed=index)
        cases.append(([image_message(question, images)], images, settings))

    def ask(case):
        messages, _, settings = case
        return (
            client.chat.completions.create(
                model=MODEL_NAME,
                messages=messages,
                max_tokens=settings["max_new_tokens"],
                temperature=settings.get("temperature", 0),
                seed=settings.get("seed"),
            )
            .choices[0]
            .message.content
        )

    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(ask, cases))
    for index, ((messages, images, settings), answer) in enumerate(zip(cases, answers)):
        assert answer == solo(tiny, messages, images, **settings)[0], f"client {index}"


def error_of(response: httpx2.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_every_error_has_openai_shape_and_the_server_keeps_serving(served, client, media_dir):
    server, engine = served
    url = f"{server.url}/v1/chat/completions"
    hello = [{"role": "user", "content": "Hello"}]

    def post(body=None, **kwargs):
        return httpx2.post(url, json=body, timeout=60, **kwargs)

    assert error_of(post(content=b"{not json", headers={"content-type": "application/json"}), 400)
    for field, value in (("temperature", 3), ("top_p", 0), ("max_tokens", 0), ("n", 2), ("seed", -1), ("top_k", -2)):
        error = error_of(post({"model": MODEL_NAME, "messages": hello, field: value}), 400)
        assert error["param"] == field, error
    assert error_of(post({"model": MODEL_NAME, "messages": []}), 400)["param"] == "messages"
    assert (
        "stop"
        in error_of(post({"model": MODEL_NAME, "messages": hello, "stop": ["a", "b", "c", "d", "e"]}), 400)["param"]
    )

    def with_image(url_text: str):
        part = {"type": "image_url", "image_url": {"url": url_text}}
        return post({"model": MODEL_NAME, "messages": [{"role": "user", "content": [part]}], "max_tokens": 2})

    not_image = error_of(with_image("data:image/png;base64," + base64.b64encode(b"hello").decode()), 400)
    assert not_image["param"] == "messages[0].content[0].image_url" and "not an image" in not_image["message"]
    assert "not valid base64" in error_of(with_image("data:image/png;base64,@@@"), 400)["message"]
    assert "does not fetch URLs" in error_of(with_image("https://example.com/cat.png"), 400)["message"]
    assert "outside the allowed media directory" in error_of(with_image("../../etc/passwd"), 400)["message"]
    assert "not an image" in error_of(with_image("notes.txt"), 400)["message"]
    assert with_image(f"file://{media_dir}/shapes.png").status_code == 200
    assert with_image("shapes.png").status_code == 200
    past = error_of(post({"model": MODEL_NAME, "messages": hello, "max_tokens": 1000}), 400)
    assert "cache positions" in past["message"]
    unknown = error_of(post({"model": "gpt-4", "messages": hello}), 404)
    assert (unknown["param"], unknown["code"]) == ("model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=hello)

    engine.max_queue = 0  # every request finds the queue full
    try:
        assert error_of(post({"model": MODEL_NAME, "messages": hello}), 429)["type"] == "rate_limit_exceeded"
    finally:
        engine.max_queue = 64
    assert client.chat.completions.create(model=MODEL_NAME, messages=hello, max_tokens=3).choices[0].message


def test_a_stopped_engine_answers_503(tiny):
    model, processor = tiny
    engine = Engine(model, max_batch=1, max_length=MAX_LENGTH)
    engine.stop()
    server = Server(create_app(engine, processor, MODEL_NAME))
    try:
        assert httpx2.get(f"{server.url}/health").status_code == 503
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}]}
        error_of(httpx2.post(f"{server.url}/v1/chat/completions", json=body, timeout=30), 503)
    finally:
        server.close()


def wait_until(condition, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_disconnect_mid_stream_frees_the_slot_and_metrics_count(served, client):
    server, engine = served
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Go on and on"}],
        "max_tokens": 90,
        "stream": True,
        "temperature": 0,
    }
    with httpx2.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        first = [next(lines) for _ in range(3)]
        assert any(line.startswith("data: ") for line in first)
        assert engine.busy_slots == 1
    wait_until(lambda: engine.busy_slots == 0)
    assert client.chat.completions.create(model=MODEL_NAME, messages=body["messages"], max_tokens=2).choices
    metrics = httpx2.get(f"{server.url}/metrics").text
    for name in (
        "aria_jax_queue_length",
        "aria_jax_busy_slots",
        "aria_jax_time_to_first_token_seconds_bucket",
        "aria_jax_inter_token_latency_seconds_bucket",
    ):
        assert name in metrics, name
    generated = float(
        next(line.split()[-1] for line in metrics.splitlines() if line.startswith("aria_jax_generated_tokens_total"))
    )
    assert generated >= 3


def test_soak_of_200_requests_loses_nothing(tiny, served):
    """200 requests at random moments from 16 clients: valid ones (greedy, eight kinds), invalid
    ones, and streams dropped after a few events. Every valid one is answered exactly as
    generate() answers it alone, every invalid one gets a 400, every slot ends free."""
    server, engine = served
    kinds = [([image_message(f"Question {k}", [SHAPES] * (k % 2))], [SHAPES] * (k % 2), 4 + 5 * k) for k in range(8)]
    expected = [solo(tiny, messages, images, max_new_tokens=tokens)[0] for messages, images, tokens in kinds]
    rng = random.Random(0)
    plan = [rng.choice(["valid"] * 6 + ["invalid", "dropped"]) for _ in range(200)]
    url = f"{server.url}/v1/chat/completions"

    def run(index: int):
        time.sleep(rng.random() * 0.05)
        kind = index % len(kinds)
        messages, _, tokens = kinds[kind]
        body = {"model": MODEL_NAME, "messages": messages, "max_tokens": tokens, "temperature": 0}
        if plan[index] == "invalid":
            return "invalid", httpx2.post(url, json={**body, "top_p": 7}, timeout=120).status_code
        if plan[index] == "dropped":
            with httpx2.stream("POST", url, json={**body, "stream": True, "max_tokens": 60}, timeout=120) as response:
                next(response.iter_lines())
            return "dropped", None
        response = httpx2.post(url, json=body, timeout=120)
        return "valid", (response.status_code, response.json()["choices"][0]["message"]["content"], kind)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(run, range(200)))
    for (what, result), planned in zip(outcomes, plan):
        assert what == planned
        if what == "invalid":
            assert result == 400
        elif what == "valid":
            status, text, kind = result
            assert status == 200 and text == expected[kind], kind
    assert sum(what == "valid" for what, _ in outcomes) > 100
    wait_until(lambda: engine.busy_slots == 0 and engine.queue_length == 0)


def test_serve_command_errors_are_one_line(tmp_path):
    from test_readme_and_cli import run_cli

    missing = run_cli("serve", "--model", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such model directory" in missing.stderr
    outside = run_cli("serve", "--model", TINY_RANDOM, "--allowed-media-dir", str(tmp_path / "nowhere"))
    assert outside.returncode == 2 and "--allowed-media-dir" in outside.stderr
    assert len(outside.stderr.strip().splitlines()) == 1
