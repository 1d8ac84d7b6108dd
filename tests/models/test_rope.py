"""M-RoPE indices against transformers' Qwen2_5_VLModel.get_rope_index and its generate().

The reference model is a tiny random Qwen2_5_VLForConditionalGeneration (1 vision block, 1
text layer) built from our tiny config; get_rope_index is called on it with mm_token_type_ids
(1 = image token, 2 = video token), which is how transformers 5.x tells modalities apart.
Decode positions are checked against the position_ids that generate() feeds the language
model at each greedy step (captured with a forward pre-hook).
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen2_5_VLConfig as HFConfig
from transformers import Qwen2_5_VLForConditionalGeneration

from recap_jax.models.qwen2_5_vl import config as config_lib
from recap_jax.models.qwen2_5_vl.rope import decode_positions, get_rope_index

CONFIG = config_lib.tiny(vocab_size=300, text_layers=1, vision_depth=1, fullatt_block_indexes=(0,))
IMG, VID = CONFIG.image_token_id, CONFIG.video_token_id
VS, VE = CONFIG.vision_start_token_id, CONFIG.vision_end_token_id
PAD = CONFIG.pad_token_id


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(HFConfig(**CONFIG.to_hf_dict())).eval()


def _tensor(x, dtype=torch.long):
    return None if x is None else torch.as_tensor(np.asarray(x), dtype=dtype)


def reference_rope(model, input_ids, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
                   attention_mask=None):
    ids = np.asarray(input_ids)
    mm_token_type_ids = np.where(ids == IMG, 1, np.where(ids == VID, 2, 0))
    spg = None if second_per_grid_ts is None else torch.as_tensor(np.asarray(second_per_grid_ts))
    positions, deltas = model.model.get_rope_index(
        _tensor(ids), mm_token_type_ids=_tensor(mm_token_type_ids), image_grid_thw=_tensor(image_grid_thw),
        video_grid_thw=_tensor(video_grid_thw), second_per_grid_ts=spg, attention_mask=_tensor(attention_mask))
    return positions.numpy(), deltas.numpy()


def image_tokens(grid):
    return [VS] + [IMG] * (int(np.prod(grid)) // 4) + [VE]


def video_tokens(grid):
    return [VS] + [VID] * (int(np.prod(grid)) // 4) + [VE]


def pad_batch(rows, side="left"):
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), PAD, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for b, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[b, span], mask[b, span] = row, 1
    return ids, mask


def assert_matches_reference(model, input_ids, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
                             attention_mask=None):
    ours = get_rope_index(input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, CONFIG)
    ref = reference_rope(model, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask)
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])
    assert ours[0].shape == (3, *np.shape(input_ids)) and ours[1].shape == (np.shape(input_ids)[0], 1)
    return ours


def test_text_only(hf_model):
    ids = np.array([[3, 4, 5, 6, 7, 8]])
    positions, deltas = assert_matches_reference(hf_model, ids)
    np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(6), (3, 1, 6)))  # plain 1D RoPE
    assert deltas[0, 0] == 0


def test_one_image_hand_worked(hf_model):
    grid = [1, 4, 6]  # merged: 2 x 3 = 6 tokens
    ids = np.array([[10, 11] + image_tokens(grid) + [12]])
    positions, deltas = assert_matches_reference(hf_model, ids, image_grid_thw=[grid])
    # text 0,1,2 (vision_start); image at p=3: t=3, h=3+[0,0,0,1,1,1], w=3+[0,1,2,0,1,2]; then 3+3=6, 7, 8
    np.testing.assert_array_equal(positions[:, 0], [
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7],
        [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],
        [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]])
    assert deltas[0, 0] == 7 + 1 - 11


def test_two_images_of_different_sizes(hf_model):
    grids = [[1, 4, 6], [1, 8, 4]]
    ids = np.array([[10] + image_tokens(grids[0]) + [11, 12] + image_tokens(grids[1]) + [13, 14]])
    assert_matches_reference(hf_model, ids, image_grid_thw=grids)


@pytest.mark.parametrize("seconds", [[0.5, 1.0], [1 / 3, 0.7], [2.0, 0.25]])
def test_image_and_videos_with_second_per_grid_ts(hf_model, seconds):
    image_grid, video_grids = [1, 4, 4], [[3, 4, 6], [4, 2, 4]]
    ids = np.array([[10] + image_tokens(image_grid) + [11] + video_tokens(video_grids[0]) + [12]
                    + video_tokens(video_grids[1]) + [13]])
    spg = np.asarray(seconds, dtype=np.float32)  # what the processor's tensors hold
    positions, _ = assert_matches_reference(hf_model, ids, [image_grid], video_grids, spg)
    assert len(np.unique(positions[0, 0][ids[0] == VID])) > 2  # the temporal row really spreads out


def test_video_without_second_per_grid_ts(hf_model):
    grid = [2, 4, 4]
    ids = np.array([[10] + video_tokens(grid) + [11]])
    assert_matches_reference(hf_model, ids, video_grid_thw=[grid])


def test_left_padded_batch_with_different_image_counts(hf_model):
    grids = [[1, 4, 4], [1, 2, 8], [1, 6, 4]]
    rows = [[10, 11, 12],
            [10] + image_tokens(grids[0]) + [11],
            [10] + image_tokens(grids[1]) + [11, 12] + image_tokens(grids[2]) + [13, 14, 15]]
    ids, mask = pad_batch(rows, "left")
    positions, _ = assert_matches_reference(hf_model, ids, image_grid_thw=grids, attention_mask=mask)
    assert (positions[:, mask == 0] == 0).all()  # padding positions, as the reference sets them


def test_right_padding(hf_model):
    grids = [[1, 4, 6], [1, 4, 4]]
    rows = [[10] + image_tokens(grids[0]) + [11, 12, 13, 14, 15, 16], [10, 11] + image_tokens(grids[1])]
    ids, mask = pad_batch(rows, "right")
    assert_matches_reference(hf_model, ids, image_grid_thw=grids, attention_mask=mask)


@settings(max_examples=25)
@given(data=st.data())
def test_random_layouts_property(hf_model, data):
    batch = data.draw(st.integers(1, 3))
    side = data.draw(st.sampled_from(["left", "right"]))
    rows, image_grids, video_grids, seconds = [], [], [], []
    grid_strategy = st.tuples(st.integers(1, 3), st.integers(1, 4).map(lambda x: 2 * x), st.integers(1, 4).map(lambda x: 2 * x))
    for _ in range(batch):
        row = data.draw(st.lists(st.integers(3, 200), max_size=4))
        for kind in data.draw(st.lists(st.sampled_from(["image", "video"]), max_size=3)):
            t, h, w = data.draw(grid_strategy)
            if kind == "image":
                image_grids.append([1, h, w])
                row += image_tokens([1, h, w])
            else:
                video_grids.append([t, h, w])
                seconds.append(data.draw(st.sampled_from([0.25, 0.5, 1 / 3, 0.7, 1.0, 1.5])))
                row += video_tokens([t, h, w])
            row += data.draw(st.lists(st.integers(3, 200), max_size=3))
        rows.append(row or [5])
    ids, mask = pad_batch(rows, side)
    assert_matches_reference(hf_model, ids, image_grids or None, video_grids or None,
                             np.asarray(seconds, np.float32) if seconds else None, mask)


def test_mismatched_grids_raise_clear_errors():
    ids = np.array([[10] + image_tokens([1, 4, 4]) + [11]])
    with pytest.raises(ValueError, match=r"sample 0: image 0 has 4 placeholder tokens .* needs 6"):
        get_rope_index(ids, [[1, 4, 6]], config=CONFIG)
    with pytest.raises(ValueError, match="more image placeholder runs"):
        get_rope_index(ids, None, config=CONFIG)
    with pytest.raises(ValueError, match="image_grid_thw has 2 rows"):
        get_rope_index(ids, [[1, 4, 4], [1, 4, 4]], config=CONFIG)


def test_fully_padded_row_gets_zeros():
    ids, mask = pad_batch([[10, 11], [12]], "left")
    mask[1] = 0
    positions, deltas = get_rope_index(ids, attention_mask=mask, config=CONFIG)
    assert (positions[:, 1] == 0).all() and deltas[1, 0] == 0


def test_decode_positions_follow_generate(hf_model):
    """generate() appends last_position + 1 per row to its 4-row position_ids (text row +
    3 M-RoPE rows) each step; for prompts ending in text that is index + delta in all rows."""
    grids = [[1, 4, 6], [1, 6, 4], [1, 4, 4]]
    rows = [[10] + image_tokens(grids[0]) + [11, 12],
            [10, 11, 12, 13] + image_tokens(grids[1]) + [14] + image_tokens(grids[2]) + [15, 16]]
    ids, mask = pad_batch(rows, "left")
    num_patches = sum(int(np.prod(g)) for g in grids)
    pixel_values = torch.randn(num_patches, CONFIG.vision.patch_dim, generator=torch.Generator().manual_seed(0))
    captured = []

    def capture(module, args, kwargs):
        captured.append(kwargs["position_ids"].clone())

    hook = hf_model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    steps = 4
    try:
        with torch.no_grad():
            hf_model.generate(input_ids=_tensor(ids), attention_mask=_tensor(mask), pixel_values=pixel_values,
                              image_grid_thw=_tensor(grids), mm_token_type_ids=_tensor((ids == IMG).astype(np.int64)),
                              max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=PAD)
    finally:
        hook.remove()
    assert len(captured) == steps and captured[0].shape[0] == 4  # [text row + 3 M-RoPE rows, B, S]

    prompt_positions, deltas = get_rope_index(ids, grids, attention_mask=mask, config=CONFIG)
    np.testing.assert_array_equal(captured[0][1:].numpy(), prompt_positions)
    real_lengths = mask.sum(1)
    for step in range(1, steps):
        ref = captured[step][1:].numpy()  # [3, B, 1]
        np.testing.assert_array_equal(decode_positions(deltas, real_lengths + step - 1, length=1), ref)
    # Several tokens at once (e.g. a multi-token chunk) and a scalar cache position.
    chunk = decode_positions(deltas, real_lengths, length=3)
    np.testing.assert_array_equal(chunk[:, :, :1], captured[1][1:].numpy())
    np.testing.assert_array_equal(np.diff(chunk, axis=-1), 1)
    np.testing.assert_array_equal(decode_positions(deltas, 20)[0, :, 0], 20 + deltas[:, 0])
