"""A run's settings, each declared once: its name, type and default, the paper's value per algo or task where the
paper varies it, the rules it is checked against and its --help. From these declarations come

    Settings            the frozen dataclass: its fields are config.json's keys
    add_arguments       train.py's flags, one per field (argparse leaves the ones not typed None)
    validate            the checks, before anything is loaded: the field's type, then its rules in order
    paper_defaults      the paper's settings for (algo, task)
    paper_table         the table of them at the end of --help

A broken rule is one line `error: --flag VALUE: why; allowed: ...` and exit status 2 (argparse's convention). Adding a
setting means one declaration below, and its use.
"""
from __future__ import annotations

import argparse
import os
import reprlib
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch

import lora
from tasks import TASKS
from values import is_finite_number as _num, is_integer, is_number  # _num: a finite number, not a bool

ALGOS = ("grpo", "sgrpo", "tspmo", "ppo", "dpo")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # lora.apply_lora adapts attention projections
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_STR = 4096  # the longest path Linux opens (PATH_MAX), and so the longest string setting
ALL = "every run"  # `paper=ALL`: the default is the paper's (or the specification's decided) value for every run

# the paper's step counts (section IV-A); gsm8k is ours, as svamp; PPO and DPO take GRPO's
PAPER_STEPS = {("mult", "tspmo"): 350, ("mult", "sgrpo"): 450, ("mult", "grpo"): 450,
               ("svamp", "tspmo"): 400, ("svamp", "sgrpo"): 325, ("svamp", "grpo"): 325,
               ("gsm8k", "tspmo"): 400, ("gsm8k", "sgrpo"): 325, ("gsm8k", "grpo"): 325}
PAPER_STEPS.update({(task, algo): PAPER_STEPS[task, "grpo"] for task in TASKS for algo in ("ppo", "dpo")})

# The sampler divides float32 logits by the temperature: at float32's smallest normal number l/T already overflows for
# every logit beyond 4, and below it T is a subnormal or 0 there (--temperature 1e-300 is 0 in float32)
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny
# [decided] (SPEC.md, F1) --lr's default with --train full: TRL's GRPO default for full fine-tuning (the paper's 1e-4 is
# a LoRA rate, for an adapter whose B starts at 0)
FULL_LR = 1e-6
LORA_FLAGS = ("lora_fraction", "lora_rank", "lora_alpha", "lora_targets")  # LoRA's own settings, none with --train full
REWARD_RULE = "a training reward this task has; allowed: mult exact or partial (S2), svamp exact, gsm8k sympy (S1)"
Rule = tuple[Callable[[Any, Any], bool], "str | Callable[[Any, Any], str]"]  # (ok(v, s), why or why(v, s))


def setting(default, help: str, *rules: Rule, choices: tuple = (), why: str = "", paper: Any = None,
            section: str = "", short: str = "", warn: Rule | None = None) -> Any:
    """One setting's declaration: a dataclass field whose metadata hold the rest.

    rules    (ok(value, settings), why) pairs, checked in order after the type
    choices  the values allowed: the parser's choices, and the first rule (its message `why`, or the list)
    paper    the paper's value by task, by algo or by (task, algo), or ALL: the default is the paper's for every run
    section  the --help group this setting opens; short: a one-letter flag
    warn     (bad(value, settings), why): a legal value that cannot learn, or is slow (a warning at the start)"""
    if choices:
        rules = ((lambda v, s: v in choices, why or "allowed: " + ", ".join(choices)), *rules)
    return field(default=default, metadata=dict(help=help, rules=rules, choices=choices, paper=paper,
                                                section=section, short=short, warn=warn))


@dataclass(frozen=True)
class Settings:
    """A dataclass with each field's declaration in its metadata, rather than a table of records that builds one: a
    reader (and a type checker) reads each setting's name, type and default as in any dataclass, first on its line."""
    algo: str = setting("tspmo", "objective (default tspmo; ppo and dpo: the baselines of SPEC-baselines.md)",
                        choices=ALGOS, section="run")
    task: str = setting("mult", "task (default mult)", choices=tuple(TASKS))
    model: str = setting("Qwen/Qwen2-1.5B", "model directory or Hugging Face repo id (default Qwen/Qwen2-1.5B)")
    revision: str | None = setting(None, "with a repo id: branch, tag or commit hash (default main)")
    data: str | None = setting(  # None: the files shipped in data/
        None, "svamp/gsm8k only. svamp: dir with train.json+test.json, or SVAMP.json (a fixed seeded split; default: "
        "the paper's 700/300 split shipped in data/svamp/); gsm8k: dir with train.jsonl+test.jsonl (default: the "
        "7,473/1,319 files shipped in data/gsm8k/)",
        (lambda v, s: v is None or s.task != "mult", "the mult task generates its problems and reads no data; "
                                                     "allowed: --data with --task svamp or gsm8k"))
    out: str | None = setting(None, "run directory (default runs/{task}-{algo}-{time}); must not hold a run already")
    device: str = setting(DEVICE, f"cpu, cuda or cuda:N (default {DEVICE})",
                          (lambda v, s: device_problem(v) is None, lambda v, s: device_problem(v)))
    dtype: str = setting("float32", "default float32 (the paper's)", choices=("float32", "bfloat16", "float16"),
                         paper=ALL)
    # F1, beyond the paper (its section V: "infeasible given our single 40GB GPU"): full_finetune.py
    train: str = setting(
        "lora", "what trains: lora = LoRA adapters on the frozen base (default, the paper's); full = every weight of "
        "the model in fp32 by AdamW, no LoRA (F1, beyond the paper: the KL reference a frozen copy of the starting "
        "weights, none for T-SPMO; --lr defaults to 1e-6; the run writes RUN/model, a Hugging Face model directory)",
        (lambda v, s: v == "lora" or s.dtype == "float32",
         lambda v, s: f"full fine-tuning trains every weight in fp32 (an AdamW update of 1e-6 is below {s.dtype}'s "
                      "resolution for most weights); allowed with --train full: --dtype float32"),
        (lambda v, s: v == "lora" or s.sample_precision != "bf16",
         "--sample-precision bf16 copies the frozen weights to bf16, and with --train full no weight is frozen; "
         "allowed with --train full: --sample-precision fp32 or tf32"),
        (lambda v, s: v == "lora" or s.critic == "shared",
         "--critic separate is a second copy of the model trained beside the policy: with --train full its weights, "
         "gradients and AdamW moments double the memory (Qwen2-1.5B: 24.8 GB more, beyond the paper's 40 GB GPU); "
         "allowed with --train full: --critic shared (the value head on the policy's states)"),
        choices=("lora", "full"), why="allowed: lora (the paper's) or full (F1: every weight, fp32)")
    seed: int = setting(0, "0 <= seed < 2^62 (default 0)", (lambda v, s: 0 <= v < 2**62, "allowed: an integer in "
                                                                                         "[0, 2^62)"))
    # the paper, section IV-A
    steps: int = setting(
        350, "optimizer steps, >= 1 (paper: see table below); with --resume, a longer (or shorter, not below the "
        "checkpoint) run", (lambda v, s: v >= 1, "a run needs at least one step; allowed: an integer >= 1"),
        paper=PAPER_STEPS, section="training (defaults: the paper's for the chosen algo and task)")
    lr: float = setting(1e-4, f"AdamW learning rate, 0 < lr <= 1 (1e-4; with --train full {FULL_LR:g})",
                        (lambda v, s: _num(v) and 0 < v <= 1, "AdamW would not move (<= 0) or diverge at once (> 1); "
                                                              "allowed: 0 < lr <= 1 (the paper: 1e-4)"), paper=ALL)
    # [decided] (SPEC.md) AdamW weight decay 0.01, torch's default; the paper names none
    weight_decay: float = setting(0.01, "AdamW weight decay, 0..1 (0.01; the paper names none)",
                                  (lambda v, s: _num(v) and 0 <= v <= 1, "allowed: 0 <= weight decay <= 1 (default "
                                                                         "0.01)"), paper=ALL)
    group_size: int = setting(  # G
        50, "completions per prompt, >= 1 (GRPO/S-GRPO 8, T-SPMO 50)",
        (lambda v, s: v >= 1, "a group needs completions; allowed: an integer >= 1 (the paper: 8, 50)"),
        # [decided] (SPEC-baselines.md) G = 8 for PPO and DPO: the same sampling budget as GRPO
        paper={"grpo": 8, "sgrpo": 8, "tspmo": 50, "ppo": 8, "dpo": 8}, short="-G",
        warn=(lambda v, s: v == 1, "one completion a group: every group has zero variance (Â = 0), so no update "
                                   "learns from the reward"))
    accum: int = setting(  # prompts per optimizer step: the effective batch
        1, "prompts per optimizer step, >= 1 (1; the ablation uses 8)",
        (lambda v, s: v >= 1, "an optimizer step needs a prompt; allowed: an integer >= 1"),
        (lambda v, s: s.algo not in ("ppo", "dpo") or v == 1, "PPO and DPO take one prompt per step (ours); allowed: "
                                                              "--accum 1 with --algo ppo or dpo"), paper=ALL)
    temperature: float = setting(
        0.3, "sampling temperature, >= 0 (0.3)",
        (lambda v, s: _num(v) and v >= 0, "allowed: a finite number >= 0 (0: greedy; the paper: 0.3)"),
        (lambda v, s: v == 0 or v >= MIN_TEMPERATURE,
         f"the sampler divides float32 logits by it, and below float32's smallest normal number "
         f"({MIN_TEMPERATURE:.4g}) the quotient overflows; allowed: 0 (greedy) or a temperature >= "
         f"{MIN_TEMPERATURE:.4g} (the paper: 0.3)"),
        paper=ALL, warn=(lambda v, s: v == 0, "greedy sampling draws G identical completions: every group has zero "
                                              "variance (Â = 0), so no update learns from the reward"))
    top_p: float = setting(  # the paper names no top-p: plain temperature sampling
        1.0, "nucleus sampling, in (0, 1] (1.0: off; the paper names none)",
        (lambda v, s: _num(v) and 0 < v <= 1, "nucleus sampling keeps a probability mass in (0, 1]; allowed: 0 < "
                                              "top-p <= 1 (1: off)"))
    max_new_tokens: int = setting(300, "completion length limit, >= 1 (300)",
                                  (lambda v, s: v >= 1, "a completion needs a token; allowed: an integer >= 1 (the "
                                                        "paper: 300)"), paper=ALL)
    sample_precision: str = setting(
        "fp32", "sampling's matrix products: fp32 (default, the paper's), tf32 (CUDA's TF32 products) or bf16 (a bf16 "
        "copy of the frozen base weights, the fp32 adapter applied as in training): faster on a GPU, the samples "
        "slightly off the fp32 policy (docs/performance.md measures how far)",
        (lambda v, s: v != "tf32" or torch.device(s.device).type == "cuda",
         "TF32 is a CUDA matrix-product mode; allowed on the CPU: fp32 or bf16"),
        choices=("fp32", "tf32", "bf16"), why="allowed: fp32 (the paper's), tf32 (CUDA matrix products in TF32) or "
                                              "bf16 (a bf16 copy of the frozen weights for sampling)")
    backward_batch: int = setting(  # 1: the paper's per-completion backward (Alg2)
        1, "completions per forward/backward, >= 1 (1: the paper's per-completion backward and its memory); GRPO, "
        "S-GRPO, PPO, DPO",
        (lambda v, s: v >= 1, "allowed: an integer >= 1 (default 1: one completion per backward)"),
        (lambda v, s: v == 1 or s.algo != "tspmo", "T-SPMO runs one forward per trie prefix; allowed: "
                                                   "--backward-batch 1 with --algo tspmo"))
    eval_max_new_tokens: int | None = setting(  # None: max_new_tokens
        None, "greedy evaluation's length limit, >= 1 (default: --max-new-tokens)",
        (lambda v, s: v is None or v >= 1, "allowed: an integer >= 1 (default: --max-new-tokens)"))
    beta: float = setting(0.01, "KL weight, GRPO/S-GRPO, >= 0 (0.01)",  # E3, E5; PPO's w2
                          (lambda v, s: _num(v) and v >= 0, "a KL weight; allowed: a finite number >= 0 (the paper: "
                                                            "0.01)"), paper=ALL)
    # [decided] (SPEC.md, E10) λ read as AdamW's weight decay (reading (b)): no λ term in the loss by default, the
    # weight decay above does the regularising; 0.01: λ·Σ‖W‖² in the loss, E10 read literally (reading (a))
    lam: float = setting(
        0.0, "T-SPMO's λ·Σ‖W‖² on LoRA in the loss, >= 0. Default 0: the paper's λ read as AdamW's weight decay 0.01, "
        "no term in the loss (SPEC.md E10: the literal term leaves the adapter inert in the miniature, docs/mini.md); "
        "0.01: E10's λ·Σ‖W‖² read literally",
        (lambda v, s: _num(v) and v >= 0, "an L2 weight in the loss; allowed: a finite number >= 0 (default 0: the "
                                          "paper's λ as weight decay; 0.01: its λ read literally)"),
        # [decided] (SPEC.md, F1) with --train full E10's λ is AdamW's weight decay over every parameter: the
        # literal term is defined on the LoRA matrices, which a fully trained model does not have
        (lambda v, s: v == 0 or s.train == "lora",
         "the literal λ·Σ‖W‖² is defined on LoRA's matrices; with --train full λ is AdamW's weight decay over every "
         "parameter (--weight-decay); allowed with --train full: --lam 0"), paper=ALL)
    tspmo_objective: str = setting(  # E10's π_θ(v|p), the paper's; logpi: log π_θ(v|p), an ablation (ours)
        "pi", "T-SPMO's per-edge term: pi = π·A, E10 as the paper writes it (default); logpi = log π·A",
        choices=("pi", "logpi"), why="allowed: pi (E10, the paper's) or logpi (an ablation)", paper=ALL)
    # [decided] (SPEC.md, B2) treerl: TreeRL's process reward on the token trie, beyond the paper; local is E7
    edge_advantage: str = setting(
        "local", "T-SPMO's A(v|p): local = E[R|p∘v] − E[R|p], E7, the paper's (default); treerl = TreeRL's "
        "[(E[R|p∘v] − E[R|root]) + (E[R|p∘v] − E[R|p])]/√n(p∘v), n(p∘v) the completions through p∘v (B2, beyond the "
        "paper: non-zero on almost every edge, so almost every completion takes a forward)",
        choices=("local", "treerl"), why="allowed: local (E7, the paper's) or treerl (B2, TreeRL's)", paper=ALL)

    reward: str | None = setting(  # P1 exact match; S2 partial credit; S1 the SymPy oracle
        None, "training reward: mult exact (default, the paper's) or partial (S2, partial credit); svamp exact; gsm8k "
        "sympy (S1). Test accuracy is always the task's own (exact / sympy)",
        (lambda v, s: v in TASKS[s.task].REWARDS, REWARD_RULE), choices=("exact", "partial", "sympy"), why=REWARD_RULE,
        paper={"mult": "exact", "svamp": "exact", "gsm8k": "sympy"})

    lora_fraction: float = setting(
        0.25, "fraction of the last layers adapted, in (0, 1]",
        (lambda v, s: _num(v) and 0 < v <= 1, "a fraction of the layers; allowed: 0 < fraction <= 1"),
        paper={"mult": 1 / 4, "svamp": 1 / 3, "gsm8k": 1 / 3},
        section="LoRA (paper: mult last 1/4 of layers, rank 8; svamp last 1/3, rank 16)")
    lora_rank: int = setting(8, "rank r, >= 1", (lambda v, s: v >= 1, "allowed: an integer >= 1 (the paper: 8 or "
                                                                      "16)"),
                             paper={"mult": 8, "svamp": 16, "gsm8k": 16})
    lora_alpha: float | None = setting(  # [decided] (SPEC.md) α = r
        None, "alpha, > 0 (default r: scale 1)",
        (lambda v, s: v is None or (_num(v) and v > 0), "LoRA's scale is alpha/r; allowed: a finite number > 0 "
                                                        "(default r)"),
        (lambda v, s: v is None or lora.scale_problem(v, s.lora_rank) is None,
         lambda v, s: f"{lora.scale_problem(v, s.lora_rank)}; allowed: --lora-alpha <= r × {lora.MAX_SCALE:.4g} = "
                      f"{s.lora_rank * lora.MAX_SCALE:.4g}"))
    lora_targets: str = setting(  # comma-separated projections of each adapted layer (the paper: q, v)
        ",".join(lora.TARGETS), f"comma-separated projections to adapt, of {','.join(LORA_TARGETS)} (default "
        "q_proj,v_proj)",
        (lambda v, s: bool(v) and set(v.split(",")) <= set(LORA_TARGETS),
         f"allowed: comma-separated projections of {','.join(LORA_TARGETS)} (default q_proj,v_proj)"), paper=ALL)

    # S-GRPO token selection (E6, Alg1): the paper's Table III
    alpha: int = setting(50, "first α tokens always in the loss, >= 0",
                         (lambda v, s: v >= 0, "S-GRPO's always-included prefix; allowed: an integer >= 0"),
                         paper={"mult": 50, "svamp": 100, "gsm8k": 100},
                         section="S-GRPO token selection (paper: mult α=50, k=100; svamp α=100, k=100)")
    k: int = setting(100, "at most k tokens in the loss, >= 1",
                     (lambda v, s: v >= 1, "S-GRPO's cap on tokens in the loss; allowed: an integer >= 1"),
                     paper={"mult": 100, "svamp": 100, "gsm8k": 100})
    # [decided] (SPEC.md) the paper does not give P
    p: float = setting(0.5, "probability of a later token, in [0, 1] (0.5; the paper gives none)",
                       (lambda v, s: _num(v) and 0 <= v <= 1, "a probability; allowed: 0 <= P <= 1 (default 0.5)"),
                       paper=ALL)

    # T-SPMO replay: the paper's Table V
    replay_success: int = setting(1, "C_success, >= 0",
                                  (lambda v, s: v >= 0, "a count of replays; allowed: an integer >= 0"),
                                  paper={"mult": 1, "svamp": 0, "gsm8k": 0},
                                  section="T-SPMO replay (paper: mult 1 success, 0 failures; svamp none)")
    replay_failure: int = setting(0, "C_failure, >= 0",
                                  (lambda v, s: v >= 0, "a count of replays; allowed: an integer >= 0"),
                                  paper={"mult": 0, "svamp": 0, "gsm8k": 0})
    # [decided] (SPEC.md) r = 1.0 (with --reward partial: success = every step right)
    replay_threshold: float = setting(1.0, "reward r separating success from failure (1.0)",
                                      (lambda v, s: _num(v), "allowed: a finite reward (default 1.0)"), paper=ALL)
    # [decided] (SPEC.md) the replay pool is the paper's "set of all previously generated completions"
    replay_pool: str = setting(
        "history", "where replays are drawn from: history = every completion of every fresh group generated so far in "
        "the run, each with its own problem and reward (default: the paper's \"set of all previously generated "
        "completions\"); group = the G just generated for this prompt (ablation)",
        choices=("history", "group"), why="allowed: history (every completion generated so far, the paper's) or "
                                          "group (this prompt's G only)", paper=ALL)
    # [decided] (SPEC.md, B1) entropy: P(j) ∝ H_j, beyond the paper; uniform is the paper's cut
    replay_cut: str = setting(
        "uniform", "where a replay branches, T-SPMO: the replay restarts from prompt + y[:j] and draws y[j] (0-based) "
        "again; uniform = j uniform in [0, |y| - 1] (default, the paper's); entropy = P(j) ∝ H_j, the entropy of the "
        "distribution y[j] was drawn from, recorded when y was sampled (B1, beyond the paper: the replay pool keeps "
        "4 bytes a token more)",
        choices=("uniform", "entropy"), why="allowed: uniform (the paper's) or entropy (B1, P(j) ∝ H_j)", paper=ALL)

    # evaluation and bookkeeping: ours, the paper gives neither
    eval_every: int = setting(50, "steps between test evaluations, >= 0 (50; 0: start and end only)",
                              (lambda v, s: v >= 0, "allowed: an integer >= 0 (0: at the start and the end only)"),
                              section="evaluation and checkpoints")
    eval_limit: int | None = setting(  # None: the whole test set
        None, "evaluate on the first N test examples, >= 1 (default all)",
        (lambda v, s: v is None or v >= 1, "an accuracy needs an example to measure; allowed: an integer >= 1 "
                                           "(default: the whole test set)"))
    eval_batch: int | None = setting(
        None, "prompts per greedy batch, >= 1 (default: on CUDA as many as half the device's free memory holds; on "
        "the CPU 32)",
        (lambda v, s: v is None or v >= 1, "allowed: an integer >= 1 (default: on CUDA what the device's memory "
                                           "holds, on the CPU 32)"))
    save_every: int = setting(10, "steps between checkpoints, >= 1 (10)",
                              (lambda v, s: v >= 1, "allowed: an integer >= 1 (default 10)"))
    threads: int | None = setting(  # None: torch's default
        None, "torch CPU threads, >= 1 (default: torch's, one per core)",
        (lambda v, s: v is None or v >= 1, "allowed: an integer >= 1 (default: torch's, one per core)"),
        warn=(lambda v, s: v is not None and v > (os.cpu_count() or 1),  # legal, but slower, not faster
              f"more threads than this machine's {os.cpu_count()} cores: the extra ones can only wait for a core"))

    # PPO with a critic (K1–K4) and DPO (D1), SPEC-baselines.md; PPO's KL weight w2 is `beta`
    # [decided] (SPEC-baselines.md) the value head shares the policy's base and LoRA
    critic: str = setting(
        "shared", "PPO value head on the policy's own hidden states (shared, default) or on a second copy of the base "
        "model with its own LoRA (separate: the classic critic and its memory)",
        choices=("shared", "separate"), why="allowed: shared (a value head) or separate (its own copy)", paper=ALL,
        section="PPO with a critic (K1-K4) and DPO (D1); PPO's KL weight w2 is --beta")
    # [decided] (SPEC-baselines.md) γ = 1
    gamma: float = setting(1.0, "PPO discount γ (1.0)",
                           (lambda v, s: _num(v) and 0 <= v <= 1, "a discount; allowed: 0 <= γ <= 1 (default 1)"),
                           paper=ALL)
    # [decided] (SPEC-baselines.md) λ_GAE = 0.95
    gae_lambda: float = setting(0.95, "GAE λ (0.95)",
                                (lambda v, s: _num(v) and 0 <= v <= 1, "allowed: 0 <= GAE λ <= 1 (default 0.95)"),
                                paper=ALL)
    clip_eps: float = setting(0.2, "PPO clip ε (0.2)",  # K3's ε
                              (lambda v, s: _num(v) and v > 0, "allowed: a finite number > 0 (default 0.2)"),
                              paper=ALL)
    # [decided] (SPEC-baselines.md) μ = 4 passes over the step's completions
    ppo_passes: int = setting(4, "PPO μ: passes, each one optimizer step, over a step's group (4)",
                              (lambda v, s: v >= 1, "PPO's μ; allowed: an integer >= 1 (default 4)"), paper=ALL)
    # [decided] (SPEC-baselines.md) w1 = 0 (entropy), w3 = 0.5 (value); w2 = β = 0.01
    w1: float = setting(0.0, "PPO entropy weight w1 (0)", (lambda v, s: _num(v), "allowed: a finite entropy weight "
                                                                                 "(default 0)"), paper=ALL)
    w3: float = setting(0.5, "PPO value-loss weight w3 (0.5)",
                        (lambda v, s: _num(v) and v >= 0, "allowed: a finite value-loss weight >= 0 (default 0.5)"),
                        paper=ALL)
    # [decided] (SPEC-baselines.md) β_D = 0.1
    dpo_beta: float = setting(0.1, "DPO β_D (0.1)",
                              (lambda v, s: _num(v) and v > 0, "allowed: a finite number > 0 (default 0.1)"),
                              paper=ALL)


# ----------------------------------------------------------------------------------------------------------------------
# What the declarations make: the parser's flags, the paper's defaults and their table


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line (`error: ...` and where the flags are listed) with argparse's
    exit status 2, rather than the whole usage before the line that matters. train.py's and mini.py's."""

    def error(self, message: str) -> NoReturn:
        usage_error(f"{message} (python {self.prog} --help lists the flags)")


def add_arguments(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """A flag per setting, in declaration order, in the --help group its section opens; returns the groups by title.
    argparse's default stays None: what the user typed is what is not None."""
    groups: dict[str, Any] = {}
    group = parser
    for f in fields(Settings):
        m = f.metadata
        if m["section"]:
            group = groups[m["section"]] = parser.add_argument_group(m["section"])
        kind = {"int": int, "float": float, "str": None}[f.type.partition(" | ")[0]]
        group.add_argument(flag(f.name), *filter(None, [m["short"]]), type=kind, choices=m["choices"] or None,
                           help=m["help"])
    return groups


def paper_defaults(algo: str, task: str) -> dict:
    """The paper's settings for (algo, task): those it varies, and those that are the same for every run (their
    defaults); gsm8k is our extension and borrows SVAMP's."""
    return {f.name: f.default if table == ALL else next(table[key] for key in ((task, algo), task, algo) if key in table)
            for f in fields(Settings) if (table := f.metadata["paper"]) is not None}


def paper_table() -> str:
    """--help's epilog: the paper's settings per (task, algo), then those that are the same for every run."""
    varying = [f.name for f in fields(Settings) if isinstance(f.metadata["paper"], dict)]
    show = lambda v: f"{v:.3g}" if isinstance(v, float) and len(str(v)) > 6 else str(v)  # noqa: E731
    width = {n: max(len(flag(n)) - 2, *(len(show(paper_defaults(a, t)[n])) for a in ALGOS for t in TASKS)) + 2
             for n in varying}
    rows = ["paper defaults (Lee & Tong 2025, arXiv 2504.20834; gsm8k is ours, as svamp; ppo and dpo: "
            "SPEC-baselines.md):", "  task   algo   " + "".join(f"{flag(n)[2:]:<{width[n]}}" for n in varying)]
    rows += [f"  {task:<6} {algo:<6} " + "".join(f"{show(d[n]):<{width[n]}}" for n in varying)
             for task in TASKS for algo in ALGOS for d in [paper_defaults(algo, task)]]
    rows, line = [r.rstrip() for r in rows], "  all:"
    for f in fields(Settings):  # one line per 116 columns, never breaking a setting from its value
        if f.metadata["paper"] == ALL:
            item = f" {flag(f.name)[2:]} {show(f.default)},"
            if len(line) + len(item) > 116:
                rows, line = rows + [line], "   "
            line += item
    note = ["  lam 0.0: the paper's λ = 0.01 read as AdamW's weight decay (SPEC.md E10, reading (b));",
            "    --lam 0.01 puts λ·Σ‖W‖² in the loss (E10 read literally)"]
    return "\n".join(rows + [line.rstrip(",")] + note)


# ----------------------------------------------------------------------------------------------------------------------
# The checks


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
    if base == "int" and is_integer(value) and abs(value) < 2**62:
        return None
    if base == "float" and is_number(value):
        return None
    if base == "str" and isinstance(value, str) and len(value) <= MAX_STR:
        return None
    return "allowed: " + {"int": "an integer below 2^62", "float": "a number",
                          "str": f"a string of at most {MAX_STR:,} characters"}[base] + (" or null" if optional else "")


def rules_problem(name: str, value, cfg: Settings) -> str | None:
    """Why `value` breaks one of setting `name`'s rules, the first in order (None: it keeps them all); `cfg`: the
    settings the rules read beside it."""
    for ok, why in Settings.__dataclass_fields__[name].metadata["rules"]:
        try:
            good = ok(value, cfg)
        except TypeError:  # e.g. a string where a number belongs (a hand-edited config.json)
            good = False
        if not good:
            return why(value, cfg) if callable(why) else why
    return None


def setting_problem(name: str, value, cfg: Settings | None = None) -> str | None:
    """Why `value` cannot be setting `name` (its type, then its rules; None: it can), for a value from elsewhere than
    the command line (mini.py's tuning table); `cfg`: the other settings (default: Settings())."""
    return type_problem(name, value) or rules_problem(name, value, cfg or Settings())


def validate(cfg: Settings, training: bool = True, source: Path | None = None) -> None:
    """Every setting's type, then every rule of every setting, before anything is loaded or written; then the
    warnings (training only). `source`: the file the settings come from (a resumed run's config.json), which a
    refusal names instead of the flag."""
    for f in fields(Settings):
        if (why := type_problem(f.name, getattr(cfg, f.name))) is not None:
            refuse_setting(f.name, getattr(cfg, f.name), why, source)
    for f in fields(Settings):
        if (why := rules_problem(f.name, getattr(cfg, f.name), cfg)) is not None:
            refuse_setting(f.name, getattr(cfg, f.name), why, source)
    for f in fields(Settings):
        if training and f.metadata["warn"] and f.metadata["warn"][0](getattr(cfg, f.name), cfg):
            print(f"warning: {flag(f.name)} {getattr(cfg, f.name)}: {f.metadata['warn'][1]}", file=sys.stderr)
