"""The `aria-jax chat` session: a conversation with a model, one line of input at a time.

A line is a user message, or a command:

    /image PATH   attach an image to the next message (repeat for several)
    /reset        start a new conversation
    /help         list the commands
    /quit         leave (as does end of input, Ctrl-D)

Every turn renders the whole conversation with the chat template, images included, so the
model sees earlier questions, its own answers and earlier images. The answer streams to
stdout and stops at `<|im_end|>`; stdout holds nothing but answers, each ended by a newline,
so a script can pipe questions in and read answers out. Errors are one line on stderr and
the session goes on. On a terminal a `> ` prompt is shown and readline edits the line.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import TextIO

from aria_jax.host_loop import SEED_LIMIT, shorten
from aria_jax.tokenizer import TokenizerError, check_text

ERROR_PREFIX = "aria-jax: error: "

HELP = """\
/image PATH   attach an image to the next message (repeat for several)
/reset        forget the conversation and any attached images
/help         this list
/quit         leave (as does Ctrl-D)
Any other line is a message to the model."""


@dataclasses.dataclass
class Settings:
    """How each answer is generated; the command line's options."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    image_options: dict = dataclasses.field(default_factory=dict)  # Aria's max_image_size and split_image, if set
    kv_cache_dtype: str | None = None


def user_message(text: str, num_images: int) -> dict:
    """The images first, then the text, as Aria's and Qwen2-VL's own examples (and `chat_prompt`) do."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@dataclasses.dataclass
class Conversation:
    """The turns so far, the images they hold (in order), and images waiting for the next message."""

    messages: list[dict] = dataclasses.field(default_factory=list)
    images: list = dataclasses.field(default_factory=list)
    attached: list = dataclasses.field(default_factory=list)

    @property
    def turns(self) -> int:
        return len(self.messages) // 2

    def with_question(self, text: str) -> tuple[list[dict], list]:
        """The messages and images of a prompt asking `text` next, without changing anything."""
        return self.messages + [user_message(text, len(self.attached))], self.images + self.attached

    def add_turn(self, question: str, answer: str) -> None:
        self.messages += [user_message(question, len(self.attached)), assistant_message(answer)]
        self.images += self.attached
        self.attached = []

    def reset(self) -> None:
        self.messages, self.images, self.attached = [], [], []


class ChatSession:
    """Turns input lines into commands and answers. `model` and `processor` are loaded already;
    `multimodal` says whether the model takes images."""

    def __init__(
        self,
        model,
        processor,
        multimodal: bool,
        settings: Settings,
        out: TextIO | None = None,
        err: TextIO | None = None,
        interactive: bool = False,
    ):
        self.model, self.processor, self.multimodal = model, processor, multimodal
        self.settings = settings
        # The streams of the moment, not of import time (a caller may have replaced them since).
        self.out, self.err, self.interactive = out or sys.stdout, err or sys.stderr, interactive
        self.conversation = Conversation()

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Reads lines until /quit or end of input."""
        if self.interactive:
            self.note("/help lists the commands; /quit or Ctrl-D leaves.")
        if hasattr(sys.stdin, "reconfigure"):
            # A strict decoder fails the whole read buffer on one bad byte, losing the good lines
            # around it; escaped bytes reach `handle` as one line to refuse.
            sys.stdin.reconfigure(errors="surrogateescape")
        while True:
            try:
                line = input("> " if self.interactive else "")
            except EOFError:
                if self.interactive:
                    self.out.write("\n")  # leave the terminal's cursor on a fresh line
                return
            except KeyboardInterrupt:  # as in a shell: Ctrl-C drops the line being typed
                self.out.write("\n")
                continue
            if not self.handle(line):
                return

    def handle(self, line: str) -> bool:
        """Acts on one line; False once the session should end. A failed command or turn
        reports one line on stderr and changes nothing."""
        line = line.strip()
        if not line:
            return True
        try:
            if line.startswith("/"):
                return self.command(line)
            self.answer(line)
        except (ValueError, OSError) as err:  # ImageError and the model's request checks included
            self.error(str(err))
        except KeyboardInterrupt:
            # Ctrl-C stops a long answer without ending the session; the turn is not kept.
            self.error("interrupted; the question and its partial answer are not kept")
        return True

    def command(self, line: str) -> bool:
        name, _, argument = line.partition(" ")
        if name == "/quit":
            return False
        if name == "/help":
            self.note(HELP, always=True)
        elif name == "/reset":
            self.conversation.reset()
            self.note("new conversation")
        elif name == "/image":
            self.attach(argument)
        else:
            self.error(f"unknown command {name}; /help lists the commands")
        return True

    # ------------------------------------------------------------------ commands and turns

    def attach(self, argument: str) -> None:
        from aria_jax.image_processing import load_image_file

        path = os.path.expanduser(unquote(argument.strip()))
        if not path:
            raise ValueError("/image needs a file: /image PATH")
        if not self.multimodal:
            raise ValueError("this is a text-only model; it takes no images")
        # Read now, so a bad file is reported at once and the conversation keeps the pixels
        # even if the file changes later.
        self.conversation.attached.append(load_image_file(path))
        count = len(self.conversation.attached)
        self.note(f"{path} attached ({count} image{'s' if count > 1 else ''} for the next message)")

    def answer(self, question: str) -> str:
        """Streams the model's answer to `question` (the conversation so far as context), then
        keeps both in the conversation. Returns the answer."""
        try:
            check_text(question, "the message")
        except TokenizerError:
            raw = question.encode("utf-8", "surrogateescape")
            raise ValueError(f"the message is not valid UTF-8 ({shorten(raw)}); it is ignored") from None
        inputs = self.model_inputs(question)
        settings = self.settings
        pieces = []
        try:
            for piece in self.model.stream(
                **inputs,
                max_new_tokens=self.answer_budget(inputs["input_ids"].shape[1]),
                do_sample=settings.temperature > 0,
                temperature=settings.temperature,
                top_p=settings.top_p,
                # A different seed per turn, so sampled turns differ but a session can be replayed;
                # wrapping keeps a seed near 2**64 - 1 usable past the first turn.
                seed=(settings.seed + self.conversation.turns) % SEED_LIMIT,
                kv_cache_dtype=settings.kv_cache_dtype,
            ):
                self.out.write(piece)
                self.out.flush()
                pieces.append(piece)
        except BaseException:
            if pieces:
                self.out.write("\n")  # end the partial answer's line before the error
                self.out.flush()
            raise
        self.out.write("\n")
        self.out.flush()
        answer = "".join(pieces)
        self.conversation.add_turn(question, answer)
        return answer

    def model_inputs(self, question: str) -> dict:
        messages, images = self.conversation.with_question(question)
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(text=prompt, images=images or None, **self.settings.image_options)
        if not self.multimodal:
            inputs = {key: inputs[key] for key in ("input_ids", "attention_mask")}
        return inputs

    def answer_budget(self, prompt_length: int) -> int:
        """--max-new-tokens, or fewer when the model's context has less room left: the
        conversation grows every turn, and a shorter last answer beats none."""
        room = self.model.text_config.max_position_embeddings - prompt_length
        if room < 1:
            raise ValueError(
                f"the conversation fills the model's context of "
                f"{self.model.text_config.max_position_embeddings} tokens; /reset starts a new one"
            )
        return min(self.settings.max_new_tokens, room)

    # ------------------------------------------------------------------ messages

    def note(self, text: str, always: bool = False) -> None:
        """Feedback for a person at the terminal, on stderr so stdout holds only answers."""
        if self.interactive or always:
            print(text, file=self.err, flush=True)

    def error(self, message: str) -> None:
        print(ERROR_PREFIX + " ".join(message.split()), file=self.err, flush=True)


def unquote(text: str) -> str:
    """A path pasted or dropped into a terminal often comes quoted."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def enable_line_editing() -> None:
    """Arrow keys and history for `input` at a terminal; readline is missing on some platforms."""
    try:
        import readline  # noqa: F401  (importing it is what turns it on)
    except ImportError:
        pass
