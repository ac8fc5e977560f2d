"""Command line of flmm_model: `python run.py <command> [options] [key=value ...]`.

Commands (a dict maps each name to a plain function returning a dict):
    train        train the heads of FrozenQwenSAM (torchrun for several GPUs)
    eval         score a checkpoint on data.test: RefCOCO/+/g cIoU & gIoU, PNG Average Recall
    predict      masks for phrases on one image (a PNG per phrase and an overlay) or through a clip (--video)
    chat         ask the frozen LMM about an image; its answer, with grounded phrases as masks and an overlay
    demo         a web demo (Gradio, the [demo] extra): segment phrases in uploaded images, with an HTTP API
    convert-sam  convert an original segment-anything checkpoint (sam_vit_l_0b3195.pth) to the transformers layout
    cache-sam    fill data.sam_cache with the SAM image embeddings of every training image
    cache-lmm    fill data.lmm_cache with the frozen LMM's outputs for every training sample
    pretrain-lmm caption-pretrain the tiny Qwen2.5-VL on the synthetic scenes (the demo's frozen LMM)

`main(argv)` is the whole program and returns the command's dict (or raises); `cli(argv)` runs it as the command line
does: every failure becomes one line `error: ...` on stderr and an exit status, 2 for a mistake the user can fix (a
bad config, argument, path, input file, phrase or image; a full disk or a directory they cannot write; see
`flmm_model.errors.UserError`), 1 for an internal failure (a bug), 130 for Ctrl-C. No traceback unless `--debug` is
given (anywhere on the command line) or FLMM_DEBUG=1 is set. Only the `__main__` block exits the process.
Each command imports its module when it runs, so `run.py --help` answers without loading torch and transformers.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
DEFAULT_PRETRAIN_CONFIG = REPO / "configs" / "demo_lmm.yaml"

OVERRIDES_HELP = """\
overrides:
  Any config key can be set after the options as key=value (dotted path, no spaces around '='); values use YAML
  syntax. Examples:
    train.lr=3e-4  train.max_steps=200  data.batch_size=4  model.dtype=bfloat16
    data.root=/data/coco  model.qwen=/ckpt/Qwen2.5-VL-3B-Instruct  train.resume=latest
    data.train.0.max_samples=100  (list items by index)   model.mask_head_widths=[32,64,128,256]
  An unknown key, a wrong type or a value outside its choices stops the run before any weights load, naming the
  key (and the closest known keys for a typo). `run.py <command> --help` lists every key with its default.

errors:
  A failure prints one line `error: ...` and exits 2 for a mistake you can fix (config, arguments, paths, input
  files, disk space), 1 for an internal error. Add --debug anywhere (or set FLMM_DEBUG=1) to see the traceback.
"""
DEBUG_FLAG = "--debug"
DEBUG_ENV = "FLMM_DEBUG"


class UsageError(ValueError):
    """Bad command line (unknown command or option, missing argument)."""


class _HelpShown(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class _Parser(argparse.ArgumentParser):
    """argparse without `sys.exit`: help becomes `_HelpShown`, errors become `UsageError`."""

    def exit(self, status: int = 0, message: str | None = None) -> None:  # noqa: A003
        if status == 0:
            raise _HelpShown(message or "")
        raise UsageError(message or f"{self.prog}: error")

    def error(self, message: str) -> None:
        raise UsageError(f"{self.format_usage()}{self.prog}: error: {message}")

    def print_help(self, file: Any = None) -> None:
        text = self.format_help()
        print(text, file=file or sys.stdout)
        raise _HelpShown(text)


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help=f"experiment YAML (default: {DEFAULT_CONFIG.relative_to(REPO)})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (see below)")


def _schema_epilog(sections: tuple[str, ...]) -> str:
    from flmm_model.config_loader import describe_schema

    lines = [line for line in describe_schema() if any(f" {s}." in line or line.startswith(f"[{s}]")
                                                       for s in sections)]
    return OVERRIDES_HELP + "\nconfig keys (type, default): help\n" + "\n".join(lines)


def build_parser() -> _Parser:
    parser = _Parser(prog="run.py", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=OVERRIDES_HELP)
    commands = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)

    train = commands.add_parser(
        "train", help="train the heads (torchrun --nproc_per_node N run.py train ... for several GPUs)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_schema_epilog(("model", "data", "train")),
        description="Train FrozenQwenSAM's trainable heads (U-Net, text projection, SAM prompt encoder + decoder); "
                    "Qwen and the SAM image encoder stay frozen. Writes config.yaml, metrics.jsonl, metrics.png and "
                    "checkpoints/step_N/ into train.out_dir. Several GPUs: torchrun --nproc_per_node N run.py "
                    "train --config ...")
    _config_args(train)
    train.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                       help="continue from the newest checkpoint in train.out_dir (or from CHECKPOINT)")

    evaluate = commands.add_parser(
        "eval", help="score a checkpoint on data.test", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_schema_epilog(("model", "data", "eval")),
        description="Score a checkpoint on every data.test dataset: RefCOCO/+/g cIoU and gIoU (protocol per "
                    "dataset: flmm or per_sentence), PNG Average Recall. Prints a table, writes eval.json. Several "
                    "GPUs: torchrun --nproc_per_node N run.py eval ...")
    _config_args(evaluate)
    evaluate.add_argument("--checkpoint", default=None, help="checkpoint dir, or a run dir (its newest checkpoint)")

    predict = commands.add_parser(
        "predict", help="masks for phrases on one image", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_schema_epilog(("model",)),
        description="Segment the objects the phrases refer to in one image. Writes mask_<k>_<phrase>.png per phrase "
                    "and overlay.png (masks, contours and labels) into --out.")
    _config_args(predict)
    predict.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir (its newest checkpoint)")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="image file")
    source.add_argument("--video", help="a clip: frames directory, GIF / WebP, or video file (pip install -e "
                                        "\".[video]\"); writes object<k>/<frame>.png and overlay.gif")
    predict.add_argument("--key-frame", type=int, default=None, help="--video: ground the phrases on this frame "
                                                                      "alone, as on an image (default: the LMM "
                                                                      "watches the clip)")
    predict.add_argument("--max-frames", type=int, default=16, help="--video: frames the LMM watches (a longer "
                                                                     "clip is sampled evenly, never cut)")
    predict.add_argument("--fps", type=float, default=None, help="--video: frame rate of a frames directory")
    predict.add_argument("--text", action="append", required=True, help="a phrase; repeat for several objects")
    predict.add_argument("--out", default=None, help="output dir (default: predictions/<image name>)")
    predict.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")

    chat = commands.add_parser(
        "chat", help="ask about an image; ground phrases of the answer", epilog=_schema_epilog(("model",)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The frozen LMM answers --question about --image (greedy, the base model's own answer); the "
                    "answer is printed with the grounded phrases marked [phrase]{k}. --ground PHRASE (repeat) grounds "
                    "phrases of the answer, --noun-phrases every noun phrase (spaCy: pip install -e \".[nlp]\"). "
                    "With --out: mask_<k>_<phrase>.png per phrase, overlay.png and answer.json.")
    _config_args(chat)
    chat.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir (its newest checkpoint)")
    chat.add_argument("--image", action="append", required=True,
                      help="image file; repeat for a multi-image question (masks are for the first)")
    chat.add_argument("--question", required=True, help="the question")
    chat.add_argument("--ground", action="append", default=None, metavar="PHRASE",
                      help="a phrase of the answer to ground; repeat for several (in answer order)")
    chat.add_argument("--noun-phrases", action="store_true", help="ground every noun phrase of the answer (spaCy)")
    chat.add_argument("--spacy-model", default="en_core_web_sm", help="spaCy English pipeline for --noun-phrases")
    chat.add_argument("--max-new-tokens", type=int, default=None,
                      help="longest answer in tokens (default 512; --visual-cot: 32, F-LMM's)")
    chat.add_argument("--visual-cot", action="store_true",
                      help="F-LMM's visual chain-of-thought: ground the most relevant object, crop it, answer with "
                           "the whole image and the crop (writes crop.png)")
    chat.add_argument("--box-scale", type=float, default=1.0, help="--visual-cot: scale of the crop box")
    chat.add_argument("--out", default=None, help="output dir for masks, overlay and answer.json (default: none)")
    chat.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")

    demo = commands.add_parser(
        "demo", help="web demo in the browser (needs the [demo] extra)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_schema_epilog(("model",)),
        description="Serve a Gradio web demo of a checkpoint. Segment: upload an image, type one phrase per line, "
                    "get the overlay, the masks as PNGs and each phrase's pixel share. Chat: ask about the image, get "
                    "the answer with its grounded phrases (typed, or its noun phrases with the [nlp] extra) "
                    "highlighted over several turns. Video: upload a GIF / WebP or video clip, type phrases and a key "
                    "frame, get an overlay GIF and the segmented frames (a longer clip than the frame budget is "
                    "sampled uniformly, and the page says so). The same as the HTTP API /segment, /chat and "
                    "/segment_video (see README). The "
                    "model loads once, before the server starts; requests run one at a time. "
                    "Needs Gradio: pip install -e \".[demo]\"")
    _config_args(demo)
    demo.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir (its newest checkpoint)")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    demo.add_argument("--port", type=int, default=7860, help="port to listen on")
    demo.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    demo.add_argument("--max-side", type=int, default=2048,
                      help="longest image side the model sees; larger images are downscaled (masks come back at the "
                           "original size)")
    demo.add_argument("--max-new-tokens", type=int, default=512, help="longest answer of the Chat tab, in tokens")
    demo.add_argument("--spacy-model", default="en_core_web_sm",
                      help="spaCy English pipeline for the Chat tab's noun phrases")

    convert = commands.add_parser(
        "convert-sam", help="convert sam_vit_*.pth (segment-anything) to a transformers SamModel dir",
        description="Convert an original segment-anything checkpoint to the transformers SamModel layout "
                    "(config.json + safetensors); set model.sam to the output directory.")
    convert.add_argument("--checkpoint", required=True, help="e.g. sam_vit_l_0b3195.pth")
    convert.add_argument("--arch", required=True, choices=["sam_vit_b", "sam_vit_l", "sam_vit_h", "tiny"])
    convert.add_argument("--out", required=True, help="output directory")

    cache = commands.add_parser(
        "cache-sam", help="fill data.sam_cache with the SAM embeddings of the training images",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_schema_epilog(("model", "data", "train")),
        description="Encode every data.train image with the frozen SAM image encoder and store the embeddings in "
                    "data.sam_cache (once; entries already there are kept), so training skips the encoder. The "
                    "cache is keyed by the SAM weights, input size, dtype, train.precision and the pixel budget: "
                    "run it with the training config. Several GPUs: torchrun --nproc_per_node N run.py cache-sam")
    _config_args(cache)

    cache_lmm = commands.add_parser(
        "cache-lmm", help="fill data.lmm_cache with the frozen LMM's outputs for the training samples",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_schema_epilog(("model", "data", "train")),
        description="Run the frozen LMM once on every data.train sample and store what the heads read from it (the "
                    "attention maps and the phrase tokens' hidden states) in data.lmm_cache (entries already there "
                    "are kept), so no training epoch runs the LMM. The cache is keyed by the LMM weights, family, "
                    "prompt, the sentence draws, the pixel budget, model.dtype and train.precision: run it with the "
                    "training config. Several GPUs: torchrun --nproc_per_node N run.py cache-lmm")
    _config_args(cache_lmm)

    pretrain = commands.add_parser(
        "pretrain-lmm", help="caption-pretrain the tiny Qwen2.5-VL on the synthetic scenes (the demo's LMM)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_schema_epilog(("model", "data", "train")),
        description="Next-token prediction of the synthetic scenes' phrases after the image, in Qwen2.5-VL's chat "
                    "format. Writes config.yaml, metrics.jsonl, metrics.png, checkpoints/step_N/ and, when done, "
                    "the transformers checkpoint <train.out_dir>/qwen (set model.qwen to it).")
    pretrain.add_argument("--config", default=str(DEFAULT_PRETRAIN_CONFIG),
                          help=f"pretraining YAML (default: {DEFAULT_PRETRAIN_CONFIG.relative_to(REPO)})")
    pretrain.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (see below)")
    pretrain.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                          help="continue from the newest checkpoint in train.out_dir (or from CHECKPOINT)")
    return parser


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from flmm_model.config_loader import load_config
    from flmm_model.recipes.pretrain_lmm import ensure_pretrained_lmm
    from flmm_model.recipes.train import train_with_ablation

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    ensure_pretrained_lmm(cfg.model)  # model.qwen_pretrain: pretrain the LMM first when model.qwen is missing
    return train_with_ablation(cfg)


def cmd_pretrain_lmm(args: argparse.Namespace) -> dict[str, Any]:
    from flmm_model.config_loader import load_config
    from flmm_model.recipes.pretrain_lmm import pretrain_lmm

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    return pretrain_lmm(load_config(args.config, overrides))


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from flmm_model.config_loader import load_config
    from flmm_model.recipes.evaluate import evaluate

    overrides = list(args.overrides) + ([f"eval.checkpoint={args.checkpoint}"] if args.checkpoint else [])
    cfg = load_config(args.config, overrides)
    return evaluate(cfg)


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    from flmm_model.apps.predict import predict
    from flmm_model.config_loader import load_config

    cfg = load_config(args.config, args.overrides)
    out_dir = args.out or str(Path("predictions") / Path(args.image or args.video).stem)
    if args.video is not None:
        from flmm_model.apps.predict import predict_video

        return predict_video(cfg.model, checkpoint=args.checkpoint, video=args.video, phrases=args.text,
                             out_dir=out_dir, device=args.device, key_frame=args.key_frame, fps=args.fps,
                             max_frames=args.max_frames)
    return predict(cfg.model, checkpoint=args.checkpoint, image=args.image, phrases=args.text, out_dir=out_dir,
                   device=args.device)


def cmd_chat(args: argparse.Namespace) -> dict[str, Any]:
    from flmm_model.apps.predict import chat
    from flmm_model.config_loader import load_config

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens: expected at least 1, found {args.max_new_tokens}")
    cfg = load_config(args.config, args.overrides)
    return chat(cfg.model, checkpoint=args.checkpoint, images=args.image, question=args.question, ground=args.ground,
                noun_phrases=args.noun_phrases, out_dir=args.out, device=args.device,
                max_new_tokens=args.max_new_tokens, spacy_model=args.spacy_model, visual_cot=args.visual_cot,
                box_scale=args.box_scale)


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from flmm_model.config_loader import load_config

    if importlib.util.find_spec("gradio") is None:
        raise UsageError('run.py demo needs Gradio, an optional extra: pip install -e ".[demo]"')
    from flmm_model.apps.demo.app import address_problem, serve_demo

    cfg = load_config(args.config, args.overrides)
    if args.max_side < 28:
        raise UsageError(f"--max-side: expected at least 28 pixels, found {args.max_side}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens: expected at least 1, found {args.max_new_tokens}")
    problem = address_problem(args.host, args.port)
    if problem:
        raise UsageError(problem)
    return serve_demo(cfg.model, checkpoint=args.checkpoint, host=args.host, port=args.port, device=args.device,
                      max_side=args.max_side, max_new_tokens=args.max_new_tokens, spacy_model=args.spacy_model)


def cmd_convert_sam(args: argparse.Namespace) -> dict[str, Any]:
    from flmm_model.recipes.convert_sam import convert_sam_checkpoint
    from flmm_model.run_dir import prepare_output_dir

    if not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file")
    prepare_output_dir(args.out, what="--out")
    out_dir = convert_sam_checkpoint(args.checkpoint, args.out, arch=args.arch)
    print(f"wrote {out_dir} (set model.sam={out_dir})")
    return {"out_dir": out_dir}


def cmd_cache_sam(args: argparse.Namespace) -> dict[str, Any]:
    from flmm_model.config_loader import load_config
    from flmm_model.recipes.cache_sam import cache_sam

    return cache_sam(load_config(args.config, args.overrides))


def cmd_cache_lmm(args: argparse.Namespace) -> dict[str, Any]:
    from flmm_model.config_loader import load_config
    from flmm_model.recipes.cache_lmm import cache_lmm

    return cache_lmm(load_config(args.config, args.overrides))


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "chat": cmd_chat, "demo": cmd_demo,
            "convert-sam": cmd_convert_sam, "cache-sam": cmd_cache_sam, "cache-lmm": cmd_cache_lmm,
            "pretrain-lmm": cmd_pretrain_lmm}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one command. Returns its dict; `{"command": "help", "text": ...}` when help was shown.

    Raises:
        UsageError: bad command line. UserError (ConfigError, DataError, ...): anything else the user can fix.
        Other exceptions: bugs. `cli` turns each into a message and an exit status.
    """
    parser = build_parser()
    argv = [item for item in (sys.argv[1:] if argv is None else argv) if item != DEBUG_FLAG]  # read by `cli`
    try:
        # Overrides may sit before or after the options: collect the leftovers that are not options.
        args, extra = parser.parse_known_args(argv)
    except _HelpShown as shown:
        return {"command": "help", "text": shown.text}
    unknown = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if unknown:
        raise UsageError(f"run.py {args.command or ''}: unrecognized arguments: {' '.join(unknown)} (options start "
                         f"with --, config overrides look like key=value)")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.command is None:
        parser.print_usage()
        raise UsageError("no command given; one of: " + ", ".join(COMMANDS) + " (run.py --help explains them)")
    result = COMMANDS[args.command](args)
    return {"command": args.command, **result}


def describe_error(error: BaseException) -> tuple[int, str]:
    """The exit status and the one message for an exception that ended a command (see the module docstring)."""
    from flmm_model.errors import UserError  # here, not at the top: `run.py --help` must not import torch

    if isinstance(error, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(error, (UsageError, UserError)):
        return 2, str(error)
    if isinstance(error, OSError):  # the file system said no: a path, a permission, the disk
        where = " ".join(str(name) for name in (error.filename, error.filename2) if name)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return 2, f"no space left on the device ({where or 'writing'}): free disk space there, or write elsewhere"
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return 2, f"{where}: {error.strerror}; check its permissions, or choose a path you can read / write"
        if error.errno is None or not where:
            return 2, str(error)
        return 2, f"{where}: {error.strerror}"
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return 1, (f"out of memory ({type(error).__name__}): lower data.batch_size / eval.batch_size or "
                   f"model.max_pixels, or use a larger device")
    first_line = (str(error).strip().splitlines() or [""])[0]
    return 1, (f"internal error: {type(error).__name__}: {first_line}\n(a bug in flmm_model, not a problem with "
               f"your input: rerun with {DEBUG_FLAG} for the traceback and report it)")


def cli(argv: list[str] | None = None) -> int:
    """Run `main(argv)` as the command line does; returns the exit status (0, or see `describe_error`).

    Failures print `error: <message>` on stderr, with the traceback only under `--debug` or FLMM_DEBUG=1.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        main(argv)
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - the one place every failure is reported
        status, message = describe_error(error)
        if debug:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(cli())
