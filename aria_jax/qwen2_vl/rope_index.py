"""Qwen2-VL's M-RoPE positions of a prompt, on the host (transformers' `get_rope_index`).

Every real token gets a (temporal, height, width) position. Text counts up by one in all three.
An image or video of `grid_thw` patches is t x (h / merge) x (w / merge) tokens in the prompt (its
`<|image_pad|>` / `<|video_pad|>` run); token (i, j, k) of it sits at start + (i, j, k), start
being where the text before it stopped. The text after it resumes one past the largest position
used so far (for an image: start + max(h, w) / merge), so positions run shorter than the prompt.
Padding tokens get position 0 and are never attended.

Generation continues from one past the prompt's largest position (`device_loop.prefill`).
"""

from __future__ import annotations

import numpy as np


def mrope_positions(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
) -> np.ndarray:
    """(B, T) ids and mask -> (B, T, 3) int32 positions. The grids are taken in order, row by row,
    one per run of image (video) tokens; the caller has checked that the counts match."""
    batch, length = input_ids.shape
    positions = np.zeros((batch, length, 3), np.int64)
    grids = {
        image_token_id: iter(np.zeros((0, 3), np.int64) if image_grid_thw is None else image_grid_thw),
        video_token_id: iter(np.zeros((0, 3), np.int64) if video_grid_thw is None else video_grid_thw),
    }
    for row in range(batch):
        real = np.flatnonzero(attention_mask[row])
        ids = input_ids[row, real]
        row_positions = np.zeros((len(ids), 3), np.int64)
        next_position, index = 0, 0
        while index < len(ids):
            token = int(ids[index])
            if token not in grids:
                row_positions[index] = next_position
                next_position, index = next_position + 1, index + 1
                continue
            t, h, w = (int(n) for n in next(grids[token]))
            h, w = h // spatial_merge_size, w // spatial_merge_size
            grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), axis=-1)
            block = grid.reshape(-1, 3) + next_position
            row_positions[index : index + len(block)] = block
            next_position, index = int(block.max()) + 1, index + len(block)
        positions[row, real] = row_positions
    return positions.astype(np.int32)
