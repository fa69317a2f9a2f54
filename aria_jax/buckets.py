"""Padded lengths: every length a prompt, a KV cache or a training batch is padded to, so that a
new request or batch reuses compiled programs instead of compiling its own."""

from __future__ import annotations

SMALLEST_BUCKET = 16
LARGE_BUCKET_STEP = 1024
# Longer prompts are prefilled this many tokens at a time (activation memory bounded by the
# chunk, not the prompt); a multiple of LARGE_BUCKET_STEP.
PREFILL_CHUNK = 4096


def bucket_length(length: int) -> int:
    """Generation's prompt and cache lengths: powers of two from 16 up to 1024, then multiples
    of 1024."""
    if length <= LARGE_BUCKET_STEP:
        return max(SMALLEST_BUCKET, 1 << (max(length, 1) - 1).bit_length())
    return -(-length // LARGE_BUCKET_STEP) * LARGE_BUCKET_STEP


def prompt_bucket(length: int, chunk: int = PREFILL_CHUNK) -> int:
    """A prompt's padded length: its bucket, rounded up to whole chunks past one chunk."""
    bucket = bucket_length(length)
    return bucket if bucket <= chunk else -(-bucket // chunk) * chunk


def default_length_buckets(max_length: int) -> tuple[int, ...]:
    """Training's padded lengths: powers of two from 16 below `max_length`, then `max_length`
    itself (a batch is padded to the smallest that holds its longest example)."""
    buckets = []
    bucket = SMALLEST_BUCKET
    while bucket < max_length:
        buckets.append(bucket)
        bucket *= 2
    return (*buckets, max_length)
