"""Write one synthetic scene as a PNG and print its phrases and the `run.py predict` command that grounds them.

    python scripts/synthetic_scene.py --seed 1 --index 3 --out predictions/scene.png

The scene is sample `index` of a synthetic split with that seed (the demo validates on seed 1, so those scenes are
held out from both the LMM's pretraining and the heads' training).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository's package

from flmm_model.data.synthetic import make_scene  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1, help="split seed (the demo's val split is 1)")
    parser.add_argument("--index", type=int, default=0, help="sample index in the split")
    parser.add_argument("--out", default="predictions/scene.png", help="PNG to write")
    parser.add_argument("--checkpoint", default="runs/demo", help="run dir for the printed predict command")
    args = parser.parse_args(argv)
    if args.index < 0:
        parser.error(f"--index must be >= 0, found {args.index}")
    scene = make_scene(np.random.default_rng([args.seed, args.index]))  # as SyntheticDataset draws sample `index`
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scene.image.save(out)
    texts = " ".join(f"--text {shlex.quote(phrase)}" for phrase in scene.phrases)
    print(f"wrote {out} ({scene.image.width} x {scene.image.height}): {'; '.join(scene.phrases)}")
    print(f"python run.py predict --checkpoint {args.checkpoint} --image {out} {texts} --out {out.with_suffix('')}")
    return {"image": str(out), "phrases": scene.phrases}


if __name__ == "__main__":
    main()
