"""The checkpoint's state is one record (trainer.resume.CheckpointState): what a real run's save writes is exactly
its fields, reads back equal, and a damaged entry or a state that cannot continue the run is refused naming it."""

import dataclasses
import json

import pytest
import torch

from sftgo.trainer.checkpoint import CheckpointError, latest_checkpoint
from sftgo.trainer.config import TrainConfig
from sftgo.trainer.loop import run
from sftgo.trainer.objectives import GroupDRO
from sftgo.trainer.resume import CheckpointState


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shared_shard_dir, tiny_model_dir):
    out = tmp_path_factory.mktemp("state") / "run"
    run(
        TrainConfig(
            data=str(shared_shard_dir),
            out=str(out),
            model=tiny_model_dir,
            max_steps=2,
            batch_tokens=160,
            progress=False,
            tensorboard=False,
            dro_step=0.1,
        )
    )
    return latest_checkpoint(out)


def test_what_save_writes_is_the_state_record_and_reads_back_equal(checkpoint):
    written = json.loads((checkpoint / "trainer_state.json").read_text())
    assert set(written) == {f.name for f in dataclasses.fields(CheckpointState)}
    state = CheckpointState.read(checkpoint)
    assert state.to_json() == written
    assert state.step == 2 and state.world_size == 1 and len(state.dro["weights"]) == 2


@pytest.mark.parametrize(
    "key, value",
    [
        ("step", -1),
        ("data_position", [0]),
        ("worst_switches", True),
        ("data_strategy", "tfidf"),
        ("dro", {"weights": [float("nan")]}),
        ("skipped_samples", 1.5),
    ],
)
def test_a_damaged_entry_is_one_sentence_naming_it(checkpoint, tmp_path, key, value):
    copy = tmp_path / checkpoint.name
    copy.mkdir()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state[key] = value
    (copy / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=f"has '{key}' = .*the checkpoint was edited or damaged"):
        CheckpointState.read(copy)


def test_a_state_that_cannot_continue_this_run_is_refused(checkpoint):
    state = CheckpointState.read(checkpoint)
    fits = dict(world=1, total_steps=4, grad_accum=1, groups=2, dro=GroupDRO(2, 0.1))
    state.fits(checkpoint, **fits)
    with pytest.raises(CheckpointError, match="has 'step' = 2, not a step of this run's 1"):
        state.fits(checkpoint, **{**fits, "total_steps": 1})
    with pytest.raises(CheckpointError, match="has 'data_position' = .*a position after 4 micro-batches"):
        state.fits(checkpoint, **{**fits, "grad_accum": 2})
    with pytest.raises(CheckpointError, match="'dro' = .*null \\(this run has no --dro-step\\)"):
        state.fits(checkpoint, **{**fits, "dro": None})
    with pytest.raises(CheckpointError, match="'dro' = .*3 Group-DRO weights"):
        state.fits(checkpoint, **{**fits, "dro": GroupDRO(3, 0.1)})
    assert torch.tensor(state.dro["weights"]).sum().item() == pytest.approx(1.0)
