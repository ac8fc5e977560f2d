"""The host-side batch: a collated CPU batch -> `PreparedBatch`, everything the forward reads, by ONE route.

`BatchPreparer` holds what the host side needs to know about a model (its Qwen config, SAM's input and mask sizes,
the U-Net grid, whether to build targets, the SAM embedding cache), no weights, and is picklable: the training and
evaluation loaders run it in their workers (`data.loader.Collator(prepare=...)` puts the result in
`batch["prepared"]`), and `GroundingModel.prepare_batch` runs the same preparer in the main process for a batch
that comes without one (the predictor's, a test's). Values are read here, where reading costs no device sync; the
result moves to the device in one go (pinned, asynchronous on CUDA: `device.to_device`), and the forward then
reads nothing back.

What the forward needs, for the B samples and K objects of a batch (objects in sample order):
- the LMM stage's inputs (`lmm_inputs.prepare_lmm_inputs`: validation, vision-token expansion, M-RoPE positions,
  phrase queries);
- U-Net groups: the samples whose attention maps share a grid, so the mask head runs once per distinct grid;
- the coarse canvas: each object's coarse logits at the top left of one (h'_max, w'_max) canvas, and, when there
  are several groups, each object's row in the concatenated group outputs;
- the text prompt tokens: each object's phrase slots padded to the longest phrase (T), as rows of the flattened
  (B * P) phrase slots, with a validity mask;
- `frames.ObjectFrames`: each object's image, SAM-input, mask-input and coarse sizes;
- SAM's input canvas (`frames.sam_input_canvas`) of the images to encode, or the cached embeddings and the misses;
- with `data.lmm_cache`: every sample's cached attention maps and phrase hidden states (`CachedLMMOutputs`: then
  the step does not run the LMM), or the samples the cache misses (the step writes their entries);
- with ground truth: the masks on one (K, H_max, W_max) canvas and the coarse targets on the U-Net grids (the
  fraction of each cell inside the object, `losses.resize_gt_masks`).

Clips: the heads run on ROWS, not samples. An image sample is one row (its image, its maps); a clip sample is one
row per frame the heads see: in training the frames with ground truth, in prediction its key frames (the first
frame of every frame group, `clip_frames="keys"`, which a SAM2 video model then propagates through the clip) or
every frame (`"all"`, for a refiner without video memory). A row reads its frame's group of the clip's maps
((K, C, G, h, w)[:, :, frame // 2]) and the sample's phrase hidden states, so an image is a clip of one group and
everything after the LMM (U-Net, SAM, losses, caches of SAM embeddings) is the image route. Without clips the rows
are the samples (`row_sample` None) and nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from flmm_model.data.lmm_cache import LMMOutputCache, sample_digests
from flmm_model.data.sam_cache import SamEmbeddingCache, image_digest
from flmm_model.device import pin_memory
from flmm_model.modeling.frames import ObjectFrames, coarse_grid_size, gt_canvas, sam_input_canvas, sam_resized_size
from flmm_model.modeling.lmm_inputs import PreparedLMMInputs, prepare_lmm_inputs
from flmm_model.modeling.losses import resize_gt_masks

CLIP_FRAMES = ("keys", "all")


@dataclass
class UNetGroup:
    """The samples whose attention maps share the grid (h, w): one mask-head call for all their objects."""

    grid: tuple[int, int]
    samples: list[int]


@dataclass
class CachedLMMOutputs:
    """What the heads read from the frozen LMM, for a batch whose every sample the LMM-output cache holds.

    Attributes:
        attention_maps: per sample (K_b, C, h_b, w_b) float32, as `LMMOutput.attention_maps`.
        phrase_rows: (layers, B, P, D) as `LMMOutput.phrase_rows` (slots past a sample's phrase tokens are zeros).
    """

    attention_maps: list[torch.Tensor]
    phrase_rows: torch.Tensor


@dataclass
class PreparedBatch:
    """Everything the forward of a batch reads (see the module docstring). Tensors on the host until `to_device`;
    built by `BatchPreparer`.

    Attributes:
        lmm: the LMM stage's inputs.
        num_objects: K_b per sample. image_sizes: (H_b, W_b) per sample. coarse_sizes: (h'_b, w'_b) per sample.
        unet_groups: the mask-head calls, in order.
        coarse_order: (K,) long, object k's row in the concatenated outputs of the groups; None when the groups'
            outputs are already in object order with one grid (a single group).
        coarse_canvas: (h'_max, w'_max). canvas: (H_max, W_max) of the refined logits.
        frames: per-object sizes (`ObjectFrames`).
        object_image: (K,) long, the sample of each object.
        text_index: (K * T,) long rows of the (B * P) phrase slots: object k's tokens, then its first token again as
            padding. text_valid: (K, T) bool, or None when every object has T tokens.
        sam_pixels: (M, 3, S, S) uint8 SAM input canvas of the images to encode in the step (all B, or the cache's
            misses), or None without SAM. sam_resized: (M, 2) float (rh, rw) of those images.
        sam_embeddings: (B, C, e, e) embeddings from the SAM cache (zeros for misses), or None without a cache.
        sam_missing: (M,) long, the images the cache missed (encoded in the step), or None without a cache.
        sam_missing_names: their cache entry names (the step's new embeddings are written under them).
        gt_canvas: (K, H_max, W_max) bool, coarse_targets: (K, h'_max, w'_max) float32; None without ground truth.
        lmm_cached: the LMM's outputs from `data.lmm_cache` when it holds every sample (the step skips the LMM; then
            `lmm.pixel_values` is emptied, it is not read), else None.
        lmm_missing: with a cache that missed: (sample, entry name, phrase tokens P_b) of each sample to write.
        row_sample: with clips, per head row its sample (every per-object / per-image entry above is per row
            then); None: the rows are the samples.
        row_frame: with clips, per row the frame of its sample's clip (-1: an image sample).
        row_group: with clips, per row the frame group its maps are read from (-1: an image sample).
    """

    lmm: PreparedLMMInputs
    num_objects: list[int]
    image_sizes: list[tuple[int, int]]
    coarse_sizes: list[tuple[int, int]]
    unet_groups: list[UNetGroup]
    coarse_order: torch.Tensor | None
    coarse_canvas: tuple[int, int]
    canvas: tuple[int, int]
    frames: ObjectFrames
    object_image: torch.Tensor
    text_index: torch.Tensor
    text_valid: torch.Tensor | None
    sam_pixels: torch.Tensor | None
    sam_resized: torch.Tensor | None
    sam_embeddings: torch.Tensor | None
    sam_missing: torch.Tensor | None
    sam_missing_names: list[str]
    gt_canvas: torch.Tensor | None
    coarse_targets: torch.Tensor | None
    lmm_cached: CachedLMMOutputs | None = None
    lmm_missing: list[tuple[int, str, int]] = field(default_factory=list)
    row_sample: list[int] | None = None
    row_frame: list[int] = field(default_factory=list)
    row_group: list[int] = field(default_factory=list)

    def pin_memory(self) -> PreparedBatch:
        """Every CPU tensor in page-locked memory (the DataLoader calls this with `pin_memory=True`)."""
        return pin_memory(self)

    @property
    def object_offsets(self) -> list[int]:
        """Row of each sample's first object (objects are in sample order)."""
        offsets, row = [], 0
        for count in self.num_objects:
            offsets.append(row)
            row += count
        return offsets


def unet_groups(grid_hw: list[tuple[int, int]], num_objects: list[int]) -> tuple[list[UNetGroup], torch.Tensor | None]:
    """Group the samples by attention grid (first appearance order) and find each object's row in the concatenated
    group outputs: (groups, (K,) long order or None for a single group)."""
    by_grid: dict[tuple[int, int], list[int]] = {}
    for b, grid in enumerate(grid_hw):
        by_grid.setdefault(tuple(grid), []).append(b)
    groups = [UNetGroup(grid=grid, samples=samples) for grid, samples in by_grid.items()]
    if len(groups) == 1:
        return groups, None
    offsets = torch.tensor([0, *num_objects]).cumsum(0).tolist()
    rows_in_concat = [row for group in groups for b in group.samples for row in range(offsets[b], offsets[b + 1])]
    order = torch.empty(len(rows_in_concat), dtype=torch.long)
    order[torch.tensor(rows_in_concat)] = torch.arange(len(rows_in_concat))  # object -> its row in the concat
    return groups, order


def text_slots(object_slots: list[list[slice | torch.Tensor]], num_slots: int) -> tuple[torch.Tensor,
                                                                                        torch.Tensor | None]:
    """(K * T,) rows of the flattened (B * P) phrase slots and the (K, T) validity (None when all objects have T
    tokens), from each object's slots (`PreparedLMMInputs.object_slots`; P = `num_slots`)."""
    rows = []
    for b, sample_slots in enumerate(object_slots):
        for slots in sample_slots:
            index = torch.arange(slots.start, slots.stop) if isinstance(slots, slice) else slots
            rows.append(index + b * num_slots)
    lengths = [index.numel() for index in rows]
    longest = max(lengths)
    padded = torch.stack([torch.cat([index, index[:1].expand(longest - index.numel())]) for index in rows])
    valid = None
    if min(lengths) != longest:
        valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]  # (K, T)
    return padded.flatten(), valid


@dataclass
class SamInputs:
    """SAM's image inputs of a batch (B images; M of them to encode in the step).

    Attributes:
        pixels: (M, 3, S, S) uint8 SAM input canvas of the images to encode (all B without a cache).
        resized: (M, 2) float (rh, rw) of those images inside S x S.
        encoded: the M images' indices in the batch.
        embeddings: (B, C, e, e) from the cache (zeros for misses), or None without a cache.
        names: B cache entry names (`sam_cache.image_digest`), or [] without a cache.
    """

    pixels: torch.Tensor
    resized: torch.Tensor
    encoded: list[int]
    embeddings: torch.Tensor | None = None
    names: list[str] | None = None

    def pin_memory(self) -> SamInputs:
        """Every CPU tensor in page-locked memory (the DataLoader calls this with `pin_memory=True`)."""
        return pin_memory(self)


@dataclass(frozen=True)
class SamInputPreparer:
    """SAM's part of the host batch: the input canvas of the images to encode, or the cached embeddings and the
    misses. Picklable; used by `BatchPreparer` and by `run.py cache-sam` (which builds no Qwen).

    Attributes:
        image_size: SAM's input side S.
        sam_cache: read the images' embeddings from this cache (`data.sam_cache`), or None.
        stretch: resize every image to S x S (SAM2's input) instead of longest side S (SAM's).
    """

    image_size: int
    sam_cache: SamEmbeddingCache | None = None
    stretch: bool = False

    def __call__(self, batch: dict[str, Any]) -> SamInputs:
        """For a collated batch (its `images`): what `collate(prepare=...)` calls."""
        return self.for_images([image.cpu() for image in batch["images"]])

    def for_images(self, images: list[torch.Tensor]) -> SamInputs:
        """For B uint8 (3, H_b, W_b) CPU images."""
        encoded, embeddings, names = list(range(len(images))), None, None
        if self.sam_cache is not None:
            names = [image_digest(image) for image in images]
            cached = [self.sam_cache.read(name) for name in names]
            encoded = [b for b, embedding in enumerate(cached) if embedding is None]
            dtype = getattr(torch, self.sam_cache.key.dtype)
            empty = torch.zeros(self.sam_cache.embedding_shape, dtype=dtype)
            embeddings = torch.stack([empty if e is None else e.to(dtype) for e in cached])  # (B, C, e, e)
        resized = [sam_resized_size(*images[b].shape[1:], self.image_size, stretch=self.stretch) for b in encoded]
        return SamInputs(pixels=sam_input_canvas([images[b] for b in encoded], self.image_size, stretch=self.stretch),
                         resized=torch.tensor(resized, dtype=torch.float32).reshape(-1, 2), encoded=encoded,
                         embeddings=embeddings, names=names)


@dataclass(frozen=True)
class BatchPreparer:
    """What the host side of a batch needs to know about a model (`GroundingModel.batch_preparer` builds it); no
    weights, picklable for DataLoader workers. Calling it on a collated batch gives the `PreparedBatch`.

    Attributes:
        qwen_config: the frozen Qwen-VL's config (ids, merge size, patch size, the family: `backbones.adapter_for`).
        coarse_size: longest side of the coarse (U-Net) grid (`model.mask_head_size`).
        sam_image_size: SAM's input side S, or None for a model without SAM (attention-only).
        sam_mask_side: SAM's mask-input side 4e (with SAM).
        sam_stretch: SAM's input frame is S x S whatever the image's aspect ratio (SAM2), not longest side S.
        targets: build the ground-truth entries when the batch has ground truth (False: prediction).
        sam_cache: read SAM embeddings from this cache (`data.sam_cache`).
        lmm_cache: read the LMM's outputs from this cache (`data.lmm_cache`).
        keep_lmm_inputs: keep the LMM's pixels when the cache holds the whole batch (a sharded LMM: when another
            process's batch misses, this one runs the LMM too, so that their collectives pair up).
        clip_frames: the frames of a clip the heads see in prediction: "keys" (the first of every frame group) or
            "all"; in training (targets) the frames with ground truth.
        timestamp_tokens: the tokenizer's timestamp pieces (Qwen3-VL / Qwen3.5 clips; `backbones.video`).
        max_video_tokens: the video-token budget of a sample (refused beyond it).
    """

    qwen_config: Any
    coarse_size: int
    sam_image_size: int | None = None
    sam_mask_side: int | None = None
    sam_stretch: bool = False
    targets: bool = True
    sam_cache: SamEmbeddingCache | None = None
    lmm_cache: LMMOutputCache | None = None
    keep_lmm_inputs: bool = False
    clip_frames: str = "keys"
    timestamp_tokens: Any = None
    max_video_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.clip_frames not in CLIP_FRAMES:
            raise ValueError(f"clip_frames: expected one of {CLIP_FRAMES}, found {self.clip_frames!r}")

    def __call__(self, batch: dict[str, Any]) -> PreparedBatch:
        return prepare_batch(batch, preparer=self)


def prepare_batch(batch: dict[str, Any], *, preparer: BatchPreparer) -> PreparedBatch:
    """A collated CPU batch (`data.loader.collate`) -> `PreparedBatch`: the one route (see the module docstring).

    Raises:
        ValueError: inconsistent input (see `lmm_inputs.validate_lmm_inputs`), or ground-truth masks that do not
            match a sample's phrases or image size.
    """
    def host(name: str) -> torch.Tensor:
        return batch[name].cpu()

    with_clips = batch.get("pixel_values_videos") is not None
    lmm = prepare_lmm_inputs(preparer.qwen_config, host("input_ids"), host("attention_mask"), batch["pixel_values"],
                             host("image_grid_thw"), mask_ids=host("mask_ids"),
                             grounded_image=batch.get("grounded_image"),
                             pixel_values_videos=batch.get("pixel_values_videos"),
                             video_grid_thw=batch["video_grid_thw"].cpu() if with_clips else None,
                             video_frame_times=batch.get("video_frame_times"),
                             timestamp_tokens=preparer.timestamp_tokens, max_video_tokens=preparer.max_video_tokens)
    images = [image.cpu() for image in batch["images"]]
    gt_masks = batch.get("gt_masks")
    has_gt = preparer.targets and bool(gt_masks) and all(mask is not None for mask in gt_masks)
    num_objects, row_sample, row_frame, row_group = lmm.num_objects, None, [], []
    object_slots, grids = lmm.object_slots, lmm.grounded_grid_hw
    if with_clips:
        if preparer.lmm_cache is not None:
            raise ValueError("data.lmm_cache: the LMM-output cache holds image samples only; a batch with a clip "
                             "runs the LMM (leave lmm_cache unset for video training)")
        row_sample, row_frame, row_group = clip_rows(
            batch, lmm, train=has_gt, clip_frames=preparer.clip_frames,
            temporal=preparer.qwen_config.vision_config.temporal_patch_size)
        images = [images[b] if frame < 0 else batch["clips"][b][frame].permute(2, 0, 1).cpu()
                  for b, frame in zip(row_sample, row_frame, strict=True)]
        if has_gt:
            gt_masks = [gt_masks[b] if frame < 0 else gt_masks[b][:, frame]
                        for b, frame in zip(row_sample, row_frame, strict=True)]
        num_objects = [lmm.num_objects[b] for b in row_sample]
        object_slots = [lmm.object_slots[b] for b in row_sample]
        grids = [grids[b] for b in row_sample]
    image_sizes = [tuple(image.shape[-2:]) for image in images]
    coarse_sizes = [coarse_grid_size(h, w, preparer.coarse_size) for h, w in grids]  # per row (h', w')
    gt, coarse_targets = None, None
    if has_gt:
        for b, (mask, count, size) in enumerate(zip(gt_masks, num_objects, image_sizes, strict=True)):
            if tuple(mask.shape) != (count, *size):
                raise ValueError(f"sample {b}: gt_masks shape {tuple(mask.shape)} does not match the {count} "
                                 f"phrases at image size {size}")
        gt = gt_canvas(list(gt_masks))  # (K, H_max, W_max)
        coarse_targets = torch.zeros((gt.shape[0], max(h for h, _ in coarse_sizes), max(w for _, w in coarse_sizes)))
        row = 0
        for mask, (height, width) in zip(gt_masks, coarse_sizes, strict=True):
            coarse_targets[row:row + mask.shape[0], :height, :width] = resize_gt_masks(mask, (height, width))
            row += mask.shape[0]

    object_image = torch.repeat_interleave(torch.arange(len(image_sizes)), torch.tensor(num_objects))
    per_object = object_image.tolist()
    with_sam = preparer.sam_image_size is not None
    sam_sizes = dict(image_size=preparer.sam_image_size, mask_side=preparer.sam_mask_side,
                     stretch=preparer.sam_stretch) if with_sam else dict(
        image_size=1, mask_side=1)  # without SAM only the image and coarse sizes are used
    frames = ObjectFrames.build([image_sizes[b] for b in per_object], [coarse_sizes[b] for b in per_object],
                                **sam_sizes)
    groups, order = unet_groups(grids, num_objects)
    text_index, text_valid = text_slots(object_slots, lmm.queries.query_index.shape[1])
    sam = SamInputPreparer(preparer.sam_image_size, preparer.sam_cache, preparer.sam_stretch).for_images(images) \
        if with_sam else None
    cached = sam is not None and sam.embeddings is not None
    lmm_cached, lmm_missing = None, []
    if preparer.lmm_cache is not None:
        lmm_cached, lmm_missing = read_lmm_cache(batch, lmm, preparer.lmm_cache)
        if lmm_cached is not None and not preparer.keep_lmm_inputs:  # no LMM run: its pixels need not travel
            lmm = replace(lmm, pixel_values=lmm.pixel_values[:0])
    return PreparedBatch(
        lmm=lmm, num_objects=num_objects, image_sizes=image_sizes, coarse_sizes=coarse_sizes,
        unet_groups=groups, coarse_order=order,
        coarse_canvas=(max(h for h, _ in coarse_sizes), max(w for _, w in coarse_sizes)),
        canvas=(max(h for h, _ in image_sizes), max(w for _, w in image_sizes)), frames=frames,
        object_image=object_image, text_index=text_index, text_valid=text_valid,
        sam_pixels=sam.pixels if sam is not None else None, sam_resized=sam.resized if sam is not None else None,
        sam_embeddings=sam.embeddings if cached else None,
        sam_missing=torch.tensor(sam.encoded, dtype=torch.long) if cached else None,
        sam_missing_names=[sam.names[b] for b in sam.encoded] if cached else [],
        gt_canvas=gt, coarse_targets=coarse_targets, lmm_cached=lmm_cached, lmm_missing=lmm_missing,
        row_sample=row_sample if with_clips else None, row_frame=row_frame,
        row_group=row_group,
    )


def clip_rows(batch: dict[str, Any], lmm: PreparedLMMInputs, *, train: bool, clip_frames: str, temporal: int
              ) -> tuple[list[int], list[int], list[int]]:
    """The head rows of a batch with clips (see the module docstring): per row its sample, frame (-1: an image)
    and frame group (-1: an image); `temporal`: frames per group (the vision config's temporal_patch_size).

    Raises:
        ValueError: a clip sample with ground truth on no frame (in training), or whose `has_gt` / frames do not
            match its frame times.
    """
    row_sample, row_frame, row_group = [], [], []
    for b, clip in enumerate(lmm.grounded_clip):
        if clip < 0:  # grounded on an image: one row
            row_sample.append(b), row_frame.append(-1), row_group.append(-1)
            continue
        frames = batch["clips"][b]
        count = frames.shape[0] if frames is not None else 0
        groups = int(lmm.video_grid_thw[clip, 0])
        if frames is None or -(-count // temporal) != groups:
            raise ValueError(f"sample {b}: its clip has {count} frames, but its video_grid_thw holds {groups} frame "
                             f"groups of {temporal}")
        if train:
            flags = batch["has_gt"][b]
            if flags is None or flags.shape != (count,):
                raise ValueError(f"sample {b}: has_gt must be ({count},) bool, one flag per frame")
            chosen = torch.nonzero(flags.cpu()).flatten().tolist()
            if not chosen:
                raise ValueError(f"sample {b} ({batch['metas'][b].get('video', '?')}): no frame of its clip has "
                                 f"ground truth, so it gives no loss; drop it from the training set")
        else:
            chosen = list(range(0, count, temporal)) if clip_frames == "keys" else list(range(count))
        for frame in chosen:
            row_sample.append(b), row_frame.append(frame), row_group.append(frame // temporal)
    return row_sample, row_frame, row_group


def read_lmm_cache(batch: dict[str, Any], lmm: PreparedLMMInputs, cache: LMMOutputCache
                   ) -> tuple[CachedLMMOutputs | None, list[tuple[int, str, int]]]:
    """The batch's LMM outputs from `cache` when it holds every sample whole, else (None, the samples to write).

    All or nothing: a batch with one miss runs the LMM for all its samples exactly as without a cache (and writes the
    misses), so no sample is computed in another batch composition than the uncached run's."""
    names = sample_digests(batch, images_per_sample=lmm.images_per_sample)
    tokens = lmm.queries.query_valid.sum(1).tolist()  # (B,) phrase tokens per sample
    entries = [cache.read(name, num_objects=lmm.num_objects[b], grid_hw=tuple(lmm.grounded_grid_hw[b]),
                          num_tokens=tokens[b]) for b, name in enumerate(names)]
    missing = [(b, name, tokens[b]) for b, (name, entry) in enumerate(zip(names, entries, strict=True))
               if entry is None]
    if missing:
        return None, missing
    layers, _, hidden = entries[0][1].shape
    rows = torch.zeros((layers, len(names), lmm.queries.query_index.shape[1], hidden), dtype=entries[0][1].dtype)
    for b, (_, entry_rows) in enumerate(entries):
        rows[:, b, :entry_rows.shape[1]] = entry_rows
    return CachedLMMOutputs(attention_maps=[maps for maps, _ in entries], phrase_rows=rows), []
