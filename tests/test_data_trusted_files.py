"""No code runs from a data file: REFER refs pickles are read by an unpickler that admits only plain values (issue 22),
and every `torch.load` in the package and its scripts loads weights only."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
from dataset_files import write_refer

from flmm_model.data.errors import DataError
from flmm_model.data.refcoco import RefCocoDataset

REPO = Path(__file__).resolve().parents[1]


class RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def refs_dataset(root: Path, tokenizer, image_processor) -> RefCocoDataset:
    return RefCocoDataset(str(root), "refcoco", "val", tokenizer=tokenizer, image_processor=image_processor,
                          train=False)


def test_a_refs_pickle_that_would_run_a_command_is_refused_and_nothing_runs(tmp_path, photos, tokenizer,
                                                                               image_processor):
    write_refer(tmp_path, photos)
    marker = tmp_path / "the_payload_ran"
    refs_path = tmp_path / "refcoco" / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes())
    refs[0]["payload"] = RunsACommand(marker)
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(DataError, match=re.escape(str(refs_path)) + r".*names posix\.system|names os\.system"):
        refs_dataset(tmp_path, tokenizer, image_processor)
    assert not marker.exists()


def test_a_refs_pickle_naming_a_missing_module_is_a_data_error(tmp_path, photos, tokenizer, image_processor):
    write_refer(tmp_path, photos)
    refs_path = tmp_path / "refcoco" / "refs(unc).p"
    refs_path.write_bytes(b"cno_such_module_here\nThing\n(tR.")  # protocol 0: GLOBAL, then call it
    with pytest.raises(DataError, match=r"refs\(unc\)\.p.*no_such_module_here\.Thing"):
        refs_dataset(tmp_path, tokenizer, image_processor)


def test_plain_refs_pickles_still_load_python2_style(tmp_path, photos, tokenizer, image_processor):
    write_refer(tmp_path, photos)  # protocol 2, as REFER's release
    assert len(refs_dataset(tmp_path, tokenizer, image_processor)) > 0


def test_every_torch_load_loads_weights_only():
    offenders = []
    for path in [*REPO.glob("flmm_model/**/*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("scripts/*.py"),
                 REPO / "run.py"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
