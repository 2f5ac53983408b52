"""checkpoints.py's readers at their boundaries, by hand: what makes a checkpoint intact (its own step, a data position
within the examples its steps drew, an adapter whose config reads back), which one a resume takes, and which log
line is torn (dropped) rather than bad (named). tests/test_faults.py runs the same rules through killed and resumed
runs; here each rule is pinned on one hand-built checkpoint or file."""
from __future__ import annotations

import random
import shutil

import pytest
import torch

import checkpoints
import lora
import pretrained


@pytest.fixture
def run(tiny, tmp_path):
    """A run directory with the checkpoints of steps 1 and 2 (a real adapter and AdamW state; --accum 3, so step s
    has drawn 3·s examples)."""
    net = pretrained.load_model(tiny)
    lora.apply_lora(net, 2, 0.5, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(lora.lora_parameters(net), lr=1e-3)
    rng = {"sample": torch.Generator().get_state(), "select": torch.Generator().get_state(),
           "replay": random.Random(0).getstate()}
    for step in (1, 2):
        net.logits(torch.tensor([[1, 2, 3]])).pow(2).mean().backward()
        opt.step()
        checkpoints.save_checkpoint(tmp_path / "run", step, net, opt, {"rng": rng, "data_position": 3 * step}, "")
    return tmp_path / "run"


def edit_state(ck, **changes):
    state = torch.load(ck / "state.pt", weights_only=True)
    torch.save({**state, **changes}, ck / "state.pt")


def test_a_resume_takes_the_newest_intact_checkpoint(run):
    ck, state = checkpoints.find_checkpoint(run, accum=3)
    assert ck.name == "step-000002" and state["step"] == 2 and state["data_position"] == 6


def test_a_state_pt_of_another_step_is_not_this_checkpoint_s(run, capsys):
    """step-000002/state.pt replaced by step 1's: refused by name, and the resume falls back to step 1 with a
    warning. The bug it is written for: a state whose step is an integer taken whatever step it records."""
    shutil.copy(run / "checkpoints" / "step-000001" / "state.pt", run / "checkpoints" / "step-000002" / "state.pt")
    with pytest.raises(ValueError, match=r"step-000002/state.pt: step is 1, not this checkpoint's 2"):
        checkpoints.read_checkpoint(run / "checkpoints" / "step-000002", accum=3)
    ck, _ = checkpoints.find_checkpoint(run, accum=3)
    assert ck.name == "step-000001" and "not this checkpoint's 2" in capsys.readouterr().err


@pytest.mark.parametrize("position,ok", [(6, True), (7, False), (0, True), (-1, False)])
def test_the_data_position_is_within_the_examples_the_steps_drew(run, position, ok):
    """Step 2 with --accum 3 has drawn 6 examples: a position of 0..6 is possible, 7 or -1 is not."""
    ck = run / "checkpoints" / "step-000002"
    edit_state(ck, data_position=position)
    if ok:
        assert checkpoints.read_checkpoint(ck, accum=3)[0]["data_position"] == position
    else:
        with pytest.raises(ValueError, match=rf"data_position is {position}; allowed: .* from 0 to 6"):
            checkpoints.read_checkpoint(ck, accum=3)


def test_a_checkpoint_whose_adapter_config_does_not_read_back_is_not_intact(run, capsys):
    """The newest checkpoint's adapter_config.json cut short: that checkpoint is refused naming the file, and the
    resume takes step 1. The bug it is written for: the validation reading the adapter's weights and not its config,
    so that the resume fails later, at loading, on a checkpoint it chose."""
    cfg = run / "checkpoints" / "step-000002" / "adapter" / "adapter_config.json"
    cfg.write_text(cfg.read_text()[:40])
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        checkpoints.read_checkpoint(cfg.parents[1], accum=3)
    ck, _ = checkpoints.find_checkpoint(run, accum=3)
    assert ck.name == "step-000001" and str(cfg) in capsys.readouterr().err


def test_only_a_last_line_without_its_newline_is_torn(tmp_path, capsys):
    """A crash mid-append leaves a last line with no newline: dropped, with a warning. A bad line that ends with its
    newline was written whole, so it is not a torn append: named, as a bad line anywhere else is. The bug it is
    written for: an off-by-one that takes the last complete line for the torn one and drops it silently."""
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "los')
    assert checkpoints.read_jsonl(log) == [{"step": 1}, {"step": 2}]
    assert "dropped a torn last line" in capsys.readouterr().err
    log.write_text('{"step": 1}\n{"step": 2}\ngarbage\n')
    with pytest.raises(ValueError, match="line 3 is not a JSON object"):
        checkpoints.read_jsonl(log)
    log.write_text('{"step": 1}\n[2]\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        checkpoints.read_jsonl(log)


def test_an_append_that_fails_halfway_cuts_the_log_back_to_its_old_bytes(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    log.write_bytes(b'{"step": 1}\n')

    def disk_full(point):  # the disk fills after the first half of the line is written
        if point.endswith(".partial"):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "fault", disk_full)
    with pytest.raises(checkpoints.WriteError, match="metrics.jsonl: No space left on device"):
        checkpoints.append_jsonl(log, {"step": 2, "loss": 0.5}, point="metrics")
    assert log.read_bytes() == b'{"step": 1}\n'
