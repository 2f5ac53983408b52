"""What a run logs: each step's metrics (metrics.jsonl) and its progress line, the evaluations (eval.jsonl) and
curves.svg, as a RunLog holds them in memory and on disk. README "What a run writes" lists every key.

Logging takes what it logs as values (the objectives' StepStats, the adapter's mean |A| and |B|): it imports neither
the objectives nor the adapter, so what a step logs is what the loop hands it."""
from __future__ import annotations

import datetime
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from checkpoints import append_jsonl, read_jsonl, write_atomic, write_jsonl
from plot import svg_plot
from settings import Settings

if TYPE_CHECKING:  # annotations only
    from tokrl import StepStats


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process peak)


def step_metrics(step: int, algo: str, rewards: list[float], lengths: list[int], fresh: list[StepStats],
                 replays: list[StepStats], seconds: float, device: torch.device,
                 adapter_means: tuple[float, float] | None = None) -> dict:
    """A step's line of metrics.jsonl, from its fresh groups (their rewards, completion lengths and StepStats, in
    order) and T-SPMO's replays: the reward's mean and spread, the loss and KL, lengths, forwards, the algorithm's own
    statistics (T-SPMO's: tspmo_metrics, with `adapter_means`, the adapter's mean |A| and |B| after the step; PPO's
    and DPO's: their StepStats.extra), time, tokens a second and peak memory. README "What a run writes" lists every
    key."""
    n = len(rewards)
    mean = sum(rewards) / n  # [E1] J(θ) = E_{Y~π_θ}[r(Y)], estimated by the mean reward of the group
    every = fresh + replays  # fresh groups, then replay groups: all of them did forwards and took a loss
    m = {"step": step, "reward_mean": mean, "reward_std": math.sqrt(sum((r - mean) ** 2 for r in rewards) / n),
         "zero_variance": any(s.zero_variance for s in fresh),
         "loss": sum(s.loss for s in every), "kl": sum(s.kl for s in fresh) / len(fresh),
         "len_mean": sum(lengths) / n, "len_max": max(lengths), "forwards": sum(s.forwards for s in every)}
    if algo == "tspmo":
        m.update(tspmo_metrics(fresh, replays, *adapter_means))
    else:
        m["loss_token_fraction"] = sum(s.tokens_in_loss for s in fresh) / max(sum(lengths), 1)
        m.update({k: v for s in fresh for k, v in s.extra.items()})  # PPO / DPO statistics (baselines.py)
    generated = sum(lengths) + sum(s.tokens_generated for s in replays)
    m.update({"seconds": round(seconds, 3), "tokens_per_s": round(generated / seconds, 1),
              "peak_mem_gb": round(peak_memory_gb(device), 3)})
    return m


GROUP_FIELDS = ("edges", "forwards", "nonzero_adv_tokens", "tokens_generated", "policy_loss", "l2_loss",
                "policy_grad_norm", "l2_grad_norm", "policy_grad_norm_A", "l2_grad_norm_A")


def tspmo_metrics(fresh: list[StepStats], replays: list[StepStats], mean_A: float, mean_B: float) -> dict:
    """T-SPMO's log, fresh and replay groups alike: |U|, the fraction of generated tokens whose edge has A ≠ 0, the
    policy and λ terms with their gradient norms (per group: which term drives the adapter), and the adapter's mean
    |A|, |B| as given (lora.mean_abs)."""
    every = fresh + replays
    groups = [{"kind": "fresh" if i < len(fresh) else "replay", **{f: getattr(s, f) for f in GROUP_FIELDS},
               **s.extra} for i, s in enumerate(every)]
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
