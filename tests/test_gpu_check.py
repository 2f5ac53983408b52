"""bench/gpu_check.py, the GPU check, run here as its CPU dry run: every part runs in its own process and reports
its tables in summary.md; a part past its cap, and every part when the check gets SIGTERM, ends with its whole
process group (a grandchild included) and is reported as such; summary.md keeps what a cut-off part measured and
projects the paper run by hand-checkable arithmetic; bad input is one line, exit status 2, before anything runs."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, write_byte_tokenizer

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

CHECK = [sys.executable, str(ROOT / "bench" / "gpu_check.py")]
TABLES = {  # part: the headings its tables have in summary.md
    "model": ["## model: model"],
    "decode": ["## decode: one decode step over a 12-slot cache", "## decode: the decode step, profiled"],
    "sampling": ["## sampling: sampling: model.sample against transformers' generate"],
    "eval": ["## eval: greedy evaluation, 4-token prompts, 6 new tokens",
             "## eval: greedy evaluation, rows ending at different steps"],
    "memory": ["## memory: a whole step under LoRA, 4 sampled tokens a completion",
               "## memory: a whole GRPO step with --train full, 4 sampled tokens a completion"],
    "main": ["## main: metrics.jsonl", "## main: eval.jsonl"],
}


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a killed one that its new parent has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def in_group(pgid: int) -> list[int]:
    """Live processes whose process group is pgid."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(d.name))
    return pids


def parts_table(summary: str) -> dict[str, list[str]]:
    """summary.md's table of parts: part -> [status, seconds, cap, log, process group]."""
    table = summary[summary.index("| part | status |"):].split("\n\n")[0].splitlines()[2:]
    rows = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in table]
    return {r[0]: r[1:] for r in rows}


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def test_the_dry_run_runs_every_part_and_summary_md_has_each_part_s_row_and_tables(tmp_path):
    """The whole check on the CPU with a tiny model: exit status 0, every part `exit 0` in its own process group,
    each part's tables in summary.md, the projection, and no process left in any part's group."""
    out = tmp_path / "out"
    r = subprocess.run([*CHECK, str(out), "--dry-run"], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    parts = parts_table(summary)
    assert list(parts) == list(gpu_check.PARTS)
    for name, (status, seconds, cap, log, pgid) in parts.items():
        assert status == "exit 0" and float(seconds) <= float(cap) == gpu_check.DRY_CAP_S, name
        assert (out / log).read_text().startswith("$ ") and not in_group(int(pgid)), name
    for name, headings in TABLES.items():
        for h in headings:
            assert h in summary, h
    assert "| CPU (dry run) |" in summary and "## Projected: Table II's T-SPMO run" in summary
    assert "| error |" not in summary and "| failed |" not in summary  # no measurement refused or failed
    assert re.search(r"^\d+ skipped in ", (out / "tests.log").read_text(), re.M)  # the CUDA tests, on the CPU
    assert (out / "main-run" / "metrics.jsonl").is_file()


HANG = """import os, subprocess, sys, time
if sys.argv[0].endswith("gpu_check.py") and sys.argv[1:3] == ["--part", "model"]:
    child = subprocess.Popen(["sleep", "300"])  # a grandchild of the check, in the part's process group
    Path = __import__("pathlib").Path
    Path(os.environ["HANG_PIDS"] + ".partial").write_text(f"{os.getpid()} {child.pid}")
    os.replace(os.environ["HANG_PIDS"] + ".partial", os.environ["HANG_PIDS"])
    time.sleep(300)
"""


@pytest.fixture
def hanging(tmp_path: Path):
    """An environment in which the check's model part hangs at its start, having started a grandchild (a
    sitecustomize module that every Python process reads: a fault injected without a hook in the check); and
    the file the part writes their pids to. Whatever the check leaves alive is killed after the test."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HANG)
    pids = tmp_path / "pids"
    yield env(PYTHONPATH=str(site), HANG_PIDS=str(pids)), pids
    for pid in map(int, pids.read_text().split() if pids.is_file() else []):
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_part_past_its_cap_is_killed_with_its_process_group_and_reported_cut_off(tmp_path, hanging):
    """The model part hangs with a grandchild: at its 3 s cap both are killed (the group, not only the leader),
    summary.md says it was cut off, the parts that need the model say so and do not start, exit status 1."""
    e, pids = hanging
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = subprocess.run([*CHECK, str(out), "--dry-run", "--parts", "model,decode", "--cap", "model=3"], cwd=ROOT,
                       env=e, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert time.monotonic() - t0 < 60
    part, grandchild = map(int, pids.read_text().split())
    assert not alive(part) and not alive(grandchild)
    parts = parts_table((out / "summary.md").read_text())
    assert parts["model"][0] == "cut off at its cap of 3 s" and 3 <= float(parts["model"][1]) < 10
    assert int(parts["model"][4]) == part and not in_group(part)
    assert parts["decode"][0] == "not run: no model (the model part did not build one)"


def test_sigterm_to_the_check_kills_the_running_part_s_group_and_writes_the_summary(tmp_path, hanging):
    """An outer timeout's SIGTERM to the check while a part runs: the part and its grandchild die, summary.md says
    the part was stopped, the work folder is removed, and the check exits with 128 + 15."""
    e, pids = hanging
    out = tmp_path / "out"
    p = subprocess.Popen([*CHECK, str(out), "--dry-run", "--parts", "model,tests"], cwd=ROOT, env=e,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not pids.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        part, grandchild = map(int, pids.read_text().split())
        assert alive(part) and alive(grandchild)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert not alive(part) and not alive(grandchild) and not in_group(part)
    parts = parts_table((out / "summary.md").read_text())
    assert parts["model"][0] == "stopped by SIGTERM: the check ended"
    assert parts["tests"][0] == "not started"
    assert err.strip().splitlines()[-1] == f"stopped by SIGTERM; {out / 'summary.md'} has what was measured"
    command = (out / "model.log").read_text().splitlines()[0].split()
    work = Path(command[command.index("--work") + 1])  # the temporary folder the check made for the model
    assert work.name.startswith("tokrl-gpu-check-") and not work.exists()


def test_summary_keeps_what_a_cut_off_part_measured_and_projects_the_run_by_hand(tmp_path):
    """A decode log cut off by its cap (its last line torn mid-write): summary.md shows the rows it holds. The
    projection by hand: a T-SPMO step of 10 s, 0.02 s a problem at the default batch, 8 evaluations of 3,000
    problems = 480 s = 8.0 min; 350 × 10 s + 480 s = 3,980 s = 66.3 min; with bf16 sampling 4 s a step: 31.3 min."""
    row = lambda table, **r: "@row " + json.dumps({"table": table, **r})  # noqa: E731
    (tmp_path / "decode.log").write_text("$ cmd\n\n" + "\n".join([
        row("one decode step", decode="eager", **{"8 rows, ms": 21.04}),
        row("one decode step", decode="graph", **{"8 rows, ms": 9.5}),
        "noise a part printed", '@row {"table": "one decode step", "decode": "bf1']) + "\n")
    (tmp_path / "memory.log").write_text("\n".join([
        row("step", algorithm="T-SPMO", **{"step s": 10.0, "_kind": "tspmo", "_precision": "fp32"}),
        row("step", algorithm="T-SPMO, bf16", **{"step s": 4.0, "_kind": "tspmo", "_precision": "bf16"})]) + "\n")
    (tmp_path / "eval.log").write_text(row("evaluation", batch=1500, default="yes", _s_per_problem=0.02) + "\n")
    state = {n: {"status": "not started", "seconds": None, "pgid": None} for n in ("decode", "eval", "memory")}
    state["decode"] = {"status": "cut off at its cap of 75 s", "seconds": 75.2, "pgid": 4321}
    c = SimpleNamespace(out=tmp_path, parts=list(state), state=state, caps={"decode": 75, "eval": 70, "memory": 90},
                        commit="abc1234",
                        args=SimpleNamespace(dry_run=False, tokenizer=None), start=time.monotonic(),
                        started="now", budget=gpu_check.BUDGET_S)
    text = gpu_check.summary(c)
    assert parts_table(text)["decode"] == ["cut off at its cap of 75 s", "75", "75", "decode.log", "4321"]
    decode = text[text.index("## decode: one decode step"):].split("\n\n")[1].splitlines()
    assert decode == ["| decode | 8 rows, ms |", "|---|---|", "| eager | 21.0 |", "| graph | 9.5 |"]
    projected = text[text.index("## Projected"):].split("\n\n")[1].splitlines()
    assert projected[2:] == ["| fp32 | 10.0 | 8 | 66.3 | < 50 |", "| bf16 | 4 | 8 | 31.3 | < 20 |"]
    assert "_kind" not in text and "_s_per_problem" not in text


@pytest.mark.parametrize("out,args,message", [
    ("out", ["--tokenizer", "{tmp}/none.json"], "--tokenizer {tmp}/none.json: no such file (Qwen2's tokenizer.json)"),
    ("out", ["--tokenizer", "{tmp}/bad.json"], "--tokenizer {tmp}/bad.json: not a tokenizer.json with added_tokens"),
    ("out", ["--tokenizer", "{tmp}/bytes.json"], "--tokenizer {tmp}/bytes.json: <|endoftext|> has id 256, not "
                                                 "Qwen2's 151643"),
    ("out", ["--parts", "model,bogus"], "--parts model,bogus: expected parts among model, tests, decode, sampling, "
                                        "eval, memory, main, comma-separated"),
    ("out", ["--cap", "decode"], "--cap decode: expected PART=SECONDS"),
    ("out", ["--cap", "model=0"], "--cap model=0: expected PART=SECONDS"),
    ("out", ["--cap", "nothing=5"], "--cap nothing=5: expected PART=SECONDS"),
    ("out", ["--budget", "nan"], "--budget nan: expected seconds above 0"),
    ("file", [], "{tmp}/file: exists and is not a folder"),
])
def test_bad_input_is_one_line_naming_it_exit_status_2_before_anything_runs(tmp_path, capsys, out, args, message):
    (tmp_path / "bad.json").write_text("{not json")
    write_byte_tokenizer(tmp_path / "bytes.json")  # the tests' tokenizer: its specials at 256-258
    (tmp_path / "file").write_text("")
    argv = [str(tmp_path / out), "--dry-run", *(a.format(tmp=tmp_path) for a in args)]
    with pytest.raises(SystemExit) as e:
        gpu_check.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: " + message.format(tmp=tmp_path))
    assert not (tmp_path / "out").exists()  # nothing written


def test_without_cuda_the_check_says_so_in_one_line_before_writing_anything(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        gpu_check.main([str(tmp_path / "out")])
    assert e.value.code == 2 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err == ("error: no CUDA device here: the check measures a GPU (--dry-run runs it "
                                       "on the CPU)\n")
