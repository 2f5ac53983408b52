"""The methods the paper argues against, in the same harness: PPO with a critic (K1–K4) and online DPO (D1).

    K1   value head V(s_t)                  ValueHead, Critic
    K2   GAE and the value target           gae · gae_by_definition (slow path), whiten
    K3   clipped surrogate                  ppo_token_objective
    K4   the lecture's PPO objective        ppo_token_objective, ppo_backward  ·  ppo_loss_batched (slow path)
    D1   online DPO from the group          dpo_pairs, dpo_coefficients, dpo_backward  ·  dpo_loss_batched (slow path)

Sources: docs/SPEC-baselines.md and the course lecture it follows (ST7003 Procesamiento Natural del Lenguaje,
"Lecture06 – RLHF": PPO, GRPO, DPO). Same conventions as tokrl.py: a completion is the generated tokens only, losses
are −J, every `*_backward` runs forward and backward one completion at a time, and the caller zeroes gradients before
and steps the optimizer after.

PPO, one training step (training.py:update):

    sample G completions with π_θold = π_θ                          (the sampler: sampling.sample)
    ppo_prepare, no gradient, one pass:  log π_θold, log π_ref, V(s_t)  →  r_t, K2: A_t, R_t, whitened Â_t
    μ times:  ppo_backward (per completion, K3 + K4, mean over all N tokens of the step)  →  optimizer step

The state s_t that V reads is the final-normed hidden state that predicts token t (position P + t − 1): the same row
the LM head reads for log π_θ(y_t | s_t), so with a shared critic one forward gives both.

DPO, one training step: the G completions' rewards give every pair (y_w, y_l) with R_w > R_l; a no-gradient pass
gives each sequence's log-ratio log π_θ(y|x) − log π_ref(y|x); the loss's derivative with respect to each log-ratio
is then a number, and one forward+backward per completion of (that number)·log π_θ(y|x) is exactly the batched
gradient (π_ref has no gradient).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import full_finetune
import lora
from distributed import World
from model import Qwen2ForCausalLM
from tokrl import StepStats, chunks, kl_estimator

WHITEN_EPS = 1e-8  # ours: (A − mean)/(std + 1e-8); a step whose advantages are all equal gets Â = 0


# ----------------------------------------------------------------------------------------------------------------------
# K1: the critic


class ValueHead(nn.Module):
    """V(s_t) = w·h_t + b, a linear C → 1 in fp32 on the final-normed hidden state h_t (whatever the model's dtype).
    ours: w = 0 and b = 0 at the start (V ≡ 0, so the first step's advantages are the returns' own)."""

    def __init__(self, hidden_size: int, device: torch.device | str | None = None):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1, device=device, dtype=torch.float32)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.proj(states.float()).squeeze(-1)  # [K1] (N, C) -> (N,) V(s_t)


class Critic:
    """K1 with its body. [decided] (SPEC-baselines.md) shared (default): the value head reads the policy's own hidden
    states, so the value loss's gradient also flows into the policy's LoRA (the common value-head setup).
    separate: a second copy of the whole base model with its own LoRA (the classic critic, and its real memory); ours:
    the copy's adapter starts as a copy of the policy's fresh one (B = 0: both start as the base model)."""

    def __init__(self, policy: Qwen2ForCausalLM, mode: str = "shared"):
        if mode not in ("shared", "separate"):
            raise ValueError(f"--critic must be shared or separate, not {mode!r}")
        self.mode = mode
        self.net = copy.deepcopy(policy) if mode == "separate" else None  # a real second copy of the weights
        self.head = ValueHead(policy.config.hidden_size, policy.lm_head.weight.device)

    def parameters(self) -> list[nn.Parameter]:
        """What the critic trains: the value head, and the separate copy's LoRA."""
        return list(self.head.parameters()) + (lora.lora_parameters(self.net) if self.net is not None else [])

    def values(self, policy_states: list[torch.Tensor], seqs: list[list[int]],
               positions: list[torch.Tensor]) -> list[torch.Tensor]:
        """V(s_t) (N_i,) for the tokens at each sequence's `positions`: from the policy's states (shared) or the
        copy's own (one forward of the right-padded batch)."""
        if self.net is None:
            return [self.head(s) for s in policy_states]
        # one head over the copy's rows (N, C), then each sequence's (N_i,), as lora.logprobs splits the policy's
        return lora.per_sequence(self.head(lora.states_at(self.net, seqs, positions)), positions)

    def _named(self) -> dict[str, nn.Parameter]:
        out = {f"value_head.{k}": p for k, p in self.head.named_parameters()}
        if self.net is not None:
            out.update({f"critic_lora.{n}.{ab}": getattr(m, ab) for n, m in lora.lora_modules(self.net)
                        for ab in ("lora_A", "lora_B")})
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """The trained tensors, by name, copied to the CPU for the checkpoint."""
        return {k: p.detach().cpu().clone() for k, p in self._named().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        mine = self._named()
        if set(state) != set(mine):
            raise ValueError(f"checkpoint critic state does not match --critic {self.mode}: missing "
                             f"{sorted(set(mine) - set(state))[:3]}, unexpected {sorted(set(state) - set(mine))[:3]}")
        with torch.no_grad():
            for k, p in mine.items():
                p.copy_(state[k])


# ----------------------------------------------------------------------------------------------------------------------
# K2: rewards, GAE, value targets, whitening


def terminal_rewards(T: int, reward: float) -> torch.Tensor:
    """r_t (T,): [decided] (SPEC-baselines.md) the task reward at the completion's last token, 0 elsewhere."""
    r = torch.zeros(T, dtype=torch.float64)
    r[T - 1] = reward
    return r


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, gae_lambda: float) -> torch.Tensor:
    """A_t (T,) = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ·V(s_{t+1}) − V(s_t), with V after the last token = 0; γ is
    `gamma`, λ is `gae_lambda` (--gamma, --gae-lambda). Computed backwards as A_t = δ_t + γλ·A_{t+1}, in float64
    on the CPU (T scalars: no device round trips)."""
    r, v = rewards.double().cpu().tolist(), values.detach().double().cpu().tolist()
    adv = [0.0] * len(r)
    running, next_value = 0.0, 0.0
    for t in reversed(range(len(r))):
        delta = r[t] + gamma * next_value - v[t]  # δ_t = r_t + γ·V(s_{t+1}) − V(s_t)
        running = delta + gamma * gae_lambda * running  # [K2] A_t = δ_t + γλ·A_{t+1} = Σ_l (γλ)^l δ_{t+l}
        adv[t] = running
        next_value = v[t]
    return torch.tensor(adv, dtype=torch.float64)


def gae_by_definition(rewards: Sequence[float], values: Sequence[float], gamma: float,
                      gae_lambda: float) -> list[float]:
    """The slow path: the double sum of K2 as written, no recursion."""
    T = len(rewards)
    v = list(values) + [0.0]  # V after the last token = 0
    delta = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(T)]
    return [sum((gamma * gae_lambda) ** l * delta[t + l] for l in range(T - t)) for t in range(T)]


def whiten(advantages: list[torch.Tensor], eps: float = WHITEN_EPS) -> list[torch.Tensor]:
    """[decided] (SPEC-baselines.md) Â = (A − mean)/std over all completion tokens of the step (every completion
    together); std is the population one (divide by N)."""
    flat = torch.cat(advantages)
    z = (flat - flat.mean()) / (flat.std(correction=0) + eps)  # K2's whitened Â
    return list(z.split([len(a) for a in advantages]))


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float | None:
    """1 − Var(R − V)/Var(R) over the step's tokens: 1 is a perfect critic, 0 one no better than a constant.
    None when the returns do not vary (the ratio is undefined)."""
    var_r = float(returns.var(correction=0))
    return None if var_r == 0 else 1 - float((returns - values).var(correction=0)) / var_r


# ----------------------------------------------------------------------------------------------------------------------
# K3, K4: PPO


@dataclass
class PPOBatch:
    """What the sampling-time pass fixes for all μ passes ([decided]: advantages and value targets computed once)."""
    prompt: list[int]
    completions: list[list[int]]
    old_logp: list[torch.Tensor]  # (T_i,) log π_θold(y_t | s_t), θold = the policy that sampled
    ref_logp: list[torch.Tensor | None]  # (T_i,) log π_ref, adapters off (None when w2 = 0)
    values: list[torch.Tensor]  # (T_i,) V(s_t) at sampling time
    advantages: list[torch.Tensor]  # (T_i,) whitened Â_t
    returns: list[torch.Tensor]  # (T_i,) value targets R_t = A_t + V(s_t), A before whitening
    n_tokens: int  # N: every completion token of the step (the mean of K4 runs over them)
    explained_variance: float | None


def _positions(prompt_len: int, y: Sequence[int], device) -> torch.Tensor:
    return torch.arange(prompt_len, prompt_len + len(y), device=device)  # every completion token, EOS included


@torch.no_grad()
def ppo_prepare(policy: Qwen2ForCausalLM, critic: Critic, prompt: Sequence[int],
                completions: Sequence[Sequence[int]], rewards: Sequence[float], *, gamma: float, gae_lambda: float,
                with_ref: bool = True) -> PPOBatch:
    """One forward per completion without gradient: π_θold, π_ref and V at sampling time, then K2."""
    dev, P = policy.lm_head.weight.device, len(prompt)
    keep = [(list(y), r) for y, r in zip(completions, rewards) if len(y)]  # an empty completion has no token
    reference = full_finetune.reference(policy) if with_ref else None  # --train full: the frozen copy
    old, ref, vals, advs, rets = [], [], [], [], []
    for y, R in keep:
        ids, positions = list(prompt) + y, _positions(P, y, dev)
        scored = lora.logprobs(policy, [ids], [positions], with_ref=with_ref, reference=reference)
        logp, ref_logp = scored.logp[0], scored.ref[0]
        v = critic.values(scored.states, [ids], [positions])[0].detach()
        a = gae(terminal_rewards(len(y), R), v, gamma, gae_lambda)  # K2's A_t: (T,) float64, CPU
        old.append(logp), ref.append(ref_logp), vals.append(v)
        advs.append(a), rets.append((a + v.double().cpu()).float().to(dev))  # K2's R_t = A_t + V(s_t), a constant
    white = [a.float().to(dev) for a in whiten(advs)] if advs else []
    n = sum(len(y) for y, _ in keep)
    ev = explained_variance(torch.cat(vals).double().cpu(), torch.cat(rets).double().cpu()) if vals else None
    return PPOBatch(list(prompt), [y for y, _ in keep], old, ref, vals, white, rets, n, ev)


def ppo_token_objective(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                        adv: torch.Tensor, values: torch.Tensor, returns: torch.Tensor, *, clip_eps: float,
                        w1: float, w2: float, w3: float) -> torch.Tensor:
    """Per-token L_PPO = min(c·Â, clip(c, 1−ε, 1+ε)·Â) + w1·H − w2·KL − w3·(V − sg(R))², c = π_θ/π_θold.

    H = −log π_θ at the sampled token (the lecture's form); KL is E4's estimator against π_ref; R is a constant."""
    ratio = torch.exp(logp - old_logp)  # c_t = π_θ/π_θold
    clipped = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # [K3]
    entropy = -logp  # H at the sampled token
    # [decided] (SPEC-baselines.md) the KL is a loss term (E4 at the sampled tokens), not a reward penalty
    kl = kl_estimator(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)  # E4's estimator
    value_err = (values - returns.detach()) ** 2  # (V(s_t) − sg(R_t))², the critic's L(γ) per token
    return clipped + w1 * entropy - w2 * kl - w3 * value_err  # [K4] L_clip + w1·H − w2·KL − w3·L(γ)


def ppo_backward(policy: Qwen2ForCausalLM, critic: Critic, batch: PPOBatch, *, clip_eps: float, w1: float, w2: float,
                 w3: float, scale: float = 1.0, world: World = World(), backward_batch: int = 1) -> StepStats:
    """One of the μ passes: per completion, forward (policy, and the separate critic) and backward of
    −Σ_t L_PPO,t / N, N = all completion tokens of the step; gradients accumulate in .grad. `world` (several
    processes, distributed.py): whose completions this process backpropagates (World(): all).
    `backward_batch` > 1 (ours): that many completions in one forward and backward."""
    dev, P, N = policy.lm_head.weight.device, len(batch.prompt), max(batch.n_tokens, 1)
    st = StepStats(tokens_generated=batch.n_tokens, tokens_in_loss=batch.n_tokens)
    clipped = approx_kl = entropy = value_loss = kl_ref = 0.0
    mine = world.assign([len(y) for y in batch.completions])  # this process's completions: all, with one
    for part in chunks(list(mine), backward_batch):
        seqs = [batch.prompt + batch.completions[i] for i in part]
        positions = [_positions(P, batch.completions[i], dev) for i in part]
        scored = lora.logprobs(policy, seqs, positions)  # π_ref: precomputed
        values = critic.values(scored.states, seqs, positions)
        loss = 0.0
        for i, logp, v in zip(part, scored.logp, values):
            J = ppo_token_objective(logp, batch.old_logp[i], batch.ref_logp[i], batch.advantages[i], v,
                                    batch.returns[i], clip_eps=clip_eps, w1=w1, w2=w2, w3=w3)
            loss = loss - J.sum() / N * scale  # K4's mean over all N completion tokens of the step
            with torch.no_grad():
                lp, old = logp.detach(), batch.old_logp[i]
                clipped += float(((lp - old).exp() - 1).abs().gt(clip_eps).sum())  # tokens where the clip is active
                approx_kl += float(kl_estimator(lp, old).sum())  # KL[π_θold ‖ π_θ], k3 on π_θold's samples
                entropy += float(-lp.sum())
                value_loss += float(((v.detach() - batch.returns[i]) ** 2).sum())
                if batch.ref_logp[i] is not None:
                    kl_ref += float(kl_estimator(lp, batch.ref_logp[i]).sum())
        loss.backward()
        st.loss += float(loss.detach())
        st.forwards += 1
    st.kl = kl_ref / N
    st.extra = {"clip_fraction": clipped / N, "approx_kl": approx_kl / N, "entropy": entropy / N,
                "value_loss": value_loss / N}
    return st


def ppo_loss_batched(logits: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                     batch: PPOBatch, *, clip_eps: float, w1: float, w2: float, w3: float) -> torch.Tensor:
    """The slow, obvious −L_PPO on a padded batch: full (G, T, V) log_softmax, every sampling-time quantity scattered
    onto the (G, T) grid, one masked mean over all completion tokens.

    logits (G, T, V) and values (G, T) from a full forward of ids (G, T) (values[:, p] = V of the state at p);
    mask (G, T) from tokrl.loss_mask."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (G, T−1)
    m = mask[:, 1:]  # token p is predicted, and valued, at p − 1

    def grid(rows: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros_like(logp)
        out[m] = torch.cat(rows).to(logp)  # row-major order: completion by completion, token by token
        return out

    ref = grid(batch.ref_logp) if batch.ref_logp and batch.ref_logp[0] is not None else None
    J = ppo_token_objective(logp, grid(batch.old_logp), ref, grid(batch.advantages), values[:, :-1].float(),
                            grid(batch.returns), clip_eps=clip_eps, w1=w1, w2=w2, w3=w3)
    return -(J * m).sum() / m.sum()


# ----------------------------------------------------------------------------------------------------------------------
# D1: DPO online from the group


def dpo_pairs(rewards: Sequence[float]) -> list[tuple[int, int]]:
    """Every (w, l) with R_w > R_l: a group with one correct of G gives G − 1 pairs; equal rewards give none."""
    return [(w, l) for w in range(len(rewards)) for l in range(len(rewards)) if rewards[w] > rewards[l]]


def dpo_coefficients(log_ratios: torch.Tensor, pairs: Sequence[tuple[int, int]], beta: float):
    """From the G sequence log-ratios log π_θ(y|x) − log π_ref(y|x) (no gradient): the loss, each pair's z, and
    ∂loss/∂log π_θ(y_i|x) for every completion (G,).

    loss = (1/n) Σ_pairs −log σ(z), z = β_D·(ratio_w − ratio_l); ∂/∂ratio_w = −σ(−z)·β_D/n, ∂/∂ratio_l = +σ(−z)·β_D/n."""
    w = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    l = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    lr = log_ratios.double()
    z = beta * (lr[w] - lr[l])  # z = β_D·[(log π_θ − log π_ref)(y_w) − (log π_θ − log π_ref)(y_l)]
    loss = F.softplus(-z).mean()  # [D1] mean over pairs of −log σ(z)
    g = torch.sigmoid(-z) * beta / len(pairs)  # |∂loss/∂ratio| per pair
    coef = torch.zeros_like(lr).index_add_(0, w, -g).index_add_(0, l, g)  # Σ_pairs ±σ(−z)·β_D/n
    return loss, z, coef


def dpo_backward(model: Qwen2ForCausalLM, prompt: Sequence[int], completions: Sequence[Sequence[int]],
                 rewards: Sequence[float], *, beta: float, scale: float = 1.0,
                 world: World = World(), backward_batch: int = 1) -> StepStats:
    """D1, exact per-completion backward: the G log-ratios without gradient first, then one forward+backward of
    coef_i·log π_θ(y_i|x) per completion that is in a pair. [decided] (SPEC-baselines.md) no pair: no update."""
    dev, P = model.lm_head.weight.device, len(prompt)
    pairs = dpo_pairs(rewards)
    st = StepStats(tokens_generated=sum(map(len, completions)), zero_variance=not pairs)
    st.extra = {"pairs": len(pairs), "dpo_skipped": not pairs}
    if not pairs:
        return st  # nothing backpropagated: the optimizer step that follows leaves every weight as it is
    ratios, kl_sum = [], 0.0
    reference = full_finetune.reference(model)  # --train full: the frozen copy; LoRA: None, the adapters off
    with torch.no_grad():
        for y in completions:
            if not y:
                ratios.append(torch.zeros((), dtype=torch.float64, device=dev))
                continue
            scored = lora.logprobs(model, [list(prompt) + list(y)], [_positions(P, y, dev)], with_ref=True,
                                   reference=reference)
            logp, ref = scored.logp[0], scored.ref[0]
            ratios.append((logp.double() - ref.double()).sum())  # log π_θ(y|x) − log π_ref(y|x): summed over tokens
            kl_sum += float(kl_estimator(logp, ref).sum())
    loss, z, coef = dpo_coefficients(torch.stack(ratios).cpu(), pairs, beta)
    todo = [i for i, y in enumerate(completions) if coef[i] != 0 and y]  # in no pair: no gradient
    # several processes: this one's completions (the log-ratios above are the whole group's); one: all
    todo = [todo[k] for k in world.assign([len(completions[i]) for i in todo])]
    for part in chunks(todo, backward_batch):  # backward_batch > 1 (ours): that many in one forward and backward
        seqs = [list(prompt) + list(completions[i]) for i in part]
        positions = [_positions(P, completions[i], dev) for i in part]
        logps = lora.logprobs(model, seqs, positions).logp
        grad_terms = [float(coef[i]) * scale * logp.sum() for i, logp in zip(part, logps)]
        sum(grad_terms).backward()  # D1's gradient: Σ_i ∂loss/∂log π_θ(y_i|x) · ∇log π_θ(y_i|x)
        st.forwards += 1
        st.tokens_in_loss += sum(len(completions[i]) for i in part)
    st.loss = float(loss) * scale
    st.kl = kl_sum / max(st.tokens_generated, 1)
    st.extra.update({"preference_accuracy": float((z > 0).double().mean()), "reward_margin": float(z.mean())})
    return st


def dpo_loss_batched(logits: torch.Tensor, ref_logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                     rewards: Sequence[float], beta: float) -> torch.Tensor:
    """The slow, obvious D1 loss on a padded batch: full log_softmax, masked sums, every pair at once."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (G, T−1)
    ref = torch.log_softmax(ref_logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = mask[:, 1:].to(lp.dtype)
    ratio = ((lp - ref) * m).sum(1)  # (G,) sequence log-ratios
    pairs = dpo_pairs(rewards)
    z = torch.stack([beta * (ratio[w] - ratio[l]) for w, l in pairs])
    return -F.logsigmoid(z).mean()
