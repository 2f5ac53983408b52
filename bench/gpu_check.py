"""Measure a GPU in under 8 minutes, for whoever is lent one. Run by hand; pytest does not collect it.

    python bench/gpu_check.py OUT_DIR [--tokenizer PATH]      # PATH: Qwen2's tokenizer.json (default: the one in
                                                              # $TOKRL_ASSETS/qwen2/, which CI's machines have)

Builds a random-weight model of Qwen2-1.5B's shape (fp32, on the GPU, with the real tokenizer) once, then runs
three parts, each in its own process under its own time cap, so that a slow or failing part cannot hide the others:

    tests   the CUDA tests (tests/test_gpu.py)                                                       90 s
    bench   bench/benchmark.py --device cuda: the decode step, sampling against transformers,      280 s
            greedy evaluation, a whole step of every algorithm, the projected paper runs
    main    python train.py --algo tspmo --task mult, 2 steps, --eval-limit 256                     90 s

Everything lands in OUT_DIR: each part's log (tests.log, bench.log, main.log) and summary.md, which gives each
part's exit status and minutes and the main command's metrics (seconds per step, peak memory, the evaluation).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model as M  # noqa: E402

PARTS = {  # name: (seconds allowed, command; {model}: the built model directory, {run}: the main command's run)
    "tests": (90, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]),
    "bench": (280, [sys.executable, "bench/benchmark.py", "--device", "cuda", "--ckpt-dir", "{model}"]),
    "main": (90, [sys.executable, "train.py", "--algo", "tspmo", "--task", "mult", "--model", "{model}", "--steps",
                  "2", "--eval-limit", "256", "--device", "cuda", "--out", "{run}"]),
}


def build_model(path: Path, tokenizer: Path) -> None:
    """Random weights (normal, std 0.02) of the qwen2-1.5b preset, drawn on the GPU, written as a model directory."""
    with torch.device("cuda"):
        m = M.Qwen2ForCausalLM(M.PRESETS["qwen2-1.5b"])
    m.init_weights(torch.Generator("cuda").manual_seed(0), std=0.02)
    M.save_model(m, path)
    shutil.copy(tokenizer, path / "tokenizer.json")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151643, 151645]}))


def run_part(name: str, out: Path, model: Path, run: Path) -> tuple[str, float]:
    """One part in its own process group, its output in OUT/name.log; killed at its cap. (status, minutes)."""
    cap, cmd = PARTS[name]
    cmd = [c.format(model=model, run=run) for c in cmd]
    t0 = time.time()
    with open(out / f"{name}.log", "w") as log:
        log.write("$ " + " ".join(cmd) + "\n\n")
        log.flush()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            status = f"exit {p.wait(timeout=cap)}"
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            status = f"stopped at its cap of {cap} s"
    return status, (time.time() - t0) / 60


def summary(run: Path, results: dict, build_min: float) -> str:
    lines = [f"# tokrl on {torch.cuda.get_device_name()}, torch {torch.__version__}\n",
             f"Model built in {build_min:.1f} min (random weights, Qwen2-1.5B's shape, fp32).\n",
             "| part | status | minutes |", "|---|---|---|"]
    lines += [f"| {name} | {status} | {minutes:.1f} |" for name, (status, minutes) in results.items()]
    for name in ("metrics.jsonl", "eval.jsonl"):
        if (run / name).is_file():
            lines += ["", f"main command, {name}:", "```", (run / name).read_text().strip()[:4000], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="folder for the logs and summary.md")
    ap.add_argument("--tokenizer", default=Path(os.environ.get("TOKRL_ASSETS", "../shared")) / "qwen2" /
                    "tokenizer.json", type=Path, help="Qwen2's tokenizer.json")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated among {','.join(PARTS)}")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here: bench/gpu_check.py measures a GPU")
    if not args.tokenizer.is_file():
        raise SystemExit(f"error: --tokenizer {args.tokenizer}: no such file (Qwen2's tokenizer.json)")
    parts = args.parts.split(",")
    if bad := set(parts) - set(PARTS):
        raise SystemExit(f"error: --parts: unknown {', '.join(sorted(bad))}; allowed: {', '.join(PARTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(os.environ.get("TMPDIR", "/tmp")) / "tokrl-gpu-check-model"
    run = model.with_name("tokrl-gpu-check-run")  # the main command's run directory (a new run each time)
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.time()
    if not (model / "model.safetensors").is_file():
        build_model(model, args.tokenizer)
    torch.cuda.empty_cache()
    build_min, results = (time.time() - t0) / 60, {}
    for name in parts:
        results[name] = run_part(name, out, model, run)
        print(f"{name}: {results[name][0]}, {results[name][1]:.1f} min", flush=True)
        (out / "summary.md").write_text(summary(run, results, build_min))
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
