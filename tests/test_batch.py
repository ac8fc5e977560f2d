"""The host-side batch by one route (`modeling.batch`): the loader's workers and the main process prepare the same
`PreparedBatch`, the forward gives the same losses for a plain collated batch, one the loader prepared and one
already on the device, and the data side imports nothing of the model."""

from __future__ import annotations

import ast
import dataclasses
import pickle
from pathlib import Path

import pytest
import torch
from test_model import MODEL_CFG
from test_sam_cache import make_items

from flmm_model.data import Collator, collate
from flmm_model.device import to_device
from flmm_model.model import build_model
from flmm_model.modeling.batch import BatchPreparer, PreparedBatch, prepare_batch

PACKAGE = Path(__file__).resolve().parents[1] / "flmm_model"


@pytest.fixture(scope="module")
def model():
    return build_model(MODEL_CFG).train()


def flat_values(value, prefix: str = "") -> dict[str, object]:
    """Every leaf of a nested dataclass / dict / list, by its path (tensors and plain values)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flat_values(item, f"{prefix}.{key}"))
        return out
    if isinstance(value, (list, tuple)) and any(dataclasses.is_dataclass(v) or torch.is_tensor(v) for v in value):
        out = {}
        for index, item in enumerate(value):
            out.update(flat_values(item, f"{prefix}[{index}]"))
        return out
    return {prefix: value}


def assert_same(first, second) -> None:
    left, right = flat_values(first), flat_values(second)
    assert left.keys() == right.keys()
    for key, value in left.items():
        other = right[key]
        if torch.is_tensor(value):
            assert torch.is_tensor(other) and value.dtype == other.dtype and torch.equal(value, other), key
        else:
            assert value == other, key


class ItemList(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_loader_workers_prepare_what_the_main_process_prepares(model, photos):
    items = make_items(model, photos)
    preparer = model.batch_preparer()
    assert isinstance(pickle.loads(pickle.dumps(preparer)), BatchPreparer)  # workers get a copy
    loader = torch.utils.data.DataLoader(
        ItemList(items), batch_size=len(items), num_workers=1,
        collate_fn=Collator(pad_token_id=model.tokenizer.pad_token_id, prepare=preparer))
    from_worker = next(iter(loader))["prepared"]
    in_process = prepare_batch(collate(items, pad_token_id=model.tokenizer.pad_token_id), preparer=preparer)
    assert isinstance(from_worker, PreparedBatch)
    assert_same(from_worker, in_process)
    assert_same(model.prepare_batch(collate(items, pad_token_id=model.tokenizer.pad_token_id)), in_process)


def test_forward_is_the_same_for_plain_loader_prepared_and_device_batches(model, photos):
    items = make_items(model, photos)
    plain = collate(items, pad_token_id=model.tokenizer.pad_token_id)
    loaded = collate(items, pad_token_id=model.tokenizer.pad_token_id, prepare=model.batch_preparer())
    on_device = to_device(loaded["prepared"], model.device)
    torch.manual_seed(0)
    expected = model(plain)
    for batch in (loaded, on_device):
        out = model(batch)
        for key in ("loss", "loss_mask_bce", "loss_mask_dice", "loss_sam_bce", "loss_sam_dice"):
            assert torch.equal(out[key], expected[key]), key


def test_prepared_sizes_match_a_hand_computed_case(model, photos):
    """A 600 x 400 photo inside SAM's S x S frame: longest side S, the other rounded half up."""
    items = make_items(model, photos)[:1]
    prepared = model.prepare_batch(collate(items, pad_token_id=model.tokenizer.pad_token_id))
    side = model.sam_refiner.image_size
    height, width = items[0]["image"].shape[1:]
    assert (height, width) == (400, 600)
    assert prepared.sam_resized.tolist() == [[float(int(400 * side / 600 + 0.5)), float(side)]]
    assert prepared.sam_pixels.shape == (1, 3, side, side) and prepared.sam_pixels.dtype == torch.uint8
    assert prepared.gt_canvas.shape == (len(items[0]["phrases"]), 400, 600)
    # the ground truth is the top-left 200 x 200 block; the coarse targets cover the same fraction of the grid
    h, w = prepared.coarse_sizes[0]
    assert prepared.coarse_targets[0, :h, :w].mean().item() == pytest.approx((200 * 200) / (400 * 600), abs=0.02)


def test_a_prediction_preparer_builds_no_targets(model, photos):
    items = make_items(model, photos)[:2]
    prepared = model.batch_preparer(targets=False)(collate(items, pad_token_id=model.tokenizer.pad_token_id))
    assert prepared.gt_canvas is None and prepared.coarse_targets is None
    with pytest.raises(ValueError, match="no gt_masks"):
        model(to_device(prepared, model.device))


def module_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("folder, forbidden", [
    ("data", ("flmm_model.modeling", "flmm_model.model", "flmm_model.predictor")),
    ("modeling", ("flmm_model.data.loader", "flmm_model.predictor", "flmm_model.model", "flmm_model.recipes",
                  "flmm_model.apps")),
])
def test_the_data_side_holds_no_model_and_the_network_no_consumer(folder, forbidden):
    for path in sorted((PACKAGE / folder).glob("*.py")):
        bad = [name for name in module_imports(path) if any(name == f or name.startswith(f + ".") for f in forbidden)]
        assert not bad, f"{path.name} imports {bad}"


def test_sam_refiner_imports_nothing_of_the_data_package():
    assert not [name for name in module_imports(PACKAGE / "modeling" / "sam_refiner.py")
                if name.startswith("flmm_model.data")]
