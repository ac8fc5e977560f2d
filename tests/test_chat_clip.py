"""`FrozenQwenSAM.chat` with a clip (`data.clips.ClipFrames`): the frozen LMM watches the clip and answers, and the
answer's phrases are grounded through every frame.

References are built here by hand: the chat text as Qwen2.5-VL's template renders a user turn holding a video, the
clip's inputs from `qwen_clip_inputs`, the answer from the frozen LMM's own `generate` (tested against transformers'
in test_video_inputs), the grounding batch from the tokenizer's offsets; the masks from `predict_masks` on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flmm_model.data.clip_pixels import qwen_clip_inputs
from flmm_model.data.clips import ClipFrames
from flmm_model.data.loader import collate
from flmm_model.data.synthetic_clips import SyntheticClips
from flmm_model.errors import InputError
from flmm_model.model import build_model

MODEL_CFG = dict(qwen="tiny", sam="sam2_tiny", min_pixels=56 * 56, max_pixels=168 * 168, seed=0,
                 mask_head_widths=[8, 16, 32, 64], mask_head_size=32)
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def model():
    return build_model(MODEL_CFG).eval()


@pytest.fixture(scope="module")
def clip():
    drawn = SyntheticClips(length=1, seed=4, num_frames=5, image_size=(64, 96), max_objects=1)[0]
    frames = np.stack([np.asarray(frame) for frame in drawn.frames])
    return ClipFrames(frames=frames, times=np.arange(5, dtype=np.float64) / 6, source="synthetic")


def test_chat_with_a_clip_answers_and_grounds_through_every_frame(model, clip):
    tokenizer = model.tokenizer
    out = model.chat(clip, "What moves in the video?", ground=["The square"], answer_prefix="The square",
                     max_new_tokens=6)
    # the answer: the frozen LMM's greedy continuation of the hand-written prompt with the whole clip (5 frames)
    text = f"{SYSTEM}<|im_start|>user\n{VIDEO}What moves in the video?<|im_end|>\n<|im_start|>assistant\nThe square"
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])[None]
    pixel_values, grid = qwen_clip_inputs(clip.frames, model.image_processor)
    assert grid[0, 0] == 3
    end = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    new = model.lmm.generate(ids, torch.ones_like(ids), pixel_values_videos=pixel_values, video_grid_thw=grid,
                             video_frame_times=[torch.from_numpy(clip.times)], max_new_tokens=6, do_sample=False,
                             eos_token_id=end, pad_token_id=tokenizer.pad_token_id)[0]
    stops = [i for i, token in enumerate(new.tolist()) if token in end]
    expected = new[: stops[0]] if stops else new
    assert out.token_ids.tolist() == expected.tolist()
    assert out.answer == "The square" + tokenizer.decode(expected, skip_special_tokens=True,
                                                         clean_up_tokenization_spaces=False)
    assert out.phrases == ["The square"] and out.grounded_image == -1
    assert out.masks.shape == (1, 5, *clip.frames.shape[1:3]) and out.masks.dtype == torch.bool

    # the masks: the teacher-forced forward over prompt + answer with the clip, built here
    full = text[: -len("The square")] + out.answer + "<|im_end|>\n"
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    start = len(text) - len("The square")
    mask_ids = torch.tensor([0 if s < start + len("The square") and e > start else -1
                             for s, e in encoding["offset_mapping"]])
    padded = np.concatenate([clip.frames, clip.frames[-1:]])  # 6 watched frames: the last repeated
    item = dict(input_ids=torch.tensor(encoding["input_ids"]), mask_ids=mask_ids, pixel_values_videos=pixel_values,
                video_grid_thw=grid, video_frame_times=torch.from_numpy(np.append(clip.times, clip.times[-1])),
                frames=torch.from_numpy(padded), gt_masks=None, has_gt=None, phrases=["The square"], meta={})
    reference = model.predict_masks(collate([item], pad_token_id=tokenizer.pad_token_id))[0][:, :5]
    assert torch.equal(out.masks, reference.cpu())


def test_chat_with_a_clip_refuses_bad_input(model, clip):
    with pytest.raises(InputError, match="non-empty"):
        model.chat(clip, "  ")
    with pytest.raises(InputError, match="max_frames"):
        model.chat(clip, "What moves?", max_frames=1)
    with pytest.raises(InputError, match="one turn"):
        model.chat(clip, "What moves?", history=[("a", "b")])
