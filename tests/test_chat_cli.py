"""`aria-jax chat` end to end with the demo model (piped and on a pseudo-terminal), every
command's --help, and one-line user errors. Model loads dominate the time, so one piped session
covers most of the chat's behaviour."""

from __future__ import annotations

import argparse
import os
import re
import select
import subprocess
import sys
import time

import pytest

from aria_jax.cli import build_parser, main
from aria_jax.demo_task import QUESTIONS
from repo_paths import DEMO_MODEL, ROOT

DEMO_IMAGE = "examples/demo_shapes.png"  # three yellow triangles
# Phrasings the demo model was trained on; the image holds several shapes, hence the plural.
SHAPE_QUESTION = QUESTIONS["shape"][0]  # "What shape is in the image?"
COLOR_QUESTION = QUESTIONS["colors"][0]  # "What color are the shapes?"
MAX_NEW_TOKENS = 16
CHAT = [sys.executable, "-m", "aria_jax.cli", "chat", "--model", DEMO_MODEL]


@pytest.fixture(scope="module")
def api_answers() -> tuple[str, str]:
    """The two answers of the Python API, greedy: the first question alone, then the second
    with the first turn (its answer as the assistant's) in the history."""
    import aria_jax

    processor = aria_jax.AriaProcessor.from_pretrained(DEMO_MODEL)
    model = aria_jax.AriaForConditionalGeneration.from_pretrained(DEMO_MODEL)
    stops = set(model.text_config.eos_token_id) | {processor.tokenizer.convert_tokens_to_ids("<|im_end|>")}

    def answer(messages: list[dict]) -> str:
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, images=[os.path.join(ROOT, DEMO_IMAGE)])
        tokens = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)[0, inputs["input_ids"].shape[1] :].tolist()
        return processor.decode(
            tokens[: next((k for k, t in enumerate(tokens) if t in stops), len(tokens))], skip_special_tokens=True
        )

    first_turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SHAPE_QUESTION}]}]
    first = answer(first_turn)
    second = answer(
        first_turn
        + [
            {"role": "assistant", "content": [{"type": "text", "text": first}]},
            {"role": "user", "content": [{"type": "text", "text": COLOR_QUESTION}]},
        ]
    )
    return first, second


def test_demo_model_answers_the_demo_image(api_answers):
    assert api_answers == ("triangle", "yellow")


# ------------------------------------------------------------------------------ piped session


@pytest.fixture(scope="module")
def piped_session() -> subprocess.CompletedProcess:
    lines = [
        "/image examples/no_such_image.png",  # an error; nothing else changes
        "/frobnicate",  # an unknown command; likewise
        "/help",
        f"/image {DEMO_IMAGE}",
        SHAPE_QUESTION,
        COLOR_QUESTION,  # answered with the first turn in the history
        "/reset",
        f"/image {DEMO_IMAGE}",
        SHAPE_QUESTION,  # a new conversation: the first answer again
        "/quit",
        "What shape is in the image?",  # after /quit: never read
    ]
    return subprocess.run(
        CHAT + ["--max-new-tokens", str(MAX_NEW_TOKENS)],
        input="\n".join(lines) + "\n",
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_piped_chat_prints_only_the_answers(piped_session, api_answers):
    assert piped_session.returncode == 0, piped_session.stderr
    first, second = api_answers
    assert piped_session.stdout == f"{first}\n{second}\n{first}\n"


def test_piped_chat_reports_errors_in_one_line_and_goes_on(piped_session):
    stderr = piped_session.stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("aria-jax: error: ")]
    assert len(errors) == 2, stderr
    assert "examples/no_such_image.png" in errors[0] and "no such file" in errors[0]
    assert "/frobnicate" in errors[1]
    assert "/reset" in stderr and "/quit" in stderr  # the /help list
    assert re.match(r"loading .*aria-jax-demo \.\.\. done in [0-9.]+s$", stderr.splitlines()[0])


# ------------------------------------------------------------------------------ on a terminal


def read_until(fd: int, transcript: bytearray, done, timeout: float = 240) -> None:
    """Reads the terminal's output into `transcript` until `done(transcript)` or the child exits."""
    deadline = time.monotonic() + timeout
    while not done(transcript) and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            transcript += chunk


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_chat_on_a_terminal_prompts_and_streams(api_answers):
    import pty

    controller, terminal = pty.openpty()
    process = subprocess.Popen(CHAT, stdin=terminal, stdout=terminal, stderr=terminal, cwd=ROOT, close_fds=True)
    os.close(terminal)
    transcript = bytearray()
    try:
        read_until(controller, transcript, lambda text: b"> " in text)
        for line in (f"/image {DEMO_IMAGE}", SHAPE_QUESTION, COLOR_QUESTION):
            prompts = transcript.count(b"> ")
            os.write(controller, line.encode() + b"\n")
            read_until(controller, transcript, lambda text: text.count(b"> ") > prompts)
        os.write(controller, b"\x04")  # Ctrl-D at an empty prompt: end of input
        read_until(controller, transcript, lambda text: False, timeout=30)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)

    lines = transcript.decode().replace("\r\n", "\n").split("\n")
    first, second = api_answers
    # The prompt, the echoed question, then the streamed answer on its own line.
    assert lines[lines.index(f"> {SHAPE_QUESTION}") + 1] == first
    assert lines[lines.index(f"> {COLOR_QUESTION}") + 1] == second
    assert "Traceback" not in transcript.decode()


# ------------------------------------------------------------------------------ --help


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    choices = next(action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return dict(choices)


def option_entries(help_text: str) -> dict[str, str]:
    """The "options:" section of a --help text: first option string -> its whole entry."""
    section = help_text.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", "\n" + section)
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries if entry.strip()}


def test_every_command_is_described_and_every_option_shows_its_default():
    commands = subcommands()
    assert {"generate", "chat", "convert", "export", "plan", "finetune"} <= set(commands)
    for name, command in commands.items():
        description = command.description or ""
        assert len(description) > 80 and "\n\n" not in description, name
        entries = option_entries(command.format_help())
        for action in command._actions:
            if not action.option_strings or action.required or action.default is argparse.SUPPRESS:
                continue  # positionals, required options and -h have no default to show
            entry = entries[action.option_strings[0]]
            assert "default" in entry, f"{name} {action.option_strings[0]}: {entry}"
            if action.nargs == 0:
                assert "(default: off)" in entry, f"{name} {action.option_strings[0]}: {entry}"
        for action in command._actions:
            if action.option_strings and action.required:
                assert "default" not in entries[action.option_strings[0]], name


# ------------------------------------------------------------------------------ one-line errors


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit:  # argparse's errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (("chat", "--model", "/no/such/model"), "/no/such/model: no such model directory"),
        (("chat", "--model", "examples"), "no config.json"),
        (("chat", "--model", DEMO_MODEL, "--temperature", "-1"), "temperature=-1.0"),
        (("chat", "--model", DEMO_MODEL, "--temperature", "0.7", "--top-p", "1.5"), "top_p=1.5"),
        (("chat", "--model", DEMO_MODEL, "--max-new-tokens", "many"), "--max-new-tokens"),
        (("chat", "--model", DEMO_MODEL, "--seed", "1.5"), "--seed"),
        (("chat", "--model", DEMO_MODEL, "--max-image-size", "100"), "max_image_size=100"),
        (("chat", "--model", DEMO_MODEL, "--dtype", "float8"), "--dtype"),
        (("chat",), "--model"),
        (("generate", "--model", DEMO_MODEL, "--prompt", "hi", "--image", "README.md"), "README.md"),
        (("generate", "--model", DEMO_MODEL, "--prompt", "hi", "--temperature", "nan"), "temperature=nan"),
        (("generate", "--model", DEMO_MODEL, "--prompt", "hi", "--max-new-tokens", "1000"), "max_new_tokens=1000"),
        (("generate", "--model", DEMO_MODEL, "--prompt", "hi", "--top-p", "x"), "--top-p"),
        (("no-such-command",), "no-such-command"),
    ],
)
def test_user_errors_are_one_line(capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(ROOT)
    code, out, err = run_main(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("aria-jax") and "error" in lines[0] and expected in lines[0], err


def test_help_and_the_converter_alone_load_no_jax():
    """`aria-jax --help` stays quick, and `plan` can choose JAX's devices before JAX starts:
    importing the package and its command line loads no JAX. `python -m convert` is the
    converter's two commands alone."""
    check = "import sys, aria_jax, aria_jax.cli; print(sorted({'jax', 'flax'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
    converter = subprocess.run(
        [sys.executable, "-m", "convert", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert converter.returncode == 0, converter.stderr
    assert "{convert,export}" in converter.stdout and "generate" not in converter.stdout
