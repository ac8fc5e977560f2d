"""The inference API over a FrozenQwenSAM, as segment-anything's `SamPredictor` sits over `Sam`.

`GroundingPredictor(model)` takes PIL images and text, builds exactly the prompt training builds (the chat template
with one compact image placeholder, the phrases joined in the assistant turn), runs the model once and returns
masks at the image's original size. The model stays a pure batch -> logits / losses module; `FrozenQwenSAM.segment`
is a one-line convenience over this class.

`chat` answers a question about one or more images with the frozen LMM (the base model's own answer: greedy by
default) and grounds parts of the answer (phrases, spans, or spaCy noun phrases) with ONE teacher-forced forward over
prompt + answer through the training path. `visual_cot` is F-LMM's visual chain-of-thought on top of it.
`FrozenQwenSAM.chat` / `.visual_cot` are one-line conveniences over these methods.

An image whose aspect ratio the Qwen processor refuses (beyond 200:1) is letterboxed: padded at the bottom or right,
segmented, and its masks cropped back, so they are exact at the original size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import EllipsisType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from flmm_model.data.clip_pixels import qwen_clip_inputs
from flmm_model.data.clips import DEFAULT_FPS, ClipFrames, FrameSample, sample_frames
from flmm_model.data.errors import DataError
from flmm_model.data.images import image_tensor, letterbox, qwen_image_inputs, to_rgb
from flmm_model.data.item import make_clip_item
from flmm_model.data.loader import collate
from flmm_model.data.prompts import (
    ChatPrompt,
    build_chat_prompt,
    encode_chat,
    encode_grounded,
    expression_parts,
    video_instruction,
)
from flmm_model.errors import InputError, MissingDependencyError
from flmm_model.phrases import DEFAULT_SPACY_MODEL, NOUN_PHRASES, resolve_spans, spacy_missing_message

# F-LMM's visual chain-of-thought (v1) texts. F-LMM's thought prefix starts with a space because its templates end the
# assistant header with "Assistant:"; Qwen's header ends with a newline, so the prefix here has none.
COT_INSTRUCTION = "First think which object in this image is most relevant to the question."
COT_THOUGHT_PREFIX = "The object most relevant to the question is"
COT_ANSWER_INSTRUCTION = "\nAnswer the question using a single word or phrase."
DEFAULT_MAX_FRAMES = 16  # the frames of a clip the frozen LMM watches (more are sampled evenly, never cut)

if TYPE_CHECKING:  # annotations only: the network never imports this module, and this module needs only its methods
    from flmm_model.modeling.grounding import GroundingModel


class GroundingPredictor:
    """Segment phrases in PIL images with a FrozenQwenSAM (any `modeling.grounding.GroundingModel`).

    Args:
        model: the model; its `tokenizer`, `image_processor`, `instruction`, `system` and `max_length` (what it was
            trained with) define the prompt.
    """

    def __init__(self, model: GroundingModel) -> None:
        if model.tokenizer is None or model.image_processor is None:
            raise ValueError("GroundingPredictor needs the model's tokenizer and image processor: build the model "
                             "with `build_model` / `FrozenQwenSAM.from_pretrained`, or pass tokenizer= and "
                             "image_processor= to FrozenQwenSAM")
        self.model = model

    def encode(self, image: Image.Image, phrases: Sequence[str]) -> dict[str, Any]:
        """The collated one-sample batch for `image` and `phrases` (the model's input; no gt_masks).

        The batch's image is `image` letterboxed when its aspect ratio needs it (see the module docstring); its meta
        holds the original `size` (H, W) to crop the masks to.

        Raises:
            InputError (a ValueError): no phrase, an empty or non-string phrase (named by its index), a special
                token in a phrase, or a text longer than the model's `max_length` tokens.
        """
        model = self.model
        input_ids, mask_ids = encode_grounded(model.tokenizer, expression_parts(list(phrases)),
                                              instruction=model.instruction, system=model.system,
                                              max_length=model.max_length)
        image = to_rgb(image)
        padded = letterbox(image)
        pixel_values, image_grid_thw = qwen_image_inputs(padded, model.image_processor)
        item = dict(input_ids=input_ids, mask_ids=mask_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                    image=image_tensor(padded), gt_masks=None, phrases=list(phrases),
                    meta={"size": (image.height, image.width)})
        return collate([item], pad_token_id=model.tokenizer.pad_token_id)

    @torch.no_grad()
    def segment(self, image: Image.Image, phrases: str | Sequence[str]) -> torch.Tensor:
        """Masks for one or more phrases: (K, H, W) bool at the image's original size, on the CPU.

        Raises:
            InputError (a ValueError): see `encode`.
        """
        phrase_list = [phrases] if isinstance(phrases, str) else list(phrases)
        if not phrase_list:
            raise InputError("segment(): expected at least one phrase, found none")
        batch = self.encode(image, phrase_list)
        height, width = batch["metas"][0]["size"]
        return self.model.predict_masks(batch)[0][:, :height, :width].cpu()  # (K, H, W): letterbox cropped off

    def encode_clip(self, frames: Sequence[Image.Image], phrases: Sequence[str], *,
                    times: Sequence[float] | None = None, max_frames: int = DEFAULT_MAX_FRAMES
                    ) -> tuple[dict[str, Any], FrameSample]:
        """The collated one-clip batch the frozen LMM watches, and which frames it holds: the frames chosen by the
        budget rule (`data.clips.sample_frames`: all of them within `max_frames`, else evenly spaced; never cut),
        their times (`times` in seconds, default frame / `data.clips.DEFAULT_FPS`), one compact `<|video_pad|>`,
        the model's instruction with "video" for "image".

        Raises:
            InputError (a ValueError): frames of different sizes or a size the processor refuses, bad phrases, a
                budget under 2 frames, times that are not one per frame.
        """
        model = self.model
        pictures = [np.asarray(to_rgb(frame)) for frame in frames]
        if times is None:
            times = np.arange(len(pictures), dtype=np.float64) / DEFAULT_FPS
        times = np.asarray(times, dtype=np.float64)
        try:
            sample = sample_frames(len(pictures), times, max_frames=max_frames)
            chosen = torch.from_numpy(np.stack([pictures[i] for i in sample.indices]))  # (N, H, W, 3)
            count, height, width = chosen.shape[:3]
            item = make_clip_item(
                frames=chosen, times=torch.from_numpy(times[sample.indices]),
                gt_masks=torch.zeros((len(phrases), count, height, width), dtype=torch.bool),
                has_gt=torch.zeros(count, dtype=torch.bool), parts=expression_parts(list(phrases)),
                meta={"size": (height, width), "video": "clip"}, tokenizer=model.tokenizer,
                image_processor=model.image_processor, instruction=video_instruction(model.instruction),
                system=model.system, max_length=model.max_length, sample="segment_clip()")
        except (DataError, ValueError) as error:
            raise InputError(f"segment_clip(): {error}") from error
        return collate([item], pad_token_id=model.tokenizer.pad_token_id), sample

    @torch.no_grad()
    def segment_clip(self, frames: Sequence[Image.Image], phrases: str | Sequence[str], *,
                     key_frame: int | None = None, times: Sequence[float] | None = None,
                     max_frames: int = DEFAULT_MAX_FRAMES) -> torch.Tensor:
        """Masks for phrases through a clip: (K, T, H, W) bool on CPU, every frame.

        Default (`key_frame=None`): the frozen LMM watches the clip (`encode_clip`: up to `max_frames` frames, as
        one video input), the heads read each frame group's maps and refine its first frame (the key frames), and
        a SAM2 video model as the refiner carries the key frames' masks through every frame of the clip with its
        memory (`GroundingModel.complete_clip`); any other refiner refines every watched frame, and a frame the
        budget left out takes its nearest watched frame's mask.

        `key_frame=k`: the phrases are grounded on frame k alone, as on an image, and SAM2's memory tracks them
        (the key frame keeps its grounded mask); any other refiner then grounds every frame on its own.

        Raises:
            InputError: no frame, frames of different sizes, a key frame outside the clip, or a bad phrase.
        """
        frames = [to_rgb(frame) for frame in frames]
        if not frames:
            raise InputError("segment_clip(): expected at least one frame, found none")
        sizes = {frame.size for frame in frames}
        if len(sizes) != 1:
            raise InputError(f"segment_clip(): frames must share one size, found sizes (W, H) {sorted(sizes)}")
        phrase_list = [phrases] if isinstance(phrases, str) else list(phrases)
        if key_frame is None:
            batch, sample = self.encode_clip(frames, phrase_list, times=times, max_frames=max_frames)
            return self.watched_masks(batch, sample, [image_tensor(frame) for frame in frames])
        if not 0 <= key_frame < len(frames):
            raise InputError(f"segment_clip(): key_frame {key_frame} is outside the clip's {len(frames)} frames")
        if not self.model.propagates:
            return torch.stack([self.segment(frame, phrases) for frame in frames], dim=1)  # (K, T, H, W)
        batch = self.encode(frames[key_frame], phrase_list)
        height, width = batch["metas"][0]["size"]
        with self.model.evaluating():
            key_logits = self.model.predict_logits(batch)[1][0][:, :height, :width]  # (K, H, W)
        # SAM2's memory carries the key frame's masks through the clip; the key frame keeps its grounded mask
        logits = self.model.complete_clip([image_tensor(frame) for frame in frames], {key_frame: key_logits})
        return (logits > 0).cpu()

    @torch.no_grad()
    def watched_masks(self, batch: dict[str, Any], sample: FrameSample, frames: Sequence[torch.Tensor]
                      ) -> torch.Tensor:
        """(K, T, H, W) bool masks on every source frame of a one-clip batch the LMM watched (the `sample` of
        `frames`, T uint8 (3, H, W) tensors): the key frames refined, SAM2's memory completing the clip, or (no
        video memory) every watched frame refined and each source frame given its nearest watched frame's."""
        watched = self.model.clip_key_logits(batch)[0]  # {sampled position: (K, H, W)}
        if not self.model.propagates:
            return torch.stack([watched[int(p)] > 0 for p in sample.nearest], dim=1).cpu()  # (K, T, H, W)
        keys: dict[int, torch.Tensor] = {}
        for position, logits in watched.items():
            keys.setdefault(int(sample.indices[position]), logits)  # a padding repeat: its original's
        return (self.model.complete_clip(frames, keys) > 0).cpu()

    # ------------------------------------------------------------------ chat: answer with the frozen LMM, then ground

    def chat(
        self,
        image: Image.Image | Sequence[Image.Image],
        question: str,
        *,
        ground: Any = None,
        system: str | None | EllipsisType = ...,
        history: Sequence[tuple[str, str]] = (),
        answer_prefix: str = "",
        grounded_image: int = 0,
        max_new_tokens: int = 512,
        spacy_model: str = DEFAULT_SPACY_MODEL,
        **generate_options: Any,
    ) -> ChatOutput:
        """Answer `question` about the image(s) with the frozen LMM, then ground parts of the answer.

        The prompt is what the backbone's chat template renders: the system turn (the template's default unless
        `system` is given; None = none), the earlier turns of `history`, and the user turn holding the image
        block(s) and then the question, followed by the assistant header (and `answer_prefix`, if any). With a
        history, the images sit at the start of the first user turn, where the conversation began. Generation is
        greedy unless `do_sample=True` is passed; it stops at the end of the turn.

        Masks come from ONE teacher-forced forward over prompt + answer (through the capture, U-Net and SAM path of
        training), the chosen spans mapped to tokens through the tokenizer's offsets; no attention is kept while
        generating.

        Args:
            image: a PIL image, or a list of them (a multi-image question; images in order), or a clip
                (`data.clips.ClipFrames`, e.g. `read_clip(path)`: see `chat_clip`).
            question: the user's text.
            ground: None (no masks), a list of phrases of the answer, a list of (start, end) character spans of
                the answer, "noun_phrases" (spaCy), or a callable answer -> spans (see `flmm_model.phrases`).
            system: the system prompt (default: the chat template's; None: no system turn).
            history: earlier (question, answer) turns of this conversation (e.g. `previous.history`).
            answer_prefix: text the answer is forced to begin with (part of `answer`), e.g. "It is".
            grounded_image: which image the masks are for (index into the images).
            max_new_tokens: longest answer in tokens.
            spacy_model: the spaCy English pipeline for "noun_phrases" (name or path).
            generate_options: passed to transformers' `generate` (`do_sample`, `temperature`, `top_p`,
                `repetition_penalty`, `stop_strings` + `tokenizer`, ...).

        Returns:
            ChatOutput (answer, phrases, spans, masks at the grounded image's original size, token_ids, history).

        Raises:
            InputError (a ValueError): no image, an empty question or one with a control token, a phrase that is not
                in the answer (named, with the answer), a bad span, an image index out of range.
            MissingDependencyError (an ImportError): "noun_phrases" without spaCy or its pipeline.
        """
        if isinstance(image, ClipFrames):
            if history:
                raise InputError("chat: a clip conversation takes one turn (history is for images)")
            return self.chat_clip(image, question, ground=ground, system=system, answer_prefix=answer_prefix,
                                  max_new_tokens=max_new_tokens, spacy_model=spacy_model, **generate_options)
        images = _image_list(image)
        _check_question(question)
        if isinstance(history, (str, bytes)) or not all(
                isinstance(turn, (tuple, list)) and len(turn) == 2 for turn in history):
            raise InputError("chat: history must be a list of (question, answer) pairs (e.g. a previous "
                             "ChatOutput.history)")
        _check_ground(ground, spacy_model)
        earlier = [[*images, history[0][0]]] + [[turn[0]] for turn in history[1:]] if history else []
        turns = [*earlier, [question] if history else [*images, question]]
        return self.chat_turns(
            images, turns, answers=[turn[1] for turn in history], ground=lambda answer: resolve_spans(
                answer, ground, spacy_model=spacy_model),
            system=system, answer_prefix=answer_prefix, grounded_image=grounded_image,
            max_new_tokens=max_new_tokens, question=question, **generate_options,
        )

    @torch.no_grad()
    def chat_clip(
        self,
        clip: ClipFrames,
        question: str,
        *,
        ground: Any = None,
        system: str | None | EllipsisType = ...,
        answer_prefix: str = "",
        max_new_tokens: int = 512,
        max_frames: int = DEFAULT_MAX_FRAMES,
        spacy_model: str = DEFAULT_SPACY_MODEL,
        **generate_options: Any,
    ) -> ChatOutput:
        """Answer `question` about a clip with the frozen LMM watching it, then ground parts of the answer through
        every frame of the clip.

        The frames it watches follow the budget rule (`data.clips.sample_frames`: all within `max_frames`, else
        evenly spaced; never cut), with their own times (the model's time positions, Qwen3-VL's timestamps). The
        prompt is the chat template's user turn holding the clip's compact video block, then the question. The
        masks come from ONE teacher-forced forward over prompt + answer with the clip, read per frame group as
        `segment_clip` reads them (SAM2's memory completing the clip).

        Returns:
            ChatOutput with `masks` (K, T, H, W) bool over the clip's T frames and `grounded_image` -1 (a clip).

        Raises:
            InputError (a ValueError): an empty question, a bad frame budget, frames the processor refuses, a
                phrase not in the answer. MissingDependencyError: "noun_phrases" without spaCy.
        """
        model, tokenizer = self.model, self.model.tokenizer
        _check_question(question)
        _check_ground(ground, spacy_model)
        try:
            sample = sample_frames(len(clip), clip.times, max_frames=max_frames)
            watched = torch.from_numpy(np.ascontiguousarray(clip.frames[sample.indices]))  # (N, H, W, 3)
            pixel_values_videos, video_grid_thw = qwen_clip_inputs(watched.numpy(), model.image_processor)
        except (DataError, ValueError) as error:
            raise InputError(f"chat: {error}") from error
        times = torch.from_numpy(np.asarray(clip.times, dtype=np.float64)[sample.indices])  # (N,) seconds
        video = dict(pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                     video_frame_times=[times])
        prompt = self.chat_prompt([[clip, question]], system=system, answer_prefix=answer_prefix)
        text, token_ids, _ = self._generate(prompt, None, max_new_tokens=max_new_tokens, video=video,
                                            **generate_options)
        answer = answer_prefix + text
        spans = resolve_spans(answer, ground, spacy_model=spacy_model)
        height, width = watched.shape[1:3]
        masks = torch.zeros((0, len(clip), height, width), dtype=torch.bool)
        if spans:
            input_ids, mask_ids = encode_chat(tokenizer, prompt, answer=answer, spans=spans,
                                              max_length=model.max_length)
            item = dict(input_ids=input_ids, mask_ids=mask_ids, pixel_values_videos=pixel_values_videos,
                        video_grid_thw=video_grid_thw, video_frame_times=times, frames=watched, gt_masks=None,
                        has_gt=None, phrases=[answer[s:e] for s, e in spans], meta={"size": (height, width)})
            batch = collate([item], pad_token_id=tokenizer.pad_token_id)
            frames = [torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1) for frame in clip.frames]
            masks = self.watched_masks(batch, sample, frames)
        return ChatOutput(answer=answer, phrases=[answer[s:e] for s, e in spans], spans=list(spans), masks=masks,
                          token_ids=token_ids, history=[(question, answer)], grounded_image=-1)

    def chat_turns(
        self,
        images: list[Image.Image],
        turns: list[list[Any]],
        *,
        answers: Sequence[str] = (),
        ground: Callable[[str], list[tuple[int, int]]],
        system: str | None | EllipsisType = ...,
        answer_prefix: str = "",
        grounded_image: int = 0,
        max_new_tokens: int = 512,
        question: str = "",
        **generate_options: Any,
    ) -> ChatOutput:
        """`chat` on a conversation given as user-turn contents (text and images interleaved as the chat template
        renders them: `str` items are text, PIL images are images, in order; `images` lists them in that order).

        `ground` maps the final answer text to the character spans to ground. `question` is recorded in the history.
        """
        prompt = self.chat_prompt(turns, answers=answers, system=system, answer_prefix=answer_prefix)
        if prompt.num_images != len(images) or not images:
            raise InputError(f"chat: the conversation holds {prompt.num_images} images but {len(images)} were given "
                             f"(at least one is needed)")
        if not 0 <= grounded_image < len(images):
            raise InputError(f"chat: grounded_image {grounded_image} does not exist; {len(images)} image(s) given, "
                             f"indices 0..{len(images) - 1}")
        # Each image preprocessed once and the vision tower run once: the grounding forward reuses generation's
        # image inputs and vision features (the same pixels give the same features).
        image_inputs = self._image_inputs(images)
        answer, token_ids, vision = self._generate(prompt, image_inputs, max_new_tokens=max_new_tokens,
                                                   **generate_options)
        answer = answer_prefix + answer
        spans = ground(answer)
        masks = self.ground_answer(prompt, answer, spans, images, grounded_image=grounded_image,
                                   image_inputs=image_inputs, vision=vision)
        return ChatOutput(answer=answer, phrases=[answer[s:e] for s, e in spans], spans=list(spans), masks=masks,
                          token_ids=token_ids, history=[*zip(_turn_questions(turns, question), [*answers, answer],
                                                             strict=True)],
                          grounded_image=grounded_image)

    def chat_prompt(self, turns: list[list[Any]], *, answers: Sequence[str] = (),
                    system: str | None | EllipsisType = ..., answer_prefix: str = "") -> ChatPrompt:
        """The model's chat template over `turns` (see `data.prompts.build_chat_prompt`); `...` = its default
        system prompt."""
        adapter = self.model.lmm.adapter
        return build_chat_prompt(self.model.tokenizer, turns, answers=answers,
                                 system=adapter.default_system if system is ... else system,
                                 answer_prefix=answer_prefix, image_block=adapter.image_block)

    def _image_inputs(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor, list[Image.Image]]:
        """pixel_values and image_grid_thw of the images (letterboxed where their aspect ratio needs it)."""
        padded = [letterbox(to_rgb(image)) for image in images]
        inputs = [qwen_image_inputs(picture, self.model.image_processor) for picture in padded]
        return torch.cat([p for p, _ in inputs]), torch.cat([g for _, g in inputs]), padded

    @torch.no_grad()
    def generate(self, prompt: ChatPrompt, images: Sequence[Image.Image], *, max_new_tokens: int = 512,
                 **generate_options: Any) -> tuple[str, torch.Tensor]:
        """The generated continuation of `prompt` (after its answer prefix): (text without special tokens, (T,)
        ids on the CPU without the end-of-turn token)."""
        text, token_ids, _ = self._generate(prompt, self._image_inputs(images), max_new_tokens=max_new_tokens,
                                            **generate_options)
        return text, token_ids

    def _generate(self, prompt: ChatPrompt,
                  image_inputs: tuple[torch.Tensor, torch.Tensor, list[Image.Image]] | None, *,
                  max_new_tokens: int, video: dict[str, Any] | None = None,
                  **generate_options: Any) -> tuple[str, torch.Tensor, Any]:
        """`generate` on images already preprocessed (`_image_inputs`; None: no image) and a clip's inputs
        (`video`: pixel_values_videos, video_grid_thw, video_frame_times); also returns the vision features."""
        tokenizer = self.model.tokenizer
        input_ids, _ = encode_chat(tokenizer, prompt, max_length=self.model.max_length)
        pixel_values, image_grid_thw, _ = image_inputs or (None, None, None)
        end_ids = self.end_token_ids()
        options = dict(max_new_tokens=max_new_tokens, eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
        options.update(generate_options)
        new_ids, vision = self.model.generate(input_ids[None], torch.ones_like(input_ids)[None], pixel_values,
                                              image_grid_thw, return_vision=True, **(video or {}), **options)
        new_ids = new_ids[0].cpu()  # (T,)
        stops = torch.isin(new_ids, torch.tensor(end_ids)).nonzero().flatten()
        token_ids = new_ids[: int(stops[0])] if stops.numel() else new_ids
        text = tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text, token_ids, vision

    def end_token_ids(self) -> list[int]:
        """The ids that end an assistant turn: `<|im_end|>` and `<|endoftext|>`."""
        tokenizer = self.model.tokenizer
        return [tokenizer.convert_tokens_to_ids(token) for token in ("<|im_end|>", "<|endoftext|>")]

    @torch.no_grad()
    def ground_answer(self, prompt: ChatPrompt, answer: str, spans: Sequence[tuple[int, int]],
                      images: Sequence[Image.Image], *, grounded_image: int = 0,
                      image_inputs: tuple[torch.Tensor, torch.Tensor, list[Image.Image]] | None = None,
                      vision: Any = None) -> torch.Tensor:
        """Masks of `answer[start:end]` for each span: one teacher-forced forward over prompt + answer.

        `image_inputs` (`_image_inputs(images)`) and `vision` (their vision features, from generation): reused
        instead of preprocessing the images and running the vision tower again.

        Returns:
            (K, H, W) bool at the grounded image's original size, on the CPU (K = 0: no forward at all).
        """
        original = to_rgb(images[grounded_image])
        if not spans:
            return torch.zeros((0, original.height, original.width), dtype=torch.bool)
        batch = self.encode_answer(prompt, answer, spans, images, grounded_image=grounded_image,
                                   image_inputs=image_inputs)
        return self.model.predict_masks(batch, vision=vision)[0][:, :original.height, :original.width].cpu()

    def encode_answer(self, prompt: ChatPrompt, answer: str, spans: Sequence[tuple[int, int]],
                      images: Sequence[Image.Image], *, grounded_image: int = 0,
                      image_inputs: tuple[torch.Tensor, torch.Tensor, list[Image.Image]] | None = None
                      ) -> dict[str, Any]:
        """The collated one-sample batch of the grounding forward: prompt + answer, span k's tokens = object k
        (`image_inputs`: the images already preprocessed by `_image_inputs`)."""
        input_ids, mask_ids = encode_chat(self.model.tokenizer, prompt, answer=answer, spans=spans,
                                          max_length=self.model.max_length)
        pixel_values, image_grid_thw, padded = image_inputs or self._image_inputs(images)
        original = to_rgb(images[grounded_image])
        item = dict(input_ids=input_ids, mask_ids=mask_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                    image=image_tensor(padded[grounded_image]), gt_masks=None, grounded_image=grounded_image,
                    phrases=[answer[s:e] for s, e in spans], meta={"size": (original.height, original.width)})
        return collate([item], pad_token_id=self.model.tokenizer.pad_token_id)

    @torch.no_grad()
    def answer_then_ground(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Masks for a collated batch whose metas request an answer first (`meta["generate"]` = {question,
        answer_prefix, max_new_tokens}; ReasonSeg's F-LMM protocol): per sample, the model answers the question
        about the sample's image (greedy), and the generated part of the answer (after the prefix, stripped) is
        grounded as one phrase. An empty generated answer gives an empty mask.

        Returns:
            Per sample (1, H, W) bool at the image's size, on the CPU. The answers are written into each meta as
            `answer`.
        """
        predictions = []
        for image, meta in zip(batch["images"], batch["metas"], strict=True):
            request = meta["generate"]
            picture = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())  # (H, W, 3) uint8
            prefix = request.get("answer_prefix", "")
            out = self.chat_turns([picture], [[picture, request["question"]]], ground=_generated_span(prefix),
                                  answer_prefix=prefix, max_new_tokens=request.get("max_new_tokens", 16),
                                  question=request["question"])
            meta["answer"] = out.answer
            masks = out.masks if out.spans else torch.zeros((1, picture.height, picture.width), dtype=torch.bool)
            predictions.append(masks)
        return predictions

    # ------------------------------------------------------------------ visual chain-of-thought (F-LMM's v1)

    @torch.no_grad()
    def visual_cot(
        self,
        image: Image.Image,
        question: str,
        *,
        thought_instruction: str = COT_INSTRUCTION,
        thought_prefix: str = COT_THOUGHT_PREFIX,
        answer_instruction: str = COT_ANSWER_INSTRUCTION,
        max_thought_tokens: int = 16,
        max_new_tokens: int = 32,
        box_scale: float = 1.0,
        min_box_half_size: int = 8,
        system: str | None | EllipsisType = ...,
        **generate_options: Any,
    ) -> VisualCotOutput:
        """F-LMM's visual chain-of-thought (v1): find the relevant object, ground it, look closer, answer.

        1. Ask which object is most relevant: user turn = image + `question` + `thought_instruction` (no space
           between them, as F-LMM), the answer forced to start with `thought_prefix`; at most `max_thought_tokens`
           new tokens, stopping at the first ".". The thought is the generated text before that ".".
        2. Ground the thought (one phrase) in the image: its mask.
        3. The mask's box, scaled by `box_scale` about its centre, each half-side at least `min_box_half_size`
           pixels, clipped to the image (the whole image when the mask is empty); crop it.
        4. Answer in one multi-image turn: "<image>the whole image, <image>the image region that might help you
           answer the question: {question}{answer_instruction}", at most `max_new_tokens` tokens.

        Returns:
            VisualCotOutput: thought, box (x0, y0, x1, y1) in pixels (x1, y1 exclusive), mask (H, W) bool, answer,
            the crop, and both rounds' ChatOutputs.
        """
        picture = to_rgb(image) if isinstance(image, Image.Image) else image
        if not isinstance(picture, Image.Image):
            raise InputError(f"visual_cot: expected one PIL image, found {type(image).__name__}")
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"visual_cot: the question must be a non-empty str, found {question!r}")
        if box_scale <= 0 or min_box_half_size < 0:
            raise InputError(f"visual_cot: box_scale must be > 0 and min_box_half_size >= 0, found {box_scale} and "
                             f"{min_box_half_size}")
        thought_options = dict(generate_options, stop_strings=["."], tokenizer=self.model.tokenizer)
        first = self.chat_turns([picture], [[picture, question + thought_instruction]], ground=_thought_span(
            thought_prefix), system=system, answer_prefix=thought_prefix, max_new_tokens=max_thought_tokens,
            question=question + thought_instruction, **thought_options)
        thought = first.phrases[0] if first.phrases else ""
        mask = first.masks[0] if first.phrases else torch.zeros((picture.height, picture.width), dtype=torch.bool)
        box = expand_box(mask, scale=box_scale, min_half_size=min_box_half_size)
        crop = picture.crop(box)
        second_question = f"the image region that might help you answer the question: {question}{answer_instruction}"
        second = self.chat_turns([picture, crop], [[picture, "the whole image, ", crop, second_question]],
                                 ground=lambda answer: [], system=system, max_new_tokens=max_new_tokens,
                                 question=second_question, **generate_options)
        return VisualCotOutput(thought=thought, box=box, mask=mask, answer=second.answer, crop=crop,
                               thought_output=first, answer_output=second)



@dataclass
class ChatOutput:
    """One answered turn of `chat`, with the grounded parts of the answer.

    Attributes:
        answer: the assistant's text (the answer prefix, if any, then the generated text; special tokens removed).
        phrases: K grounded phrases in answer order; `answer[spans[k][0]:spans[k][1]] == phrases[k]`.
        spans: K (start, end) character offsets into `answer`.
        masks: (K, H, W) bool at the grounded image's original size, on the CPU (K = 0 without grounding); a clip:
            (K, T, H, W) over its frames.
        token_ids: (T,) long, the generated ids without the end-of-turn token, on the CPU.
        history: the conversation's (question, answer) turns including this one: pass it as `history=` to continue.
        grounded_image: the index of the image the masks are for (-1: the clip).
    """

    answer: str
    phrases: list[str]
    spans: list[tuple[int, int]]
    masks: torch.Tensor
    token_ids: torch.Tensor
    history: list[tuple[str, str]] = field(default_factory=list)
    grounded_image: int = 0


@dataclass
class VisualCotOutput:
    """The result of `visual_cot`.

    Attributes:
        thought: the generated name of the most relevant object (before the first ".").
        box: (x0, y0, x1, y1) pixel box of the crop in the original image (x1, y1 exclusive).
        mask: (H, W) bool, the thought's mask at the image's size (all False when nothing was grounded).
        answer: the final answer, from the whole image and the crop together.
        crop: the cropped region (PIL image).
        thought_output, answer_output: the two rounds' ChatOutputs.
    """

    thought: str
    box: tuple[int, int, int, int]
    mask: torch.Tensor
    answer: str
    crop: Image.Image
    thought_output: ChatOutput
    answer_output: ChatOutput


def expand_box(mask: torch.Tensor, *, scale: float = 1.0, min_half_size: int = 8) -> tuple[int, int, int, int]:
    """The box of an (H, W) bool mask, scaled by `scale` about its centre, each half-side at least `min_half_size`
    pixels, clipped to the image: (x0, y0, x1, y1) with x1, y1 exclusive. The whole image for an empty mask."""
    height, width = mask.shape
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    if rows.numel() == 0:
        return 0, 0, width, height
    x0, x1, y0, y1 = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
    centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
    half_w = max((x1 - x0) / 2 * scale, min_half_size)
    half_h = max((y1 - y0) / 2 * scale, min_half_size)
    box = (max(0, math.floor(centre_x - half_w)), max(0, math.floor(centre_y - half_h)),
           min(width, math.ceil(centre_x + half_w)), min(height, math.ceil(centre_y + half_h)))
    return box


def _thought_span(prefix: str) -> Callable[[str], list[tuple[int, int]]]:
    """Grounding rule of the thought: the generated text after `prefix`, up to the first ".", stripped."""

    def spans(answer: str) -> list[tuple[int, int]]:
        body = answer[len(prefix):].split(".", 1)[0]
        start = len(prefix) + len(body) - len(body.lstrip())
        end = len(prefix) + len(body.rstrip())
        return [(start, end)] if end > start else []

    return spans


def _generated_span(prefix: str) -> Callable[[str], list[tuple[int, int]]]:
    """Grounding rule of an answer-then-ground protocol: everything generated after `prefix`, stripped."""

    def spans(answer: str) -> list[tuple[int, int]]:
        body = answer[len(prefix):]
        start, end = len(prefix) + len(body) - len(body.lstrip()), len(prefix) + len(body.rstrip())
        return [(start, end)] if end > start else []

    return spans


def _check_question(question: Any) -> None:
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"chat: the question must be a non-empty str, found {question!r}")


def _check_ground(ground: Any, spacy_model: str) -> None:
    """"noun_phrases" needs spaCy and its pipeline: checked before generating (the answer would be lost)."""
    if isinstance(ground, str) and ground == NOUN_PHRASES:
        problem = spacy_missing_message(spacy_model)
        if problem:
            raise MissingDependencyError(problem)


def _image_list(image: Any) -> list[Image.Image]:
    images = [image] if isinstance(image, Image.Image) else list(image) if isinstance(image, (list, tuple)) else None
    if not images or not all(isinstance(picture, Image.Image) for picture in images):
        raise InputError(f"chat: expected a PIL image or a non-empty list of PIL images, found "
                         f"{type(image).__name__}")
    return [to_rgb(picture) for picture in images]


def _turn_questions(turns: list[list[Any]], last_question: str) -> list[str]:
    """The text of each user turn (its str items joined), the last one being `last_question` when given."""
    texts = ["".join(item for item in content if isinstance(item, str)) for content in turns]
    if last_question:
        texts[-1] = last_question
    return texts
