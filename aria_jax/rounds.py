"""An engine round, and how process 0 of a multi-host mesh hands it to the others.

Every process must run the same jitted calls in the same order with the same inputs: process 0
decides a round (`Engine._plan`), sends it as bytes (an .npz archive, read back without pickle)
with two `broadcast_one_to_all` collectives (its size, then its bytes), and every process runs it.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
from jax.experimental import multihost_utils

from aria_jax.device_loop import Sampling
from aria_jax.host_loop import Request
from aria_jax.pretrained import Prompt


@dataclasses.dataclass(frozen=True)
class Admission:
    slot: int
    prompt: Prompt


@dataclasses.dataclass(frozen=True)
class Round:
    admissions: list[Admission]
    release: np.ndarray  # (slots,) bool: slots to mark done before decoding
    decode: bool
    stop: bool = False  # the leader has stopped: followers return

    @classmethod
    def stopping(cls, num_slots: int) -> "Round":
        return cls([], np.zeros((num_slots,), bool), decode=False, stop=True)


# What followers need of each admission: the device inputs, never the host-side stop strings.
_PROMPT_ARRAYS = ("padded_ids", "padded_mask", "position_ids")
_SAMPLING_ARRAYS = ("temperature", "top_k", "top_p", "seed")


def encode(round_: Round) -> bytes:
    arrays = {"release": round_.release}
    header = {"decode": round_.decode, "stop": round_.stop, "admissions": []}
    for index, admission in enumerate(round_.admissions):
        prompt, request = admission.prompt, admission.prompt.request
        header["admissions"].append(
            {"slot": admission.slot, "max_new_tokens": request.max_new_tokens, "kv_cache_dtype": request.kv_cache_dtype}
        )
        for name in _PROMPT_ARRAYS:
            if getattr(prompt, name) is not None:
                arrays[f"{index}/{name}"] = getattr(prompt, name)
        for name, value in prompt.media.items():
            arrays[f"{index}/media/{name}"] = value
        for name in _SAMPLING_ARRAYS:
            arrays[f"{index}/sampling/{name}"] = np.asarray(getattr(request.sampling, name))
        arrays[f"{index}/stop_ids"] = request.stop_ids
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode(data: bytes) -> Round:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    header = json.loads(arrays.pop("header").tobytes())
    admissions = []
    for index, entry in enumerate(header["admissions"]):

        def array(name):
            return arrays.get(f"{index}/{name}")

        sampling = Sampling(*(array(f"sampling/{name}") for name in _SAMPLING_ARRAYS))
        request = Request(entry["max_new_tokens"], sampling, array("stop_ids"), (), entry["kv_cache_dtype"])
        padded_ids = array("padded_ids")
        media_prefix = f"{index}/media/"
        media = {name[len(media_prefix) :]: value for name, value in arrays.items() if name.startswith(media_prefix)}
        prompt = Prompt(padded_ids, padded_ids, array("padded_mask"), media, request, array("position_ids"))
        admissions.append(Admission(entry["slot"], prompt))
    return Round(admissions, arrays["release"], header["decode"], header["stop"])


def broadcast_round(round_: Round | None) -> Round:
    """Process 0's round (others pass None), on every process."""
    data = b"" if round_ is None else encode(round_)
    size = int(multihost_utils.broadcast_one_to_all(np.asarray([len(data)], np.int32))[0])
    payload = np.frombuffer(data, np.uint8) if round_ is not None else np.zeros((size,), np.uint8)
    return decode(np.asarray(multihost_utils.broadcast_one_to_all(payload)).tobytes())
