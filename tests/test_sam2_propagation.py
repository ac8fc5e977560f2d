"""Sam2Propagator against transformers' own Sam2VideoProcessor + inference-session path, on a tiny random SAM2."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Sam2ImageProcessorFast,
    Sam2VideoInferenceSession,
    Sam2VideoModel,
    Sam2VideoProcessor,
    Sam2VideoVideoProcessor,
)

from flmm_model.modeling.sam2_propagation import Sam2Propagator, sam2_video_tiny_config


@pytest.fixture(scope="module")
def propagator():
    torch.manual_seed(0)
    return Sam2Propagator(sam2=Sam2VideoModel(sam2_video_tiny_config()))


def clip(num_frames=3, height=36, width=44):
    generator = torch.Generator().manual_seed(1)
    frames = [torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
              for _ in range(num_frames)]
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[0, 4:20, 6:30] = True
    masks[1, 18:34, 20:40] = True
    return frames, masks


def hf_propagate(model, frames, key_index, masks):
    """transformers' documented path: processor session, mask prompts, forward then reverse propagation."""
    processor = Sam2VideoProcessor(image_processor=Sam2ImageProcessorFast(), video_processor=Sam2VideoVideoProcessor())
    video = torch.stack(frames).permute(0, 2, 3, 1).numpy()  # (T, H, W, 3)
    session = processor.init_video_session(video=video, inference_device="cpu")
    processor.add_inputs_to_inference_session(session, frame_idx=key_index, obj_ids=list(range(len(masks))),
                                              input_masks=[m for m in masks])
    model(session, frame_idx=key_index)
    per_frame = {}
    for reverse in (False, True):
        for output in model.propagate_in_video_iterator(session, start_frame_idx=key_index, reverse=reverse):
            per_frame.setdefault(output.frame_idx, processor.post_process_masks(
                [output.pred_masks], original_sizes=[[session.video_height, session.video_width]],
                binarize=False)[0][:, 0])
    return torch.stack([per_frame[t] for t in range(len(frames))], dim=1)  # (K, T, H, W)


def hf_propagate_without_torchvision(propagator, frames, key_index, masks):
    """The same path with transformers' processor methods called on a stand-in (their image / video processors need
    torchvision, absent here): HF's mask-prompt mapping, session and propagation; the frame preprocessing is ours
    and the post-processing is Sam2VideoVideoProcessor.post_process_masks' two bilinear resizes, restated."""
    model = propagator.sam2
    stand_in = SimpleNamespace(target_size=1024, size={"height": 1024, "width": 1024})
    height, width = frames[0].shape[1:]
    session = Sam2VideoInferenceSession(video=propagator.preprocess(frames), video_height=height, video_width=width,
                                        dtype=torch.float32)
    Sam2VideoProcessor.process_new_mask_for_video_frame(stand_in, session, key_index, list(range(len(masks))),
                                                        [m for m in masks])
    model(session, frame_idx=key_index)
    per_frame = {}
    for reverse in (False, True):
        for output in model.propagate_in_video_iterator(session, start_frame_idx=key_index, reverse=reverse):
            full = F.interpolate(output.pred_masks, (1024, 1024), mode="bilinear", align_corners=False)
            per_frame.setdefault(output.frame_idx, F.interpolate(full, (height, width), mode="bilinear",
                                                                 align_corners=False)[:, 0])
    return torch.stack([per_frame[t] for t in range(len(frames))], dim=1)  # (K, T, H, W)


def test_propagate_matches_transformers_session_with_key_frame_not_first(propagator):
    frames, masks = clip()
    ours = propagator.propagate(frames, {1: masks})
    reference = hf_propagate_without_torchvision(propagator, frames, 1, masks)
    assert ours.shape == reference.shape == (2, 3, 36, 44)
    assert ours[:, 0].abs().max() < 1e3  # frame 0 came from reverse propagation, not the -1e4 fill
    torch.testing.assert_close(ours, reference.float(), atol=1e-4, rtol=1e-4)


def test_propagate_matches_transformers_processor_path(propagator):
    pytest.importorskip("torchvision")
    frames, masks = clip()
    ours = propagator.propagate(frames, {1: masks})
    reference = hf_propagate(propagator.sam2, frames, 1, masks)
    assert ours.shape == reference.shape == (2, 3, 36, 44)
    assert ((ours > 0) == (reference > 0)).float().mean() > 0.999
    torch.testing.assert_close(ours, reference.float(), atol=2e-2, rtol=1e-3)


def test_two_objects_at_once_equal_each_alone(propagator):
    frames, masks = clip()
    both = propagator.propagate(frames, {1: masks})
    for k in range(2):
        torch.testing.assert_close(both[k:k + 1], propagator.propagate(frames, {1: masks[k:k + 1]}),
                                   atol=1e-4, rtol=1e-4)


def test_bad_inputs_raise_value_errors(propagator):
    frames, masks = clip(num_frames=2)
    with pytest.raises(ValueError, match="differ in size"):
        propagator.propagate([frames[0], torch.zeros(3, 10, 10, dtype=torch.uint8)], {0: masks})
    with pytest.raises(ValueError, match="out of range"):
        propagator.propagate(frames, {2: masks})
    with pytest.raises(ValueError, match="must be"):
        propagator.propagate(frames, {0: masks[:, :10]})
    with pytest.raises(ValueError, match="no key frame"):
        propagator.propagate(frames, {})


def test_one_sam2_preset_refines_and_propagates():
    """`model.sam=sam2_tiny` builds one Sam2VideoModel: its image parts refine, its memory propagates."""
    from flmm_model.build import build_sam
    from flmm_model.modeling.sam2_refiner import Sam2Refiner

    sam = build_sam("sam2_tiny")
    refiner = Sam2Refiner(sam=sam).eval()
    frames = [torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8) for _ in range(3)]
    embedding = refiner.encode_images(refiner.preprocess(frames[:1]))[0]
    with torch.no_grad():
        key = refiner(image_embeddings=embedding, coarse_logits=torch.randn(1, 6, 8),
                      text_prompts=[torch.randn(2, refiner.prompt_dim)], original_size=(48, 64))  # (1, 48, 64)
    out = Sam2Propagator(sam2=sam).propagate(frames, {0: key})
    assert out.shape == (1, 3, 48, 64) and torch.isfinite(out).all()
