"""The files a user hands in, checked before any weight loads and before anything is written (checks.py): a damaged
adapter, a data record the reward cannot read, a data file that is not UTF-8, an evaluation of nothing, an --out
that leads nowhere. Each is one `error:` line naming the file (and the record), exit status 2; docs/running.md's "When
things go wrong" table gives every fault its exit status, and `test_every_row_of_the_table_has_its_exit_status`
holds the code to it."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_checkpoint, refused
import checkpoints
import lora
import model as M
import train
import training
from test_train import SMALL, write_gsm8k, write_svamp

pytestmark = pytest.mark.usefixtures("no_fsync")


# --- the faults a new user found ------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["random bytes", "100 bytes short"])
def test_a_damaged_adapter_file_is_one_line_exit_2(tmp_path, tiny, adapter_of_tiny, capsys, no_loading, damage):
    """Before: exit 1 and a 22-line traceback ending in safetensors' `SafetensorError`."""
    bad = Path(shutil.copytree(adapter_of_tiny, tmp_path / "bad"))
    weights = bad / "adapter_model.safetensors"
    if damage == "random bytes":
        weights.write_bytes(os.urandom(weights.stat().st_size))
    else:
        os.truncate(weights, weights.stat().st_size - 100)
    code, err = refused(["--model", str(tiny), "--eval-only", "--adapter", str(bad), "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    if damage == "random bytes":
        assert err.startswith(f"error: --adapter {bad}: {weights}: not a safetensors file"), err
    else:
        n = (adapter_of_tiny / "adapter_model.safetensors").stat().st_size
        assert err == (f"error: --adapter {bad}: {weights}: {n - 100} bytes, but its header announces {n}: the file is "
                       "truncated (an interrupted download or copy)\n")


def test_a_non_finite_adapter_weight_is_named_before_the_weights_load(tmp_path, tiny, adapter_of_tiny, capsys,
                                                                       no_loading):
    from safetensors.torch import load_file, save_file
    bad = Path(shutil.copytree(adapter_of_tiny, tmp_path / "bad"))
    weights = load_file(str(bad / "adapter_model.safetensors"))
    name = sorted(weights)[1]
    weights[name][0, 0] = float("inf")
    save_file(weights, str(bad / "adapter_model.safetensors"))
    code, err = refused(["--model", str(tiny), "--eval-only", "--adapter", str(bad), "--device", "cpu"], capsys)
    assert code == 2 and err == (f"error: --adapter {bad}: {bad / 'adapter_model.safetensors'}: {name} holds "
                                 "non-finite values (NaN or inf)\n")


@pytest.mark.parametrize("answer,why", [(float("nan"), "Answer nan is not a finite number"),
                                        (float("inf"), "Answer inf is not a finite number"),
                                        ("12", "needs string Body and Question and a numeric Answer")])
def test_a_svamp_answer_the_reward_cannot_read_is_named_before_anything(tmp_path, tiny, capsys, no_loading, answer,
                                                                        why):
    """Before: the data check passed NaN; the run wrote config.json and .lock, loaded the weights and died with
    `error: Invalid literal for Fraction: 'nan'`, naming neither the file nor the record."""
    d = write_svamp(tmp_path / "s")
    records = json.loads((d / "train.json").read_text())
    records[2]["Answer"] = answer
    (d / "train.json").write_text(json.dumps(records))  # json writes NaN and Infinity, and reads them back
    run = tmp_path / "run"
    code, err = refused(["--task", "svamp", "--model", str(tiny), "--data", str(d), "--out", str(run), *SMALL],
                        capsys)
    assert code == 2 and err == f"error: {d / 'train.json'}: record 2 (chal-3): {why}\n"
    assert not run.exists()


def test_a_gsm8k_file_that_is_not_utf8_is_named_with_its_line(tmp_path, tiny, capsys, no_loading):
    """Before: `error: 'utf-8' codec can't decode byte 0xe9 in position ...`, with no file name."""
    d = write_gsm8k(tmp_path / "g")
    lines = (d / "train.jsonl").read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"plus", b"pl\xe9s")  # Latin-1's é
    (d / "train.jsonl").write_bytes(b"\n".join(lines))
    run = tmp_path / "run"
    code, err = refused(["--task", "gsm8k", "--model", str(tiny), "--data", str(d), "--out", str(run), *SMALL],
                        capsys)
    # line 4 is {"question": "What is 3 pl\xe9s 1?", ...}: 26 characters before the byte 0xe9
    assert code == 2 and err == (f"error: {d / 'train.jsonl'}: line 4 is not UTF-8 text (byte 0xe9 at column 27); "
                                 "save the file as UTF-8\n")
    assert not run.exists()


@pytest.mark.parametrize("task,fields,longer", [
    ("svamp", {"Body": "b", "Question": "q", "Answer": 3}, "Question"),
    ("gsm8k", {"question": "q", "answer": "a #### 5"}, "answer"),
])
def test_a_record_s_text_limit_counts_every_text_field(task, fields, longer):
    """tasks.MAX_TEXT_CHARS bounds a record's whole text, SVAMP's Body and Question together, GSM8K's question and
    answer: a record of exactly the limit is accepted, one character more in either field is refused by its count.
    The bug it is written for: a field left out of the sum (a 2 MB answer would then pass the check)."""
    import tasks
    check = tasks.Svamp.record_problem if task == "svamp" else tasks.Gsm8k.record_problem
    pad = tasks.MAX_TEXT_CHARS - sum(len(v) for v in fields.values() if isinstance(v, str))
    first = next(k for k, v in fields.items() if isinstance(v, str))
    exact = {**fields, first: fields[first] + "x" * pad}
    assert check(exact) is None
    for field in (first, longer):
        over = {**exact, field: "y" + exact[field]}
        assert f"{tasks.MAX_TEXT_CHARS + 1:,} characters" in check(over), field


def test_an_evaluation_of_no_example_is_refused(tiny, capsys, no_loading):
    """Before: exit 0 with "accuracy 0.0000 on 0 mult test examples", an accuracy of nothing."""
    code, err = refused(["--model", str(tiny), "--eval-only", "--eval-limit", "0", "--device", "cpu"], capsys)
    assert code == 2 and err == ("error: --eval-limit 0: --eval-only measures an accuracy, and 0 examples have none; "
                                 "allowed: --eval-limit >= 1 with --eval-only\n")


@pytest.mark.parametrize("how", [[], ["--eval-only"]], ids=["a new run", "--eval-only"])
def test_an_out_that_is_a_dangling_symbolic_link_is_named(tmp_path, tiny, capsys, no_loading, how):
    """Before: `cannot write …/.lock: File exists`, which misleads: nothing is there."""
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone" / "run")
    code, err = refused(["--model", str(tiny), "--out", str(link), *SMALL, *how], capsys)
    assert code == 2 and err == (f"error: --out {link}: a symbolic link to {tmp_path / 'gone' / 'run'}, which does "
                                 "not exist; allowed: a new or empty directory, or a link to one\n")
    assert link.is_symlink() and not (tmp_path / "gone").exists()


# --- docs/running.md's table: every row's exit status, produced -------------------------------------------------------

def table_rows() -> dict[str, list[int]]:
    """docs/running.md's "What survives what": each fault with the exit statuses its last cell names, in order."""
    text = (ROOT / "docs" / "running.md").read_text().split("**What survives what.**", 1)[1]
    table = [line for line in text.split("\n\n", 2)[1].splitlines() if line.startswith("| ")][1:]
    rows = {}
    for line in table:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = [int(n) for n in re.findall(r"\b\d+\b", cells[-1])]
    return rows


def status(args: list[str], capsys) -> int:
    """train.main(args)'s exit status, as the shell would see it."""
    capsys.readouterr()
    try:
        code = train.main(args)
    except SystemExit as e:
        code = e.code
    capsys.readouterr()
    return 1 if isinstance(code, str) else code  # SystemExit("error: ...") prints its message and exits 1


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory) -> Path:
    """A finished 2-step run (checkpoints 1 and 2)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train.main(["--model", str(tiny), *SMALL, "--steps", "2", "--save-every", "1", "--eval-limit", "1", "--out",
                str(run)])
    return run


class Row:
    """What one row's scenario needs: a fresh copy of the finished run, the tiny model, its adapter, the fixtures."""

    def __init__(self, finished, tiny, adapter, tmp_path, capsys, monkeypatch):
        self.finished, self.tiny, self.adapter, self.tmp = finished, tiny, adapter, tmp_path
        self.capsys, self.monkeypatch, self.copies = capsys, monkeypatch, 0

    def run(self) -> Path:
        self.copies += 1
        return Path(shutil.copytree(self.finished, self.tmp / f"run{self.copies}"))

    def new_run(self, *flags: str) -> int:
        return status(["--model", str(self.tiny), *SMALL, "--out", str(self.tmp / "new"), *flags], self.capsys)

    def resume(self, run: Path, *flags: str) -> int:
        return status(["--resume", str(run), *flags], self.capsys)


def after_a_killed_checkpoint_write(t: Row) -> list[int]:
    run = t.run()
    tmp = run / "checkpoints" / ".tmp-step-000003"
    (tmp / "adapter").mkdir(parents=True)
    (tmp / "state.pt").write_bytes(b"PK\x03\x04 half")
    return [t.resume(run, "--steps", "3")]


def after_a_killed_log_append(t: Row) -> list[int]:
    run = t.run()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')
    return [t.resume(run, "--steps", "3")]


def broken_checkpoints(t: Row) -> list[int]:
    run = t.run()
    os.truncate(run / "checkpoints" / "step-000002" / "state.pt", 100)
    fell_back = t.resume(run)
    run = t.run()
    for ck in (run / "checkpoints").glob("step-*"):
        (ck / "state.pt").write_bytes(b"")
    return [fell_back, t.resume(run)]


def stale_temporary_files(t: Row) -> list[int]:
    run = t.run()
    (run / ".curves.svg.tmp").write_text("<svg")
    return [t.resume(run)]


def disk_full(t: Row) -> list[int]:
    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")
    with t.monkeypatch.context() as m:
        m.setattr(checkpoints.os, "replace", full)
        return [t.resume(t.run(), "--steps", "3")]


def non_finite(t: Row) -> list[int]:
    real = training.update

    def poisoned(*a, **k):
        st = real(*a, **k)
        st.loss = float("nan")
        return st
    with t.monkeypatch.context() as m:
        m.setattr(training, "update", poisoned)
        return [t.resume(t.run(), "--steps", "3")]


def ctrl_c(t: Row) -> list[int]:
    real, codes = training.Trainer.train_step, []
    for presses in (1, 2):
        def train_step(self, stream, presses=presses):
            m = real(self, stream)
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)  # StopRequest's handler: the first asks, the second stops at once
            return m
        with t.monkeypatch.context() as m:
            m.setattr(training.Trainer, "train_step", train_step)
            codes.append(t.resume(t.run(), "--steps", "5"))
    return codes


def held_by_another(t: Row) -> list[int]:
    run = t.run()
    hold = checkpoints.hold_run_dir(run)  # another open file: the flock refuses this process's second taker too
    try:
        return [t.resume(run)]
    finally:
        hold.release()


def cache_refused_at_run_time(t: Row) -> list[int]:
    def refuse(*a, **k):
        raise M.CacheTooLarge(4, 168, 10**9, "cpu", RuntimeError("can't allocate memory"))
    with t.monkeypatch.context() as m:
        m.setattr(M, "sample", refuse)
        return [t.resume(t.run(), "--steps", "3")]


def adapter_of_another_model(t: Row) -> list[int]:
    from conftest import tiny_config
    other = make_checkpoint(t.tmp / "other", tiny_config(num_hidden_layers=2))
    return [status(["--model", str(other), "--eval-only", "--adapter", str(t.adapter), "--device", "cpu"], t.capsys)]


def model_gone(t: Row) -> list[int]:
    run = t.run()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": str(t.tmp / "gone")}))
    return [t.resume(run)]


def another_number_of_processes(t: Row) -> list[int]:
    run = t.run()
    for ck in (run / "checkpoints").glob("step-*"):
        state = torch.load(ck / "state.pt", weights_only=True)
        torch.save({**state, "rng_ranks": [state["rng"]] * 2}, ck / "state.pt")  # as a 2-process run writes it
    return [t.resume(run)]


def damaged_file(t: Row) -> list[int]:
    bad = Path(shutil.copytree(t.adapter, t.tmp / "bad"))
    (bad / "adapter_model.safetensors").write_bytes(os.urandom(1000))
    return [status(["--model", str(t.tiny), "--eval-only", "--adapter", str(bad), "--device", "cpu"], t.capsys)]


def dangling_out(t: Row) -> list[int]:
    (t.tmp / "new").symlink_to(t.tmp / "nowhere")
    return [t.new_run()]


def model_not_found(t: Row) -> list[int]:
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("the network is unreachable")
    with t.monkeypatch.context() as m:
        m.setattr(huggingface_hub, "snapshot_download", offline)
        return [status(["--model", "tokrl-tests/not-here", "--eval-only", "--device", "cpu"], t.capsys)]


# the table's rows by the start of their first cell: a scenario that meets the fault, or (a row that needs torchrun)
# the test that pins it
ROWS = {
    "kill -9 (or a power loss) anywhere in a checkpoint write": after_a_killed_checkpoint_write,
    "kill -9 during a log append": after_a_killed_log_append,
    "the newest checkpoint truncated or corrupt": broken_checkpoints,
    "temporary files of an interrupted write": stale_temporary_files,
    "disk full": disk_full,
    "NaN or inf in the adapter": non_finite,
    "Ctrl-C": ctrl_c,
    "a second `train.py --resume RUN`": held_by_another,
    "the KV cache cannot be allocated at run time": cache_refused_at_run_time,
    "`--max-new-tokens 1000000000`": lambda t: [t.new_run("--max-new-tokens", "1000000000")],
    "a KV cache larger than the device's whole memory": lambda t: [t.new_run("-G", "100000000",
                                                                             "--max-new-tokens", "800")],
    "an `--adapter` trained for another model": adapter_of_another_model,
    "a `--lora-fraction` that adapts none": lambda t: [t.new_run("--lora-fraction", "0.1")],
    "`--resume` of a run copied from another machine": model_gone,
    "`--resume` with another number of processes": another_number_of_processes,
    "an abort in a `torchrun` process's interpreter teardown":
        "test_distributed.py::test_an_abort_in_the_interpreter_teardown_cannot_fail_a_finished_torchrun_run",
    "a damaged file handed in": damaged_file,
    "`--eval-only --eval-limit 0`": lambda t: [status(["--model", str(t.tiny), "--eval-only", "--eval-limit", "0",
                                                       "--device", "cpu"], t.capsys)],
    "`--out` a symbolic link to a directory that does not exist": dangling_out,
    "a `--model` repo id that can be neither found": model_not_found,
}


def row_key(fault: str) -> str:
    [key] = [k for k in ROWS if fault.startswith(k)]
    return key


def test_the_table_follows_the_one_rule_and_every_row_has_a_scenario():
    rows = table_rows()
    assert sorted(map(row_key, rows)) == sorted(ROWS)
    for fault, statuses in rows.items():
        assert statuses and set(statuses) <= {0, 1, 2, 130}, fault
        if isinstance(ROWS[row_key(fault)], str):  # the test that pins it exists
            file, name = ROWS[row_key(fault)].split("::")
            assert f"def {name}(" in (ROOT / "tests" / file).read_text()


@pytest.mark.parametrize("key", [k for k, v in ROWS.items() if not isinstance(v, str)])
def test_every_row_of_the_table_has_its_exit_status(key, finished, tiny, adapter_of_tiny, tmp_path, capsys,
                                                    monkeypatch):
    [statuses] = [s for fault, s in table_rows().items() if row_key(fault) == key]
    assert ROWS[key](Row(finished, tiny, adapter_of_tiny, tmp_path, capsys, monkeypatch)) == statuses
