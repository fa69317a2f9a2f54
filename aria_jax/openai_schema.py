"""OpenAI's request bodies for chat and plain completions, and how they become engine requests.

Validation is pydantic's (a wrong type or out-of-range value is a 400 naming the field); what
pydantic cannot say (an image that is not an image, a URL we will not fetch, a file outside the
allowed media directory) raises `InvalidRequest` with the offending parameter.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import secrets
from typing import Literal, Union

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4  # as OpenAI's API


class InvalidRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logprobs=False ...)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str
    detail: str | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[Union[TextPart, ImagePart]], None] = None


class Sampling(_Body):
    """The settings both endpoints share. top_k is an extension (0: off), as in vLLM."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1, le=1)

    def settings(self, room: int) -> dict:
        """`Engine.submit`'s settings; `room`: the most tokens the answer may take."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS}", "stop")
        if any(not stop for stop in stops):
            raise InvalidRequest("stop strings must not be empty", "stop")
        max_tokens = self.max_completion_tokens or self.max_tokens
        if max_tokens is None:
            max_tokens = max(room, 1)  # past the room, the engine's error names the sizes
        return dict(
            max_new_tokens=max_tokens,
            do_sample=self.temperature > 0,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            stop_strings=stops,
            seed=secrets.randbits(63) if self.seed is None else self.seed,
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise InvalidRequest(f"prompt holds {len(self.prompt)} prompts; send one per request", "prompt")
        return self.prompt[0]


def aria_messages(messages: list[Message], allowed_media_dir: str | None) -> tuple[list[dict], list[Image.Image]]:
    """OpenAI messages -> Aria's (content items "text" and "image") and the images in order."""
    converted, images = [], []
    for index, message in enumerate(messages):
        content = message.content
        if content is None or isinstance(content, str):
            items = [{"type": "text", "text": content or ""}]
        else:
            items = []
            for part_index, part in enumerate(content):
                if isinstance(part, TextPart):
                    items.append({"type": "text", "text": part.text})
                else:
                    param = f"messages[{index}].content[{part_index}].image_url"
                    images.append(load_image(part.image_url.url, allowed_media_dir, param))
                    items.append({"type": "image"})
        converted.append({"role": "system" if message.role == "developer" else message.role, "content": items})
    return converted, images


def load_image(url: str, allowed_media_dir: str | None, param: str) -> Image.Image:
    """A `data:` URL's image, or a local file's under `allowed_media_dir`. Nothing is fetched."""
    if url.startswith(("http://", "https://")):
        raise InvalidRequest(
            f"{param}: this server does not fetch URLs ({url[:60]}); send the image inline "
            f"as a data: URL (data:image/png;base64,...)",
            param,
        )
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise InvalidRequest(f"{param}: a data: URL must be base64 (data:image/...;base64,...)", param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{param}: the data: URL's payload is not valid base64", param) from None
        return open_image(io.BytesIO(data), param)
    path = url[len("file://") :] if url.startswith("file://") else url
    if allowed_media_dir is None:
        raise InvalidRequest(
            f"{param}: local files are refused; start the server with --allowed-media-dir to "
            f"allow files under a directory, or send a data: URL",
            param,
        )
    root = os.path.realpath(allowed_media_dir)
    resolved = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, resolved]) != root:
        raise InvalidRequest(f"{param}: {path} is outside the allowed media directory", param)
    if not os.path.isfile(resolved):
        raise InvalidRequest(f"{param}: no such file under the allowed media directory: {path}", param)
    with open(resolved, "rb") as file:
        return open_image(io.BytesIO(file.read()), param)


def open_image(data: io.BytesIO, param: str) -> Image.Image:
    try:
        image = Image.open(data)
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise InvalidRequest(f"{param}: not an image that can be read ({error})", param) from None
    return image
