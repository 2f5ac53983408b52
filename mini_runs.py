"""The miniature's methods and one run of each, shared by `python mini.py` and `--beyond` (mini_beyond.py).

    METHODS        each method's algorithm and what differs from the algorithm's settings
    run_settings   one run's Settings: the paper's defaults for (algo, mult), scaled to the miniature
    run_job        one run through training.train (the code path of `python train.py`), its log in RUN/log.txt
    run_all        the runs, `parallel` at a time in separate processes, one CPU thread each
    choose         the learning rate with the best validation accuracy (ties: the smaller)
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import torch

import mini_base
import training
from mini_base import MAX_NEW_TOKENS, MiniMult, say
from settings import Settings, paper_defaults

METHODS = {  # name: (algo, what differs from the algorithm's settings); each sets λ itself, whatever the CLI's default
    "grpo": ("grpo", {}),
    "sgrpo": ("sgrpo", {}),
    # E10's λ, two readings (docs/mini.md, "E10's λ"): (b) λ as AdamW's decoupled weight decay of 0.01, no λ term in
    # the loss (the CLI's default, [decided] SPEC.md); (a) literal, λ·Σ‖W‖² over every LoRA A and B in the loss,
    # λ = 0.01. AdamW's weight decay is 0.01 in both (torch's default, [decided] SPEC.md).
    "tspmo-decay": ("tspmo", {"lam": 0.0}),
    "tspmo-literal": ("tspmo", {"lam": 0.01}),
    # Table V's contrast: T-SPMO (b) without replay, C_success = C_failure = 0 (the paper: 70.0% with success replay,
    # 19.5% without)
    "tspmo-decay-noreplay": ("tspmo", {"lam": 0.0, "replay_success": 0, "replay_failure": 0}),
    # the methods the paper argues against (SPEC-baselines.md: G = 8, GRPO's steps; PPO μ = 4, γ = 1, λ_GAE = 0.95,
    # ε = 0.2, w1 = 0, w2 = β, w3 = 0.5; DPO β_D = 0.1), every other setting the CLI's default
    "ppo": ("ppo", {}),
    "dpo": ("dpo", {}),
    # ablations, not run by default (--methods): E10 with log π in place of π; PPO with a separate critic; replay from
    # this prompt's group only (not the history pool)
    "tspmo-decay-logpi": ("tspmo", {"lam": 0.0, "tspmo_objective": "logpi"}),
    "tspmo-literal-logpi": ("tspmo", {"lam": 0.01, "tspmo_objective": "logpi"}),
    "ppo-separate": ("ppo", {"critic": "separate"}),
    "tspmo-decay-group": ("tspmo", {"lam": 0.0, "replay_pool": "group"}),
    "tspmo-literal-group": ("tspmo", {"lam": 0.01, "replay_pool": "group"}),
}
STEPS = {"grpo": 450, "sgrpo": 450, "tspmo": 350, "ppo": 450, "dpo": 450}  # Table II's; PPO, DPO: GRPO's
STEP_SCALE = 1.0  # the paper's step counts: at a third of them the ranking and E10's λ read otherwise (docs/mini.md)
QUICK_STEP_SCALE = 1 / 9
LRS = (3e-4, 1e-3, 3e-3)  # --tune's grid (the paper's 1e-4 moves a 1 M-parameter model's LoRA too little)
# ours: the miniature has 4 layers, so the paper's last 1/4 would be one layer with q/v only (4,096 LoRA parameters);
# the last half, all four attention projections, rank 8 (16,384). The same for every method.
LORA_FRACTION, LORA_TARGETS = 0.5, "q_proj,k_proj,v_proj,o_proj"


def scaled_selection() -> tuple[int, int]:
    """S-GRPO's α and k scaled from the paper's (50, 100) at 300 new tokens to the miniature's completion limit."""
    return round(50 * MAX_NEW_TOKENS / 300), round(100 * MAX_NEW_TOKENS / 300)  # (7, 13)


def run_settings(method: str, setting: str, seed: int, base: Path, lr: float,
                 step_scale: float = STEP_SCALE) -> Settings:
    """Settings of one run: the paper's defaults for (algo, mult), scaled; the same for every method except G,
    S-GRPO's (α, k), T-SPMO's replay and λ, PPO's critic, and the learning rate --tune chose."""
    algo, change = METHODS[method]
    alpha, k = scaled_selection()
    paper = paper_defaults(algo, "mult")
    return Settings(**{
        **paper, "algo": algo, "task": f"mini-{setting}", "model": str(base), "device": "cpu", "seed": seed,
        "steps": max(1, round(STEPS[algo] * step_scale)), "alpha": alpha, "k": k,
        "lr": lr, "lora_fraction": LORA_FRACTION, "lora_targets": LORA_TARGETS,
        "max_new_tokens": MAX_NEW_TOKENS, "eval_max_new_tokens": MAX_NEW_TOKENS,
        "eval_every": 0, "eval_batch": mini_base.SPLIT_SIZE, "save_every": 10**9, "threads": 1, **change})


@dataclasses.dataclass(frozen=True)
class Job:
    setting: str
    method: str
    seed: int
    split: str  # "test", or "validation" (--tune)
    cfg: Settings


def run_job(job: Job, loaded=None) -> dict:
    """One RL run through training.train, its progress lines in RUN/log.txt; the task scores job.split. `loaded`: (net,
    tok, eos) of the base, copied so that each run puts its LoRA on a fresh model (None: read it from disk)."""
    run = Path(job.cfg.out)
    if run.exists():
        shutil.rmtree(run)  # training.train appends to metrics.jsonl: start clean
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(job.cfg), indent=2) + "\n")
    torch.set_num_threads(job.cfg.threads or 1)
    net, tok, eos = loaded or training.load_everything(job.cfg)
    t0, cpu0 = time.time(), time.process_time()
    with open(run / "log.txt", "w") as f, contextlib.redirect_stdout(f):
        final = training.train(job.cfg, run, task=MiniMult(tok, job.setting, job.split),
                            loaded=(copy.deepcopy(net), tok, eos))
    # wall minutes depend on what else the machine runs; this process's CPU minutes (one thread) hardly do
    return {"setting": job.setting, "method": job.method, "seed": job.seed, "split": job.split, "lr": job.cfg.lr,
            "accuracy": final["accuracy"], "steps": job.cfg.steps, "minutes": (time.time() - t0) / 60,
            "cpu_minutes": (time.process_time() - cpu0) / 60, "run": str(run)}


def run_all(jobs: list[Job], parallel: int, log=say) -> list[dict]:
    """Every job, `parallel` at a time in separate processes (1: in this process, each base loaded once)."""
    done = []

    def report(r):
        done.append(r)
        log(f"  {r['setting']:<11} {r['method']:<20} lr {r['lr']:g} seed {r['seed']} | {r['split']} accuracy "
            f"{r['accuracy']:.3f} | {r['steps']} steps | {r['minutes']:.1f} min (CPU {r['cpu_minutes']:.1f})  "
            f"[{len(done)}/{len(jobs)}]")

    if parallel <= 1:
        bases: dict[str, tuple] = {}
        for j in jobs:
            if j.cfg.model not in bases:
                bases[j.cfg.model] = training.load_everything(j.cfg)
            report(run_job(j, bases[j.cfg.model]))
    else:  # spawn: a fresh interpreter per worker (forking after torch's thread pool started can hang)
        with multiprocessing.get_context("spawn").Pool(parallel) as pool:
            for r in pool.imap_unordered(run_job, jobs):
                report(r)
            # Each worker exits on its own, running its exit handlers: tqdm makes a multiprocessing lock in it, a
            # named semaphore under spawn, that only those handlers unlink. The `with` alone would terminate() the
            # workers (SIGTERM), and the resource tracker would report the semaphores as leaked after the results.
            pool.close()
            pool.join()
    order = {(j.setting, j.method, j.seed, j.cfg.lr): i for i, j in enumerate(jobs)}
    return sorted(done, key=lambda r: order[r["setting"], r["method"], r["seed"], r["lr"]])


def slowest_first(jobs: list[Job]) -> list[Job]:
    """ours: PPO's μ = 4 passes (and the separate critic's second model) make it the slowest; it starts first, so
    that the two workers end together."""
    return sorted(jobs, key=lambda j: (j.method != "ppo-separate", j.method != "ppo"))



def choose(validation: dict[float, float]) -> float:
    """The learning rate with the best validation accuracy; ties go to the smaller rate."""
    return min(validation, key=lambda lr: (-validation[lr], lr))



def workers(parallel: int, jobs: int) -> int:
    """--parallel, capped at the jobs and this machine's cores (a worker beyond either only waits, and holds its
    memory): said in a note."""
    cores = os.cpu_count() or 1
    n = min(parallel, jobs, cores)
    if n < parallel:
        print(f"note: --parallel {parallel}: {jobs} run(s) on {cores} core(s), so {n} at a time", file=sys.stderr)
    return n
