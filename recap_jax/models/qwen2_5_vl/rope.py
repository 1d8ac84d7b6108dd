"""Multimodal RoPE (M-RoPE) position indices for Qwen2.5-VL, computed host-side in numpy.

Every token gets three position ids (temporal, height, width). Text tokens advance all three
together by one per token. The ``llm_grid_t x llm_grid_h x llm_grid_w`` tokens of one image or
video (grid sizes after the spatial merge) start at the running position p and take
(p + t * time_interval, p + h, p + w); the next token then continues at
p + max(llm_grid_h, llm_grid_w). time_interval is 1 for images and
tokens_per_second * second_per_grid_t for videos (truncated to an integer per temporal patch).

Since vision tokens advance the position by less than their count, a prompt ends at a
position smaller than its length: delta = max_position + 1 - num_tokens (<= 0) per sample.
Generated text tokens continue at index + delta (`decode_positions`).

Equal to transformers' ``Qwen2_5_VLModel.get_rope_index`` (5.x), which tells modalities apart
by ``mm_token_type_ids``; here they come from input_ids (image_token_id -> image,
video_token_id -> video), which is what the processor's mm_token_type_ids encode.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from recap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig

_TEXT, _IMAGE, _VIDEO = 0, 1, 2


def _runs(types: np.ndarray) -> list[tuple[int, int, int]]:
    """(type, start, end) of each maximal run of equal values."""
    if types.size == 0:
        return []
    starts = np.flatnonzero(np.diff(types)) + 1
    bounds = np.concatenate([[0], starts, [types.size]])
    return [(int(types[s]), int(s), int(e)) for s, e in zip(bounds[:-1], bounds[1:])]


def _vision_positions(start: int, grid_thw: np.ndarray, merge: int, time_interval: Any) -> np.ndarray:
    """[3, t*h*w] positions of one image/video whose grid (before merging) is grid_thw."""
    grid_t, grid_h, grid_w = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    if isinstance(time_interval, np.floating):
        # float product truncated toward zero, in the dtype of second_per_grid_ts (as torch's .long())
        temporal = (np.arange(grid_t).astype(time_interval.dtype) * time_interval).astype(np.int64)
    else:
        temporal = np.arange(grid_t, dtype=np.int64) * int(time_interval)
    t, h, w = np.meshgrid(temporal + start, np.arange(grid_h) + start, np.arange(grid_w) + start, indexing="ij")
    return np.stack([t.ravel(), h.ravel(), w.ravel()]).astype(np.int64)


def _as_time_scales(second_per_grid_ts: Any) -> np.ndarray | None:
    """second_per_grid_ts as an array; python lists become float32, like the processor's tensors."""
    if second_per_grid_ts is None:
        return None
    if isinstance(second_per_grid_ts, (list, tuple)):
        values = np.asarray(second_per_grid_ts)
        return values.astype(np.float32) if values.dtype.kind == "f" else values
    return np.asarray(second_per_grid_ts)


def get_rope_index(input_ids: np.ndarray, image_grid_thw: np.ndarray | None = None,
                   video_grid_thw: np.ndarray | None = None, second_per_grid_ts: Any = None,
                   attention_mask: np.ndarray | None = None,
                   config: Qwen2_5_VLConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """3D positions of a (padded) batch: (position_ids int64 [3, B, S], deltas int64 [B, 1]).

    image_grid_thw / video_grid_thw: [n, 3] grids (before merging) of all images / videos of
    the batch, in order of appearance. second_per_grid_ts: [num_videos] seconds per temporal
    patch (temporal_patch_size / fps), default 1; the temporal products are computed in its
    dtype (python lists become float32, the dtype of the processor's tensors). Padding
    (attention_mask == 0) gets position 0 and is skipped when counting. A row with no real
    token gets positions 0 and delta 0 (transformers raises there).
    """
    if config is None:
        raise ValueError("get_rope_index: config is required (token ids, spatial_merge_size, tokens_per_second)")
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"get_rope_index: input_ids must be [batch, length], got shape {input_ids.shape}")
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != input_ids.shape:
        raise ValueError(f"get_rope_index: attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
    merge = config.vision.spatial_merge_size
    none = np.zeros((0, 3), np.int64)
    grids = {_IMAGE: none if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3),
             _VIDEO: none if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3)}
    names = {_IMAGE: "image", _VIDEO: "video"}
    time_scales = _as_time_scales(second_per_grid_ts)
    time_scales = None if time_scales is None else np.atleast_1d(time_scales)
    if time_scales is not None and time_scales.shape[0] < len(grids[_VIDEO]):
        raise ValueError(f"get_rope_index: second_per_grid_ts has {time_scales.shape[0]} entries for "
                         f"{len(grids[_VIDEO])} videos")
    used = {_IMAGE: 0, _VIDEO: 0}

    position_ids = np.zeros((3, batch, length), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    for b in range(batch):
        ids = input_ids[b][mask[b]]
        if ids.size == 0:
            continue
        types = np.where(ids == config.image_token_id, _IMAGE, np.where(ids == config.video_token_id, _VIDEO, _TEXT))
        pieces, current = [], 0
        for kind, start, end in _runs(types):
            if kind == _TEXT:
                pieces.append(np.broadcast_to(np.arange(end - start, dtype=np.int64) + current, (3, end - start)))
                current += end - start
                continue
            k = used[kind]
            if k >= len(grids[kind]):
                raise ValueError(f"get_rope_index: sample {b} has more {names[kind]} placeholder runs than the "
                                 f"{len(grids[kind])} rows of {names[kind]}_grid_thw")
            grid = grids[kind][k]
            expected = int(np.prod(grid)) // merge ** 2
            if end - start != expected:
                raise ValueError(f"get_rope_index: sample {b}: {names[kind]} {k} has {end - start} placeholder tokens "
                                 f"(at unpadded index {start}) but its grid {grid.tolist()} needs {expected}")
            if kind == _VIDEO:
                scale = 1 if time_scales is None else time_scales[k]
                interval = (scale.dtype.type(config.vision.tokens_per_second) * scale
                            if isinstance(scale, np.floating) else config.vision.tokens_per_second * int(scale))
            else:
                interval = 1
            pieces.append(_vision_positions(current, grid, merge, interval))
            current += max(int(grid[1]), int(grid[2])) // merge
            used[kind] += 1
        positions = np.concatenate(pieces, axis=1)
        position_ids[:, b, mask[b]] = positions
        deltas[b, 0] = positions.max() + 1 - ids.size
    for kind in (_IMAGE, _VIDEO):
        if used[kind] != len(grids[kind]):
            raise ValueError(f"get_rope_index: {names[kind]}_grid_thw has {len(grids[kind])} rows but the batch has "
                             f"{used[kind]} {names[kind]} placeholder runs")
    return position_ids, deltas


def decode_positions(deltas: np.ndarray, cache_positions: np.ndarray | int, length: int = 1) -> np.ndarray:
    """[3, B, length] positions of text tokens that continue a prompt: index + delta in all rows.

    cache_positions: per sample (or one scalar), the index of the first new token in the
    unpadded sequence, i.e. the number of real tokens before it (prompt length + tokens
    generated so far). For a left-padded prompt of padded length S with n_b real tokens, pass
    n_b + step, or equivalently the padded slot S + step with deltas - (S - n_b).

    This is transformers' rule for a cached forward without position_ids (attention_mask
    cumsum - 1 + rope_deltas). Its ``generate`` instead continues each row from the prompt's last
    position + 1, which is the same whenever the prompt ends with a text token (always the case
    with the chat template's generation prompt); after a trailing image the rows would differ.
    """
    deltas = np.asarray(deltas, dtype=np.int64).reshape(-1, 1)
    starts = np.broadcast_to(np.asarray(cache_positions, dtype=np.int64).reshape(-1, 1), deltas.shape)
    positions = starts + deltas + np.arange(length, dtype=np.int64)[None, :]
    return np.broadcast_to(positions[None], (3, *positions.shape)).copy()
