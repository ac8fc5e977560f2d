"""`train.compile`: which modules `FrozenQwenSAM.compile_parts` compiles, in place, and that training asks for it.

(The compiled forward itself was checked by hand on CPU with the eager backend: identical losses; an inductor
compile of every part takes minutes on the CPU machine, too long for the suite.)
"""

from __future__ import annotations

import torch
from test_model import MODEL_CFG
from test_train import DEMO, TINY

import run
from flmm_model.model import FrozenQwenSAM, build_model


def test_compile_parts_compiles_blocks_layers_and_heads_in_place(monkeypatch):
    model = build_model(MODEL_CFG)
    compiled: list[tuple[torch.nn.Module, dict]] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append((self, kwargs)))
    keys = set(model.state_dict())
    model.compile_parts()
    modules = {id(module) for module, _ in compiled}
    sam = model.sam_refiner.sam
    expected = [*model.qwen.model.visual.blocks, *model.qwen.model.language_model.layers, model.mask_head,
                *sam.vision_encoder.layers, sam.mask_decoder]
    assert modules == {id(module) for module in expected}
    assert all(kwargs == {"backend": "inductor", "dynamic": True} for _, kwargs in compiled)
    assert set(model.state_dict()) == keys  # in place: checkpoints keep their names


def test_train_compile_flag_compiles_the_model(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(FrozenQwenSAM, "compile_parts", lambda self, **kwargs: calls.append(self))
    result = run.main(["train", "--config", DEMO, *TINY, "data.val=[]", "train.max_steps=1", "train.compile=true",
                       f"train.out_dir={tmp_path / 'run'}"])
    assert result["steps"] == 1 and calls == [result["model"]]
