"""Aria's tokenizer without transformers: the same ids and text as transformers 5, on `tokenizers`.

transformers 5 loads every Aria checkpoint with its generic `TokenizersBackend` (whatever
`tokenizer_class` the checkpoint names): a `tokenizers.Tokenizer` plus Python bookkeeping of the
special tokens. This module builds the same `tokenizers.Tokenizer` and repeats that bookkeeping.

- With a `tokenizer.json`, the pipeline is that file. Hub Aria's was written by transformers 4's
  LlamaConverter with legacy=true: a "▁" is prepended to every stretch of text between added tokens.
- With only `tokenizer.model`, it is what `SpmConverter.build_tokenizer_from_spm_proto` builds: BPE
  over the sentencepiece vocabulary with merges generated from it, normalizer = the precompiled
  charsmap + Replace(" ", "▁") (no dummy prefix, so not what `sentencepiece.encode` gives), decoder
  Replace("▁", " ") + ByteFallback + Fuse; control and user-defined pieces become added tokens.
- Then the config's added tokens and the named / extra special tokens are re-added through
  `Tokenizer.add_tokens` in transformers' order, which settles their ids and flags.

The checkpoint's `legacy` and `add_prefix_space` are not read (transformers 5 does not either);
`add_bos_token` / `add_eos_token` only count without a tokenizer.json.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np
from aria_jax.config import read_json_object
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

# Aria's chat template (the one in rhymes-ai/Aria's chat_template.json and in transformers'
# `src/transformers/models/aria/convert_aria_weights_to_hf.py`), used when a checkpoint ships none.
# No BOS, no system-prompt handling; an image item renders as "<fim_prefix><|img|><fim_suffix>".
# One user turn with an image then "describe the image", plus the generation prompt, renders as
# "<|im_start|>user\n<fim_prefix><|img|><fim_suffix>describe the image<|im_end|>\n<|im_start|>assistant\n".
DEFAULT_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is iterable %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<fim_prefix><|img|><fim_suffix>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES, in its order.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
SPM_BPE, SPM_CONTROL, SPM_USER_DEFINED = 2, 3, 4  # sentencepiece's model type BPE and piece types


class TokenizerError(ValueError):
    """A tokenizer checkpoint this module cannot load, or an argument it cannot take; the message
    names the file or the argument, and the problem."""


class ChatTemplateError(TokenizerError):
    """A chat template that does not compile (the message names its file and line) or that fails
    on the messages given (an undefined variable, the template's own raise_exception, ...)."""


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def check_text(text: Any, name: str = "text") -> str:
    """`text`, if it is a str that is valid Unicode. A lone surrogate, which is what Python makes
    of bytes that are not UTF-8 (command-line arguments, files read with surrogateescape), has no
    UTF-8 form, so the tokenizers library cannot take it: a TokenizerError names its position."""
    if not isinstance(text, str):
        raise TokenizerError(f"{name} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise TokenizerError(
            f"{name} is not valid Unicode: lone surrogate U+{ord(text[err.start]):04X} at position {err.start} "
            f"(bytes that are not UTF-8, decoded with surrogateescape?)"
        ) from None
    return text


def _added_token(value: Any, special: bool | None = None) -> Any:
    """A serialized AddedToken (a dict) as an AddedToken, `special` overriding its flag; str as is."""
    if not isinstance(value, dict):
        return value
    flags = {k: v for k, v in value.items() if k in ("content", "single_word", "lstrip", "rstrip", "normalized")}
    return AddedToken(**flags, special=bool(value.get("special", False)) if special is None else special)


def generate_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """transformers' `generate_merges(vocab)`: every split of every piece into two pieces, ranked
    by the merged piece's id, then by the left and right lengths."""
    merges = []
    for piece, piece_id in vocab.items():
        splits = [
            (piece[:i], piece[i:], piece_id) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab
        ]
        merges += sorted(splits, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(left, right) for left, right, _ in merges]


def _tokenizer_from_json(path: str, byte_level: bool = False) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise TokenizerError(f"{path}: not a tokenizers file ({err})") from err
    if byte_level:  # a byte-level (GPT-2 style) model, e.g. Qwen2's: its tokenizer.json as it is
        return tokenizer
    # Aria's tokenizer is sentencepiece-style; a byte-level (GPT-2 style) one is another model's.
    for part in (tokenizer.pre_tokenizer, tokenizer.decoder):
        if part is not None and b'"ByteLevel"' in part.__getstate__():
            raise TokenizerError(f"{path}: a ByteLevel pipeline is not an Aria (sentencepiece-style) tokenizer")
    return tokenizer


def _tokenizer_from_sentencepiece(path: str, kwargs: dict, added: dict[int, Any]) -> Tokenizer:
    """transformers' `_convert_from_sentencepiece` for TokenizersBackend; updates `kwargs` as it does."""
    try:
        from google.protobuf.message import DecodeError
        from sentencepiece.sentencepiece_model_pb2 import ModelProto
    except Exception as err:  # ImportError, or protobuf's VersionError (pb2 made by a newer protoc)
        raise TokenizerError(f"{path}: sentencepiece's model proto does not load with this protobuf ({err})") from err
    proto = ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except (OSError, DecodeError) as err:
        raise TokenizerError(f"{path}: not a sentencepiece model ({err})") from err
    spec, charsmap = proto.trainer_spec, proto.normalizer_spec.precompiled_charsmap
    if not proto.pieces or spec.model_type != SPM_BPE:
        raise TokenizerError(f"{path}: only sentencepiece BPE models are supported (model_type={spec.model_type})")
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    merges = generate_merges(vocab)
    # Placeholder pieces renamed by tokenizer_config's added_tokens_decoder (after the merges).
    id_to_piece = {index: piece for piece, index in vocab.items()}
    for index, token in added.items():
        current, new = id_to_piece.get(index), str(token)
        if current and current != new and new not in vocab:
            vocab[new] = vocab.pop(current)
            id_to_piece[index] = new
    try:
        model = BPE(vocab, merges, unk_token=spec.unk_piece, fuse_unk=True, byte_fallback=spec.byte_fallback)
    except Exception as err:
        raise TokenizerError(f"{path}: cannot build the BPE model ({err})") from err
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        ([normalizers.Precompiled(charsmap)] if charsmap else []) + [normalizers.Replace(" ", "\u2581")]
    )
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " ")] + ([decoders.ByteFallback(), decoders.Fuse()] if spec.byte_fallback else [])
    )
    # The proto's bos / eos / unk, unless the config names them (even as null).
    for key, index, piece, default in (
        ("bos_token", spec.bos_id, spec.bos_piece, "<s>"),
        ("eos_token", spec.eos_id, spec.eos_piece, "</s>"),
        ("unk_token", spec.unk_id, spec.unk_piece, "<unk>"),
    ):
        if index >= 0:
            kwargs.setdefault(key, piece or default)
    # Control (special) and user-defined (not special) pieces are the extra special tokens,
    # unless the config has an extra_special_tokens entry.
    kwargs["additional_special_tokens"] = [
        AddedToken(p.piece, normalized=False, special=p.type == SPM_CONTROL)
        for p in proto.pieces
        if p.type in (SPM_CONTROL, SPM_USER_DEFINED)
    ]
    return tokenizer


def _config_added_tokens(kwargs: dict, file, json_path: str | None) -> dict[int, Any]:
    """transformers' `_from_pretrained` bookkeeping: move model-specific special tokens (image_token,
    ...) to `kwargs["model_specific_special_tokens"]`, and return the added tokens to re-add:
    tokenizer_config's added_tokens_decoder or, for older checkpoints, special_tokens_map.json,
    added_tokens.json and tokenizer.json's added tokens."""
    if "additional_special_tokens" in kwargs and not kwargs.get("extra_special_tokens"):
        kwargs["extra_special_tokens"] = kwargs.pop("additional_special_tokens")
    model_specific = {
        key: kwargs.pop(key)
        for key in list(kwargs)
        if key.endswith("_token") and key not in NAMED_SPECIAL_TOKENS and isinstance(kwargs[key], str)
    }
    if isinstance(kwargs.get("extra_special_tokens"), dict):
        model_specific.update(kwargs.pop("extra_special_tokens"))
    if model_specific:
        kwargs["model_specific_special_tokens"] = model_specific
    if "added_tokens_decoder" in kwargs:
        added = {int(index): _added_token(token) for index, token in kwargs["added_tokens_decoder"].items()}
    else:
        added, special_tokens_map = {}, file("special_tokens_map.json")
        for key, value in (read_json_object(special_tokens_map, TokenizerError) if special_tokens_map else {}).items():
            if key == "extra_special_tokens" and isinstance(value, list):
                merged = list(kwargs.get("extra_special_tokens") or [])
                for token in value:
                    if (token := _added_token(token, special=True)) not in merged:
                        merged.append(token)
                value = merged
            elif key != "extra_special_tokens":
                value = _added_token(value, special=True)
            kwargs[key] = value
        if isinstance(kwargs.get("extra_special_tokens"), dict):
            kwargs.setdefault("model_specific_special_tokens", {}).update(kwargs.pop("extra_special_tokens"))
        if file("added_tokens.json"):
            specials = {str(kwargs[k]) for k in NAMED_SPECIAL_TOKENS if kwargs.get(k)}
            specials |= {str(t) for t in kwargs.get("extra_special_tokens") or []}
            for content, index in read_json_object(file("added_tokens.json"), TokenizerError).items():
                added[int(index)] = AddedToken(content, normalized=content not in specials, special=content in specials)
        for token in read_json_object(json_path, TokenizerError).get("added_tokens", []) if json_path else []:
            added[int(token["id"])] = _added_token(token)
    # A named special token takes the flags of the added token with its content.
    by_content = {str(token): token for token in added.values()}
    for key in NAMED_SPECIAL_TOKENS:
        if kwargs.get(key) is not None:
            kwargs[key] = by_content.get(str(kwargs[key]), kwargs[key])
    return added


def _add_special_tokens(tokenizer: Tokenizer, kwargs: dict, added: dict[int, Any]) -> tuple[dict, set[str]]:
    """transformers' PreTrainedTokenizerBase / TokenizersBackend `__init__`: name the special tokens,
    re-add the config's added tokens and any named / extra special token not there yet, set the
    BOS / EOS post-processor. Returns the named special tokens (bos_token ... then model-specific
    ones such as image_token) and the contents `skip_special_tokens` drops."""
    if "additional_special_tokens" in kwargs and "extra_special_tokens" not in kwargs:
        kwargs["extra_special_tokens"] = kwargs.pop("additional_special_tokens")
    named: dict[str, Any] = {key: kwargs.get(key) for key in NAMED_SPECIAL_TOKENS}
    extra = kwargs.get("extra_special_tokens") or []
    if isinstance(extra, dict):
        named.update(extra)
        extra = []
    named.update(
        {
            key: value
            for key, value in kwargs.items()
            if key.endswith("_token") and key not in NAMED_SPECIAL_TOKENS and isinstance(value, (str, AddedToken))
        }
    )
    named.update(kwargs.get("model_specific_special_tokens") or {})
    # transformers means to skip the added tokens the backend has, but compares them by id, so it
    # re-adds them all; the contents it checks special tokens against are not updated as it goes.
    to_add = [token for _, token in sorted(added.items())]
    present = [t.content for t in tokenizer.get_added_tokens_decoder().values()] + [str(t) for t in to_add]
    for token in [*named.values(), *extra]:
        if token is not None and str(token) not in present and token not in to_add:
            to_add.append(token)
    named_contents = {str(token) for token in named.values() if token}
    to_add = [AddedToken(t, special=True) if isinstance(t, str) else t for t in to_add]
    for token in to_add:
        token.special = token.special or token.content in named_contents
    # tokenizers keeps a content special once it was added as special, whatever its flags later.
    special = {t.content for t in [*tokenizer.get_added_tokens_decoder().values(), *to_add] if t.special}
    tokenizer.add_tokens(to_add)
    tokenizer.encode_special_tokens = bool(kwargs.get("split_special_tokens", False))

    named = {key: str(value) for key, value in named.items() if value is not None}
    bos = kwargs.get("add_bos_token") and named.get("bos_token")
    eos = kwargs.get("add_eos_token") and named.get("eos_token")
    if (bos or eos) and (tokenizer.post_processor is None or "add_bos_token" in kwargs or "add_eos_token" in kwargs):
        single = " ".join(t for t in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if t)
        pair = " ".join(t for t in (single, bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if t)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, tokenizer.token_to_id(t)) for t in (bos, eos) if t]
        )
    return named, special


def _read_chat_template(kwargs: dict, file) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json (as in transformers); a legacy
    chat_template.json is a processor-level file, used last. A template that does not compile
    is a ChatTemplateError naming its file and line."""
    template, source = kwargs.get("chat_template"), f"{file('tokenizer_config.json')}: chat_template"
    if file("chat_template.jinja"):
        source = file("chat_template.jinja")
        try:
            with open(source, encoding="utf-8") as f:
                template = f.read()
        except (OSError, ValueError) as err:
            raise ChatTemplateError(f"{source}: unreadable ({_one_line(err)})") from None
    elif template is None and file("chat_template.json"):
        source = f"{file('chat_template.json')}: chat_template"
        template = read_json_object(file("chat_template.json"), TokenizerError).get("chat_template")
    if isinstance(template, list):
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and "template" in t for t in template):
            raise ChatTemplateError(f"{source}: a list of templates holds objects with 'name' and 'template'")
        template = {t["name"]: t["template"] for t in template}
    if isinstance(template, dict):
        template = template.get("default", next(iter(template.values()), None))
    if template is not None:
        compile_chat_template(template, source)
    return template


class AriaTokenizer:
    """Aria's tokenizer with transformers 5's behaviour (see the module docstring); load it with
    `from_pretrained(dir)`. `backend_tokenizer` is the `tokenizers.Tokenizer` doing the work."""

    padding_side = "right"

    def __init__(
        self,
        backend_tokenizer: Tokenizer,
        named_special_tokens: dict[str, str],
        special_contents: set[str],
        chat_template: str | None = None,
        padding_side: str | None = None,
        name_or_path: str = "",
    ):
        if padding_side not in (None, "left", "right"):
            raise TokenizerError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.backend_tokenizer = backend_tokenizer
        self.named_special_tokens = dict(named_special_tokens)
        self._special = set(special_contents)
        self.chat_template = chat_template if chat_template is not None else DEFAULT_CHAT_TEMPLATE
        self.padding_side = padding_side or self.padding_side
        self.name_or_path = name_or_path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, byte_level: bool = False) -> "AriaTokenizer":
        """Load a checkpoint's tokenizer. A tokenizer.json with a ByteLevel pre-tokenizer or
        decoder (GPT-2 / Qwen2 style) is refused as not Aria's unless `byte_level=True`, which
        other model families (Qwen2-VL) pass; everything else is the same for them."""
        directory = os.fspath(path)
        if not os.path.isdir(directory):
            raise TokenizerError(f"{directory}: not a directory")

        def file(name: str) -> str | None:
            full = os.path.join(directory, name)
            return full if os.path.isfile(full) else None

        json_path, spm_path = file("tokenizer.json"), file("tokenizer.model")
        if json_path is None and spm_path is None:
            raise TokenizerError(f"{directory}: no tokenizer.json or tokenizer.model")
        kwargs = (
            read_json_object(file("tokenizer_config.json"), TokenizerError) if file("tokenizer_config.json") else {}
        )
        if not isinstance(kwargs, dict):
            raise TokenizerError(f"{file('tokenizer_config.json')}: expected a JSON object")
        kwargs.pop("tokenizer_class", None)
        if json_path is not None:
            kwargs.pop("add_bos_token", None)
            kwargs.pop("add_eos_token", None)
        for key, value in kwargs.items():  # serialized AddedTokens ({"__type": "AddedToken", ...})
            if key.endswith("_token") and isinstance(value, dict):
                kwargs[key] = _added_token(value)
        chat_template = _read_chat_template(kwargs, file)
        added = _config_added_tokens(kwargs, file, json_path)
        if json_path is not None:
            tokenizer = _tokenizer_from_json(json_path, byte_level)
        else:
            tokenizer = _tokenizer_from_sentencepiece(spm_path, kwargs, added)
        named, special = _add_special_tokens(tokenizer, kwargs, added)
        return cls(tokenizer, named, special, chat_template, kwargs.get("padding_side"), directory)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds the post-processor's (for Aria, none: no BOS).
        Text that is not valid Unicode is a TokenizerError (see `check_text`)."""
        return self.backend_tokenizer.encode(check_text(text), add_special_tokens=add_special_tokens).ids

    def __call__(
        self,
        texts: str | Sequence[str],
        padding: bool | str = False,
        max_length: int | None = None,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
    ) -> dict[str, Any]:
        """Tokenize one text or a batch. `padding`: False / "do_not_pad", True / "longest", or
        "max_length" (with `max_length`). `return_tensors="np"` gives int32 numpy arrays (and
        requires equal lengths, i.e. padding for ragged batches)."""
        single = isinstance(texts, str)
        if not single and not isinstance(texts, (list, tuple)):
            raise TokenizerError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        batch = [texts] if single else [check_text(t, f"texts[{i}]") for i, t in enumerate(texts)]
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in batch]
        masks = [[1] * len(row) for row in ids]
        if padding is True or padding in ("longest", "max_length"):
            if padding == "max_length" and (
                isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 0
            ):
                raise TokenizerError(f"padding='max_length' needs max_length, a non-negative int; got {max_length!r}")
            target = max_length if padding == "max_length" else max((len(row) for row in ids), default=0)
            ids, masks = pad_batch(ids, self.pad_token_id_or_raise(), target, padding_side or self.padding_side)
        elif padding not in (False, None, "do_not_pad"):
            raise TokenizerError(f"padding={padding!r}: use False, True, 'longest' or 'max_length'")
        if return_tensors not in (None, "np"):
            raise TokenizerError(f"return_tensors={return_tensors!r}: only None or 'np'")
        if return_tensors == "np":
            if len({len(row) for row in ids}) > 1:
                raise TokenizerError("texts of different lengths need padding=True for return_tensors='np'")
            rows = len(ids)
            ids, masks = np.asarray(ids, np.int32).reshape(rows, -1), np.asarray(masks, np.int32).reshape(rows, -1)
        if single:
            ids, masks = ids[0], masks[0]
        return {"input_ids": ids, "attention_mask": masks}

    def decode(self, ids: Sequence[int] | np.ndarray | int, skip_special_tokens: bool = False) -> str:
        """Text of `ids`, as tokenizers decodes it: unknown ids dropped, and special added tokens
        with `skip_special_tokens`. Negative ids (e.g. -100 label padding) are dropped too."""
        try:
            flat = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
        except (TypeError, ValueError, OverflowError):
            raise TokenizerError(f"ids must be integer token ids, got {_one_line(repr(ids))[:80]}") from None
        # tokenizers takes u32 ids; any id past the vocabulary is unknown and dropped all the same.
        return self.backend_tokenizer.decode(
            [i for i in flat if 0 <= i < 2**32], skip_special_tokens=skip_special_tokens
        )

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        if hasattr(sequences, "__array__"):
            sequences = np.asarray(sequences)
            sequences = (sequences[None] if sequences.ndim == 1 else sequences).tolist()
        return [self.decode(list(row), skip_special_tokens=skip_special_tokens) for row in sequences]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False):
        """Token strings (an added token as tokenizers shows it, normalized); unknown ids dropped."""
        if isinstance(ids, (int, np.integer)):
            return self.backend_tokenizer.id_to_token(int(ids)) if ids >= 0 else None
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        tokens = (self.convert_ids_to_tokens(int(i)) for i in ids if int(i) not in skip)
        return [token for token in tokens if token is not None]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]):
        if isinstance(tokens, str):
            found = self.backend_tokenizer.token_to_id(tokens)
            return found if found is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    @property
    def vocab_size(self) -> int:  # the base vocabulary, without added tokens beyond it
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(sorted(self.backend_tokenizer.get_added_tokens_decoder().items()))

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return {token.content: index for index, token in self.added_tokens_decoder.items()}

    def __getattr__(self, name: str):
        # bos_token, image_token, ... and their *_id: the checkpoint's named special tokens.
        token, named = name.removesuffix("_id"), self.__dict__.get("named_special_tokens", {})
        if token.endswith("_token") and (token in NAMED_SPECIAL_TOKENS or token in named):
            content = named.get(token)
            return self.backend_tokenizer.token_to_id(content) if name != token and content is not None else content
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self.named_special_tokens)

    @property
    def all_special_ids(self) -> list[int]:  # the ids skip_special_tokens drops
        return [index for index, token in self.added_tokens_decoder.items() if token.content in self._special]

    @property
    def all_special_tokens(self) -> list[str]:
        return [token.content for token in self.added_tokens_decoder.values() if token.content in self._special]

    def is_special(self, token: str) -> bool:
        return token in self._special

    def pad_token_id_or_raise(self) -> int:
        pad = self.pad_token_id if self.pad_token_id is not None else self.unk_token_id
        if pad is None:
            raise TokenizerError("this tokenizer has no pad token (nor unk token) to pad with")
        return pad

    def apply_chat_template(
        self,
        messages: list[dict] | list[list[dict]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        **kwargs,
    ):
        """Render messages with the checkpoint's chat template as transformers does; `tokenize=True`
        returns token ids (no BOS)."""
        return render_chat_template(
            chat_template or self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tokenize=(lambda text: self.encode(text, add_special_tokens=False)) if tokenize else None,
            template_kwargs={**self.special_tokens_map, **kwargs},
        )

    def __repr__(self) -> str:
        return (
            f"AriaTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"added_tokens={len(self.added_tokens_decoder)}, special_tokens={self.special_tokens_map})"
        )


def pad_batch(ids: list[list[int]], pad_id: int, length: int, side: str) -> tuple[list[list[int]], list[list[int]]]:
    """Pad rows to `length` with `pad_id` on `side` ("left" or "right"); longer rows are kept as they are."""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    out_ids, out_mask = [], []
    for row in ids:
        pad = max(length - len(row), 0)
        left, right = (pad, 0) if side == "left" else (0, pad)
        out_ids.append([pad_id] * left + list(row) + [pad_id] * right)
        out_mask.append([0] * left + [1] * len(row) + [0] * right)
    return out_ids, out_mask


# Chat templates: transformers' renderer (utils/chat_template_utils.py) and its jinja2 sandbox.


@functools.lru_cache(maxsize=32)
def _compile_template(template: str):
    from datetime import datetime

    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # no HTML escaping
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:  # `dict` for templates, without the type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # no underscore names (CPython internals)
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
                )

    class GenerationTag(jinja2.ext.Extension):  # `{% generation %}` renders its body (no assistant masks)
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=TemplateDict(),
        namespace=TemplateNamespace,
    )
    return env.from_string(template)


def compile_chat_template(template: Any, source: str = "chat template"):
    """The compiled template, or a ChatTemplateError naming `source` (a file, or where in a
    file the template sits) and the line of the syntax error."""
    import jinja2

    if not isinstance(template, str):
        raise ChatTemplateError(f"{source}: a chat template must be a string, got {type(template).__name__}")
    try:
        return _compile_template(template)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"{source}: line {err.lineno}: {_one_line(err.message)}") from None
    except Exception as err:  # e.g. RecursionError on deep nesting
        raise ChatTemplateError(f"{source}: does not compile ({type(err).__name__}: {_one_line(err)})") from None


def _plain(value: Any) -> Any:
    """transformers' `_plain_template_data`: only JSON-like data reaches the template."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy scalars) back to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, np.generic):
        return _plain(value.item())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render_chat_template(
    template: str, messages, add_generation_prompt: bool = False, tokenize=None, template_kwargs: dict | None = None
):
    """transformers' `apply_chat_template(..., tokenize=False)` rendering; one conversation (a list
    of message dicts) gives a str, a list of conversations a list of str."""
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(
            f"messages must be a list of message dicts, or a list of such lists; got {type(messages).__name__}"
        )
    if not messages:
        raise ChatTemplateError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    batched = isinstance(messages[0], (list, tuple))
    compiled = compile_chat_template(template)
    kwargs = _plain(dict(template_kwargs or {}))
    rendered = []
    for chat in messages if batched else [messages]:
        for i, message in enumerate(chat):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise ChatTemplateError(
                    f"message {i} must be a dict with a 'role' string, got {_one_line(repr(message))[:80]}"
                )
        chat = _plain([{k: v for k, v in message.items() if v is not None} for message in chat])
        for i, message in enumerate(chat):  # reasoning under its older names too, as transformers does
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                chat[i] = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        try:
            text = compiled.render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except Exception as err:  # the template's raise_exception, undefined names, its own bugs
            raise ChatTemplateError(f"chat template: {_one_line(err) or type(err).__name__}") from err
        rendered.append(tokenize(text) if tokenize is not None else text)
    return rendered if batched else rendered[0]
