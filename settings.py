"""A run's settings: the dataclass whose fields are the CLI's flags and config.json's keys, the paper's defaults for
each (algo, task), and the table of rules every setting is checked against before anything is loaded.

One rule a line: (setting, allowed(value, settings), why and what is allowed). A broken rule is one line
`error: --flag VALUE: why; allowed: ...` and exit status 2 (argparse's convention). Adding a setting means adding
its field here and its rule below.
"""
from __future__ import annotations

import math
import os
import reprlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch

import baselines
import lora
from tasks import TASKS

# ----------------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    algo: str = "tspmo"  # grpo | sgrpo | tspmo | ppo | dpo
    task: str = "mult"  # mult | svamp | gsm8k
    model: str = "Qwen/Qwen2-1.5B"  # a directory, or a repo id found in / downloaded to the Hugging Face cache
    revision: str | None = None  # with a repo id: branch, tag or commit (None: main)
    data: str | None = None  # svamp / gsm8k data (file or directory); None: the files shipped in data/
    out: str | None = None  # run directory; None: runs/{task}-{algo}-{time}
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "float32"  # the paper trains in fp32
    seed: int = 0
    reward: str | None = None  # training reward: mult exact (P1) | partial (S2); svamp exact; gsm8k sympy (S1)
    # training (paper, section IV-A)
    steps: int = 350
    lr: float = 1e-4
    weight_decay: float = 0.01  # [decided] (SPEC.md) AdamW weight decay 0.01, torch's default; the paper names none
    group_size: int = 50  # G
    accum: int = 1  # prompts per optimizer step (effective batch; the paper's ablation uses 8)
    temperature: float = 0.3
    top_p: float = 1.0  # the paper names no top-p: plain temperature sampling
    max_new_tokens: int = 300
    sample_precision: str = "fp32"  # sampling's matrix products: fp32 (the paper's) | tf32 | bf16 (a bf16 copy of the base)
    eval_max_new_tokens: int | None = None  # greedy evaluation's limit (None: max_new_tokens)
    beta: float = 0.01  # KL weight of GRPO / S-GRPO (E3, E5)
    # [decided] (SPEC.md, E10) λ read as AdamW's weight decay (reading (b)): no λ term in the loss by default, the
    # weight decay above does the regularising; 0.01: λ·Σ‖W‖² in the loss, E10 read literally (reading (a))
    lam: float = 0.0
    tspmo_objective: str = "pi"  # E10's π_θ(v|p) (the paper's) | "logpi": log π_θ(v|p), an ablation (ours)
    # LoRA
    lora_fraction: float = 0.25
    lora_rank: int = 8
    lora_alpha: float | None = None  # [decided] (SPEC.md) α = r
    lora_targets: str = ",".join(lora.TARGETS)  # comma-separated projections of each adapted layer (paper: q, v)
    # S-GRPO token selection (E6)
    alpha: int = 50
    k: int = 100
    p: float = 0.5  # [decided] (SPEC.md) the paper does not give P
    # T-SPMO replay
    replay_success: int = 1
    replay_failure: int = 0
    replay_threshold: float = 1.0  # [decided] (SPEC.md) r = 1.0 (with --reward partial: success = every step right)
    replay_pool: str = "history"  # [decided] (SPEC.md) the paper's "set of all previously generated completions"
    # evaluation and bookkeeping (ours)
    eval_every: int = 50
    eval_limit: int | None = None  # evaluate on the first N test examples (None: all)
    eval_batch: int | None = None  # prompts per greedy batch (None: CUDA what the device's memory holds; CPU 32)
    save_every: int = 10
    threads: int | None = None  # torch CPU threads (None: torch's default, one per core)
    backward_batch: int = 1  # completions per forward/backward (1: the paper's per-completion backward, Alg2)
    # PPO with a critic (K1–K4) and DPO (D1), SPEC-baselines.md; PPO's KL weight w2 is `beta`
    critic: str = "shared"  # [decided] (SPEC-baselines.md) the value head shares the policy's base and LoRA
    gamma: float = baselines.GAMMA
    gae_lambda: float = baselines.GAE_LAMBDA
    clip_eps: float = baselines.PPO_CLIP_EPS
    ppo_passes: int = baselines.PPO_PASSES  # μ
    w1: float = baselines.W1  # entropy weight
    w3: float = baselines.W3  # value-loss weight
    dpo_beta: float = baselines.DPO_BETA  # β_D


COMMON = dict(lr=1e-4, beta=0.01, lam=0.0, temperature=0.3, max_new_tokens=300)  # lam 0: λ as weight decay (E10)
TASK_DEFAULTS = {  # LoRA per task (paper IV-A); S-GRPO (α, k) (Table III); replay (Table V)
    "mult": dict(lora_fraction=1 / 4, lora_rank=8, alpha=50, k=100, replay_success=1, replay_failure=0,
                 reward="exact"),
    "svamp": dict(lora_fraction=1 / 3, lora_rank=16, alpha=100, k=100, replay_success=0, replay_failure=0,
                  reward="exact"),
    "gsm8k": dict(lora_fraction=1 / 3, lora_rank=16, alpha=100, k=100, replay_success=0, replay_failure=0,
                  reward="sympy"),  # ours
}
STEPS = {("mult", "tspmo"): 350, ("mult", "sgrpo"): 450, ("mult", "grpo"): 450,
         ("svamp", "tspmo"): 400, ("svamp", "sgrpo"): 325, ("svamp", "grpo"): 325,
         ("gsm8k", "tspmo"): 400, ("gsm8k", "sgrpo"): 325, ("gsm8k", "grpo"): 325}  # gsm8k: ours, as svamp
STEPS.update({(task, algo): STEPS[task, "grpo"] for task in ("mult", "svamp", "gsm8k") for algo in ("ppo", "dpo")})
GROUP = {"grpo": 8, "sgrpo": 8, "tspmo": 50,
         "ppo": 8, "dpo": 8}  # [decided] (SPEC-baselines.md) G = 8 for PPO and DPO: the same sampling budget as GRPO


def paper_defaults(algo: str, task: str) -> dict:
    """The paper's settings for (algo, task); gsm8k is our extension and borrows SVAMP's."""
    return {**COMMON, **TASK_DEFAULTS[task], "steps": STEPS[task, algo], "group_size": GROUP[algo]}


# ----------------------------------------------------------------------------------------------------------------------
# The rules

def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # lora.apply_lora adapts attention projections


RULES: list[tuple[str, Callable[[Any, Settings], bool], str]] = [
    ("steps", lambda v, s: v >= 1, "a run needs at least one step; allowed: an integer >= 1"),
    ("lr", lambda v, s: _num(v) and 0 < v <= 1, "AdamW would not move (<= 0) or diverge at once (> 1); "
                                                "allowed: 0 < lr <= 1 (the paper: 1e-4)"),
    ("weight_decay", lambda v, s: _num(v) and 0 <= v <= 1, "allowed: 0 <= weight decay <= 1 (default 0.01)"),
    ("group_size", lambda v, s: v >= 1, "a group needs completions; allowed: an integer >= 1 (the paper: 8, 50)"),
    ("accum", lambda v, s: v >= 1, "an optimizer step needs a prompt; allowed: an integer >= 1"),
    ("temperature", lambda v, s: _num(v) and v >= 0, "allowed: a finite number >= 0 (0: greedy; the paper: 0.3)"),
    ("top_p", lambda v, s: _num(v) and 0 < v <= 1, "nucleus sampling keeps a probability mass in (0, 1]; allowed: "
                                                   "0 < top-p <= 1 (1: off)"),
    ("max_new_tokens", lambda v, s: v >= 1, "a completion needs a token; allowed: an integer >= 1 (the paper: 300)"),
    ("beta", lambda v, s: _num(v) and v >= 0, "a KL weight; allowed: a finite number >= 0 (the paper: 0.01)"),
    ("lam", lambda v, s: _num(v) and v >= 0, "an L2 weight in the loss; allowed: a finite number >= 0 (default 0: "
                                           "the paper's λ as weight decay; 0.01: its λ read literally)"),
    ("lora_fraction", lambda v, s: _num(v) and 0 < v <= 1, "a fraction of the layers; allowed: 0 < fraction <= 1"),
    ("lora_rank", lambda v, s: v >= 1, "allowed: an integer >= 1 (the paper: 8 or 16)"),
    ("lora_alpha", lambda v, s: v is None or (_num(v) and v > 0), "LoRA's scale is alpha/r; allowed: a finite "
                                                                  "number > 0 (default r)"),
    ("alpha", lambda v, s: v >= 0, "S-GRPO's always-included prefix; allowed: an integer >= 0"),
    ("k", lambda v, s: v >= 1, "S-GRPO's cap on tokens in the loss; allowed: an integer >= 1"),
    ("p", lambda v, s: _num(v) and 0 <= v <= 1, "a probability; allowed: 0 <= P <= 1 (default 0.5)"),
    ("replay_success", lambda v, s: v >= 0, "a count of replays; allowed: an integer >= 0"),
    ("replay_failure", lambda v, s: v >= 0, "a count of replays; allowed: an integer >= 0"),
    ("replay_threshold", lambda v, s: _num(v), "allowed: a finite reward (default 1.0)"),
    ("replay_pool", lambda v, s: v in ("history", "group"), "allowed: history (every completion generated so far, "
                                                            "the paper's) or group (this prompt's G only)"),
    ("eval_every", lambda v, s: v >= 0, "allowed: an integer >= 0 (0: at the start and the end only)"),
    ("eval_limit", lambda v, s: v is None or v >= 0, "allowed: an integer >= 0 (default: the whole test set)"),
    ("eval_batch", lambda v, s: v is None or v >= 1, "allowed: an integer >= 1 (default: on CUDA what the device's "
                                                    "memory holds, on the CPU 32)"),
    ("backward_batch", lambda v, s: v >= 1, "allowed: an integer >= 1 (default 1: one completion per backward)"),
    ("backward_batch", lambda v, s: v == 1 or s.algo != "tspmo", "T-SPMO runs one forward per trie prefix; allowed: "
                                                                 "--backward-batch 1 with --algo tspmo"),
    ("sample_precision", lambda v, s: v in ("fp32", "tf32", "bf16"), "allowed: fp32 (the paper's), tf32 (CUDA matrix "
                                                                    "products in TF32) or bf16 (a bf16 copy of the "
                                                                    "frozen weights for sampling)"),
    ("sample_precision", lambda v, s: v != "tf32" or torch.device(s.device).type == "cuda",
     "TF32 is a CUDA matrix-product mode; allowed on the CPU: fp32 or bf16"),
    ("save_every", lambda v, s: v >= 1, "allowed: an integer >= 1 (default 10)"),
    ("seed", lambda v, s: 0 <= v < 2**62, "allowed: an integer in [0, 2^62)"),
    ("data", lambda v, s: v is None or s.task != "mult", "the mult task generates its problems and reads no data; "
                                                         "allowed: --data with --task svamp or gsm8k"),
    ("reward", lambda v, s: v in TASKS[s.task].REWARDS, "a training reward this task has; allowed: mult exact or "
                                                         "partial (S2), svamp exact, gsm8k sympy (S1)"),
    ("eval_max_new_tokens", lambda v, s: v is None or v >= 1, "allowed: an integer >= 1 (default: --max-new-tokens)"),
    ("tspmo_objective", lambda v, s: v in ("pi", "logpi"), "allowed: pi (E10, the paper's) or logpi (an ablation)"),
    ("lora_targets", lambda v, s: bool(v) and set(v.split(",")) <= set(LORA_TARGETS),
     f"allowed: comma-separated projections of {','.join(LORA_TARGETS)} (default q_proj,v_proj)"),
    ("threads", lambda v, s: v is None or v >= 1, "allowed: an integer >= 1 (default: torch's, one per core)"),
    # PPO with a critic and DPO (baselines.py)
    ("accum", lambda v, s: s.algo not in ("ppo", "dpo") or v == 1,
     "PPO and DPO take one prompt per step (ours); allowed: --accum 1 with --algo ppo or dpo"),
    ("critic", lambda v, s: v in ("shared", "separate"), "allowed: shared (a value head) or separate (its own copy)"),
    ("gamma", lambda v, s: _num(v) and 0 <= v <= 1, "a discount; allowed: 0 <= γ <= 1 (default 1)"),
    ("gae_lambda", lambda v, s: _num(v) and 0 <= v <= 1, "allowed: 0 <= GAE λ <= 1 (default 0.95)"),
    ("clip_eps", lambda v, s: _num(v) and v > 0, "allowed: a finite number > 0 (default 0.2)"),
    ("ppo_passes", lambda v, s: v >= 1, "PPO's μ; allowed: an integer >= 1 (default 4)"),
    ("w1", lambda v, s: _num(v), "allowed: a finite entropy weight (default 0)"),
    ("w3", lambda v, s: _num(v) and v >= 0, "allowed: a finite value-loss weight >= 0 (default 0.5)"),
    ("dpo_beta", lambda v, s: _num(v) and v > 0, "allowed: a finite number > 0 (default 0.1)"),
    ("device", lambda v, s: device_problem(v) is None, ""),  # the message comes from device_problem
]
WARNINGS: list[tuple[str, Callable[[Any, Settings], bool], str]] = [  # legal, but nothing learnt, or slow
    ("group_size", lambda v, s: v == 1, "one completion a group: every group has zero variance (Â = 0), so no "
                                        "update learns from the reward"),
    ("temperature", lambda v, s: v == 0, "greedy sampling draws G identical completions: every group has zero "
                                         "variance (Â = 0), so no update learns from the reward"),
    ("threads", lambda v, s: v is not None and v > (os.cpu_count() or 1),  # legal, but slower, not faster
     f"more threads than this machine's {os.cpu_count()} cores: the extra ones can only wait for a core"),
]


def device_problem(device) -> str | None:
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return "not a device; allowed: cpu, cuda, cuda:N"
    if d.type == "cuda" and not torch.cuda.is_available():
        return (f"CUDA is not available here (torch {torch.__version__}, built "
                f"{'with CUDA ' + torch.version.cuda if torch.version.cuda else 'without CUDA'}); allowed: cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s); allowed: cuda:0 … cuda:N-1"
    if d.type not in ("cpu", "cuda"):
        return "tokrl runs on the CPU or a CUDA GPU; allowed: cpu, cuda, cuda:N"
    return None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def usage_error(message: str) -> NoReturn:
    """A bad flag or a bad file handed in: one line, exit status 2 (argparse's convention)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def refuse_setting(name: str, value, why: str, source: Path | None = None) -> NoReturn:
    usage_error(f"{source}: {name} is {reprlib.repr(value)}; {why}" if source else f"{flag(name)} {value}: {why}")


def type_problem(name: str, value) -> str | None:
    """A setting's value against its field's type (None: it fits). The command line always gives the type; a
    resumed run's config.json may hold anything: integers must be below 2^62, strings at most MAX_STR characters."""
    base, _, optional = Settings.__dataclass_fields__[name].type.partition(" | ")
    if value is None and optional:
        return None
    if base == "int" and isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**62:
        return None
    if base == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return None
    if base == "str" and isinstance(value, str) and len(value) <= MAX_STR:
        return None
    return "allowed: " + {"int": "an integer below 2^62", "float": "a number",
                          "str": f"a string of at most {MAX_STR:,} characters"}[base] + (" or null" if optional else "")


MAX_STR = 4096  # the longest path Linux opens (PATH_MAX), and so the longest string setting


def validate(cfg: Settings, training: bool = True, source: Path | None = None) -> None:
    """Every setting's type and every rule of RULES, before anything is loaded or written; then the warnings
    (training only). `source`: the file the settings come from (a resumed run's config.json), which a refusal
    names instead of the flag."""
    for name in Settings.__dataclass_fields__:
        if (why := type_problem(name, getattr(cfg, name))) is not None:
            refuse_setting(name, getattr(cfg, name), why, source)
    for name, ok, why in RULES:
        value = getattr(cfg, name)
        try:
            good = ok(value, cfg)
        except TypeError:  # e.g. a string where a number belongs (a hand-edited config.json)
            good = False
        if not good:
            refuse_setting(name, value, why or device_problem(value), source)
    for name, bad, why in WARNINGS:
        if training and bad(getattr(cfg, name), cfg):
            print(f"warning: {flag(name)} {getattr(cfg, name)}: {why}", file=sys.stderr)
