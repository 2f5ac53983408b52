"""Does a finished `torchrun train.py` run exit 0? Run by hand (a measurement, not a test): consecutive 2-process runs
of the CLI on a tiny model, each checked for its exit status and its files.

    python bench/torchrun_exits.py                  # 20 runs of T-SPMO with replay, then 20 of S-GRPO (CPU, gloo)
    python bench/torchrun_exits.py --runs 5 --algos sgrpo

A run counts as complete when torchrun exits 0 and the run directory holds everything a finished run writes:
config.json, metrics.jsonl with every step, eval.jsonl with the evaluations due, curves.svg, the last checkpoint
(and `latest` naming it) and adapter/ in PEFT's format. Each failure is printed with the tail of its output, and so
is any "terminate called" line (a C++ abort) whatever the exit status.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_checkpoint  # noqa: E402

STEPS = 3
COMMON = ["--task", "mult", "--device", "cpu", "-G", "4", "--max-new-tokens", "8", "--steps", str(STEPS),
          "--eval-limit", "2", "--eval-every", "2", "--save-every", "2", "--lora-fraction", "0.5"]
ALGOS = {  # T-SPMO with replay (a failure replayed every step, a success when one is drawn); S-GRPO's selection
    "tspmo": ["--algo", "tspmo", "--replay-success", "1", "--replay-failure", "1", "--replay-threshold", "0.5",
              "--reward", "partial"],
    "sgrpo": ["--algo", "sgrpo", "--alpha", "2", "--k", "4"],
}


def missing_files(run: Path) -> list[str]:
    """What a finished run lacks (empty: complete)."""
    need = ["config.json", "curves.svg", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
            f"checkpoints/step-{STEPS:06d}/state.pt", f"checkpoints/step-{STEPS:06d}/adapter/adapter_model.safetensors"]
    missing = [f for f in need if not (run / f).is_file()]
    logs = {name: [json.loads(x)["step"] for x in (run / name).read_text().splitlines()] if (run / name).is_file()
            else [] for name in ("metrics.jsonl", "eval.jsonl")}
    if logs["metrics.jsonl"] != list(range(1, STEPS + 1)):
        missing.append(f"metrics.jsonl steps {logs['metrics.jsonl']}")
    if logs["eval.jsonl"] != [0, 2, STEPS]:
        missing.append(f"eval.jsonl steps {logs['eval.jsonl']}")
    latest = run / "checkpoints" / "latest"
    if not latest.is_file() or latest.read_text() != f"step-{STEPS:06d}\n":
        missing.append("checkpoints/latest")
    return missing


def one_run(model: Path, out: Path, algo: str, nproc: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "train.py",
           "--model", str(model), "--out", str(out), *COMMON, *ALGOS[algo]]
    t0 = time.time()
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = r.stdout + r.stderr
    metrics = out / "metrics.jsonl"
    replays = sum(len(json.loads(x).get("replays", [])) for x in metrics.read_text().splitlines()) \
        if metrics.is_file() else 0
    return {"status": r.returncode, "seconds": time.time() - t0, "missing": missing_files(out), "replays": replays,
            "aborts": output.count("terminate called"), "tail": output[-2000:]}


def load() -> str:
    """The load average, and the tasks runnable now (Linux: /proc/loadavg; a VM's load average can be far off)."""
    runnable = Path("/proc/loadavg").read_text().split()[3] if Path("/proc/loadavg").is_file() else "?"
    return f"load average {os.getloadavg()[0]:.1f}, runnable tasks {runnable}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="consecutive runs per algorithm (20)")
    p.add_argument("--algos", default="tspmo,sgrpo", help="comma-separated, of tspmo,sgrpo")
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args()
    start = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"# torchrun exits, {start}: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"{load()} at start; python {platform.python_version()}, torch "
          f"{__import__('torch').__version__}; {args.nproc} processes (gloo), {STEPS} steps a run", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_checkpoint(Path(tmp) / "tiny")
        for algo in args.algos.split(","):
            results = []
            for i in range(args.runs):
                r = one_run(model, Path(tmp) / f"{algo}-{i}", algo, args.nproc)
                results.append(r)
                if r["status"] or r["missing"] or r["aborts"]:
                    print(f"{algo} run {i + 1}: exit {r['status']}, missing {r['missing']}, 'terminate called' "
                          f"{r['aborts']}x\n{r['tail']}", flush=True)
            rows.append((algo, results))
    print(f"\n| algorithm | runs | exit 0 | files complete | replays | 'terminate called' | s per run (mean) |\n"
          f"|---|---|---|---|---|---|---|")
    for algo, results in rows:
        print(f"| {algo} | {len(results)} | {sum(r['status'] == 0 for r in results)} | "
              f"{sum(not r['missing'] for r in results)} | {sum(r['replays'] for r in results)} | "
              f"{sum(r['aborts'] for r in results)} | "
              f"{sum(r['seconds'] for r in results) / len(results):.1f} |")
    print(f"\n{load()} at the end ({datetime.datetime.now():%H:%M})")


if __name__ == "__main__":
    main()
