"""Train Qwen2 with GRPO, S-GRPO or T-SPMO under LoRA, as in Lee & Tong (2025), on one GPU (or the CPU).
The methods the paper argues against run in the same harness: --algo ppo (a critic, GAE) and --algo dpo.

    python train.py --algo tspmo --task mult                  # the paper's settings for (algo, task)
    python train.py --algo sgrpo --task svamp --steps 10      # any setting can be overridden
    python train.py --resume runs/mult-tspmo-20261122-101500  # continue exactly where it stopped [--steps N]
    python train.py --task mult --eval-only [--adapter DIR]   # accuracy of the base model or of an adapter

Deviations from the paper and choices it leaves open (README "Choices the paper leaves open" lists the same):
  1. T-SPMO replay takes its own optimizer step after each replayed group (the paper: "the policy model is updated
     again"); a training step of T-SPMO with replay therefore makes 1 + C_success + C_failure optimizer steps.
  2. The gsm8k task (prompt, SymPy reward, LoRA and step settings) is an extension; the paper has no such run.
  3. Evaluation cadence (--eval-every) and checkpoint cadence are ours; the paper gives neither.
  4. A zero-variance group still takes its update: GRPO/S-GRPO still backpropagate the β·KL term (E3/E5 keep it when
     Â = 0), T-SPMO only the λ·‖W‖² term. The step is logged with zero_variance = true.
  5. With --accum N, T-SPMO draws N rounds of replays after the accumulated update (one per fresh group; with
     --replay-pool group each from its own group); --reward partial (S2) trains on partial credit, evaluation stays
     exact. The replay pool (replay.py) is every completion generated so far, each replayed under its own problem.
  6. PPO and DPO (SPEC-baselines.md, baselines.py) take one prompt per step (--accum 1). PPO's shared critic passes
     the value loss's gradient into the policy's LoRA; PPO logs means over its μ passes.

Every setting is checked before anything is loaded (settings.RULES); a resume keeps the settings the run recorded.

Sections: evaluation · the training loop · command line. Settings, the paper's defaults and the rules they are
checked against: settings.py; the settings against the model and this machine: checks.py; tasks and data: tasks.py;
checkpoints, logs and the run directory's hold: checkpoints.py; T-SPMO's replay pool: replay.py; the plot: plot.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import baselines
import distributed
import lora
import model as M
import tokrl
import checkpoints
from replay import ReplayPool
from distributed import World, combine_stats, own_rng, rng_for_checkpoint
from checkpoints import (WriteError, append_jsonl, find_checkpoint, read_jsonl, save_checkpoint, write_atomic,
                         write_jsonl)
from checks import check_inputs, check_resume, eval_batch, read_run_settings
from plot import svg_plot
from settings import GROUP, LORA_TARGETS, TASK_DEFAULTS, Settings, flag, paper_defaults, usage_error, validate
from tasks import DataError, Task, TrainStream, make_task

# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: greedy, batched, accuracy = mean reward ([decided] SPEC.md)


class EvalStopped(Exception):
    """Ctrl-C during an evaluation: it is abandoned between batches (and run again on resume)."""


def evaluate(net, tok, task: Task, cfg: Settings, eos, stop: StopRequest | None = None,
             world: World = World()) -> dict:
    """With N processes each takes a slice of the test set (distributed.py) and the counts are summed."""
    data = task.test_set()[: cfg.eval_limit]
    mine = [data[i] for i in world.share(len(data))]
    new_tokens = cfg.eval_max_new_tokens or cfg.max_new_tokens
    t0, correct, examples, details = time.time(), 0.0, [], {}
    encoded = [tok.encode(task.prompt(ex)) for ex in mine]
    rows = eval_batch(cfg, net.config, max(map(len, encoded), default=1), len(mine))
    # minutes for 3,000 problems: a progress bar on a terminal; none when stderr is not one (disable=None), so that
    # logs and CI output stay one line per event
    with tqdm(total=len(mine), desc=f"eval {task.name}", unit="problem", disable=None if world.main else True,
              leave=False) as bar:
        for i in range(0, len(mine), rows):
            if stop is not None and stop.requested and world.size == 1:  # N processes: between steps only
                raise EvalStopped
            batch, prompts = mine[i: i + rows], encoded[i: i + rows]
            try:
                outs = M.greedy(net, prompts, new_tokens, eos=eos, stop=task.stop())
            except M.CacheTooLarge as e:
                e.flags = f"--eval-batch {cfg.eval_batch or f'{rows} (its default here)'}, " \
                          f"--eval-max-new-tokens {new_tokens}"
                raise
            for ex, out in zip(batch, outs):
                text = tok.decode(out)
                r = task.eval_reward(text, ex)  # the task's own reward, whatever --reward trains with
                correct += r
                for k, v in task.eval_details(text, ex).items():  # mult: S2's partial credit
                    details[k] = details.get(k, 0.0) + v
                if len(examples) < 3:
                    examples.append({"example": list(ex) if isinstance(ex, tuple) else ex, "completion": text,
                                     "reward": r})
            bar.update(len(batch))
            bar.set_postfix(accuracy=f"{correct / (i + len(batch)):.3f}", refresh=False)
    M.release_decoders(net)  # the evaluation's fixed-shape caches and graphs: gigabytes at a large batch
    correct, examples = world.sum([correct])[0], world.gather(examples)[:3]  # one process: unchanged
    totals: dict[str, float] = {}
    for part in world.gather([details]):  # N processes: a rank with no problem has no keys
        for k, v in part.items():
            totals[k] = totals.get(k, 0.0) + v
    return {"accuracy": correct / max(len(data), 1), "n": len(data), "seconds": round(time.time() - t0, 2),
            **{k: v / max(len(data), 1) for k, v in sorted(totals.items())}, "examples": examples}


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
           critic: baselines.Critic | None = None, world: World = World()) -> tokrl.StepStats:
    """Backward of one group with the chosen objective (the caller sums the gradients over the processes and steps
    the optimizer; PPO takes its first μ − 1 steps itself, with `opt`). With N processes each backpropagates its
    share and the statistics are the whole group's."""
    share = world.assign if world.size > 1 else None
    if algo == "ppo":
        st = ppo_update(net, critic, opt, prompt, completions, rewards, cfg, world)  # [K4]
        return combine_stats(world, st, algo)
    if algo == "dpo":
        st = baselines.dpo_backward(net, prompt, completions, rewards, beta=cfg.dpo_beta, scale=scale,  # [D1]
                                    share=share, backward_batch=cfg.backward_batch)
        return combine_stats(world, st, algo)
    if algo == "tspmo":
        st = tokrl.tspmo_backward(net, prompt, completions, rewards, lam=cfg.lam if world.main else 0.0,  # [E10]
                                  scale=scale, objective=cfg.tspmo_objective, share=share,
                                  summed_grads=world.summed_grads if share else None)
        return combine_stats(world, st, algo)  # λ·Σ‖W‖² once, on rank 0: its gradient is summed with the others'
    selection = None
    if algo == "sgrpo":  # every process draws every T_i, in order: the "select" stream stays the same everywhere
        selection = [tokrl.select_tokens(len(y), cfg.alpha, cfg.k, cfg.p, gens["select"])  # [Alg1]
                     for y in completions]
    st = tokrl.grpo_backward(net, prompt, completions, rewards, beta=cfg.beta, selection=selection, scale=scale,
                             share=share, backward_batch=cfg.backward_batch)
    return combine_stats(world, st, algo)


def ppo_update(net, critic: baselines.Critic, opt, prompt, completions, rewards, cfg: Settings,
               world: World = World()) -> tokrl.StepStats:
    """[decided] (SPEC-baselines.md) μ passes over the step's completions, each accumulating the per-completion
    gradients and taking one optimizer step; π_θold, advantages and value targets are fixed once, at sampling time.
    The first μ − 1 steps are taken here, the last one by the caller. Logged: means over the μ passes.
    With N processes each backpropagates its share of the completions and the gradients are summed before each step
    (the sampling-time pass runs whole on every process: the whitening reads every token of the step)."""
    batch = baselines.ppo_prepare(net, critic, prompt, completions, rewards, gamma=cfg.gamma,
                                  gae_lambda=cfg.gae_lambda, with_ref=cfg.beta != 0)  # [K2]
    passes = []
    for k in range(cfg.ppo_passes):
        if k:
            world.sum_grads([p for group in opt.param_groups for p in group["params"]])
            opt.step()
            opt.zero_grad(set_to_none=True)
        passes.append(baselines.ppo_backward(net, critic, batch, clip_eps=cfg.clip_eps, w1=cfg.w1, w2=cfg.beta,
                                             w3=cfg.w3, share=world.assign if world.size > 1 else None,
                                             backward_batch=cfg.backward_batch))  # [K3] [K4]
        check_finite(net, passes[-1], critic.parameters(), world)
    st, n = passes[-1], len(passes)
    st.loss, st.kl = sum(p.loss for p in passes) / n, sum(p.kl for p in passes) / n
    st.forwards, st.zero_variance = sum(p.forwards for p in passes), len(set(rewards)) == 1
    st.extra = {k: sum(p.extra[k] for p in passes) / n for k in st.extra}
    st.extra["explained_variance"] = batch.explained_variance
    return st


def check_finite(net, st: tokrl.StepStats, more=(), world: World = World()) -> None:
    """The loss and every gradient (the policy's LoRA, and `more`: a critic's parameters) are finite. With N
    processes (whose gradients are still shares) they decide together: all stop, or none."""
    bad = not math.isfinite(st.loss) or any(not torch.isfinite(p.grad).all()
                                            for p in [*lora.lora_parameters(net), *more] if p.grad is not None)
    if world.size > 1:
        bad = world.sum([float(bad)])[0] > 0
    if bad:
        raise NonFiniteLoss(f"loss {st.loss} or its gradient is not finite")


class Trainer:
    def __init__(self, cfg: Settings, run: Path, net, tok, task: Task, eos, world: World = World()):
        self.cfg, self.run, self.net, self.tok, self.task, self.eos = cfg, run, net, tok, task, eos
        self.world = world  # one process, or this one's place among N (distributed.py)
        self.dev = next(net.parameters()).device
        # PPO: the critic (value head; separate: and a second copy of the base with its LoRA) trains with the policy
        self.critic = baselines.Critic(net, cfg.critic) if cfg.algo == "ppo" else None
        params = lora.lora_parameters(net) + (self.critic.parameters() if self.critic else [])
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # the sampling generator lives on the model's device (torch.multinomial needs it there): a seed gives different
        # samples on CPU and CUDA (different streams), each reproducible; the other draws are on the CPU everywhere
        # with N processes each samples from its own stream (rank 0's is the one-process one); the others are the same
        self.gens = {"sample": torch.Generator(self.dev).manual_seed(world.seed_for_rank(cfg.seed)),
                     "select": torch.Generator().manual_seed(cfg.seed + 1),  # S-GRPO token selection
                     "replay": random.Random(cfg.seed + 3)}  # the data's RNG: tasks.TrainStream, seed + 2
        self.step = 0
        self.pool = ReplayPool(cfg.replay_threshold)  # T-SPMO's replay pool (--replay-pool history): run state

    def rng_state(self) -> dict:
        g = self.gens
        return {"sample": g["sample"].get_state(), "select": g["select"].get_state(), "replay": g["replay"].getstate()}

    def set_rng_state(self, r: dict) -> None:
        self.gens["sample"].set_state(r["sample"]), self.gens["select"].set_state(r["select"])
        self.gens["replay"].setstate(r["replay"])

    def optimizer_step(self) -> None:
        """The gradients summed over the processes (each holds its share's; one process: nothing to do), AdamW's
        step, the same everywhere, then the guard: a non-finite adapter weight or moment stops the run before it is
        saved."""
        self.world.sum_grads([p for group in self.opt.param_groups for p in group["params"]])
        self.opt.step()
        bad = checkpoints.non_finite(self.net, self.opt)
        if bad:
            raise NonFiniteLoss(f"{bad} is not finite after the optimizer step")

    def sample_group(self, prompt_ids, ex, prefix=()):
        """G completions of prompt∘prefix with their rewards against the example `ex` (the reward reads prefix +
        completion). With N processes each samples and scores its share, and every process gets the whole group, in
        rank order."""
        cfg, n = self.cfg, self.world.counts(self.cfg.group_size)[self.world.rank]
        try:
            outs = M.sample(self.net, list(prompt_ids) + list(prefix), n, cfg.max_new_tokens - len(prefix),
                            temperature=cfg.temperature, top_p=cfg.top_p, generator=self.gens["sample"], eos=self.eos,
                            stop=self.task.stop(prefix), precision=cfg.sample_precision) if n else []
        except M.CacheTooLarge as e:
            e.flags = f"-G {cfg.group_size}, --max-new-tokens {cfg.max_new_tokens}"
            raise
        scored = [(o, self.task.reward(self.tok.decode(list(prefix) + o), ex)) for o in outs]
        group = self.world.gather(scored)
        return [o for o, _ in group], [r for _, r in group]

    def check_finite(self, st: tokrl.StepStats) -> None:
        check_finite(self.net, st, self.critic.parameters() if self.critic else (), self.world)

    def replay(self, groups: list[tuple]) -> list[tokrl.StepStats]:
        """T-SPMO replay, after the update on this step's fresh groups (ex, prompt ids, completions, rewards): for each
        of them, C_success + C_failure completions drawn from the pool, each restarted from a random cut of its own
        tokens, under its own problem; one update each."""
        cfg, rng, step = self.cfg, self.gens["replay"], self.step + 1
        if cfg.replay_pool == "history":  # [decided] (SPEC.md) the replay pool: every fresh completion so far
            for ex, _, completions, rewards in groups:
                self.pool.add_group(ex, completions, rewards, step)
        stats = []
        for ex, _, completions, rewards in groups:  # ours: with --accum N, N rounds of picks (one per fresh group)
            pool = self.pool
            if cfg.replay_pool == "group":  # the ablation: this prompt's G completions only
                pool = ReplayPool(cfg.replay_threshold)
                pool.add_group(ex, completions, rewards, step)
            for i in pool.draw(rng, cfg.replay_success, cfg.replay_failure):  # R_success, R_fail: replay.py
                y, source = pool.completion(i), pool.example(i)
                j = rng.randint(0, len(y) - 1)  # cut uniform in [0, |y| − 1]: the prefix is prompt + y_1 … y_j
                if cfg.max_new_tokens - j < 1:
                    continue
                prompt_ids = self.tok.encode(self.task.prompt(source))  # its own problem's prompt
                conts, rs = self.sample_group(prompt_ids, source, y[:j])  # scored against its own problem
                self.opt.zero_grad(set_to_none=True)
                st = update(self.net, "tspmo", list(prompt_ids) + list(y[:j]), conts, rs, cfg, self.gens, 1.0,
                            world=self.world)  # [E10]
                self.check_finite(st)
                self.optimizer_step()  # deviation 1 (module docstring): each replayed group is its own update
                st.extra = {"replay_cut": j, "replay_reward": sum(rs) / len(rs),  # the continuations' mean reward
                            "replay_source_step": pool.step[i], "replay_source_reward": pool.reward[i]}
                stats.append(st)
        return stats

    def train_step(self, stream) -> dict:
        """One optimizer step over cfg.accum prompts' groups (Alg2), then, for T-SPMO, the replays.

        ours: with --accum N, T-SPMO draws N rounds of replays after the accumulated update (one round per fresh
        group: from the whole pool, or with --replay-pool group from that group, scored against its own example),
        each replayed group its own update."""
        cfg, t0 = self.cfg, time.time()
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.opt.zero_grad(set_to_none=True)
        rewards_all, stats, lengths, groups = [], [], [], []
        for _ in range(cfg.accum):
            ex = next(stream)
            prompt_ids = self.tok.encode(self.task.prompt(ex))
            completions, rewards = self.sample_group(prompt_ids, ex)
            st = update(self.net, cfg.algo, prompt_ids, completions, rewards, cfg, self.gens, 1 / cfg.accum,
                        opt=self.opt, critic=self.critic, world=self.world)
            self.check_finite(st)
            rewards_all += rewards
            lengths += [len(y) for y in completions]
            stats.append(st)
            groups.append((ex, prompt_ids, completions, rewards))
        self.optimizer_step()
        replays = self.replay(groups) if cfg.algo == "tspmo" and cfg.replay_success + cfg.replay_failure else []
        secs = time.time() - t0
        n = len(rewards_all)
        mean = sum(rewards_all) / n  # [E1] J(θ) = E_{Y~π_θ}[r(Y)], estimated by the mean reward of the group
        gen_tokens = sum(lengths) + sum(s.tokens_generated for s in replays)
        every = stats + replays  # fresh groups, then replay groups: all of them did forwards and took a loss
        m = {"step": self.step + 1, "reward_mean": mean,
             "reward_std": math.sqrt(sum((r - mean) ** 2 for r in rewards_all) / n),
             "zero_variance": any(s.zero_variance for s in stats),
             "loss": sum(s.loss for s in every), "kl": sum(s.kl for s in stats) / len(stats),
             "len_mean": sum(lengths) / n, "len_max": max(lengths), "forwards": sum(s.forwards for s in every)}
        if cfg.algo == "tspmo":
            m.update(tspmo_metrics(self.net, stats, replays))
        else:
            m["loss_token_fraction"] = sum(s.tokens_in_loss for s in stats) / max(sum(lengths), 1)
            m.update({k: v for s in stats for k, v in s.extra.items()})  # PPO / DPO statistics (baselines.py)
        m.update({"seconds": round(secs, 3), "tokens_per_s": round(gen_tokens / secs, 1),
                  "peak_mem_gb": round(peak_memory_gb(self.dev), 3)})
        return m


GROUP_FIELDS = ("edges", "forwards", "nonzero_adv_tokens", "tokens_generated", "policy_loss", "l2_loss",
                "policy_grad_norm", "l2_grad_norm", "policy_grad_norm_A", "l2_grad_norm_A")


def tspmo_metrics(net, fresh: list[tokrl.StepStats], replays: list[tokrl.StepStats]) -> dict:
    """T-SPMO's log, fresh and replay groups alike: |U|, the fraction of generated tokens whose edge has A ≠ 0, the
    policy and λ terms with their gradient norms (per group: which term drives the adapter), and mean |A|, |B|."""
    every = fresh + replays
    groups = [{"kind": "fresh" if i < len(fresh) else "replay", **{f: getattr(s, f) for f in GROUP_FIELDS},
               **s.extra} for i, s in enumerate(every)]
    mean_A, mean_B = lora.mean_abs(net)
    return {"edges": sum(s.edges for s in every),
            "nonzero_adv_token_fraction": sum(s.nonzero_adv_tokens for s in every) /
            max(sum(s.tokens_generated for s in every), 1),
            "policy_loss": sum(s.policy_loss for s in every), "l2_loss": sum(s.l2_loss for s in every),
            "lora_A_mean_abs": mean_A, "lora_B_mean_abs": mean_B,
            "replays": [s.extra for s in replays], "groups": groups}


def progress_line(m: dict, steps: int, started: float, first_step: int) -> str:
    done = m["step"] - first_step
    eta = (time.time() - started) / max(done, 1) * (steps - m["step"])
    if "groups" in m:  # T-SPMO: the two terms of the loss and their gradient norms (fresh group), |A|
        g = m["groups"][0]
        what = (f"loss {m['loss']:+.4f} (policy {m['policy_loss']:+.4f}, λ {m['l2_loss']:.4f}) | "
                f"|∇| policy {g['policy_grad_norm']:.1e} λ {g['l2_grad_norm']:.1e} | |A| {m['lora_A_mean_abs']:.2e} | "
                f"A≠0 {100 * m['nonzero_adv_token_fraction']:.1f}%")
    else:
        what = f"loss {m['loss']:+.4f} | kl {m['kl']:.4f} | in-loss {100 * m['loss_token_fraction']:.1f}%"
    return (f"step {m['step']:>4}/{steps} | reward {m['reward_mean']:.3f}±{m['reward_std']:.3f}"
            f"{' (zero-var)' if m['zero_variance'] else ''} | {what} | len {m['len_mean']:.0f} | "
            f"{m['seconds']:.1f} s | {m['tokens_per_s']:.0f} tok/s | mem {m['peak_mem_gb']:.2f} GB | "
            f"eta {datetime.timedelta(seconds=int(eta))}")


def load_everything(cfg: Settings):
    """The model, its tokenizer and its EOS ids. The files were checked by check_inputs before (main does)."""
    model_dir = M.resolve_model_dir(cfg.model, revision=cfg.revision)
    net = M.load_model(model_dir, dtype=M.DTYPES[cfg.dtype], device=cfg.device)
    tok = M.Tokenizer(model_dir / "tokenizer.json")
    return net, tok, M.eos_ids(model_dir, net.config, tok)


class RunLog:
    """A run's logs in memory and on disk: metrics.jsonl and eval.jsonl (appended), curves.svg (rewritten whole)."""

    def __init__(self, run: Path, cfg: Settings, resume_step: int | None = None, write: bool = True):
        self.run, self.title, self.write = run, f"{cfg.algo} on {cfg.task}", write  # write: rank 0 of N only
        self.metrics = read_jsonl(run / "metrics.jsonl", resume_step) if resume_step is not None else []
        self.evals = read_jsonl(run / "eval.jsonl", resume_step) if resume_step is not None else []
        if resume_step is not None and write:  # drop what was logged after the checkpoint: those steps are run again
            write_jsonl(run / "metrics.jsonl", self.metrics)
            write_jsonl(run / "eval.jsonl", self.evals)

    def step(self, m: dict) -> None:
        self.metrics.append(m)
        if self.write:
            append_jsonl(self.run / "metrics.jsonl", m, "metrics")

    def eval(self, e: dict) -> None:
        self.evals.append(e)
        if self.write:
            append_jsonl(self.run / "eval.jsonl", e, "eval")

    def curves(self) -> None:
        if self.write:
            write_atomic(self.run / "curves.svg", svg_plot(self.metrics, self.evals, self.title).encode(), "curves")


def restore(tr: Trainer, ck: Path, state: dict) -> int:
    """A checkpoint back into the trainer: adapter, AdamW, step, RNGs. Returns the data position."""
    lora.load_adapter_weights(tr.net, ck / "adapter")
    tr.opt.load_state_dict(state["optimizer"])
    tr.step = state["step"]
    tr.set_rng_state(own_rng(tr.world, state))  # N processes: each its own generators
    if tr.critic is not None:
        tr.critic.load_state(state.get("extra", {}))  # PPO: the value head (and the separate critic's LoRA)
    if "replay_pool" in state:
        tr.pool = ReplayPool.from_state(state["replay_pool"])
    return state["data_position"]


def train(cfg: Settings, run: Path, resume: bool = False, task: Task | None = None,
          checkpoint: tuple[Path, dict] | None = None, loaded=None, world: World = World()) -> dict:
    """The whole run; returns the final evaluation. `task` lets tests (and mini.py) plug in their own task;
    `checkpoint` is the one main() already chose for a resume (else the newest intact one is found here); `loaded` =
    (net, tok, eos) an already-loaded model to train instead of reading cfg.model from disk (LoRA is put on that net
    in place: pass a fresh copy per run). With N processes (`world`, distributed.py) every one runs this loop on its
    share of each group; rank 0 alone prints and writes."""
    torch.manual_seed(cfg.seed)  # nothing should draw from the global RNG; this only pins what might
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # CPU: arithmetic on denormal floats (below 1.2e-38) is slow; flushing them to zero changes no result that matters
    # and made a zero-variance backward 30x faster on the test machine
    torch.set_flush_denormal(True)
    net, tok, eos = loaded or load_everything(cfg)
    task = task or make_task(cfg.task, tok, cfg.data, cfg.reward)
    lora.apply_lora(net, cfg.lora_rank, cfg.lora_fraction, cfg.lora_alpha, targets=cfg.lora_targets.split(","),
                    generator=torch.Generator().manual_seed(cfg.seed + 4))  # [L1]
    tr = Trainer(cfg, run, net, tok, task, eos, world)
    say = print if world.main else (lambda *a, **k: None)
    position, last_saved = 0, None
    if resume:
        last_saved, state = checkpoint or find_checkpoint(run)
        position = restore(tr, last_saved, state)
        say(f"resumed {run} at step {tr.step} from {last_saved.name}")
    log = RunLog(run, cfg, tr.step if resume else None, write=world.main)
    if hasattr(task, "split_note"):
        say(f"data: {task.split_note}")
    # the stream skips the examples already drawn: the same next examples as an uninterrupted run
    stream = TrainStream(task, cfg.seed + 2, position)

    def eval_due(step: int) -> bool:
        return step == 0 or step == cfg.steps or bool(cfg.eval_every and step % cfg.eval_every == 0)

    def log_eval(step: int, stop: StopRequest) -> None:
        with torch.no_grad():
            e = {"step": step, **evaluate(net, tok, task, cfg, eos, stop, world), **lora.adapter_norms(net)}
        log.eval(e)
        say(f"eval  step {step:>4} | accuracy {e['accuracy']:.4f} on {e['n']} | {e['seconds']:.0f} s", flush=True)

    def save(step: int) -> None:
        nonlocal last_saved
        state = {**rng_for_checkpoint(world, tr.rng_state()), "data_position": stream.position}  # every process's
        if len(tr.pool):
            state["replay_pool"] = tr.pool.state()  # T-SPMO: resume draws the same replays
        if tr.critic is not None:
            state["extra"] = tr.critic.state()  # PPO: the value head (and the separate critic's LoRA)
        last_saved = (save_checkpoint(run, step, net, tr.opt, state, cfg.model) if world.main else
                      run / "checkpoints" / f"step-{step:06d}")

    def safe() -> str:
        return (f"the last checkpoint, {last_saved}, is whole and untouched" if last_saved else
                "no checkpoint was written yet")

    def stopping() -> bool:  # N processes: a Ctrl-C seen by any stops all, after the same step (a collective)
        return bool(world.sum([stop.requested])[0])

    started, first = time.time(), tr.step
    with StopRequest() as stop:
        try:
            try:
                if eval_due(tr.step) and not any(e["step"] == tr.step for e in log.evals):
                    log_eval(tr.step, stop)  # step 0, or an evaluation that a stop or a crash cut short
                while tr.step < cfg.steps and not stopping():
                    m = tr.train_step(stream)
                    tr.step = m["step"]
                    log.step(m)
                    say(progress_line(m, cfg.steps, started, first), flush=True)
                    if eval_due(tr.step):
                        log_eval(tr.step, stop)
                    if tr.step % cfg.save_every == 0 or tr.step == cfg.steps or stopping():
                        save(tr.step)
                    log.curves()
            except EvalStopped:  # Ctrl-C during an evaluation: it is run again on resume
                pass
            if stopping() and (last_saved is None or last_saved.name != f"step-{tr.step:06d}"):
                save(tr.step)  # a stop during the step-0 (or another) evaluation: a checkpoint of this step
        except NonFiniteLoss as e:
            raise SystemExit(f"error: {e} at step {tr.step + 1}; stopped without saving it: {safe()}. A lower --lr "
                             "or --dtype float32 in a new run avoids it") from None
        except checkpoints.NonFiniteState as e:
            raise SystemExit(f"error: {e}; stopped: {safe()}") from None
        except M.CacheTooLarge as e:
            raise SystemExit(f"error: {e}. Stopped: {safe()}; with memory freed on {e.device}, continue with python "
                             f"train.py --resume {run}, or start a new run with fewer rows or new tokens") from None
        except WriteError as e:
            raise SystemExit(f"error: {e}. Stopped: {safe()}; once the disk has room, continue with "
                             f"python train.py --resume {run}") from None
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once
            print(f"\nstopped at once: {safe()}; continue with: python train.py --resume {run}", file=sys.stderr)
            raise SystemExit(130) from None
    finished = tr.step == cfg.steps and bool(log.evals) and log.evals[-1]["step"] == tr.step
    if stopping() and not finished:
        say(f"stopped at step {tr.step}; continue with: python train.py --resume {run}")
        return log.evals[-1] if log.evals else {}
    try:
        log.curves()
        if world.main:
            checkpoints.write_adapter(net, run / "adapter", cfg.model)
    except WriteError as e:
        raise SystemExit(f"error: {e}. The run is complete in {last_saved}; once the disk has room, "
                         f"python train.py --resume {run} writes the rest") from None
    say(f"done: accuracy {log.evals[-1]['accuracy']:.4f}; adapter in {run / 'adapter'} (PEFT format)")
    return log.evals[-1]


def eval_only(cfg: Settings, adapter: str | None, out: Path | None, world: World = World()) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    net, tok, eos = load_everything(cfg)
    task = make_task(cfg.task, tok, cfg.data, cfg.reward)
    if adapter:
        lora.load_adapter(net, adapter)
    with torch.no_grad():
        e = evaluate(net, tok, task, cfg, eos, world=world)
    if world.main:
        print(f"accuracy {e['accuracy']:.4f} on {e['n']} {cfg.task} test examples "
              f"({'adapter ' + adapter if adapter else 'base model'})")
    if out and world.main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "eval.json", (json.dumps({"adapter": adapter, **e}, indent=2) + "\n").encode())
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
    rows.append("  all: AdamW lr 1e-4 (weight decay 0.01: T-SPMO's lambda = 0.01 read as it, --lam 0; --lam 0.01 "
                "puts it in the loss), beta = 0.01, temperature 0.3, "
                "300 new tokens, fp32, one prompt per step, P = 0.5, replay threshold r = 1.0, replay pool: every "
                "completion generated so far (history)")
    rows.append("  reward (--reward): mult exact (the paper's; or partial = S2), svamp exact, gsm8k sympy (S1)")
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
    g.add_argument("--revision", help="with a repo id: branch, tag or commit hash (default main)")
    g.add_argument("--data", help="svamp/gsm8k only. svamp: dir with train.json+test.json, or SVAMP.json (a "
                                  "fixed seeded split; default: the paper's 700/300 split shipped in data/svamp/); "
                                  "gsm8k: dir with train.jsonl+test.jsonl (default: the 7,473/1,319 files shipped "
                                  "in data/gsm8k/)")
    g.add_argument("--out", help="run directory (default runs/{task}-{algo}-{time}); must not hold a run already")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest intact checkpoint, with the "
                                                       "settings it recorded (only --steps may change)")
    g.add_argument("--eval-only", action="store_true", help="evaluate the base model (or --adapter) and exit")
    g.add_argument("--adapter", help="with --eval-only: a PEFT LoRA adapter directory")
    g.add_argument("--device", help=f"cpu, cuda or cuda:N (default {S.device})")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32 (the paper's)")
    g.add_argument("--seed", type=int, help="0 <= seed < 2^62 (default 0)")
    g.add_argument("--reward", choices=["exact", "partial", "sympy"],
                   help="training reward: mult exact (default, the paper's) or partial (S2, partial credit); svamp "
                        "exact; gsm8k sympy (S1). Test accuracy is always the task's own (exact / sympy)")
    g = p.add_argument_group("training (defaults: the paper's for the chosen algo and task)")
    g.add_argument("--steps", type=int, help="optimizer steps, >= 1 (paper: see table below); with --resume, "
                                             "a longer (or shorter, not below the checkpoint) run")
    g.add_argument("--lr", type=float, help="AdamW learning rate, 0 < lr <= 1 (1e-4)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay, 0..1 (0.01; the paper names none)")
    g.add_argument("--group-size", "-G", type=int, help="completions per prompt, >= 1 (GRPO/S-GRPO 8, T-SPMO 50)")
    g.add_argument("--accum", type=int, help="prompts per optimizer step, >= 1 (1; the ablation uses 8)")
    g.add_argument("--temperature", type=float, help="sampling temperature, >= 0 (0.3)")
    g.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1] (1.0: off; the paper names none)")
    g.add_argument("--max-new-tokens", type=int, help="completion length limit, >= 1 (300)")
    g.add_argument("--sample-precision", choices=["fp32", "tf32", "bf16"],
                   help="sampling's matrix products: fp32 (default, the paper's), tf32 (CUDA's TF32 products) or bf16 "
                        "(a bf16 copy of the frozen base weights, the fp32 adapter applied as in training): faster "
                        "on a GPU, the samples slightly off the fp32 policy (docs/performance.md measures how far)")
    g.add_argument("--backward-batch", type=int,
                   help="completions per forward/backward, >= 1 (1: the paper's per-completion backward and its "
                        "memory); GRPO, S-GRPO, PPO, DPO")
    g.add_argument("--eval-max-new-tokens", type=int,
                   help="greedy evaluation's length limit, >= 1 (default: --max-new-tokens)")
    g.add_argument("--beta", type=float, help="KL weight, GRPO/S-GRPO, >= 0 (0.01)")
    g.add_argument("--lam", type=float,
                   help="T-SPMO's λ·Σ‖W‖² on LoRA in the loss, >= 0. Default 0: the paper's λ read as AdamW's weight "
                        "decay 0.01, no term in the loss (SPEC.md E10: the literal term leaves the adapter inert in "
                        "the miniature, docs/mini.md); 0.01: E10's λ·Σ‖W‖² read literally")
    g.add_argument("--tspmo-objective", choices=["pi", "logpi"],
                   help="T-SPMO's per-edge term: pi = π·A, E10 as the paper writes it (default); logpi = log π·A")
    g = p.add_argument_group("LoRA (paper: mult last 1/4 of layers, rank 8; svamp last 1/3, rank 16)")
    g.add_argument("--lora-fraction", type=float, help="fraction of the last layers adapted, in (0, 1]")
    g.add_argument("--lora-rank", type=int, help="rank r, >= 1")
    g.add_argument("--lora-alpha", type=float, help="alpha, > 0 (default r: scale 1)")
    g.add_argument("--lora-targets",
                   help=f"comma-separated projections to adapt, of {','.join(LORA_TARGETS)} (default q_proj,v_proj)")
    g = p.add_argument_group("S-GRPO token selection (paper: mult α=50, k=100; svamp α=100, k=100)")
    g.add_argument("--alpha", type=int, help="first α tokens always in the loss, >= 0")
    g.add_argument("--k", type=int, help="at most k tokens in the loss, >= 1")
    g.add_argument("--p", type=float, help="probability of a later token, in [0, 1] (0.5; the paper gives none)")
    g = p.add_argument_group("T-SPMO replay (paper: mult 1 success, 0 failures; svamp none)")
    g.add_argument("--replay-success", type=int, help="C_success, >= 0")
    g.add_argument("--replay-failure", type=int, help="C_failure, >= 0")
    g.add_argument("--replay-threshold", type=float, help="reward r separating success from failure (1.0)")
    g.add_argument("--replay-pool", choices=["history", "group"],
                   help="where replays are drawn from: history = every completion of every fresh group generated so "
                        "far in the run, each with its own problem and reward (default: the paper's \"set of all "
                        "previously generated completions\"); group = the G just generated for this prompt (ablation)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, help="steps between test evaluations, >= 0 (50; 0: start and end only)")
    g.add_argument("--eval-limit", type=int, help="evaluate on the first N test examples, >= 0 (default all)")
    g.add_argument("--eval-batch", type=int, help="prompts per greedy batch, >= 1 (default: on CUDA as many as "
                                                  "half the device's free memory holds; on the CPU 32)")
    g.add_argument("--save-every", type=int, help="steps between checkpoints, >= 1 (10)")
    g.add_argument("--threads", type=int, help="torch CPU threads, >= 1 (default: torch's, one per core)")
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


def given_settings(args: argparse.Namespace) -> dict:
    """The settings the user typed (argparse leaves the others None)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
            if getattr(args, f.name, None) is not None}


def resolve(args: argparse.Namespace, base: Settings | None = None) -> Settings:
    """Settings = Settings() defaults ← the paper's for (algo, task) ← a resumed run's ← what the user typed."""
    given = given_settings(args)
    if base is not None:
        return dataclasses.replace(base, **given)
    algo, task = given.get("algo", Settings.algo), given.get("task", Settings.task)
    return Settings(**{**paper_defaults(algo, task), "algo": algo, "task": task, **given})


def resume_settings(args: argparse.Namespace) -> tuple[Settings, Path]:
    """A resume's settings, checked before anything is loaded: the recorded ones (a typed flag that differs from
    them is refused, except --steps)."""
    run = Path(args.resume)
    recorded = read_run_settings(run)
    if args.eval_only or args.adapter:
        usage_error(f"{'--eval-only' if args.eval_only else '--adapter'}: not with --resume; evaluate a run's "
                    f"adapter with --eval-only --adapter {run / 'adapter'}")
    for name, value in given_settings(args).items():
        if name != "steps" and value != getattr(recorded, name):
            usage_error(f"{flag(name)} {value}: {run} was recorded with {name} = {getattr(recorded, name)!r} "
                        f"({run / 'config.json'}); a resumed run keeps its settings, only --steps may change")
    cfg = dataclasses.replace(recorded, steps=args.steps or recorded.steps)
    validate(cfg, training=False)
    if not M.is_dir(cfg.model) and not M.is_repo_id(cfg.model):
        usage_error(f"{run} was recorded with --model {cfg.model} ({run / 'config.json'}), which is not a directory "
                    "here (a run from another machine, or started from another directory?); a resumed run keeps its "
                    f"settings: put the same model at {cfg.model}, or a symbolic link to it")
    return cfg, run


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
LOGS = ("metrics.jsonl", "eval.jsonl", "resumes.jsonl", "curves.svg")


def new_run_dir(cfg: Settings) -> Path:
    """The run directory of a new run: new, or one whose run stopped before its first checkpoint (nothing there can be
    resumed, so it starts again). One with a checkpoint holds a run: --resume it, or choose another --out."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run = Path(cfg.out or f"runs/{cfg.task}-{cfg.algo}-{stamp}")
    refuse_a_run_there(run)
    return run


def refuse_a_run_there(run: Path) -> None:
    """Checked when the directory is chosen, and again once it is held (a run may have got there in between)."""
    if run.exists() and not run.is_dir():
        usage_error(f"--out {run}: is a file; allowed: a new or empty directory")
    if any((run / "checkpoints").glob("step-*")):
        usage_error(f"--out {run}: already holds a run; continue it with --resume {run}, or choose another --out")


def hold(directory: Path, option: str) -> checkpoints.RunHold | None:
    """One writer per directory (checkpoints.hold_run_dir), taken before anything there is written. Under torchrun
    rank 0 holds it for the whole job (the only process that writes); the others hold nothing."""
    if distributed.env_rank() != 0:
        return None
    try:
        return checkpoints.hold_run_dir(directory)
    except checkpoints.RunHeld as e:
        usage_error(f"{option} {directory}: {e}")


def start_run_dir(run: Path, cfg: Settings) -> Settings:
    """Create the run directory and write its settings, once (a resume never rewrites them)."""
    if (run / "config.json").is_file():
        print(f"warning: {run} holds a run that stopped before its first checkpoint; starting it again there",
              file=sys.stderr)
        checkpoints.remove_stale(run)
        for name in LOGS:
            (run / name).unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, out=str(run))
    write_atomic(run / "config.json", (json.dumps(dataclasses.asdict(cfg), indent=2) + "\n").encode())
    return cfg


def checked_settings(args: argparse.Namespace) -> tuple[Settings, Path | None]:
    """The settings and the run directory (None with --eval-only), checked before anything is loaded or written."""
    if args.resume:
        return resume_settings(args)
    cfg = resolve(args)
    validate(cfg, training=not args.eval_only)
    if cfg.out and Path(cfg.out).is_symlink() and not Path(cfg.out).exists():
        usage_error(f"--out {cfg.out}: a symbolic link to {os.readlink(cfg.out)}, which does not exist; allowed: a "
                    "new or empty directory, or a link to one")
    if args.eval_only and cfg.eval_limit == 0:
        usage_error("--eval-limit 0: --eval-only measures an accuracy, and 0 examples have none; allowed: "
                    "--eval-limit >= 1 with --eval-only")
    if args.adapter and not args.eval_only:
        usage_error(f"--adapter {args.adapter}: only with --eval-only (training starts a new adapter)")
    if args.adapter and not all((Path(args.adapter) / f).is_file() for f in ADAPTER_FILES):
        usage_error(f"--adapter {args.adapter}: not an adapter directory; allowed: a directory with "
                    f"{' and '.join(ADAPTER_FILES)} (PEFT format, e.g. RUN_DIR/adapter)")
    return cfg, None if args.eval_only else new_run_dir(cfg)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    world, held, working = World(), None, False
    try:
        cfg, run = checked_settings(args)
        task = check_inputs(cfg, not args.eval_only, args.adapter)  # seconds; loading the weights takes minutes
        if run is not None or cfg.out:  # before anything in the directory is written (or pruned)
            held = hold(run or Path(cfg.out), "--resume" if args.resume else "--out")
        ck = check_resume(run, cfg) if args.resume else None
        if run is not None and ck is None:
            refuse_a_run_there(run)
        world = distributed.from_env(cfg.device)  # under torchrun: this process's place among N; else World()
        on_device = dataclasses.replace(cfg, device=world.device) if world.size > 1 else cfg  # cuda:LOCAL_RANK
        working = True  # from here on the directory may be written: the hold's record names this process
        if args.eval_only:
            eval_only(on_device, args.adapter, Path(cfg.out) if cfg.out else None, world)
            distributed.shutdown(world, synchronize=True)
            return 0
        if ck is None:
            run = Path(world.gather([str(run)])[0])  # rank 0's name (a default name holds the time)
            cfg = start_run_dir(run, cfg) if world.main else dataclasses.replace(cfg, out=str(run))
        elif world.main:
            for p in checkpoints.remove_stale(run):
                print(f"removed {p}, left by an interrupted write", file=sys.stderr)
            append_jsonl(run / "resumes.jsonl", {"step": ck[1]["step"], "steps": cfg.steps,
                                                 "time": datetime.datetime.now().isoformat(timespec="seconds")})
        if world.main:
            print("settings: " + json.dumps(dataclasses.asdict(cfg)))
        train(dataclasses.replace(on_device, out=cfg.out), run, resume=ck is not None, task=task, checkpoint=ck,
              world=world)
        distributed.shutdown(world, synchronize=True)  # every process got here: end together
    except (DataError, M.ModelNotFoundError, M.CacheTooLarge, FileNotFoundError, ValueError, WriteError) as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # a write outside checkpoints.py's writers (mkdir): name the path
        raise SystemExit(f"error: {e.filename or ''}: {e.strerror or e}") from None
    except KeyboardInterrupt:
        print("\ninterrupted before training started; the run's files are as they were", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        distributed.shutdown(world)
        if held is not None:
            held.release(restore=not working)
    return 0


if __name__ == "__main__":
    status = main()  # an error raises SystemExit, with its own status, through the normal exit
    if distributed.env_world_size() > 1:  # under torchrun: a finished run's status is not left to the teardown
        distributed.exit_finished(status)
    sys.exit(status)
