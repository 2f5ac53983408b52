"""The paper in miniature: Table II and Figure 1 on a laptop CPU, one command, nothing downloaded.

    python mini.py            # the full table: base, GRPO, S-GRPO, T-SPMO (+ 3 T-SPMO ablations), PPO, DPO; 3 seeds
    python mini.py --quick    # one seed, fewer steps: about a minute
    python mini.py --rebuild-base   # run the base's SFT here instead of copying the shipped one (data/mini-base/)

What it does, in order (each stage writes into --out, default runs/mini/):
  1. a character-level tokenizer (`tokenizers`) and a tiny Qwen2 of the real architecture (4 layers, hidden 128,
     4 query / 2 KV heads, tied embeddings: about 1 M parameters), saved as a normal model directory
     (config.json, model.safetensors, tokenizer.json) that `python train.py --model DIR` also accepts;
  2. a base skill by supervised fine-tuning, constructed so that the skill is latent and the base is weak, like
     Qwen2-1.5B on 3x3-digit multiplication (3.9%): first chain-of-thought traces only, then briefly a mix of 85%
     bare answers and 15% traces. Greedy decoding then mostly writes a bare (usually wrong) answer; sampling sometimes
     starts a trace, which is usually right. This is a constructed setting, not the paper's. Cached in
     OUT/base/ (rerunning skips it);
  3. the RL runs, each through `train.train` (the code path of `python train.py`), with the paper's settings scaled
     to the miniature (`run_settings` lists them), two runs at a time, one CPU thread each;
  4. OUT/results.md (the table, beside the paper's Table II) and OUT/figure1.svg (training reward and test accuracy
     against step for GRPO, S-GRPO, T-SPMO (and λ = 0), PPO and DPO, mean over seeds), and the table printed.

The task: 2-digit x 2-digit multiplication. Prompt "47*86=", completion either a trace
" 47*6=282 47*80=3760 282+3760=4042" or a bare answer "4042", then EOS; reward P1 (the last integer equals A·B).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import multiprocessing
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import checkpoints
import lora
import model as M
import tasks
import train
from reward import exact_match_reward

SHIPPED_BASE = Path(__file__).resolve().parent / "data" / "mini-base"  # the SFT'd base, built by build_base from seed 0

say = functools.partial(print, flush=True)  # progress lines reach a log file as they happen

# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and model

CHARS = "0123456789*+= "
UNK = "<unk>"
EOS = M.ENDOFTEXT  # model.eos_ids finds <|endoftext|> in any tokenizer that has it
EOS_ID = len(CHARS)
MAX_NEW_TOKENS = 40  # the longest trace, " 99*9=891 99*90=8910 891+8910=9801", is 33 characters, then EOS


def build_tokenizer(path: Path) -> None:
    """One token per character of CHARS, then EOS and <unk>: ids 0..13, 14, 15."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(CHARS)} | {EOS: len(CHARS), UNK: len(CHARS) + 1}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character its own piece
    tk.decoder = decoders.Fuse()  # join the pieces with nothing between them (WordLevel would put spaces)
    tk.add_special_tokens([AddedToken(EOS, special=True)])
    tk.save(str(path))


def mini_config() -> M.Qwen2Config:
    """Qwen2-1.5B's architecture (GQA, RoPE, SwiGLU, RMSNorm, q/k/v biases, tied embeddings) at 1/12 the width."""
    return M.Qwen2Config(vocab_size=len(CHARS) + 2, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=EOS_ID)


def build_model(seed: int) -> M.Qwen2ForCausalLM:
    net = M.Qwen2ForCausalLM(mini_config())
    net.init_weights(torch.Generator().manual_seed(seed), std=0.02)
    return net


# ----------------------------------------------------------------------------------------------------------------------
# The task: 2-digit x 2-digit multiplication


def trace(a: int, b: int) -> str:
    """The chain of thought: a times the ones digit of b, a times the tens, their sum (the last integer: a·b)."""
    ones, tens = b % 10, b - b % 10
    return f" {a}*{ones}={a * ones} {a}*{tens}={a * tens} {a * ones}+{a * tens}={a * b}"


def bare(a: int, b: int) -> str:
    return f"{a * b}"


class MiniMult(tasks.Task):
    """A, B uniform in [10, 99]; a fixed test set of distinct pairs, excluded from SFT and RL training."""

    name = "mini-mult"
    TEST_SEED, TEST_SIZE = 20250429, 300

    @functools.cached_property
    def _test(self) -> list[tuple[int, int]]:
        rng, pairs = random.Random(self.TEST_SEED), {}
        while len(pairs) < self.TEST_SIZE:
            pairs.setdefault((rng.randint(10, 99), rng.randint(10, 99)), None)
        return list(pairs)

    def test_set(self):
        return self._test

    def train_stream(self, rng: random.Random):
        test = set(self._test)
        while True:
            ab = (rng.randint(10, 99), rng.randint(10, 99))
            if ab not in test:
                yield ab

    def prompt(self, ex):
        return f"{ex[0]}*{ex[1]}="

    def reward(self, text, ex):
        return exact_match_reward(text, ex[0] * ex[1])  # [P1] last integer == A·B


# ----------------------------------------------------------------------------------------------------------------------
# Supervised fine-tuning: the base skill


@dataclasses.dataclass(frozen=True)
class SftSettings:
    cot_steps: int = 1000  # stage 1: traces only (test accuracy of the traces about 80% at the end)
    mix_steps: int = 100  # stage 2, brief: 85% bare answers, 15% traces
    mix_cot: float = 0.15
    batch: int = 64
    lr: float = 3e-3  # stage 1, after a warm-up of 100 steps
    mix_lr: float = 1e-3  # stage 2, its own AdamW (3e-3 there also spoiled the traces in a trial)
    seed: int = 0


def sft_batch(tok: M.Tokenizer, eos: int, pairs, cot_fraction: float, rng: random.Random):
    """Right-padded ids (B, T) and the loss mask (B, T−1): completion tokens and EOS, not the prompt or padding."""
    rows, masks = [], []
    for a, b in pairs:
        p = tok.encode(f"{a}*{b}=")
        c = tok.encode(trace(a, b) if rng.random() < cot_fraction else bare(a, b)) + [eos]
        rows.append(p + c)
        masks.append([0] * (len(p) - 1) + [1] * len(c))  # position t predicts token t + 1
    T = max(map(len, rows))
    ids = torch.tensor([r + [eos] * (T - len(r)) for r in rows])  # (B, T)
    mask = torch.tensor([m + [0] * (T - 1 - len(m)) for m in masks], dtype=torch.float32)  # (B, T−1)
    return ids, mask


def sft(net: M.Qwen2ForCausalLM, tok: M.Tokenizer, task: MiniMult, s: SftSettings, log=say) -> list[dict]:
    """Cross-entropy on the completions: s.cot_steps of traces, then s.mix_steps of the bare/trace mix. Seeded:
    the pairs, the trace-or-bare draws and (by the caller) the initial weights; one thread count gives one result."""
    rng = random.Random(s.seed)
    stream = task.train_stream(random.Random(s.seed + 1))
    history: list[dict] = []
    net.train()
    for stage, steps, lr, cot in (("traces", s.cot_steps, s.lr, 1.0), ("mix", s.mix_steps, s.mix_lr, s.mix_cot)):
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
        for step in range(steps):
            if stage == "traces":
                opt.param_groups[0]["lr"] = lr * min(1.0, (step + 1) / 100)  # warm-up, then constant
            ids, mask = sft_batch(tok, EOS_ID, [next(stream) for _ in range(s.batch)], cot, rng)
            logits = net.logits(ids[:, :-1])  # (B, T−1, V)
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T−1)
            loss = (nll * mask).sum() / mask.sum()  # mean over the completion tokens of the batch
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % 100 == 0 or step + 1 == steps:
                history.append({"stage": stage, "step": step + 1, "loss": round(loss.item(), 4)})
                log(f"sft {stage:<6} step {step + 1:>5}/{steps} | loss {history[-1]['loss']:.4f}")
    net.eval()
    return history


def evaluate_base(net: M.Qwen2ForCausalLM, tok: M.Tokenizer, task: MiniMult, limit: int | None = None) -> dict:
    """Greedy accuracy of the SFT'd base on the test set, how often greedy decoding starts a trace, and the latent
    skill: the accuracy of greedy decoding made to start a trace (the prompt followed by a space)."""
    data = task.test_set()[:limit]
    with torch.no_grad():
        outs = M.greedy(net, [tok.encode(task.prompt(ex)) for ex in data], MAX_NEW_TOKENS, eos=[EOS_ID])
        forced = M.greedy(net, [tok.encode(task.prompt(ex) + " ") for ex in data], MAX_NEW_TOKENS, eos=[EOS_ID])
    texts = [tok.decode(o) for o in outs]
    rewards = [task.reward(t, ex) for t, ex in zip(texts, data)]
    cot = [t.startswith(" ") for t in texts]
    n_cot = sum(cot)
    return {"accuracy": sum(rewards) / len(data), "trace_rate": n_cot / len(data),
            "trace_accuracy": sum(r for r, c in zip(rewards, cot) if c) / max(n_cot, 1),
            "bare_accuracy": sum(r for r, c in zip(rewards, cot) if not c) / max(len(data) - n_cot, 1),
            "forced_trace_accuracy": statistics.fmean(task.reward(tok.decode(o), ex) for o, ex in zip(forced, data)),
            "n": len(data)}


def build_base(out: Path, s: SftSettings, eval_limit: int | None = None, log=say, shipped: bool = True) -> Path:
    """OUT/base/: the tokenizer, the SFT'd model and base.json (the SFT settings and the base's accuracy).
    Cached: an existing base built with the same settings is reused (delete the folder to rebuild); else the shipped
    base (data/mini-base/) when it was built with the same settings and `shipped`; else the SFT runs here."""
    base = out / "base"
    meta = base / "base.json"
    key = [dataclasses.asdict(s), eval_limit]
    if meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        log(f"base: reusing {base} (delete it to rebuild)")
        return base
    if shipped and json.loads((SHIPPED_BASE / "base.json").read_text()).get("key") == key:
        # ours: the repository ships the base this SFT built from seed 0 (4 MB), so that a fresh clone's --quick
        # needs no SFT; --rebuild-base builds it again (3.5-6.5 min on one thread; the thread count and the CPU's
        # float sums can change it slightly)
        shutil.copytree(SHIPPED_BASE, base, dirs_exist_ok=True)
        log(f"base: the shipped SFT base ({SHIPPED_BASE}, copied to {base}); --rebuild-base builds it from seed "
            f"{s.seed}")
        return base
    base.mkdir(parents=True, exist_ok=True)
    build_tokenizer(base / "tokenizer.json")
    tok = M.Tokenizer(base / "tokenizer.json")
    torch.manual_seed(s.seed)  # nothing draws from it; pinned anyway
    net = build_model(s.seed)
    task = MiniMult(tok)
    t0 = time.time()
    history = sft(net, tok, task, s, log)
    M.save_model(net, base)
    ev = evaluate_base(net, tok, task, eval_limit)
    info = {"key": [dataclasses.asdict(s), eval_limit], "sft": dataclasses.asdict(s),
            "parameters": M.num_parameters(net), "minutes": (time.time() - t0) / 60, "history": history, **ev}
    lora.atomic_write(meta, lambda p: Path(p).write_text(json.dumps(info, indent=2) + "\n"))
    log(f"base: {info['parameters']:,} parameters; SFT {info['minutes']:.1f} min; greedy accuracy "
        f"{ev['accuracy']:.3f} (a trace in {ev['trace_rate']:.3f} of outputs, right in {ev['trace_accuracy']:.3f} of "
        f"those; bare answers right in {ev['bare_accuracy']:.3f})")
    return base


# ----------------------------------------------------------------------------------------------------------------------
# The RL runs: the paper's settings, scaled to the miniature

METHODS = {  # name: (algo, what differs from the algorithm's settings)
    "grpo": ("grpo", {}),
    "sgrpo": ("sgrpo", {}),
    "tspmo": ("tspmo", {}),
    "tspmo-lam0": ("tspmo", {"lam": 0.0}),  # ablation: no λ‖W‖² term
    "tspmo-logpi": ("tspmo", {"tspmo_objective": "logpi"}),  # ablation: log π in place of E10's π
    "tspmo-lam0-logpi": ("tspmo", {"lam": 0.0, "tspmo_objective": "logpi"}),  # both: λ = 0.01 kills either's LoRA A
    # the methods the paper argues against (SPEC-baselines.md: G = 8, GRPO's steps; PPO: shared critic, μ = 4,
    # γ = 1, λ_GAE = 0.95, ε = 0.2, w1 = 0, w2 = β, w3 = 0.5; DPO: β_D = 0.1), every setting the CLI's default
    "ppo": ("ppo", {}),
    "dpo": ("dpo", {}),
}
STEPS = {"grpo": 450, "sgrpo": 450, "tspmo": 350, "ppo": 450, "dpo": 450}  # Table II's; PPO, DPO: GRPO's
# ours: the miniature has 4 layers, so the paper's last 1/4 would be one layer with q/v only (4,096 LoRA parameters);
# the last half, all four attention projections, rank 8 (16,384). The same for every method.
LORA_FRACTION, LORA_TARGETS = 0.5, "q_proj,k_proj,v_proj,o_proj"
LR = 1e-3  # ours: the paper's 1e-4 moves a 1 M-parameter model's LoRA too little in a few hundred steps
STEP_SCALE = 1.0  # the paper's step counts: a run takes one to three minutes on one thread
QUICK_STEP_SCALE = 1 / 3


def scaled_selection() -> tuple[int, int]:
    """S-GRPO's α and k scaled from the paper's (50, 100) at 300 new tokens to the miniature's completion limit."""
    return round(50 * MAX_NEW_TOKENS / 300), round(100 * MAX_NEW_TOKENS / 300)  # (7, 13)


def run_settings(method: str, seed: int, base: Path, step_scale: float = STEP_SCALE) -> train.Settings:
    """Settings of one run: the paper's defaults for (algo, mult), scaled; the same for every method except G,
    S-GRPO's (α, k), T-SPMO's replay and the ablation's one change."""
    algo, change = METHODS[method]
    alpha, k = scaled_selection()
    paper = train.paper_defaults(algo, "mult")
    return train.Settings(**{
        **paper, "algo": algo, "task": "mini-mult", "model": str(base), "device": "cpu", "seed": seed,
        "steps": max(1, round(STEPS[algo] * step_scale)), "alpha": alpha, "k": k,
        "lr": LR, "lora_fraction": LORA_FRACTION, "lora_targets": LORA_TARGETS,
        "max_new_tokens": MAX_NEW_TOKENS, "eval_max_new_tokens": MAX_NEW_TOKENS,
        "eval_every": 0, "eval_batch": MiniMult.TEST_SIZE, "save_every": 10**9, "threads": 1, **change})


@dataclasses.dataclass(frozen=True)
class Job:
    method: str
    seed: int
    cfg: train.Settings


def run_job(job: Job, loaded=None) -> dict:
    """One RL run through train.train, its progress lines in RUN/log.txt. `loaded`: (net, tok, eos) of the base,
    copied so that each run puts its LoRA on a fresh model (None: read the base from disk)."""
    import contextlib

    run = Path(job.cfg.out)
    if run.exists():
        import shutil
        shutil.rmtree(run)  # train.train appends to metrics.jsonl: start clean
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(job.cfg), indent=2) + "\n")
    torch.set_num_threads(job.cfg.threads or 1)
    net, tok, eos = loaded or train.load_everything(job.cfg)
    t0 = time.time()
    with open(run / "log.txt", "w") as f, contextlib.redirect_stdout(f):
        final = train.train(job.cfg, run, task=MiniMult(tok), loaded=(copy.deepcopy(net), tok, eos))
    return {"method": job.method, "seed": job.seed, "accuracy": final["accuracy"], "steps": job.cfg.steps,
            "minutes": (time.time() - t0) / 60, "run": str(run)}


def run_all(jobs: list[Job], base: Path, parallel: int, log=say) -> list[dict]:
    """Every job, `parallel` at a time in separate processes (1: in this process, on one loaded base)."""
    done = []

    def report(r):
        done.append(r)
        log(f"  {r['method']:<12} seed {r['seed']} | accuracy {r['accuracy']:.3f} | {r['steps']} steps | "
            f"{r['minutes']:.1f} min  [{len(done)}/{len(jobs)}]")

    if parallel <= 1:
        loaded = train.load_everything(jobs[0].cfg) if jobs else None
        for j in jobs:
            report(run_job(j, loaded))
    else:  # spawn: a fresh interpreter per worker (forking after torch's thread pool started can hang)
        with multiprocessing.get_context("spawn").Pool(parallel) as pool:
            for r in pool.imap_unordered(run_job, jobs):
                report(r)
    order = {(j.method, j.seed): i for i, j in enumerate(jobs)}
    return sorted(done, key=lambda r: order[r["method"], r["seed"]])


# ----------------------------------------------------------------------------------------------------------------------
# Results: the table and the figure

PAPER_TABLE_II = {"base": 3.9, "grpo": 4.4, "sgrpo": 22.9, "tspmo": 70.0}  # Qwen2-1.5B, 3x3 digits, n = 3000
LABELS = {"base": "base (SFT)", "grpo": "GRPO", "sgrpo": "S-GRPO", "tspmo": "T-SPMO (+ replay)",
          "tspmo-lam0": "T-SPMO, λ = 0", "tspmo-logpi": "T-SPMO, log π", "tspmo-lam0-logpi": "T-SPMO, λ = 0, log π",
          "ppo": "PPO (shared critic)", "dpo": "DPO (online)"}
COLORS = {"grpo": "#1f77b4", "sgrpo": "#ff7f0e", "tspmo": "#2ca02c", "tspmo-lam0": "#2ca02c", "ppo": "#d62728",
          "dpo": "#9467bd"}
DASHED = {"tspmo-lam0"}  # the ablation that changes the picture most, drawn dashed beside the three methods


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def results_table(base_info: dict, results: list[dict]) -> str:
    """Markdown: accuracy (%) mean ± std over seeds, each seed, steps, minutes per run; the paper's Table II beside."""
    rows = ["| method | miniature accuracy (%), mean ± std | per seed | steps | minutes per run | "
            "paper, Table II (%) |", "|---|---|---|---|---|---|",
            f"| {LABELS['base']} | {100 * base_info['accuracy']:.1f} | (greedy: one value) | 0 | "
            f"{base_info['minutes']:.1f} (SFT) | {PAPER_TABLE_II['base']} |"]
    for method in METHODS:
        rs = [r for r in results if r["method"] == method]
        if not rs:
            continue
        m, s = mean_std([100 * r["accuracy"] for r in rs])
        seeds = ", ".join(f"{100 * r['accuracy']:.1f}" for r in rs)
        paper = PAPER_TABLE_II.get(method, "—")
        rows.append(f"| {LABELS[method]} | {m:.1f} ± {s:.1f} | {seeds} | {rs[0]['steps']} | "
                    f"{statistics.fmean(r['minutes'] for r in rs):.1f} | {paper} |")
    return "\n".join(rows)


def curves(results: list[dict], method: str) -> tuple[list, list]:
    """Mean over seeds: training reward (moving mean of 10 steps) per step, test accuracy per evaluation step."""
    per_seed_r, per_seed_a = [], []
    for r in (r for r in results if r["method"] == method):
        metrics = checkpoints.read_jsonl(Path(r["run"]) / "metrics.jsonl")
        rw = [m["reward_mean"] for m in metrics]
        per_seed_r.append([sum(rw[max(0, i - 9): i + 1]) / len(rw[max(0, i - 9): i + 1]) for i in range(len(rw))])
        per_seed_a.append({e["step"]: e["accuracy"] for e in checkpoints.read_jsonl(Path(r["run"]) / "eval.jsonl")})
    if not per_seed_r:
        return [], []
    n = min(map(len, per_seed_r))
    reward = [(i + 1, statistics.fmean(s[i] for s in per_seed_r)) for i in range(n)]
    steps = sorted(set.intersection(*(set(a) for a in per_seed_a)))
    return reward, [(st, statistics.fmean(a[st] for a in per_seed_a)) for st in steps]


def figure(results: list[dict], title: str) -> str:
    """Figure 1 of the paper in miniature: two panels, one line per method (mean over seeds)."""
    W, H, pad, top = 440, 300, 46, 30
    series = {m: curves(results, m) for m in COLORS}
    xmax = max([p[0] for r, a in series.values() for p in r + a] + [1])

    def xy(s, v):
        return pad + (W - pad - 10) * s / xmax, top + (H - top - pad) * (1 - min(max(v, 0.0), 1.0))

    def panel(x0, name, which):
        out = [f'<g transform="translate({x0},0)"><text x="{W / 2}" y="20" text-anchor="middle">{name}</text>',
               f'<rect x="{pad}" y="{top}" width="{W - pad - 10}" height="{H - top - pad}" fill="none" stroke="#999"/>']
        for v in (0, 0.25, 0.5, 0.75, 1.0):
            out.append(f'<text x="{pad - 4}" y="{xy(0, v)[1] + 4:.1f}" text-anchor="end" font-size="11">{v:g}</text>')
        for s in (0, xmax // 2, xmax):
            out.append(f'<text x="{xy(s, 0)[0]:.1f}" y="{H - pad + 16}" text-anchor="middle" font-size="11">{s}</text>')
        out.append(f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle" font-size="12">step</text>')
        for method, color in COLORS.items():
            pts = series[method][which]
            if pts:
                line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in pts))
                dash = ' stroke-dasharray="6,4"' if method in DASHED else ""
                out.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        return out + ["</g>"]

    legend = [f'<text x="{10 + 146 * i}" y="{H + 36}" fill="{c}" font-size="12">'
              f'{LABELS[m]}{" (dashed)" if m in DASHED else ""}</text>' for i, (m, c) in enumerate(COLORS.items())]
    body = panel(0, "training reward (mean of 10 steps)", 0) + panel(W, "test accuracy (greedy)", 1) + legend
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H + 44}" font-family="sans-serif">'
            f'<text x="{W}" y="{H + 14}" text-anchor="middle" font-size="12">{title}</text>'
            + "".join(body) + "</svg>\n")


def machine() -> str:
    import os
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = f", load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores{load}; torch {torch.__version__}"


def settings_lines(base: Path, step_scale: float) -> list[str]:
    cfgs = {m: run_settings(m, 0, base, step_scale) for m in METHODS}
    out = []
    for m, c in cfgs.items():
        extra = {"grpo": f"β = {c.beta}", "sgrpo": f"β = {c.beta}, α = {c.alpha}, k = {c.k}, P = {c.p}",
                 "ppo": f"{c.critic} critic, μ = {c.ppo_passes}, γ = {c.gamma}, λ_GAE = {c.gae_lambda}, "
                        f"ε = {c.clip_eps}, w1 = {c.w1}, w2 = β = {c.beta}, w3 = {c.w3}",
                 "dpo": f"β_D = {c.dpo_beta}, pairs from the group"}.get(
            m, f"λ = {c.lam}, replay C_success = {c.replay_success}, objective {c.tspmo_objective}")
        out.append(f"- {LABELS[m]}: G = {c.group_size}, {c.steps} steps, {extra}")
    c = cfgs["grpo"]
    out.append(f"- all: AdamW lr {c.lr:g} (weight decay {c.weight_decay}), temperature {c.temperature}, "
               f"at most {c.max_new_tokens} new tokens (sampling and evaluation), LoRA rank {c.lora_rank} on "
               f"{c.lora_targets} of the last {c.lora_fraction:g} of the layers, one prompt per step, "
               f"one CPU thread per run")
    return out


def write_results(out: Path, base_info: dict, results: list[dict], step_scale: float, minutes: float,
                  command: str) -> str:
    table = results_table(base_info, results)
    seeds = sorted({r["seed"] for r in results})
    text = "\n".join([
        "# tokrl: the paper in miniature", "",
        f"`{command}` — {time.strftime('%Y-%m-%d %H:%M %Z')}, {machine()}; {minutes:.1f} minutes in all "
        f"({'not counting the SFT, cached from an earlier run: it took' if base_info.get('cached') else 'the SFT:'} "
        f"{base_info['minutes']:.1f} min).", "",
        f"2-digit × 2-digit multiplication, a {base_info['parameters']:,}-parameter Qwen2 given a latent skill by SFT "
        f"(a constructed setting, not the paper's); test accuracy by greedy decoding on the fixed "
        f"{base_info['n']}-problem test set, seeds {seeds}. The paper's column is Qwen2-1.5B on 3-digit × 3-digit "
        f"multiplication (n = 3000).", "",
        table, "",
        f"Base: greedy decoding starts a trace in {100 * base_info['trace_rate']:.1f}% of the test problems "
        f"(right in {100 * base_info['trace_accuracy']:.1f}% of those) and writes a bare answer otherwise (right in "
        f"{100 * base_info['bare_accuracy']:.1f}%); made to start a trace (the prompt and a space), greedy decoding is "
        f"right in {100 * base_info['forced_trace_accuracy']:.1f}%: the latent skill.", "",
        "Settings:", *settings_lines(Path(base_info["dir"]), step_scale), "",
        "![Figure 1 in miniature](figure1.svg)", ""])
    (out / "results.md").write_text(text)
    (out / "figure1.svg").write_text(figure(results, f"2-digit multiplication, tiny Qwen2 (mean of {len(seeds)} "
                                                     f"seed{'s' * (len(seeds) > 1)})"))
    return table


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/mini", help="output folder (default runs/mini; the SFT'd base is cached "
                                                      "in OUT/base)")
    p.add_argument("--quick", action="store_true", help="one seed, a third of the paper's steps, into OUT/quick/ "
                                                        "(the base is shared with the full table)")
    p.add_argument("--seeds", type=positive_int, help="seeds per method (default 3; --quick 1)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {','.join(METHODS)}")
    p.add_argument("--steps", type=positive_int, help="RL steps for every method (default: scaled paper's)")
    p.add_argument("--sft-cot-steps", type=positive_int, help=f"SFT stage 1 (default {SftSettings.cot_steps})")
    p.add_argument("--sft-mix-steps", type=int, help=f"SFT stage 2 (default {SftSettings.mix_steps})")
    p.add_argument("--eval-limit", type=positive_int, help="evaluate on the first N test problems (default all)")
    p.add_argument("--rebuild-base", action="store_true", help="run the SFT here rather than copy the shipped base "
                                                               "(data/mini-base/, built by the same SFT from seed 0)")
    p.add_argument("--sft-threads", type=positive_int, default=1,
                   help="torch threads for the SFT (1: the thread count changes the float sums, so the base)")
    p.add_argument("--parallel", type=positive_int, default=2, help="runs at a time, one thread each (2)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = args.methods.split(",")
    if bad := [m for m in methods if m not in METHODS]:
        raise SystemExit(f"error: --methods: unknown method {bad[0]!r}; choose from {','.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.sft_threads)  # the runs below take one thread each
    sft_settings = SftSettings(**{k: v for k, v in (("cot_steps", args.sft_cot_steps),
                                                     ("mix_steps", args.sft_mix_steps)) if v is not None})
    cached = (out / "base" / "base.json").is_file()
    if args.rebuild_base:
        shutil.rmtree(out / "base", ignore_errors=True)
    base = build_base(out, sft_settings, args.eval_limit, shipped=not args.rebuild_base)
    torch.set_num_threads(threads)
    base_info = {**json.loads((base / "base.json").read_text()), "dir": str(base), "cached": cached}
    step_scale = QUICK_STEP_SCALE if args.quick else STEP_SCALE
    dest = out / "quick" if args.quick else out  # --quick keeps its own runs and files beside the full table's
    dest.mkdir(parents=True, exist_ok=True)
    seeds = range(args.seeds or (1 if args.quick else 3))
    jobs = []
    for method in methods:
        for seed in seeds:
            cfg = run_settings(method, seed, base, step_scale)
            cfg = dataclasses.replace(cfg, out=str(dest / "runs" / f"{method}-seed{seed}"),
                                      steps=args.steps or cfg.steps, eval_limit=args.eval_limit)
            jobs.append(Job(method, seed, dataclasses.replace(cfg, eval_every=max(1, min(25, cfg.steps // 6)))))
    jobs.sort(key=lambda j: j.method != "ppo")  # ours: PPO's μ = 4 passes make it the slowest; first, to end together
    say(f"{len(jobs)} runs, {args.parallel} at a time, one thread each; progress in {dest}/runs/*/log.txt")
    results = run_all(jobs, base, args.parallel)
    (dest / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    command = "python mini.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    table = write_results(dest, base_info, results, step_scale, (time.time() - t0) / 60, command)
    print(table)
    print(f"wrote {dest / 'results.md'} and {dest / 'figure1.svg'} in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
