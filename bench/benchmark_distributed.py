"""Step time of 1 process against N processes (torchrun, gloo, CPU), run by hand: the same CLI run, seconds per step.

    python bench/benchmark_distributed.py                 # CPU: 1 process, then 2 (one thread each), then 1 with 2
    python bench/benchmark_distributed.py --device cuda --nproc 1 2 4 8   # on a machine with 8 GPUs: NCCL

A random-weight Qwen2 (hidden 256, 6 layers, the byte tokenizer of the tests) is written to a temporary directory;
each configuration runs `train.py` for --steps steps and reports the mean of metrics.jsonl's `seconds` without the
first step (warm-up). The completions differ with N (each process samples its share from its own stream), so the
work per step differs a little too; the mean completion length is printed beside each time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_checkpoint, tiny_config  # noqa: E402


def run(model: Path, out: Path, algo: str, nproc: int, threads: int, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc-per-node={nproc}"]
    group = args.group or {"grpo": 8, "sgrpo": 8, "tspmo": 16}[algo]
    cmd = [*launcher, "train.py", "--model", str(model), "--out", str(out), "--algo", algo, "--task", "mult",
           "--device", args.device, "-G", str(group), "--max-new-tokens", str(args.tokens), "--steps",
           str(args.steps), "--eval-limit", "1", "--eval-every", "0", "--save-every", "1000", "--seed", "1"]
    t0 = time.time()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {"s_per_step": sum(r["seconds"] for r in rows) / len(rows), "len": sum(r["len_mean"] for r in rows) /
            len(rows), "wall": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--algos", nargs="+", default=["sgrpo", "tspmo"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--group", type=int, help="G for every algorithm (default 8; T-SPMO 16)")
    p.add_argument("--no-threads-row", action="store_true", help="CPU: leave out the 1 process × N threads row")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        model = make_checkpoint(Path(d) / "model", tiny_config(hidden_size=256, intermediate_size=688,
                                                               num_hidden_layers=6), std=0.05)
        cpu = args.device == "cpu"
        threads_row = cpu and max(args.nproc) > 1 and not args.no_threads_row  # 1 process with N threads
        configs = [(n, 1) for n in args.nproc] + ([(1, max(args.nproc))] if threads_row else [])
        print(f"# {args.device}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; "
              f"{args.steps} steps, mean of steps 2..{args.steps}; {args.tokens} new tokens at most, G "
              f"{args.group or '8 (T-SPMO 16)'}")
        print("| algorithm | processes × threads | s/step | speed-up | mean completion length |\n|---|---|---|---|---|")
        for algo in args.algos:
            base = None
            for i, (n, threads) in enumerate(configs):
                r = run(model, Path(d) / f"{algo}-{i}", algo, n, threads, args)
                base = base or r["s_per_step"]
                print(f"| {algo} | {n} × {threads} | {r['s_per_step']:.2f} | {base / r['s_per_step']:.2f} | "
                      f"{r['len']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
