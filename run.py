"""Command line of flmm_model: `python run.py <command> [options] [key=value ...]`.

Commands (a dict maps each name to a plain function returning a dict):
    train        train the heads of FrozenQwenSAM (torchrun for several GPUs)
    eval         score a checkpoint on data.test: RefCOCO/+/g cIoU & gIoU, PNG Average Recall
    predict      masks for phrases on one image: a PNG per phrase and an overlay
    convert-sam  convert an original segment-anything checkpoint (sam_vit_l_0b3195.pth) to the transformers layout
    pretrain-lmm caption-pretrain the tiny Qwen2.5-VL on the synthetic scenes (the demo's frozen LMM)

`main(argv)` is the whole program and returns the command's dict; only the `__main__` block exits the process.
"""

from __future__ import annotations

import argparse
import sys
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
"""


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
    from flmm_model.config import describe_schema

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
    predict.add_argument("--image", required=True, help="image file")
    predict.add_argument("--text", action="append", required=True, help="a phrase; repeat for several objects")
    predict.add_argument("--out", default=None, help="output dir (default: predictions/<image name>)")
    predict.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")

    convert = commands.add_parser(
        "convert-sam", help="convert sam_vit_*.pth (segment-anything) to a transformers SamModel dir",
        description="Convert an original segment-anything checkpoint to the transformers SamModel layout "
                    "(config.json + safetensors); set model.sam to the output directory.")
    convert.add_argument("--checkpoint", required=True, help="e.g. sam_vit_l_0b3195.pth")
    convert.add_argument("--arch", required=True, choices=["sam_vit_b", "sam_vit_l", "sam_vit_h", "tiny"])
    convert.add_argument("--out", required=True, help="output directory")

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
    from flmm_model.config import load_config
    from flmm_model.pretrain_lmm import ensure_pretrained_lmm
    from flmm_model.train import attention_only_config, train

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    ensure_pretrained_lmm(cfg.model)  # model.qwen_pretrain: pretrain the LMM first when model.qwen is missing
    compare = {}
    if cfg.train.attention_only_baseline and not cfg.model.attention_only:
        compare["attention-only heads"] = train(attention_only_config(cfg))["val"]
    return train(cfg, compare=compare)


def cmd_pretrain_lmm(args: argparse.Namespace) -> dict[str, Any]:
    from flmm_model.config import load_config
    from flmm_model.pretrain_lmm import pretrain_lmm

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    return pretrain_lmm(load_config(args.config, overrides))


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from flmm_model.config import load_config
    from flmm_model.evaluate import evaluate

    overrides = list(args.overrides) + ([f"eval.checkpoint={args.checkpoint}"] if args.checkpoint else [])
    cfg = load_config(args.config, overrides)
    return evaluate(cfg)


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    from flmm_model.config import load_config
    from flmm_model.predict import predict

    cfg = load_config(args.config, args.overrides)
    out_dir = args.out or str(Path("predictions") / Path(args.image).stem)
    return predict(cfg.model, checkpoint=args.checkpoint, image=args.image, phrases=args.text, out_dir=out_dir,
                   device=args.device)


def cmd_convert_sam(args: argparse.Namespace) -> dict[str, Any]:
    from flmm_model.sam_convert import convert_sam_checkpoint

    if not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file")
    out_dir = convert_sam_checkpoint(args.checkpoint, args.out, arch=args.arch)
    print(f"wrote {out_dir} (set model.sam={out_dir})")
    return {"out_dir": out_dir}


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "convert-sam": cmd_convert_sam,
            "pretrain-lmm": cmd_pretrain_lmm}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one command. Returns its dict; `{"command": "help", "text": ...}` when help was shown.

    Raises:
        UsageError: bad command line. ConfigError: a config that does not fit the schema.
    """
    parser = build_parser()
    try:
        # Overrides may sit before or after the options: collect the leftovers that are not options.
        args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
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


if __name__ == "__main__":
    from flmm_model.config import ConfigError

    try:
        main()
    except (UsageError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
