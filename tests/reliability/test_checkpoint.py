"""QAT checkpoints: nothing in them runs, a damaged or foreign one is refused, a resumed run is the uninterrupted one.

A tiny conv net on 8×8 inputs, four batches an epoch: every case here takes well under a second of training.
"""

import copy
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

import hessq
from hessq import ArtifactError, CheckpointMismatchError, ConfigError
from tests._models import tiny_net
from tests._hostile import RunsCode

SAMPLES, BATCH = 32, 8  # 4 steps an epoch


class AugmentedDigits(Dataset):
    """Random 1×8×8 images, flipped with torch.rand and jittered with NumPy's and Python's global RNGs."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(7)
        self.x = torch.randn(SAMPLES, 1, 8, 8, generator=gen)
        self.y = torch.randint(0, 10, (SAMPLES,), generator=gen)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int):
        x = self.x[i]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        x = x + float(np.random.uniform(-0.05, 0.05)) + 0.05 * random.random()
        return x, self.y[i]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny convolutions: threads only contend (conftest restores the count)


@pytest.fixture(scope="module")
def quantized():
    model = tiny_net().eval()
    calib = [(torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)), None)]
    return {bits: hessq.quantize(model, bits, calib, pin_first_last=None) for bits in (4, 8)}


def _fresh(quantized, bits=4):
    return copy.deepcopy(quantized[bits])  # what a new process would rebuild with hessq.quantize


def _state(q):
    return {k: v.clone() for k, v in q.state_dict().items()}


def _scramble_global_rngs():
    """What a new process would have: other global RNG states than the interrupted run left."""
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)


def _loader(kind: str) -> DataLoader:
    ds = AugmentedDigits()
    if kind == "global":
        return DataLoader(ds, batch_size=BATCH, shuffle=True)
    # A new process builds its generator anew; seed it differently to show the checkpoint's state is what counts.
    gen = torch.Generator().manual_seed(random.randrange(1000))
    if kind == "loader_generator":
        return DataLoader(ds, batch_size=BATCH, shuffle=True, generator=gen)
    return DataLoader(ds, batch_size=BATCH, sampler=RandomSampler(ds, generator=gen))


TRAIN = dict(epochs=2, lr=0.05, seed=3, progress=False)


@pytest.mark.parametrize("kind", ["global", "loader_generator", "sampler_generator"])
def test_resume_of_a_shuffling_augmenting_dataloader_is_the_uninterrupted_run(quantized, tmp_path, kind):
    random.seed(0)
    straight = _fresh(quantized)
    hist = hessq.finetune(straight, _loader(kind), **TRAIN)
    assert hist["steps"] == 8 and hist["resumed_from_step"] is None

    ckpt = tmp_path / "qat.ckpt"
    random.seed(0)
    first = hessq.finetune(_fresh(quantized), _loader(kind), checkpoint=ckpt, max_steps=3, **TRAIN)
    assert first["steps"] == 3 and first["resumed_from_step"] is None
    # Interrupted mid-epoch twice: in the first epoch, then in the second (another epoch-start state).
    for max_steps, resumed_from in ((6, 3), (None, 6)):
        _scramble_global_rngs()
        resumed = _fresh(quantized)
        h = hessq.finetune(resumed, _loader(kind), checkpoint=ckpt, max_steps=max_steps, checkpoint_every=2,
                           **TRAIN)
        assert h["resumed_from_step"] == resumed_from
    assert h["steps"] == hist["steps"]
    assert h["epoch_loss"] == hist["epoch_loss"]
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} of {len(a)} tensors differ: {differing[:5]}"



def test_a_checkpoint_whose_pickle_runs_code_is_refused_without_running_it(quantized, tmp_path):
    marker = tmp_path / "marker"
    ckpt = tmp_path / "qat.ckpt"
    torch.save({"format": "hessq.qat-checkpoint", "version": 2, "payload": RunsCode(marker)}, ckpt)
    q = _fresh(quantized)
    before = _state(q)
    with pytest.raises(ArtifactError, match="qat.ckpt") as err:
        hessq.finetune(q, _loader("global"), checkpoint=ckpt, **TRAIN)
    assert "would run code" in str(err.value)
    assert not marker.exists(), "loading the checkpoint ran the pickled command"
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    # The payload is real: an unsafe load does run it.
    armed = tmp_path / "armed.ckpt"
    torch.save(RunsCode(tmp_path / "ran"), armed)
    torch.load(armed, weights_only=False)
    assert (tmp_path / "ran").exists()


def _good_checkpoint(quantized, tmp_path):
    """A checkpoint one step before the end of a 4-step run, and the weights its resume gives."""
    ckpt = tmp_path / "good.ckpt"
    kw = dict(epochs=1, lr=0.05, seed=1, progress=False)
    hessq.finetune(_fresh(quantized), _loader("global"), checkpoint=ckpt, max_steps=3, **kw)
    good = tmp_path / "resumed.ckpt"
    good.write_bytes(ckpt.read_bytes())
    q = _fresh(quantized)
    hessq.finetune(q, _loader("global"), checkpoint=good, **kw)
    return ckpt, _state(q), kw


def test_a_flipped_bit_anywhere_is_refused_or_changes_nothing(quantized, tmp_path):
    ckpt, reference, kw = _good_checkpoint(quantized, tmp_path)
    data = ckpt.read_bytes()
    rng = random.Random(0)
    refused = identical = 0
    damaged = tmp_path / "damaged.ckpt"
    for position in rng.sample(range(len(data)), 50):
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        damaged.write_bytes(bytes(flipped))
        q = _fresh(quantized)
        try:
            hessq.finetune(q, _loader("global"), checkpoint=damaged, **kw)
        except ArtifactError as exc:
            assert "damaged.ckpt" in str(exc), exc
            refused += 1
            continue
        # The flip hit nothing the checkpoint holds (zip padding, an unread field): the resume is the good one.
        state = _state(q)
        assert all(torch.equal(reference[k], state[k]) for k in reference), f"flip at byte {position} changed weights"
        identical += 1
    assert refused + identical == 50 and refused > 0


@pytest.mark.parametrize("damage", ["truncated", "empty", "directory", "garbage", "version_1", "other_kind"])
def test_an_unreadable_or_foreign_file_at_the_checkpoint_path_is_refused(quantized, tmp_path, damage):
    ckpt, _, kw = _good_checkpoint(quantized, tmp_path)
    path = tmp_path / "qat.ckpt"
    if damage == "truncated":
        path.write_bytes(ckpt.read_bytes()[: len(ckpt.read_bytes()) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "directory":
        path.mkdir()
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif damage == "version_1":  # what hessq wrote before checkpoints were sealed
        q = _fresh(quantized)
        torch.save({"format": "hessq.qat-checkpoint", "version": 1, "model": q.state_dict(), "step": 3}, path)
    else:
        torch.save({"format": "hessq.distilled-data", "version": 1, "sha256": "0" * 64}, path)
    q = _fresh(quantized)
    before = _state(q)
    with pytest.raises(ArtifactError, match="qat.ckpt"):
        hessq.finetune(q, _loader("global"), checkpoint=path, **kw)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def _checkpoint_at_step_2(quantized, tmp_path, **overrides):
    ckpt = tmp_path / "qat.ckpt"
    kw = {**TRAIN, "epochs": 1, **overrides}
    hessq.finetune(_fresh(quantized), _loader("global"), checkpoint=ckpt, max_steps=2, **kw)
    return ckpt


MISMATCHES = {
    "bit plan": (dict(bits=8), r"conv1 weight bits 8 here, 4 in the checkpoint"),
    "lr": (dict(lr=0.02), r"lr 0.02 here, 0.05 in the checkpoint"),
    "epochs": (dict(epochs=2), r"epochs 2.0 here, 1.0 in the checkpoint"),
    "momentum": (dict(momentum=0.5), r"momentum 0.5 here, 0.9 in the checkpoint"),
    "weight_decay": (dict(weight_decay=1e-4), r"weight_decay 0.0001 here, 0.0 in the checkpoint"),
    "seed": (dict(seed=4), r"seed 4 here, 3 in the checkpoint"),
    "teacher": (dict(teacher=True), r"a teacher is given here, none was in the checkpoint's run"),
    "temperature": (dict(temperature=2.0), r"temperature 2.0 here, 1.0 in the checkpoint"),
    "distill_weight": (dict(distill_weight=0.5), r"distill_weight 0.5 here, 1.0 in the checkpoint"),
    "loss_fn": (dict(loss_fn=torch.nn.MultiMarginLoss()), r"loss_fn MultiMarginLoss here, CrossEntropyLoss in"),
    "steps_per_epoch": (dict(batch_size=4), r"steps_per_epoch 8 here, 4 in the checkpoint"),
}


@pytest.mark.parametrize("what", list(MISMATCHES))
def test_a_checkpoint_of_another_plan_or_configuration_is_refused_saying_what_differs(quantized, tmp_path, what):
    ckpt = _checkpoint_at_step_2(quantized, tmp_path)
    change, message = MISMATCHES[what]
    change = dict(change)
    q = _fresh(quantized, change.pop("bits", 4))
    if change.pop("teacher", False):
        change["teacher"] = tiny_net().eval()
    data = DataLoader(AugmentedDigits(), batch_size=change.pop("batch_size", BATCH), shuffle=True)
    before = _state(q)
    with pytest.raises(CheckpointMismatchError, match=message) as err:
        hessq.finetune(q, data, checkpoint=ckpt, **{**TRAIN, "epochs": 1, **change})
    assert "resume=False" in str(err.value) and "delete the file" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_progress_max_steps_and_checkpoint_every_may_change_on_resume(quantized, tmp_path, capsys):
    ckpt = _checkpoint_at_step_2(quantized, tmp_path)
    q = _fresh(quantized)
    h = hessq.finetune(q, _loader("global"), checkpoint=ckpt, **{**TRAIN, "epochs": 1, "progress": True},
                       max_steps=3, checkpoint_every=1)
    assert h["resumed_from_step"] == 2 and h["steps"] == 3
    captured = capsys.readouterr()
    assert "resuming" in captured.out + captured.err
    # resume=False starts over and overwrites the checkpoint
    h = hessq.finetune(_fresh(quantized), _loader("global"), checkpoint=ckpt, resume=False, max_steps=2,
                       **{**TRAIN, "epochs": 1})
    assert h["resumed_from_step"] is None and h["steps"] == 2


def test_a_dataloader_with_persistent_workers_is_refused_with_a_checkpoint(quantized, tmp_path):
    data = DataLoader(AugmentedDigits(), batch_size=BATCH, shuffle=True, num_workers=1, persistent_workers=True)
    with pytest.raises(ConfigError, match="persistent_workers=False"):
        hessq.finetune(_fresh(quantized), data, checkpoint=tmp_path / "qat.ckpt", **TRAIN)
