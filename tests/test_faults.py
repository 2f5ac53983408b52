"""Faults injected and survived. The training process is killed with SIGKILL at every write point of a checkpoint and
of the logs (checkpoints.FAULT_POINTS), then resumed: the final adapter, the optimizer state and the metrics (less
timings) are bit-identical to a run that was never interrupted. Also: resume from every step of every task × algo,
torn log lines, broken checkpoints, stale temporary files, a full disk, Ctrl-C, non-finite weights, and a second
process started on a run directory that one already writes.

The killed runs are forked from this process (torch is already imported, so a run costs a fraction of a second); the
child sets TOKRL_FAULT=POINT:N and checkpoints.fault kills it with SIGKILL the N-th time it reaches POINT."""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import model as M
import tasks
import train
import training
from conftest import ROOT, hold_in_another_process, refused
from test_train import write_gsm8k

TIMING = ("seconds", "tokens_per_s", "peak_mem_gb")
STEPS = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The forked children must run on one thread (see `killed`); so does this process, so that both sum in the
    same order and the comparisons can ask for bit-equality whatever the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


pytestmark = pytest.mark.usefixtures("no_fsync")  # conftest.py: fsync off, the faults here are kills


def write_small_svamp(d: Path) -> Path:
    """Three training problems, so a 4-step run crosses an epoch boundary (SVAMP reshuffles there)."""
    d.mkdir(parents=True, exist_ok=True)
    rec = lambda i: {"ID": f"chal-{i}", "Body": f"Tom has {i} apples" + "!" * i + ".", "Question": "How many?",
                     "Answer": float(i)}
    (d / "train.json").write_text(json.dumps([rec(i) for i in range(1, 4)]))
    (d / "test.json").write_text(json.dumps([rec(i) for i in range(4, 6)]))
    return d


@pytest.fixture(autouse=True)
def varied_rewards(monkeypatch):
    """A random tiny model never answers right; a reward that depends on the completion (its length's parity) makes
    the groups vary, so every objective moves the adapter and T-SPMO has successes to replay."""
    for cls in (tasks.Mult, tasks.Svamp, tasks.Gsm8k):
        monkeypatch.setattr(cls, "reward", lambda self, text, ex: float(len(text) % 2))


def argv(tiny: Path, tmp: Path, task: str, algo: str, run: Path, *extra: str) -> list[str]:
    """`algo` may end in -full: that algorithm with --train full (every weight trained, no LoRA flag)."""
    data = {"mult": [], "svamp": ["--data", str(write_small_svamp(tmp / "svamp"))],
            "gsm8k": ["--data", str(write_gsm8k(tmp / "gsm8k"))]}[task]
    trained = ["--train", "full"] if algo.endswith("-full") else ["--lora-fraction", "0.5"]
    return ["--task", task, "--algo", algo.removesuffix("-full"), "--model", str(tiny), "--device", "cpu", "-G", "4",
            "--max-new-tokens", "8", "--temperature", "1.0", "--lr", "1e-2", *trained, "--alpha", "2", "--k", "4",
            "--replay-success", "1", "--eval-limit", "2", "--steps", str(STEPS), "--save-every", "1",
            "--out", str(run), *data, *extra]


def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def same(a, b) -> bool:
    """Equal, with torch.equal on every tensor (nested dicts, lists and tuples)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The run's trained tensors: the final adapter, or with --train full the final model's weights."""
    if (run / "model").is_dir():
        return load_file(str(run / "model" / "model.safetensors"))
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def outcome(run: Path) -> dict:
    """What must be bit-identical: final adapter (or model), the last checkpoint's state (optimizer, RNGs, data
    position), metrics and evaluations less timings."""
    return {"adapter": final_weights(run),
            "state": torch.load(run / "checkpoints" / f"step-{STEPS:06d}" / "state.pt", weights_only=True),
            "metrics": strip(checkpoints.read_jsonl(run / "metrics.jsonl")),
            "evals": strip(checkpoints.read_jsonl(run / "eval.jsonl"))}


def assert_same_run(a: Path, b: Path) -> None:
    oa, ob = outcome(a), outcome(b)
    assert same(oa["adapter"], ob["adapter"]), "adapter tensors differ"
    assert same(oa["state"], ob["state"]), "optimizer, RNG or data state differs"
    assert oa["metrics"] == ob["metrics"] and [m["step"] for m in oa["metrics"]] == list(range(1, STEPS + 1))
    assert oa["evals"] == ob["evals"]
    names = lambda run: sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names(a) == names(b)
    assert not stray(b), "temporary files left behind"


def stray(run: Path) -> list[Path]:
    """Hidden files other than the run's hold (RUN/.lock, which stays by design, naming the last holder)."""
    return [p for p in run.rglob(".*") if p != run / checkpoints.HOLD_FILE]


def killed(point: str, n: int, args: list[str]) -> int | None:
    """Run train.main(args) in a forked child that SIGKILLs itself at the n-th `point`; its exit code (-9: killed)."""
    def child():
        # OpenMP's thread pool does not survive a fork (the child would wait on threads it does not have): one thread
        torch.set_num_threads(1)
        os.environ["TOKRL_FAULT"] = f"{point}:{n}"
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1), os.dup2(devnull, 2)
        train.main(args)
        os._exit(0)

    p = multiprocessing.get_context("fork").Process(target=child)
    p.start()
    p.join(120)
    if p.is_alive():  # hung: end it, and fail
        p.kill()
        p.join()
        return None
    return p.exitcode


# which occurrence of each point to kill at: mid-run, after at least one checkpoint exists
NTH = {"checkpoint": 2, "latest": 2, "prune": 1, "metrics": 3, "eval": 2, "curves": 2}
CONFIGS = [("svamp", "tspmo"), ("mult", "sgrpo"), ("svamp", "tspmo-full"), ("mult", "grpo-full")]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> dict:
    """One uninterrupted run per configuration (module-scoped: the autouse reward patch is not active here, so it is
    applied by hand)."""
    mp = pytest.MonkeyPatch()
    for cls in (tasks.Mult, tasks.Svamp, tasks.Gsm8k):
        mp.setattr(cls, "reward", lambda self, text, ex: float(len(text) % 2))
    runs = {}
    try:
        for task, algo in CONFIGS:
            tmp = tmp_path_factory.mktemp(f"ref-{task}-{algo}")
            train.main(argv(tiny, tmp, task, algo, tmp / "run", "--eval-every", "2"))
            runs[task, algo] = tmp / "run"
    finally:
        mp.undo()
    return runs


@pytest.mark.parametrize("task,algo", CONFIGS)
@pytest.mark.parametrize("point", checkpoints.FAULT_POINTS)
def test_sigkill_at_each_write_point_then_resume_is_bit_exact(tmp_path, tiny, reference, task, algo, point):
    run = tmp_path / "run"
    args = argv(tiny, tmp_path, task, algo, run, "--eval-every", "2")
    assert killed(point, NTH[point.split(".")[0]], args) == -signal.SIGKILL, f"{point} was never reached"
    train.main(["--resume", str(run)])
    assert_same_run(reference[task, algo], run)


@pytest.mark.parametrize("how", ["--resume", "the same command"])
@pytest.mark.parametrize("point", ["checkpoint.state.written", "metrics.appended", "eval.appended"])
def test_killed_before_the_first_checkpoint_the_resume_starts_it_again(tmp_path, tiny, reference, capsys, point,
                                                                       how):
    """Killed before (or in) its first checkpoint's write, a run has nothing to resume from: `--resume RUN` starts it
    again from step 0 with the settings it recorded, as the same command does. Before: the resume was refused (exit
    2), though the faults table said it resumes (exit 0)."""
    run = tmp_path / "run"
    args = argv(tiny, tmp_path, "svamp", "tspmo", run, "--eval-every", "2")
    assert killed(point, 1, args) == -signal.SIGKILL
    capsys.readouterr()
    assert train.main(["--resume", str(run)] if how == "--resume" else args) == 0
    assert f"warning: {run} holds a run that stopped before its first checkpoint" in capsys.readouterr().err
    assert_same_run(reference["svamp", "tspmo"], run)


def test_the_reference_runs_move_the_adapter_and_replay(reference):
    """Guards the test above against comparing runs where nothing happens."""
    for (task, algo), run in reference.items():
        metrics = checkpoints.read_jsonl(run / "metrics.jsonl")
        assert len({m["reward_mean"] for m in metrics}) > 1
        if algo.endswith("-full"):  # every weight trained: the final embedding is not the starting one
            start = load_file(str(Path(json.loads((run / "config.json").read_text())["model"]) / "model.safetensors"))
            end = final_weights(run)
            assert not torch.equal(start["model.embed_tokens.weight"], end["model.embed_tokens.weight"])
        else:
            B = [t for k, t in final_weights(run).items() if "lora_B" in k]
            assert any(float(b.abs().sum()) > 0 for b in B)
        if algo == "tspmo":
            assert sum(len(m["replays"]) for m in metrics) >= 2
            # the history pool at work: a later step replays a completion generated at an earlier one, so the kill
            # and resume tests compare runs whose replays read the pool restored from a checkpoint
            assert any(r["replay_source_step"] < m["step"] for m in metrics for r in m["replays"])


# --- resume from every step, every task × algorithm -------------------------------------------------------------------

@pytest.mark.parametrize("task", ["mult", "svamp", "gsm8k"])
@pytest.mark.parametrize("algo", ["grpo", "sgrpo", "tspmo", "grpo-full", "tspmo-full"])
def test_resume_from_every_step_is_bit_exact(tmp_path, tiny, monkeypatch, task, algo):
    """A run stopped after any step k (mid-epoch for SVAMP/GSM8K, right after a T-SPMO replay) and resumed equals the
    uninterrupted run. The checkpoint of step k of the uninterrupted run is the state a run stopped at k leaves."""
    monkeypatch.setattr(checkpoints, "KEEP", STEPS + 1)
    ref = tmp_path / "ref"
    train.main(argv(tiny, tmp_path, task, algo, ref, "--eval-every", "0", "--eval-limit", "1"))
    for k in range(1, STEPS):
        run = tmp_path / f"stopped-at-{k}"
        shutil.copytree(ref, run)
        shutil.rmtree(run / ("model" if algo.endswith("-full") else "adapter"))
        for later in range(k + 1, STEPS + 1):
            shutil.rmtree(run / "checkpoints" / f"step-{later:06d}")
        (run / "checkpoints" / "latest").write_text(f"step-{k:06d}\n")
        train.main(["--resume", str(run)])
        assert_same_run(ref, run)


def test_svamp_stream_resumes_mid_epoch():
    """The fault that was: restoring only the data RNG's state after an epoch was shuffled starts a new epoch, so a
    resumed run repeats or skips problems. TrainStream's position gives exactly the next ones."""
    task = tasks.Svamp.__new__(tasks.Svamp)
    task.train = [{"ID": i} for i in range(7)]
    straight = tasks.TrainStream(task, seed=5)
    order = [next(straight)["ID"] for _ in range(20)]
    for k in range(20):
        resumed = tasks.TrainStream(task, seed=5, position=k)
        assert [next(resumed)["ID"] for _ in range(20 - k)] == order[k:]
    rng = random.Random(5)  # the old way: the RNG state checkpointed after 3 draws, the stream rebuilt from it
    old = task.train_stream(rng)
    [next(old) for _ in range(3)]
    assert [next(task.train_stream(rng))["ID"] for _ in range(4)] != order[3:7]


# --- broken files at resume -------------------------------------------------------------------------------------------

@pytest.fixture
def done(tmp_path, tiny) -> Path:
    """A finished 4-step run (checkpoints 3 and 4 kept), the reference for the resumes below."""
    run = tmp_path / "done"
    train.main(argv(tiny, tmp_path, "svamp", "tspmo", run, "--eval-every", "2"))
    return run


def redo_from(done: Path, tmp_path: Path, step: int) -> Path:
    """A copy of the run as it stood after `step` had been checkpointed (the later checkpoint removed)."""
    run = tmp_path / "again"
    shutil.copytree(done, run)
    shutil.rmtree(run / "adapter")
    for p in (run / "checkpoints").glob("step-*"):
        if int(p.name[5:]) > step:
            shutil.rmtree(p)
    return run


@pytest.mark.parametrize("damage", ["truncated state.pt", "empty adapter", "missing state.pt", "garbage state.pt"])
def test_a_broken_newest_checkpoint_falls_back_to_the_previous(done, tmp_path, capsys, damage):
    run = redo_from(done, tmp_path, STEPS)
    newest = run / "checkpoints" / f"step-{STEPS:06d}"
    shutil.copytree(done / "checkpoints" / f"step-{STEPS - 1:06d}", tmp_path / "prev")
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS - 1:06d}")
    shutil.copytree(tmp_path / "prev", run / "checkpoints" / f"step-{STEPS - 1:06d}")
    state = newest / "state.pt"
    if damage == "truncated state.pt":
        os.truncate(state, state.stat().st_size // 2)
    elif damage == "empty adapter":
        (newest / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    elif damage == "missing state.pt":
        state.unlink()
    else:
        state.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    train.main(["--resume", str(run), "--steps", str(STEPS)])
    err = capsys.readouterr().err
    assert f"names step-{STEPS:06d}" in err and str(newest) in err and f"step-{STEPS - 1:06d}" in err
    assert_same_run(done, run)


def test_latest_naming_a_missing_checkpoint(done, tmp_path, capsys):
    run = redo_from(done, tmp_path, STEPS - 1)
    (run / "checkpoints" / "latest").write_text("step-000099\n")
    capsys.readouterr()
    train.main(["--resume", str(run)])
    assert "names step-000099" in capsys.readouterr().err
    assert_same_run(done, run)


def test_no_intact_checkpoint_is_an_error_naming_the_files(done, tmp_path, capsys):
    run = redo_from(done, tmp_path, STEPS)
    for p in (run / "checkpoints").glob("step-*"):
        (p / "state.pt").write_bytes(b"")
    before = snapshot(run)
    code, msg = refused(["--resume", str(run)], capsys)
    assert code == 2 and msg.startswith(f"error: {run} has no intact checkpoint to resume from: ")
    for p in (run / "checkpoints").glob("step-*"):
        assert f"{p / 'state.pt'}: not a checkpoint torch can read" in msg
    assert snapshot(run) == before  # refused before anything was written


@pytest.mark.parametrize("log", ["metrics.jsonl", "eval.jsonl"])
def test_a_torn_last_log_line_is_dropped_with_a_warning(done, tmp_path, capsys, log):
    run = redo_from(done, tmp_path, STEPS - 1)
    with open(run / log, "a") as f:
        f.write('{"step": 4, "reward_me')  # a crash in the middle of an append
    capsys.readouterr()
    train.main(["--resume", str(run)])
    assert f"warning: {run / log}: dropped a torn last line" in capsys.readouterr().err
    assert_same_run(done, run)


def test_a_bad_line_inside_a_log_is_named_before_anything_is_written(done, tmp_path, capsys, monkeypatch):
    run = redo_from(done, tmp_path, STEPS - 1)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    before = snapshot(run)
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("the weights loaded before the logs were read"))
    code, err = refused(["--resume", str(run)], capsys)
    assert code == 2 and err.splitlines()[-1].startswith(f"error: {run / 'metrics.jsonl'}: line 2 is not a JSON object")
    assert err.endswith("; fix or remove that line\n") and snapshot(run) == before
    monkeypatch.undo()  # the advice: remove that line; the resume runs
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert train.main(["--resume", str(run)]) == 0


def test_stale_temporary_files_are_removed_at_the_next_start(done, tmp_path, capsys):
    run = redo_from(done, tmp_path, STEPS - 1)
    stale = [run / ".curves.svg.tmp", run / "checkpoints" / ".latest.tmp", run / "checkpoints" / ".tmp-step-000004",
             run / "checkpoints" / ".trash-step-000001", run / ".metrics.jsonl.abc123.tmp"]
    for p in stale:
        p.mkdir() if "step" in p.name else p.write_text("half")
    capsys.readouterr()
    train.main(["--resume", str(run)])
    err = capsys.readouterr().err
    assert all(not p.exists() and f"removed {p}, left by an interrupted write" in err for p in stale)
    assert_same_run(done, run)


# --- a full disk ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target,step,safe", [("state.pt", 2, 1), ("adapter_model.safetensors", 2, 1), ("latest", 2, 1),
                                               ("metrics.jsonl", 3, 2), ("curves.svg", 2, 2), ("state.pt", 1, None)])
def test_disk_full_names_the_path_and_what_is_safe(done, tmp_path, tiny, monkeypatch, target, step, safe):
    """ENOSPC when the `step`-th write of `target` reaches the disk: one line naming the file and the intact
    checkpoint; no half file and no half line stays; once there is room, the advice it prints (the resume) gives the
    uninterrupted run. In the first checkpoint (`safe` None) there is none to name. Before: the line said "continue
    with --resume" there too, and that resume was refused."""
    real, seen = os.fsync, []

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if Path(path).name.lstrip(".").startswith(target):
            seen.append(path)
            if len(seen) == step:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(checkpoints, "DURABLE", True)  # the full disk shows itself when the data reach it: at fsync
    monkeypatch.setattr(checkpoints.os, "fsync", fsync)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(argv(tiny, tmp_path, "svamp", "tspmo", run, "--eval-every", "2"))
    monkeypatch.setattr(checkpoints.os, "fsync", real)
    msg = str(e.value)
    assert msg.startswith("error: cannot write ") and "No space left on device. Stopped: " in msg
    if safe:
        ck = run / "checkpoints" / f"step-{safe:06d}"
        assert msg.endswith(f"the last checkpoint, {ck}, is whole and untouched; once the disk has room, continue "
                            f"with python train.py --resume {run}")
    else:
        assert msg.endswith(f"no checkpoint was written yet; once the disk has room, start it again from step 0 with "
                            f"python train.py --resume {run}")
    named = msg.split("cannot write ", 1)[1].split(":", 1)[0]
    assert named.endswith({"state.pt": f"step-{step:06d}", "adapter_model.safetensors": "step-000002"}.get(target,
                                                                                                           target))
    assert not stray(run) and (run / "metrics.jsonl").read_text().endswith("\n")
    assert (run / "curves.svg").stat().st_size > 0 if (run / "curves.svg").exists() else target in ("curves.svg",
                                                                                                  "state.pt")
    advice = msg.split(" with python train.py ")[1].split()
    assert train.main(advice) == 0
    assert_same_run(done, run)


# --- Ctrl-C -----------------------------------------------------------------------------------------------------------

def interrupt_evaluation(monkeypatch, times: int) -> None:
    """Ctrl-C (a real SIGINT to this process) `times` times during the first greedy batch of the evaluation."""
    real = M.greedy
    calls = []

    def greedy(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(M, "greedy", greedy)
    return real


def test_ctrl_c_during_the_step_0_evaluation_exits_with_the_resume_command(done, tmp_path, tiny, monkeypatch,
                                                                            capsys):
    run = tmp_path / "run"
    real = interrupt_evaluation(monkeypatch, 1)
    assert train.main(argv(tiny, tmp_path, "svamp", "tspmo", run, "--eval-every", "2", "--eval-batch", "1")) == 0
    monkeypatch.setattr(M, "greedy", real)
    assert f"stopped at step 0; continue with: python train.py --resume {run}" in capsys.readouterr().out
    assert (run / "checkpoints" / "latest").read_text() == "step-000000\n"
    assert checkpoints.read_jsonl(run / "eval.jsonl") == [] and checkpoints.read_jsonl(run / "metrics.jsonl") == []
    train.main(["--resume", str(run)])
    assert_same_run(done, run)


def test_a_second_ctrl_c_stops_at_once_and_its_advice_runs(done, tmp_path, tiny, monkeypatch, capsys):
    """Two Ctrl-C during the step-0 evaluation, before any checkpoint: exit status 130 at once, and a line whose
    advice (the resume, which starts the run again from step 0) gives the uninterrupted run. Before: the line said
    "continue with --resume", and that resume was refused."""
    run = tmp_path / "run"
    real = interrupt_evaluation(monkeypatch, 2)
    with pytest.raises(SystemExit) as e:
        train.main(argv(tiny, tmp_path, "svamp", "tspmo", run, "--eval-every", "2", "--eval-batch", "1"))
    monkeypatch.setattr(M, "greedy", real)
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.endswith("\nstopped at once: no checkpoint was written yet; start it again "
                                                f"from step 0 with: python train.py --resume {run}\n")
    assert train.main(err.split("with: python train.py ")[1].split()) == 0
    assert_same_run(done, run)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_the_final_adapter_write(done, tmp_path, tiny, monkeypatch, capsys, presses):
    """Ctrl-C while the final adapter is written, once: the run ends whole (its adapter written), exit status 0;
    twice: it stops at once (130), naming the last checkpoint, and the resume it advises writes the adapter. Before:
    "interrupted before training started; the run's files are as they were", neither of them true."""
    run, real = tmp_path / "run", checkpoints.write_adapter

    def write_adapter(net, out, *a, **k):
        if Path(out) == run / "adapter":  # the final adapter, not a checkpoint's
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)
        return real(net, out, *a, **k)

    monkeypatch.setattr(checkpoints, "write_adapter", write_adapter)
    args = argv(tiny, tmp_path, "svamp", "tspmo", run, "--eval-every", "2")
    if presses == 1:
        assert train.main(args) == 0
        assert "done: accuracy" in capsys.readouterr().out
    else:
        with pytest.raises(SystemExit) as e:
            train.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 130 and err.endswith(
            f"\nstopped at once: the last checkpoint, {run / 'checkpoints' / f'step-{STEPS:06d}'}, is whole and "
            f"untouched; continue with: python train.py --resume {run}\n")
        monkeypatch.setattr(checkpoints, "write_adapter", real)
        assert train.main(err.split("with: python train.py ")[1].split()) == 0
    assert_same_run(done, run)


def test_the_final_adapter_on_a_full_disk_and_the_resume_that_writes_it(done, tmp_path, tiny, monkeypatch):
    """The disk fills while the final adapter is written: one line saying the run is complete in its last checkpoint
    and that the resume writes the rest; it does."""
    run, real = tmp_path / "run", checkpoints.write_atomic

    def write_atomic(path, *a, **k):
        if Path(path).parent == run / "adapter":
            raise checkpoints.WriteError(Path(path), OSError(errno.ENOSPC, "No space left on device"))
        return real(path, *a, **k)

    monkeypatch.setattr(checkpoints, "write_atomic", write_atomic)
    with pytest.raises(SystemExit) as e:
        train.main(argv(tiny, tmp_path, "svamp", "tspmo", run, "--eval-every", "2"))
    monkeypatch.setattr(checkpoints, "write_atomic", real)
    msg = str(e.value)
    assert msg == (f"error: cannot write {run / 'adapter' / 'adapter_model.safetensors'}: No space left on device. "
                   f"The run is complete in {run / 'checkpoints' / f'step-{STEPS:06d}'}; once the disk has room, "
                   f"python train.py --resume {run} writes the rest")
    assert train.main(msg.split("python train.py ")[1].split(" writes")[0].split()) == 0
    assert_same_run(done, run)


@pytest.mark.parametrize("at_step", [2, STEPS])
def test_ctrl_c_during_a_step_finishes_it_checkpoints_and_resumes_exactly(done, tmp_path, tiny, monkeypatch, capsys,
                                                                         at_step):
    """Ctrl-C while step `at_step` samples: that step completes and is checkpointed, the evaluation due after it is
    left to the resume (during the last step: the final evaluation and the adapter), and the resumed run is exact."""
    real, where = training.Trainer.train_step, {}

    def train_step(self, stream):
        if self.step + 1 == at_step and not where:
            where["sent"] = os.kill(os.getpid(), signal.SIGINT)
        return real(self, stream)

    monkeypatch.setattr(training.Trainer, "train_step", train_step)
    run = tmp_path / "run"
    assert train.main(argv(tiny, tmp_path, "svamp", "tspmo", run, "--eval-every", "2")) == 0
    assert f"stopped at step {at_step}; continue with: python train.py --resume {run}" in capsys.readouterr().out
    assert (run / "checkpoints" / "latest").read_text() == f"step-{at_step:06d}\n"
    assert [e["step"] for e in checkpoints.read_jsonl(run / "eval.jsonl")] == [s for s in (0, 2) if s < at_step]
    assert not (run / "adapter").exists()
    monkeypatch.setattr(training.Trainer, "train_step", real)
    train.main(["--resume", str(run)])
    assert_same_run(done, run)


# --- SIGTERM: a scheduler's stop (Kubernetes, docker stop, SLURM's preemption, torchrun passing it on) ---------------

# train.main in a process of its own, with this module's varied reward; SEND_AT=load sends SIGTERM to itself while the
# weights load, SEND_AT=step:N:TIMES sends it TIMES times while step N runs; without SEND_AT the caller sends it
SIGNALLED = """import os, signal, sys
import model, tasks, train, training
for cls in (tasks.Mult, tasks.Svamp, tasks.Gsm8k):
    cls.reward = lambda self, text, ex: float(len(text) % 2)
at = os.environ.get("SEND_AT", "")
if at == "load":
    real_load = model.load_model
    def load_model(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_load(*a, **k)
    model.load_model = load_model
if at.startswith("step:"):
    _, step, times = at.split(":")
    real_step = training.Trainer.train_step
    def train_step(self, stream):
        if self.step + 1 == int(step):
            for _ in range(int(times)):
                os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, stream)
    training.Trainer.train_step = train_step
sys.exit(train.main(sys.argv[1:]))
"""


def signalled(args: list[str], at: str | None = None) -> subprocess.Popen:
    """`train.py ARGS` in a process of its own (SIGNALLED), SIGTERM sent `at` (None: by the caller)."""
    env = {k: v for k, v in os.environ.items() if k != "SEND_AT"}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **({"SEND_AT": at} if at else {})})
    return subprocess.Popen([sys.executable, "-c", SIGNALLED, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigterm_finishes_the_step_checkpoints_and_the_resume_is_bit_exact(tmp_path, tiny):
    """A real process sent SIGTERM mid-run, as a scheduler stops a job: the step under way finishes and is
    checkpointed (--save-every is far away: the checkpoint is the signal's), the process says so and exits 143
    (128 + SIGTERM: stopped, not finished). `--resume` to one step further equals the run that was never stopped.
    Before: it died at once with 143, no checkpoint, no word; all since the last checkpoint was lost."""
    run = tmp_path / "run"
    common = ["--eval-every", "0", "--save-every", "1000"]
    p = signalled(argv(tiny, tmp_path, "svamp", "tspmo", run, "--steps", "100000", *common))
    try:
        wait_for(run / "metrics.jsonl", p)  # step 1 is done: the signal lands in a later step
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    k = len(checkpoints.read_jsonl(run / "metrics.jsonl"))
    assert p.returncode == 143 and 1 <= k < 100000, (p.returncode, err[-2000:])
    assert (run / "checkpoints" / "latest").read_text() == f"step-{k:06d}\n" and not (run / "adapter").exists()
    assert "SIGTERM: stopping after this step (a second signal stops at once; the last checkpoint stays)" in out
    assert out.endswith(f"stopped at step {k}; continue with: python train.py --resume {run}\n")
    ref = tmp_path / "ref"
    train.main(argv(tiny, tmp_path, "svamp", "tspmo", ref, "--steps", str(k + 1), *common))
    assert train.main(["--resume", str(run), "--steps", str(k + 1)]) == 0
    final = lambda r: torch.load(r / "checkpoints" / f"step-{k + 1:06d}" / "state.pt", weights_only=True)
    assert same(final(ref), final(run))
    assert same(load_file(str(ref / "adapter" / "adapter_model.safetensors")),
                load_file(str(run / "adapter" / "adapter_model.safetensors")))
    for log in ("metrics.jsonl", "eval.jsonl"):
        assert strip(checkpoints.read_jsonl(ref / log)) == strip(checkpoints.read_jsonl(run / log))


@pytest.mark.parametrize("at", ["step:2:2", "load", "load of a resume"])
def test_a_second_sigterm_or_one_before_training_stops_at_once_and_its_advice_runs(done, tmp_path, tiny, at):
    """Two SIGTERMs during step 2: the second stops at once (143), naming step 1's checkpoint; one while the weights
    load: training never started, the directory holds its settings alone (or, in a resume, its checkpoints stay as
    they were). Each line's advice, run, gives the uninterrupted run."""
    run = tmp_path / "run"
    if at == "load of a resume":
        run = redo_from(done, tmp_path, 3)  # checkpoint 3 (and 4, removed): the run as it stood after step 3
        p = signalled(["--resume", str(run)], "load")
    else:
        p = signalled(argv(tiny, tmp_path, "svamp", "tspmo", run, "--eval-every", "2"), at)
    out, err = p.communicate(timeout=180)
    resume = f"python train.py --resume {run}"
    assert p.returncode == 143, err[-2000:]
    if at == "step:2:2":
        ck = run / "checkpoints" / "step-000001"
        assert err.endswith(f"\nstopped at once: the last checkpoint, {ck}, is whole and untouched; continue with: "
                            f"{resume}\n")
    elif at == "load":
        assert err.endswith(f"\ninterrupted before training started: {run} holds its settings alone; start it again "
                            f"from step 0 with: {resume}\n")
        assert sorted(p.name for p in run.iterdir()) == [".lock", "config.json"]
    else:
        assert err.endswith(f"\ninterrupted before training resumed; its checkpoints are untouched: continue with: "
                            f"{resume}\n")
    assert train.main(err.split("with: python train.py ")[1].split()) == 0
    assert_same_run(done, run)


# --- non-finite state is never written --------------------------------------------------------------------------------

@pytest.mark.parametrize("in_replay", [False, True], ids=["fresh group", "replay group"])
def test_non_finite_weights_stop_the_run_before_they_are_saved(tmp_path, tiny, monkeypatch, in_replay):
    """An optimizer step from step 2 on (the fresh group's, or a T-SPMO replay group's) writes NaN into a LoRA weight:
    the run stops at once, names the last good checkpoint and leaves it (and `latest`) untouched; the bad step is
    neither logged nor saved, and no final adapter is written."""
    run = tmp_path / "run"
    real_step, real_replay = torch.optim.AdamW.step, training.Trainer.replay
    real_train_step = training.Trainer.train_step
    where = {"step": 0, "replay": False, "poisoned": None}

    def train_step(self, stream):
        where["step"] = self.step + 1
        return real_train_step(self, stream)

    def replay(self, *a):
        where["replay"] = True
        try:
            return real_replay(self, *a)
        finally:
            where["replay"] = False

    def step_then_poison(self, *a, **k):
        out = real_step(self, *a, **k)
        if where["step"] >= 2 and where["replay"] == in_replay and where["poisoned"] is None:
            where["poisoned"] = where["step"]
            self.param_groups[0]["params"][0].data[0, 0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_poison)
    monkeypatch.setattr(training.Trainer, "replay", replay)
    monkeypatch.setattr(training.Trainer, "train_step", train_step)
    with pytest.raises(SystemExit) as e:
        train.main(argv(tiny, tmp_path, "svamp", "tspmo", run, "--eval-every", "0"))
    step, msg = where["poisoned"], str(e.value)
    assert step is not None
    good = run / "checkpoints" / f"step-{step - 1:06d}"
    assert msg.startswith("error: ") and "lora_A is not finite after the optimizer step at step " in msg
    assert f"at step {step}; stopped without saving it: the last checkpoint, {good}, is whole and untouched" in msg
    assert [m["step"] for m in checkpoints.read_jsonl(run / "metrics.jsonl")] == list(range(1, step))
    assert (run / "checkpoints" / "latest").read_text() == f"{good.name}\n" and not (run / "adapter").exists()
    assert good.name == sorted(p.name for p in (run / "checkpoints").glob("step-*"))[-1]
    state, tensors = checkpoints.read_checkpoint(good)  # reads back whole, finite
    assert state["step"] == step - 1 and all(torch.isfinite(t).all() for t in tensors.values())


def test_save_checkpoint_refuses_non_finite_state(tmp_path, tiny):
    import lora
    net = M.load_model(tiny)
    lora.apply_lora(net, 2, 0.5, None, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(lora.lora_parameters(net))
    with torch.no_grad():
        lora.lora_parameters(net)[1][0, 0] = float("inf")
    with pytest.raises(checkpoints.NonFiniteState, match="lora_B is not finite: checkpoint of step 7 not written"):
        checkpoints.save_checkpoint(tmp_path, 7, net, opt, {}, "m")
    assert not (tmp_path / "checkpoints").exists()


# --- a KV cache the device cannot hold at run time --------------------------------------------------------------------

def test_a_kv_cache_the_device_cannot_allocate_stops_the_run_with_its_size(done, tmp_path, tiny, monkeypatch):
    """Step 2's group needs its KV cache and the allocator refuses (the CPU's own message; on a GPU, CUDA's out of
    memory): one line naming -G, --max-new-tokens, the bytes and the device, and the last checkpoint (step 1),
    byte-identical. With the memory back, the resume gives the uninterrupted run."""
    run, real, seen = tmp_path / "run", torch.empty, {}

    def empty(*shape, **kw):  # the G-row keys of step 2: (G, K, positions, D) = (4, 2, S, 16)
        dims = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if len(dims) == 4 and dims[:2] == (4, 2) and (run / "checkpoints" / "step-000001").is_dir() and not seen:
            seen["checkpoints"] = snapshot(run / "checkpoints")
            raise RuntimeError(f"[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               f"memory: you tried to allocate {4 * dims[2] * 2 * 16 * 4} bytes. Error code 12")
        return real(*shape, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(SystemExit) as e:
        train.main(argv(tiny, tmp_path, "svamp", "tspmo", run, "--eval-every", "2"))
    monkeypatch.setattr(torch, "empty", real)
    msg = str(e.value)
    positions = int(msg.split("rows × positions = 4 × ")[1].split(")")[0])
    assert msg.startswith(f"error: the KV cache for -G 4, --max-new-tokens 8 (rows × positions = 4 × {positions}) "
                          f"needs {4 * positions * 1025:,} bytes (0.00 GiB) on cpu, which could not be allocated "
                          "(RuntimeError: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                          "allocate memory: ")
    assert msg.endswith(f". Stopped: the last checkpoint, {run / 'checkpoints' / 'step-000001'}, is whole and "
                        f"untouched; with memory freed on cpu, continue with python train.py --resume {run}, or start "
                        "a new run with fewer rows or new tokens")
    assert snapshot(run / "checkpoints") == seen["checkpoints"]
    assert [m["step"] for m in checkpoints.read_jsonl(run / "metrics.jsonl")] == [1]
    train.main(["--resume", str(run)])
    assert_same_run(done, run)


# --- a second process: one run directory, one writer ------------------------------------------------------------------

def snapshot(run: Path) -> dict:
    """Every file's bytes and every directory's name under `run`."""
    return {str(p.relative_to(run)): p.read_bytes() if p.is_file() else None for p in sorted(run.rglob("*"))}


def refusal(run: Path, option: str, holder_pid: int) -> str:
    """The one line a second process prints, naming the holder as its RUN/.lock records it."""
    rec = json.loads((run / checkpoints.HOLD_FILE).read_text())
    assert rec["pid"] == holder_pid and rec["host"] == socket.gethostname() and rec["started"][:2] == "20"
    return (f"error: {option} {run}: in use by another process (pid {holder_pid} on {rec['host']}, started "
            f"{rec['started']}; its hold: {run / checkpoints.HOLD_FILE}); a run directory has one writer at a time: "
            "wait for that process to end, or stop it\n")


def wait_for(path: Path, proc: subprocess.Popen, last: str | None = None, timeout: float = 120) -> str:
    """Wait until `path` exists (and holds something other than `last`); returns its text."""
    end = time.time() + timeout
    while not path.exists() or path.read_text() == last:
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {path} changed"
        assert time.time() < end, f"{path} did not change in {timeout} s"
        time.sleep(0.1)
    return path.read_text()


def test_a_second_resume_stops_before_touching_a_running_run_and_kill_9_frees_it(tmp_path, tiny):
    """The fault: two `train.py --resume RUN` a second apart both ran; the second pruned the checkpoint the first was
    writing and finished over its files. Now the second (a real CLI process) stops with exit status 2 and one line
    naming the directory and the holder (pid, host, start time); the first trains on, its files untouched (no
    resumes.jsonl line). SIGKILL ends the first's hold with it: the next resume runs with nothing cleaned by hand."""
    run, env = tmp_path / "run", {**os.environ, "OMP_NUM_THREADS": "1"}
    args = argv(tiny, tmp_path, "mult", "sgrpo", run, "--steps", "100000", "--eval-every", "0")
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        latest = wait_for(run / "checkpoints" / "latest", first)
        second = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(run)], env=env,
                                capture_output=True, text=True, timeout=120)
        assert (second.returncode, second.stdout) == (2, "")
        assert second.stderr == refusal(run, "--resume", first.pid)
        wait_for(run / "checkpoints" / "latest", first, last=latest)  # the first writes on
        assert not (run / "resumes.jsonl").exists()
    finally:
        first.kill()
        first.wait()
    assert (run / checkpoints.HOLD_FILE).exists()  # the dead holder's file stays; its hold does not
    _, state = checkpoints.find_checkpoint(run)
    assert train.main(["--resume", str(run), "--steps", str(state["step"] + 1)]) == 0
    assert [m["step"] for m in checkpoints.read_jsonl(run / "metrics.jsonl")] == list(range(1, state["step"] + 2))
    assert json.loads((run / checkpoints.HOLD_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("how", ["--resume", "--out", "--eval-only --out"])
def test_a_held_directory_is_refused_before_anything_is_loaded_or_written(tmp_path, tiny, monkeypatch, capsys, how):
    """While another process holds RUN: a resume of it, a new run with --out RUN, and --eval-only --out RUN each stop
    before the weights load, with one line and exit status 2, and leave RUN byte-identical (its .lock included).
    Once the holder is killed (SIGKILL), the same command runs."""
    run = tmp_path / "run"
    if how == "--resume":
        train.main(argv(tiny, tmp_path, "mult", "sgrpo", run, "--eval-every", "0"))
    command = {"--resume": ["--resume", str(run)], "--out": argv(tiny, tmp_path, "mult", "sgrpo", run),
               "--eval-only --out": ["--eval-only", "--model", str(tiny), "--device", "cpu", "--eval-limit", "2",
                                     "--max-new-tokens", "4", "--out", str(run)]}[how]
    holder = hold_in_another_process(run)
    try:
        before = snapshot(run)
        with monkeypatch.context() as m:
            m.setattr(M, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                train.main(command)
        assert e.value.code == 2 and capsys.readouterr().err == refusal(run, how.split()[-1], holder.pid)
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    assert train.main(command + (["--steps", str(STEPS + 1)] if how == "--resume" else [])) == 0
    done = "eval.json" if how == "--eval-only --out" else "adapter"
    assert (run / done).exists() and json.loads((run / checkpoints.HOLD_FILE).read_text())["pid"] == os.getpid()
