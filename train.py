"""Train Qwen2 with GRPO, S-GRPO or T-SPMO under LoRA, as in Lee & Tong (2025), on one GPU (or the CPU).
The methods the paper argues against run in the same harness: --algo ppo (a critic, GAE) and --algo dpo.

    python train.py --algo tspmo --task mult                  # the paper's settings for (algo, task)
    python train.py --algo sgrpo --task svamp --steps 10      # any setting can be overridden
    python train.py --resume runs/mult-tspmo-20261122-101500  # continue exactly where it stopped
    python train.py --task mult --eval-only [--adapter DIR]   # accuracy of the base model or of an adapter

Deviations from the paper and choices it leaves open (README "Choices the paper leaves open" lists the same):
  1. T-SPMO replay takes its own optimizer step after each replayed group (the paper: "the policy model is updated
     again"); a training step of T-SPMO with replay therefore makes 1 + C_success + C_failure optimizer steps.
  2. The gsm8k task (prompt, SymPy reward, LoRA and step settings) is an extension; the paper has no such run.
  3. Evaluation cadence (--eval-every) and checkpoint cadence are ours; the paper gives neither.
  4. A zero-variance group still takes its update: GRPO/S-GRPO still backpropagate the β·KL term (E3/E5 keep it when
     Â = 0), T-SPMO only the λ·‖W‖² term. The step is logged with zero_variance = true.
  5. PPO and DPO (SPEC-baselines.md, baselines.py) take one prompt per step (--accum 1). PPO's shared critic passes
     the value loss's gradient into the policy's LoRA; PPO logs means over its μ passes.

Sections: settings · evaluation · the training loop · command line. Tasks and data: tasks.py; checkpoints and logs:
checkpoints.py; the plot: plot.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import baselines
import lora
import model as M
import tokrl
from checkpoints import latest_checkpoint, read_jsonl, save_checkpoint, write_jsonl
from plot import svg_plot
from tasks import DataError, Task, make_task

# ----------------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    algo: str = "tspmo"  # grpo | sgrpo | tspmo | ppo | dpo
    task: str = "mult"  # mult | svamp | gsm8k
    model: str = "Qwen/Qwen2-1.5B"  # a directory, or a repo id found in / downloaded to the Hugging Face cache
    data: str | None = None  # svamp / gsm8k data (file or directory); None: the tokrl cache, downloaded if absent
    out: str | None = None  # run directory; None: runs/{task}-{algo}-{time}
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "float32"  # the paper trains in fp32
    seed: int = 0
    # training (paper, section IV-A)
    steps: int = 350
    lr: float = 1e-4
    weight_decay: float = 0.01  # [decided] (SPEC.md) AdamW weight decay 0.01, torch's default; the paper names none
    group_size: int = 50  # G
    accum: int = 1  # prompts per optimizer step (effective batch; the paper's ablation uses 8)
    temperature: float = 0.3
    top_p: float = 1.0  # the paper names no top-p: plain temperature sampling
    max_new_tokens: int = 300
    beta: float = 0.01  # KL weight of GRPO / S-GRPO (E3, E5)
    lam: float = 0.01  # λ of T-SPMO's L2 term (E10)
    # LoRA
    lora_fraction: float = 0.25
    lora_rank: int = 8
    lora_alpha: float | None = None  # [decided] (SPEC.md) α = r
    # S-GRPO token selection (E6)
    alpha: int = 50
    k: int = 100
    p: float = 0.5  # [decided] (SPEC.md) the paper does not give P
    # T-SPMO replay
    replay_success: int = 1
    replay_failure: int = 0
    replay_threshold: float = 1.0  # [decided] (SPEC.md) r = 1.0
    # evaluation and bookkeeping (ours)
    eval_every: int = 50
    eval_limit: int | None = None  # evaluate on the first N test examples (None: all)
    eval_batch: int = 32
    save_every: int = 10
    # PPO with a critic (K1–K4) and DPO (D1), SPEC-baselines.md; PPO's KL weight w2 is `beta`
    critic: str = "shared"  # [decided] (SPEC-baselines.md) the value head shares the policy's base and LoRA
    gamma: float = baselines.GAMMA
    gae_lambda: float = baselines.GAE_LAMBDA
    clip_eps: float = baselines.PPO_CLIP_EPS
    ppo_passes: int = baselines.PPO_PASSES  # μ
    w1: float = baselines.W1  # entropy weight
    w3: float = baselines.W3  # value-loss weight
    dpo_beta: float = baselines.DPO_BETA  # β_D


COMMON = dict(lr=1e-4, beta=0.01, lam=0.01, temperature=0.3, max_new_tokens=300)
TASK_DEFAULTS = {  # LoRA per task (paper IV-A); S-GRPO (α, k) (Table III); replay (Table V)
    "mult": dict(lora_fraction=1 / 4, lora_rank=8, alpha=50, k=100, replay_success=1, replay_failure=0),
    "svamp": dict(lora_fraction=1 / 3, lora_rank=16, alpha=100, k=100, replay_success=0, replay_failure=0),
    "gsm8k": dict(lora_fraction=1 / 3, lora_rank=16, alpha=100, k=100, replay_success=0, replay_failure=0),  # ours
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
# Evaluation: greedy, batched, accuracy = mean reward ([decided] SPEC.md)


def evaluate(net, tok, task: Task, cfg: Settings, eos) -> dict:
    data = task.test_set()[: cfg.eval_limit]
    t0, correct, examples = time.time(), 0.0, []
    for i in range(0, len(data), cfg.eval_batch):
        batch = data[i: i + cfg.eval_batch]
        prompts = [tok.encode(task.prompt(ex)) for ex in batch]
        outs = M.greedy(net, prompts, cfg.max_new_tokens, eos=eos, stop=task.stop())
        for ex, out in zip(batch, outs):
            text = tok.decode(out)
            r = task.reward(text, ex)
            correct += r
            if len(examples) < 3:
                examples.append({"example": list(ex) if isinstance(ex, tuple) else ex, "completion": text, "reward": r})
    return {"accuracy": correct / max(len(data), 1), "n": len(data), "seconds": round(time.time() - t0, 2),
            "examples": examples}


# ----------------------------------------------------------------------------------------------------------------------
# The training loop


class StopRequest:
    """First Ctrl-C: finish the current step, checkpoint, exit. Second: stop at once (the last checkpoint stays)."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.old = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to quit now; the last checkpoint stays)", flush=True)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.old)


class NonFiniteLoss(RuntimeError):
    pass


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process peak)


def update(net, algo: str, prompt, completions, rewards, cfg: Settings, gens, scale: float, opt=None,
           critic: baselines.Critic | None = None) -> tokrl.StepStats:
    """Backward of one group with the chosen objective (the caller steps the optimizer; PPO takes its first μ − 1
    steps itself, with `opt`)."""
    if algo == "ppo":
        return ppo_update(net, critic, opt, prompt, completions, rewards, cfg)  # [K4]
    if algo == "dpo":
        return baselines.dpo_backward(net, prompt, completions, rewards, beta=cfg.dpo_beta, scale=scale)  # [D1]
    if algo == "tspmo":
        return tokrl.tspmo_backward(net, prompt, completions, rewards, lam=cfg.lam, scale=scale)  # [E10]
    selection = None
    if algo == "sgrpo":
        selection = [tokrl.select_tokens(len(y), cfg.alpha, cfg.k, cfg.p, gens["select"]) for y in completions]  # [Alg1]
    return tokrl.grpo_backward(net, prompt, completions, rewards, beta=cfg.beta, selection=selection, scale=scale)


def ppo_update(net, critic: baselines.Critic, opt, prompt, completions, rewards, cfg: Settings) -> tokrl.StepStats:
    """[decided] (SPEC-baselines.md) μ passes over the step's completions, each accumulating the per-completion
    gradients and taking one optimizer step; π_θold, advantages and value targets are fixed once, at sampling time.
    The first μ − 1 steps are taken here, the last one by the caller. Logged: means over the μ passes."""
    batch = baselines.ppo_prepare(net, critic, prompt, completions, rewards, gamma=cfg.gamma,
                                  gae_lambda=cfg.gae_lambda, with_ref=cfg.beta != 0)  # [K2]
    passes = []
    for k in range(cfg.ppo_passes):
        if k:
            opt.step()
            opt.zero_grad(set_to_none=True)
        passes.append(baselines.ppo_backward(net, critic, batch, clip_eps=cfg.clip_eps, w1=cfg.w1, w2=cfg.beta,
                                             w3=cfg.w3))  # [K3] [K4]
        check_finite(net, passes[-1], critic.parameters())
    st, n = passes[-1], len(passes)
    st.loss, st.kl = sum(p.loss for p in passes) / n, sum(p.kl for p in passes) / n
    st.forwards, st.zero_variance = sum(p.forwards for p in passes), len(set(rewards)) == 1
    st.extra = {k: sum(p.extra[k] for p in passes) / n for k in st.extra}
    st.extra["explained_variance"] = batch.explained_variance
    return st


def check_finite(net, st: tokrl.StepStats, more=()) -> None:
    """The loss and every gradient (the policy's LoRA, and `more`: a critic's parameters) are finite."""
    bad = not math.isfinite(st.loss) or any(not torch.isfinite(p.grad).all()
                                            for p in [*lora.lora_parameters(net), *more] if p.grad is not None)
    if bad:
        raise NonFiniteLoss(f"loss {st.loss} or its gradient is not finite")


class Trainer:
    def __init__(self, cfg: Settings, run: Path, net, tok, task: Task, eos):
        self.cfg, self.run, self.net, self.tok, self.task, self.eos = cfg, run, net, tok, task, eos
        self.dev = next(net.parameters()).device
        # PPO: the critic (value head; separate: and a second copy of the base with its LoRA) trains with the policy
        self.critic = baselines.Critic(net, cfg.critic) if cfg.algo == "ppo" else None
        params = lora.lora_parameters(net) + (self.critic.parameters() if self.critic else [])
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.gens = {"sample": torch.Generator(self.dev).manual_seed(cfg.seed),  # sampling completions
                     "select": torch.Generator().manual_seed(cfg.seed + 1),  # S-GRPO token selection
                     "data": random.Random(cfg.seed + 2), "replay": random.Random(cfg.seed + 3)}
        self.step = 0

    def sample_group(self, prompt_ids, prefix=()):
        """G completions of prompt∘prefix with their rewards (the reward reads prefix + completion)."""
        cfg = self.cfg
        outs = M.sample(self.net, list(prompt_ids) + list(prefix), cfg.group_size, cfg.max_new_tokens - len(prefix),
                        temperature=cfg.temperature, top_p=cfg.top_p, generator=self.gens["sample"], eos=self.eos,
                        stop=self.task.stop(prefix))
        return outs, [self.task.reward(self.tok.decode(list(prefix) + o), self.ex) for o in outs]

    def replay(self, prompt_ids, completions, rewards) -> list[tokrl.StepStats]:
        """T-SPMO replay: restart from a random cut of chosen completions of this group, one update each."""
        cfg, rng = self.cfg, self.gens["replay"]
        # [decided] (SPEC.md) the replay pool is the G completions just generated for this prompt
        good = [i for i, r in enumerate(rewards) if r >= cfg.replay_threshold]  # R_success = {y : R(y) >= r}
        bad = [i for i, r in enumerate(rewards) if r < cfg.replay_threshold]  # R_fail = {y : R(y) < r}
        picks = rng.sample(good, min(cfg.replay_success, len(good))) + rng.sample(bad, min(cfg.replay_failure,
                                                                                        len(bad)))
        stats = []
        for i in picks:
            y = completions[i]
            j = rng.randint(0, len(y) - 1)  # cut uniform in [0, |y| − 1]: the prefix is prompt + y_1 … y_j
            if cfg.max_new_tokens - j < 1:
                continue
            conts, rs = self.sample_group(prompt_ids, y[:j])
            self.opt.zero_grad(set_to_none=True)
            st = tokrl.tspmo_backward(self.net, list(prompt_ids) + list(y[:j]), conts, rs, lam=cfg.lam)  # [E10]
            check_finite(self.net, st)
            self.opt.step()  # deviation 1 (module docstring): each replayed group is its own update
            st.extra = {"replay_cut": j, "replay_reward": sum(rs) / len(rs)}
            stats.append(st)
        return stats

    def train_step(self, stream) -> dict:
        cfg, t0 = self.cfg, time.time()
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.opt.zero_grad(set_to_none=True)
        rewards_all, stats, lengths, replays = [], [], [], []
        for _ in range(cfg.accum):
            self.ex = next(stream)
            prompt_ids = self.tok.encode(self.task.prompt(self.ex))
            completions, rewards = self.sample_group(prompt_ids)
            st = update(self.net, cfg.algo, prompt_ids, completions, rewards, cfg, self.gens, 1 / cfg.accum,
                        opt=self.opt, critic=self.critic)
            check_finite(self.net, st)
            rewards_all += rewards
            lengths += [len(y) for y in completions]
            stats.append(st)
        self.opt.step()
        if cfg.algo == "tspmo":
            replays = self.replay(prompt_ids, completions, rewards)
        secs = time.time() - t0
        n = len(rewards_all)
        mean = sum(rewards_all) / n  # [E1] J(θ) = E_{Y~π_θ}[r(Y)], estimated by the mean reward of the group
        gen_tokens = sum(lengths) + sum(s.tokens_generated for s in replays)
        return {"step": self.step + 1, "reward_mean": mean,
                "reward_std": math.sqrt(sum((r - mean) ** 2 for r in rewards_all) / n),
                "zero_variance": any(s.zero_variance for s in stats),
                "loss_token_fraction": sum(s.tokens_in_loss for s in stats) / max(sum(lengths), 1),
                "loss": sum(s.loss for s in stats), "kl": sum(s.kl for s in stats) / len(stats),
                "len_mean": sum(lengths) / n, "len_max": max(lengths), "forwards": sum(s.forwards for s in stats),
                "edges": sum(s.edges for s in stats), "replays": [s.extra for s in replays],
                "seconds": round(secs, 3), "tokens_per_s": round(gen_tokens / secs, 1),
                "peak_mem_gb": round(peak_memory_gb(self.dev), 3),
                **{k: v for s in stats for k, v in s.extra.items()}}  # PPO / DPO statistics (baselines.py)


def progress_line(m: dict, steps: int, started: float, first_step: int) -> str:
    done = m["step"] - first_step
    eta = (time.time() - started) / max(done, 1) * (steps - m["step"])
    return (f"step {m['step']:>4}/{steps} | reward {m['reward_mean']:.3f}±{m['reward_std']:.3f}"
            f"{' (zero-var)' if m['zero_variance'] else ''} | loss {m['loss']:+.4f} | kl {m['kl']:.4f} | "
            f"in-loss {100 * m['loss_token_fraction']:.1f}% | len {m['len_mean']:.0f} | {m['seconds']:.1f} s | "
            f"{m['tokens_per_s']:.0f} tok/s | mem {m['peak_mem_gb']:.2f} GB | eta {datetime.timedelta(seconds=int(eta))}")



def load_everything(cfg: Settings):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    model_dir = M.resolve_model_dir(cfg.model)
    net = M.load_model(model_dir, dtype=dtype, device=cfg.device)
    tok = M.Tokenizer(model_dir / "tokenizer.json")
    return net, tok, M.eos_ids(model_dir, net.config, tok)


def train(cfg: Settings, run: Path, resume: bool = False, task: Task | None = None) -> dict:
    """The whole run; returns the final evaluation. `task` lets tests plug in a toy task."""
    torch.manual_seed(cfg.seed)  # nothing should draw from the global RNG; this only pins what might
    # CPU: arithmetic on denormal floats (below 1.2e-38) is slow; flushing them to zero changes no result that matters
    # and made a zero-variance backward 30x faster on the test machine
    torch.set_flush_denormal(True)
    net, tok, eos = load_everything(cfg)
    task = task or make_task(cfg.task, tok, cfg.data, cfg.seed)
    lora.apply_lora(net, cfg.lora_rank, cfg.lora_fraction, cfg.lora_alpha,
                    generator=torch.Generator().manual_seed(cfg.seed + 4))  # [L1]
    tr = Trainer(cfg, run, net, tok, task, eos)
    metrics, evals = [], []
    if resume:
        ck = latest_checkpoint(run)
        if ck is None:
            raise SystemExit(f"error: {run} has no checkpoint to resume from (checkpoints/latest)")
        lora.load_adapter_weights(net, ck / "adapter")
        state = torch.load(ck / "state.pt", weights_only=True)
        if tr.critic is not None:
            tr.critic.load_state(state.get("extra", {}))  # PPO: the value head (and the separate critic's LoRA)
        tr.opt.load_state_dict(state["optimizer"])
        tr.step = state["step"]
        r = state["rng"]
        tr.gens["sample"].set_state(r["sample"]), tr.gens["select"].set_state(r["select"])
        tr.gens["data"].setstate(r["data"]), tr.gens["replay"].setstate(r["replay"])
        metrics = read_jsonl(run / "metrics.jsonl", tr.step)  # drop steps logged after the checkpoint
        evals = read_jsonl(run / "eval.jsonl", tr.step)
        write_jsonl(run / "metrics.jsonl", metrics)
        write_jsonl(run / "eval.jsonl", evals)
        print(f"resumed {run} at step {tr.step} from {ck.name}")
    if hasattr(task, "split_note"):
        print(f"data: {task.split_note}")
    # the data stream is rebuilt from the restored RNG state: the same next examples as an uninterrupted run
    stream = task.train_stream(tr.gens["data"])

    def log_eval(step):
        with torch.no_grad():
            e = {"step": step, **evaluate(net, tok, task, cfg, eos)}
        evals.append(e)
        write_jsonl(run / "eval.jsonl", evals)
        print(f"eval  step {step:>4} | accuracy {e['accuracy']:.4f} on {e['n']} | {e['seconds']:.0f} s", flush=True)

    if not evals:
        log_eval(tr.step)
    started, first = time.time(), tr.step
    with StopRequest() as stop:
        while tr.step < cfg.steps and not stop.requested:
            try:
                m = tr.train_step(stream)
            except NonFiniteLoss as e:
                ck = latest_checkpoint(run)
                raise SystemExit(f"error: {e} at step {tr.step + 1}; stopped without saving it. The last good "
                                 f"checkpoint is {ck or 'none (no checkpoint was written yet)'}") from None
            tr.step = m["step"]
            metrics.append(m)
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
            print(progress_line(m, cfg.steps, started, first), flush=True)
            if cfg.eval_every and tr.step % cfg.eval_every == 0 and tr.step < cfg.steps:
                log_eval(tr.step)
            if tr.step % cfg.save_every == 0 or tr.step == cfg.steps or stop.requested:
                save_checkpoint(run, tr.step, net, tr.opt, tr.gens, cfg.model,
                                extra=tr.critic.state() if tr.critic is not None else None)
            (run / "curves.svg").write_text(svg_plot(metrics, evals, f"{cfg.algo} on {cfg.task}"))
    if stop.requested and tr.step < cfg.steps:
        print(f"stopped at step {tr.step}; continue with: python train.py --resume {run}")
        return evals[-1]
    if not evals or evals[-1]["step"] != tr.step:
        log_eval(tr.step)
    (run / "curves.svg").write_text(svg_plot(metrics, evals, f"{cfg.algo} on {cfg.task}"))
    lora.save_adapter(net, run / "adapter", base_model=cfg.model)
    print(f"done: accuracy {evals[-1]['accuracy']:.4f}; adapter in {run / 'adapter'} (PEFT format)")
    return evals[-1]


def eval_only(cfg: Settings, adapter: str | None, out: Path | None) -> dict:
    net, tok, eos = load_everything(cfg)
    task = make_task(cfg.task, tok, cfg.data, cfg.seed)
    if adapter:
        lora.load_adapter(net, adapter)
    with torch.no_grad():
        e = evaluate(net, tok, task, cfg, eos)
    print(f"accuracy {e['accuracy']:.4f} on {e['n']} {cfg.task} test examples "
          f"({'adapter ' + adapter if adapter else 'base model'})")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps({"adapter": adapter, **e}, indent=2) + "\n")
    return e


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def paper_table() -> str:
    rows = ["paper defaults (Lee & Tong 2025; gsm8k is ours):",
            "  task   algo   steps  G   LoRA frac/rank  S-GRPO α,k  replay C_succ,C_fail",]
    for task in TASK_DEFAULTS:
        for algo in GROUP:
            d = paper_defaults(algo, task)
            rows.append(f"  {task:<6} {algo:<6} {d['steps']:<6} {d['group_size']:<3} "
                        f"{d['lora_fraction']:.3g}/{d['lora_rank']:<11} {d['alpha']},{d['k']:<8}  "
                        f"{d['replay_success']},{d['replay_failure']}")
    rows.append("  all: AdamW lr 1e-4 (weight decay 0.01), beta = lambda = 0.01, temperature 0.3, "
                "300 new tokens, fp32, one prompt per step, P = 0.5, replay threshold r = 1.0")
    rows.append("  ppo, dpo (SPEC-baselines.md): steps and G as GRPO's; PPO gamma 1, GAE lambda 0.95, clip 0.2, "
                "4 passes, w1 = 0, w2 = beta, w3 = 0.5, shared critic; DPO beta_D = 0.1")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=paper_table(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    S = Settings()
    g = p.add_argument_group("run")
    g.add_argument("--algo", choices=["grpo", "sgrpo", "tspmo", "ppo", "dpo"],
                   help="objective (default tspmo; ppo and dpo: the baselines of SPEC-baselines.md)")
    g.add_argument("--task", choices=["mult", "svamp", "gsm8k"], help="task (default mult)")
    g.add_argument("--model", help=f"model directory or Hugging Face repo id (default {S.model})")
    g.add_argument("--data", help="svamp: dir with train.json+test.json (700/300) or SVAMP.json (seeded split); "
                                  "gsm8k: dir with train.jsonl+test.jsonl (default: ~/.cache/tokrl, downloaded)")
    g.add_argument("--out", help="run directory (default runs/{task}-{algo}-{time})")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    g.add_argument("--eval-only", action="store_true", help="evaluate the base model (or --adapter) and exit")
    g.add_argument("--adapter", help="with --eval-only: a PEFT LoRA adapter directory")
    g.add_argument("--device", help=f"default {S.device}")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32 (the paper's)")
    g.add_argument("--seed", type=int, help="default 0")
    g = p.add_argument_group("training (defaults: the paper's for the chosen algo and task)")
    g.add_argument("--steps", type=int, help="optimizer steps (paper: see table below)")
    g.add_argument("--lr", type=float, help="AdamW learning rate (1e-4)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (0.01; the paper names none)")
    g.add_argument("--group-size", "-G", type=int, help="completions per prompt (GRPO/S-GRPO 8, T-SPMO 50)")
    g.add_argument("--accum", type=int, help="prompts per optimizer step (1; the ablation uses 8)")
    g.add_argument("--temperature", type=float, help="sampling temperature (0.3)")
    g.add_argument("--top-p", type=float, help="nucleus sampling (1.0: off; the paper names none)")
    g.add_argument("--max-new-tokens", type=int, help="completion length limit (300)")
    g.add_argument("--beta", type=float, help="KL weight, GRPO/S-GRPO (0.01)")
    g.add_argument("--lam", type=float, help="L2 weight on LoRA, T-SPMO (0.01)")
    g = p.add_argument_group("LoRA (paper: mult last 1/4 of layers, rank 8; svamp last 1/3, rank 16)")
    g.add_argument("--lora-fraction", type=float, help="fraction of the last layers adapted")
    g.add_argument("--lora-rank", type=int, help="rank r")
    g.add_argument("--lora-alpha", type=float, help="alpha (default r: scale 1)")
    g = p.add_argument_group("S-GRPO token selection (paper: mult α=50, k=100; svamp α=100, k=100)")
    g.add_argument("--alpha", type=int, help="first α tokens always in the loss")
    g.add_argument("--k", type=int, help="at most k tokens in the loss")
    g.add_argument("--p", type=float, help="probability of a later token (0.5; the paper gives none)")
    g = p.add_argument_group("T-SPMO replay (paper: mult 1 success, 0 failures; svamp none)")
    g.add_argument("--replay-success", type=int, help="C_success")
    g.add_argument("--replay-failure", type=int, help="C_failure")
    g.add_argument("--replay-threshold", type=float, help="reward r separating success from failure (1.0)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, help="steps between test evaluations (50; 0: start and end only)")
    g.add_argument("--eval-limit", type=int, help="evaluate on the first N test examples (default all)")
    g.add_argument("--eval-batch", type=int, help="prompts per greedy batch (32)")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (10)")
    g = p.add_argument_group("PPO with a critic (K1-K4) and DPO (D1); PPO's KL weight w2 is --beta")
    g.add_argument("--critic", choices=["shared", "separate"],
                   help="PPO value head on the policy's own hidden states (shared, default) or on a second copy "
                        "of the base model with its own LoRA (separate: the classic critic and its memory)")
    g.add_argument("--gamma", type=float, help="PPO discount γ (1.0)")
    g.add_argument("--gae-lambda", type=float, help="GAE λ (0.95)")
    g.add_argument("--clip-eps", type=float, help="PPO clip ε (0.2)")
    g.add_argument("--ppo-passes", type=int, help="PPO μ: passes, each one optimizer step, over a step's group (4)")
    g.add_argument("--w1", type=float, help="PPO entropy weight w1 (0)")
    g.add_argument("--w3", type=float, help="PPO value-loss weight w3 (0.5)")
    g.add_argument("--dpo-beta", type=float, help="DPO β_D (0.1)")
    return p


def baseline_settings_error(cfg: Settings) -> str | None:
    """A one-line error for PPO/DPO settings that cannot work, before anything is loaded."""
    if cfg.algo in ("ppo", "dpo") and cfg.accum != 1:
        return f"--accum {cfg.accum}: --algo {cfg.algo} takes one prompt per step (--accum 1)"  # ours
    checks = [("--ppo-passes", cfg.ppo_passes, cfg.ppo_passes >= 1), ("--clip-eps", cfg.clip_eps, cfg.clip_eps > 0),
              ("--gamma", cfg.gamma, 0 <= cfg.gamma <= 1), ("--gae-lambda", cfg.gae_lambda, 0 <= cfg.gae_lambda <= 1),
              ("--dpo-beta", cfg.dpo_beta, cfg.dpo_beta > 0), ("--critic", cfg.critic,
                                                                cfg.critic in ("shared", "separate"))]
    return next((f"{flag} {value}: out of range" for flag, value, ok in checks if not ok), None)


def resolve(args: argparse.Namespace, base: Settings | None = None) -> Settings:
    """Settings = Settings() defaults ← the paper's for (algo, task) ← a resumed run's ← what the user typed."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
             if getattr(args, f.name, None) is not None}
    if base is not None:
        cfg = dataclasses.replace(base, **given)
    else:
        algo, task = given.get("algo", Settings.algo), given.get("task", Settings.task)
        cfg = Settings(**{**paper_defaults(algo, task), "algo": algo, "task": task, **given})
    if (err := baseline_settings_error(cfg)) is not None:
        raise SystemExit(f"error: {err}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.json").is_file():
            raise SystemExit(f"error: {run} is not a tokrl run directory (no config.json)")
        saved = json.loads((run / "config.json").read_text())
        cfg = resolve(args, Settings(**{k: v for k, v in saved.items() if k in Settings.__dataclass_fields__}))
    else:
        cfg = resolve(args)
    try:
        if args.eval_only:
            eval_only(cfg, args.adapter, Path(cfg.out) if cfg.out else None)
            return 0
        if not args.resume:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            run = Path(cfg.out or f"runs/{cfg.task}-{cfg.algo}-{stamp}")
            if (run / "metrics.jsonl").is_file():
                raise SystemExit(f"error: {run} already holds a run; use --resume {run} or another --out")
            run.mkdir(parents=True, exist_ok=True)
            cfg = dataclasses.replace(cfg, out=str(run))
        print("settings: " + json.dumps(dataclasses.asdict(cfg)))
        (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        train(cfg, run, resume=bool(args.resume))
    except (DataError, M.ModelNotFoundError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
