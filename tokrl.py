"""The paper's objectives, each with per-completion backward, and the slow batched paths they are tested against.

    E2   group advantages            group_advantages
    E4   KL estimator                kl_estimator
    E3   GRPO objective / Alg2       grpo_backward (every token)      ·  grpo_loss_batched (slow path)
    E5   S-GRPO objective            grpo_backward (selected tokens)  ·  grpo_loss_batched with a selection
    E6   token selection / Alg1      select_tokens
    E10  T-SPMO objective            tspmo_backward (trie.py computes E7–E9, and B2 beyond the paper)

Conventions: a completion y is the generated tokens only (EOS included when it was generated); the prompt x is never
in a loss. Every `*_backward` runs forward and backward one completion at a time (Alg2), so at most one sequence's
activations live at once; the caller zeroes gradients before and takes the optimizer step after. Losses are −J.

Several processes (distributed.py): `share`, given each item's cost (tokens), names the completions or trie targets
this process backpropagates (None: all, the one-process run); the caller sums the gradients over the processes.

Memory and time (each tested against its slow path):
  * layers below the first LoRA layer run without autograd (they hold nothing to train), and their output is
    shared by the policy and the reference forward (identical weights: adapters only sit above);
  * the LM head runs only at the positions that enter the loss — never a (T, V) tensor for a whole sequence;
  * a sequence is cut after the last position that enters the loss (causal attention: later tokens change nothing);
  * T-SPMO evaluates each prefix with a non-zero-advantage edge exactly once (trie.PrefixTrie.targets).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

import full_finetune
import lora
from model import Qwen2ForCausalLM, logprobs_at
from trie import PrefixTrie, Target

ADV_EPS = 1e-4  # [decided] (SPEC.md) Â = (R − μ)/(σ + 1e-4)
CLIP_EPS = 0.2  # PPO clip ε. With μ = 1 update per group ρ ≡ 1 and the clip never acts; kept to match E3 as written


# ----------------------------------------------------------------------------------------------------------------------
# E2, E4, E6: the small formulas


def group_advantages(rewards: Sequence[float] | torch.Tensor, eps: float = ADV_EPS) -> torch.Tensor:
    """Â_i = (R_i − μ_R)/(σ_R + eps), μ and σ over the G rewards of one prompt; σ is the population standard
    deviation (divide by G, not G − 1). Equal rewards give Â = 0 for every completion (a zero-variance group)."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    return (r - r.mean()) / (r.std(correction=0) + eps)  # [E2] ([decided] + 1e-4: SPEC.md)


def kl_estimator(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token D_KL[π_θ ‖ π_ref] ≈ π_ref/π_θ − log(π_ref/π_θ) − 1 at the sampled token (the k3 estimator).
    ≥ 0, and exactly 0 where the two policies agree. Gradient flows through log π_θ only."""
    d = ref_logp - logp  # log(π_ref/π_θ)
    return d.exp() - d - 1  # [E4]


def select_tokens(T: int, alpha: int, k: int, p: float, generator: torch.Generator | None) -> list[int]:
    """Alg1: the 0-based positions of a T-token completion that enter the S-GRPO loss.

    Scan t = 0 … T−1: t < α is always included; else, while fewer than k are included, t is included with
    probability P; once k are included, stop. [decided] (SPEC.md) 0-based: the first α generated tokens are included.
    The T uniforms are drawn at once from `generator` (its own stream, not the sampler's)."""
    u = torch.rand(T, generator=generator).tolist()
    chosen: list[int] = []
    for t in range(T):  # [Alg1] scan t: include, sample, or break
        if t >= alpha and len(chosen) >= k:
            break  # 0 otherwise: |T_i| = k, nothing later can enter
        if t < alpha or u[t] < p:  # [E6] 1 if t < α; Bernoulli(P) if t ≥ α and |T_i| < k
            chosen.append(t)
    return chosen


# ----------------------------------------------------------------------------------------------------------------------
# The loss mask of the batched (slow) path


def loss_mask(prompt_len: int, lengths: Sequence[int], total_len: int) -> torch.Tensor:
    """(G, total_len) bool: True where the token at that position is a completion token that enters the loss.

        position   0 … P−1  |  P … P+|y_i|−1              |  P+|y_i| … total_len−1
        token      prompt   |  completion (EOS last if    |  padding
                            |  it was generated)          |
        mask       0        |  1                          |  0

    EOS is inside the mask (choosing to stop is an action); padding never is — even when pad id == EOS id, since
    the mask comes from the lengths, not from token ids. Position t's log-prob is read from the logits at t − 1."""
    pos = torch.arange(total_len)[None, :]  # (1, T)
    n = torch.as_tensor(list(lengths))[:, None]  # (G, 1)
    return (pos >= prompt_len) & (pos < prompt_len + n)  # (G, T)


# ----------------------------------------------------------------------------------------------------------------------
# Forward passes for the loss: frozen bottom without autograd, adapted top with it


def frozen_bottom(model: Qwen2ForCausalLM, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding and the layers below the first LoRA layer, without autograd, for sequences right-padded to the
    longest: (B, T, C) hidden and (B, T) positions. Right padding needs no mask: attention is causal, so no real
    token sees the padding after it."""
    dev, T = model.lm_head.weight.device, max(map(len, seqs))
    x = torch.tensor([list(s) + [0] * (T - len(s)) for s in seqs], device=dev)  # (B, T)
    pos = torch.arange(T, device=dev).expand(len(seqs), T)  # (B, T)
    # trained fully (--train full) the embedding trains too: there is no frozen bottom, and no layer runs here
    with torch.set_grad_enabled(full_finetune.trains_fully(model)):
        h = model.run_layers(model.model.embed_tokens(x), pos, 0, first_trained_layer(model))
    return h, pos


def first_trained_layer(model: Qwen2ForCausalLM) -> int:
    """The lowest layer with a weight to train: the first LoRA layer, or 0 for a model trained fully."""
    return 0 if full_finetune.trains_fully(model) else lora.first_lora_layer(model)


def adapted_top(model: Qwen2ForCausalLM, h: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The layers from the first LoRA layer up and the final norm; hidden states (N, C) at `rows` only: flat
    indices b·T + t into the (B, T) batch (for one sequence, its positions)."""
    h = model.run_layers(h, pos, first_trained_layer(model))
    return model.model.norm(h.flatten(0, 1)[rows])  # RMSNorm is per position: normalise only the rows we read


def policy_and_ref_logprobs(model: Qwen2ForCausalLM, ids: list[int], positions: torch.Tensor, with_ref: bool):
    """log π_θ(ids[p] | ids[:p]) with gradient and, if asked, log π_ref (adapters off, no gradient): (N,) each."""
    _, logp, ref = policy_states_and_logprobs(model, ids, positions, with_ref)
    return logp, ref


def policy_states_and_logprobs(model: Qwen2ForCausalLM, ids: list[int], positions: torch.Tensor, with_ref: bool):
    """As `policy_and_ref_logprobs`, also returning the final-normed hidden states (N, C) that predict ids[p]:
    the states s_t a value head reads (baselines.py, K1), from the same forward."""
    states, logp, ref = batch_states_and_logprobs(model, [ids], [positions], with_ref)
    return states[0], logp[0], ref[0]


def batch_states_and_logprobs(model: Qwen2ForCausalLM, seqs: Sequence[Sequence[int]],
                              positions: Sequence[torch.Tensor], with_ref: bool):
    """`policy_states_and_logprobs` for several sequences in one forward of their right-padded batch: per sequence
    its states (N_i, C), log π_θ (N_i,) and log π_ref (N_i,) or None, at its own positions."""
    h, pos = frozen_bottom(model, seqs)
    T = h.shape[1]
    rows = torch.cat([b * T + p for b, p in enumerate(positions)])  # flat (b, p) of every scored token
    targets = torch.cat([torch.tensor(list(s), device=h.device)[p] for s, p in zip(seqs, positions)])
    states = adapted_top(model, h, pos, rows - 1)  # (N, C): the state at p−1 predicts token p
    logp = logprobs_at(model, states, targets)
    ref = None
    if with_ref and (frozen := full_finetune.reference(model)) is not None:  # --train full: the starting weights
        with torch.no_grad():  # the copy's own forward, whole (it shares no layer's output with the policy)
            ref = logprobs_at(frozen, adapted_top(frozen, *frozen_bottom(frozen, seqs), rows - 1), targets)
    elif with_ref:
        with torch.no_grad(), lora.adapters_off(model):  # π_ref: same weights, adapters off (SPEC.md)
            ref = logprobs_at(model, adapted_top(model, h, pos, rows - 1), targets)
    sizes = [len(p) for p in positions]
    split = lambda t: list(t.split(sizes)) if t is not None else [None] * len(sizes)  # noqa: E731
    return split(states), split(logp), split(ref)


def chunks(items: Sequence[int], size: int) -> list[list[int]]:
    """`items` in consecutive runs of `size` (the last shorter): the completions of one batched forward/backward."""
    return [list(items[k: k + size]) for k in range(0, len(items), size)]


# ----------------------------------------------------------------------------------------------------------------------
# GRPO (E3, Alg2) and S-GRPO (E5, E6, Alg1)


@dataclass
class StepStats:
    """What one group's backward did. The two token counts are different things, so they have different names."""
    loss: float = 0.0  # −J as backpropagated (summed over the per-completion pieces; T-SPMO: policy + λ term)
    kl: float = 0.0  # mean per-token KL estimate over the tokens in the loss
    tokens_in_loss: int = 0  # GRPO/S-GRPO: positions whose log-prob enters the loss
    nonzero_adv_tokens: int = 0  # T-SPMO: generated tokens whose edge (prefix, token) has A ≠ 0
    tokens_generated: int = 0
    forwards: int = 0  # forward+backward passes taken
    edges: int = 0  # T-SPMO: |U|
    zero_variance: bool = False
    # T-SPMO: the two terms of −J (E10) and the norms of their gradients on the LoRA weights (every A and B; A only).
    # E10 divides the policy term by |U| (every edge, ~95% with A = 0) and not λ·Σ‖W‖²: these show which one moves
    # the adapter (AdamW follows whichever gradient dominates).
    policy_loss: float = 0.0  # −(1/|U|)·Σ π_θ(v|p)·A(v|p)
    l2_loss: float = 0.0  # λ·Σ_W ‖W‖²
    policy_grad_norm: float = 0.0
    l2_grad_norm: float = 0.0
    policy_grad_norm_A: float = 0.0
    l2_grad_norm_A: float = 0.0
    extra: dict = field(default_factory=dict)


def grpo_token_objective(logp: torch.Tensor, ref_logp: torch.Tensor | None, adv: float, beta: float,
                         clip_eps: float = CLIP_EPS) -> torch.Tensor:
    """Per-token min[ρ·Â, clip(ρ, 1−ε, 1+ε)·Â] − β·D_KL with ρ = π_θ/π_θold and π_θold = π_θ detached (μ = 1).

    ρ = exp(log π_θ − log π_θ.detach()) is 1 in value and its gradient is ∇log π_θ: this is E5's
    π_θ/π_θ|no-grad, and E3's clip is inactive at ρ = 1."""
    ratio = torch.exp(logp - logp.detach())  # ρ = π_θ/π_θold, = 1 in value
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # min[ρÂ, clip(ρ)Â]
    kl = kl_estimator(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    return surrogate - beta * kl  # [E3] the term in braces: min[ρÂ, clip(ρ, 1−ε, 1+ε)Â] − β·D_KL


def grpo_backward(model: Qwen2ForCausalLM, prompt: Sequence[int], completions: Sequence[Sequence[int]],
                  rewards: Sequence[float], *, beta: float, selection: Sequence[Sequence[int]] | None = None,
                  scale: float = 1.0, share: Callable[[list[int]], list[int]] | None = None,
                  backward_batch: int = 1) -> StepStats:
    """Alg2: per-completion forward (policy and reference) and backward of −J/G; gradients accumulate in .grad.

    selection=None is GRPO (E3: every token of y_i). With S-GRPO's T_i from `select_tokens`, it is E5: the mean runs
    over T_i only, and only those positions reach the LM head. `scale` divides the loss further (accumulating over
    several prompts for the effective-batch ablation). `share`: this process's completions (module docstring).
    `backward_batch` > 1 (ours): that many completions in one forward and backward, the same gradient (up to float
    rounding) for that many sequences' activations at once."""
    G, P = len(completions), len(prompt)
    adv = group_advantages(rewards)  # over the whole group, also when this process backpropagates a share
    st = StepStats(tokens_generated=sum(map(len, completions)), zero_variance=bool((adv == 0).all()))
    kl_sum = 0.0
    chosen = [list(range(len(y))) if selection is None else list(selection[i])  # GRPO: all t; S-GRPO: T_i
              for i, y in enumerate(completions)]
    mine = range(G) if share is None else share([max(T_i, default=-1) + 1 for T_i in chosen])
    dev = model.lm_head.weight.device
    for part in chunks([i for i in mine if chosen[i]], backward_batch):  # an empty T_i has no token to score
        # causal: the tokens after the last scored one change nothing, so each sequence ends there
        seqs = [list(prompt) + list(completions[i][: max(chosen[i]) + 1]) for i in part]
        positions = [torch.tensor([P + t for t in chosen[i]], device=dev) for i in part]
        _, logps, refs = batch_states_and_logprobs(model, seqs, positions, with_ref=beta != 0)
        loss = 0.0
        for i, logp, ref in zip(part, logps, refs):
            # GRPO's T_i is every t: E3's (1/|y_i|)·Σ_t
            J_i = grpo_token_objective(logp, ref, float(adv[i]), beta).mean()  # [E5] (1/|T_i|)·Σ_{t∈T_i}
            loss = loss - J_i / G * scale  # [Alg2] loss divided by G, then backward per completion
            st.tokens_in_loss += len(chosen[i])
            if ref is not None:
                kl_sum += float(kl_estimator(logp.detach(), ref).sum())
        loss.backward()
        st.loss += float(loss.detach())
        st.forwards += 1
    st.kl = kl_sum / max(st.tokens_in_loss, 1)
    return st


def grpo_loss_batched(logits: torch.Tensor, ref_logits: torch.Tensor | None, ids: torch.Tensor,
                      mask: torch.Tensor, rewards: Sequence[float], beta: float) -> torch.Tensor:
    """The slow, obvious GRPO/S-GRPO loss (−J) on a padded batch: full (G, T, V) log_softmax, masked means.

    logits (G, T, V) of ids (G, T); mask (G, T) from `loss_mask` (ANDed with the S-GRPO selection for E5)."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (G, T−1)
    ref = None
    if ref_logits is not None:
        ref = torch.log_softmax(ref_logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = mask[:, 1:].to(logp.device, logp.dtype)  # token t is predicted at t − 1
    adv = group_advantages(rewards).to(logp)[:, None]  # (G, 1): one advantage for every token of y_i
    per_token = grpo_token_objective(logp, ref, adv, beta)  # (G, T−1)
    J = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()  # E3 the slow way: (1/G)·Σ_i (1/|y_i|)·Σ_t
    return -J


# ----------------------------------------------------------------------------------------------------------------------
# T-SPMO (E10 over the trie's E7–E9)


def tspmo_backward(model: Qwen2ForCausalLM, prompt: Sequence[int], completions: Sequence[Sequence[int]],
                   rewards: Sequence[float], *, lam: float, scale: float = 1.0, objective: str = "pi",
                   estimator: str = "local", share: Callable[[list[int]], list[int]] | None = None,
                   summed_grads: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> StepStats:
    """−J_TSPMO = −(1/|U|)·Σ_{(p,v)∈U} π_θ(v|p)·A(v|p) + λ·Σ_W ‖W‖², backpropagated per forward pass.

    objective="logpi" puts log π_θ(v|p) in place of π_θ(v|p): an ablation, ours ("pi": E10 as the paper writes it).
    estimator: A(v|p), "local" (E7, the paper's) or "treerl" (B2, TreeRL's: non-zero on almost every edge, so almost
    every completion takes a forward); E10's form is the same for both.

    |U| counts every edge of the trie, A = 0 ones too; those add nothing to the gradient, so the model runs only on
    the prefixes that have an edge with A ≠ 0, each once, on one completion that contains it (trie.targets).
    `share`: this process's targets (module docstring); `summed_grads` (with a share) returns the policy gradient
    summed over the processes, so that the logged gradient norms are the whole group's."""
    if objective not in ("pi", "logpi"):
        raise ValueError(f"tspmo_backward: objective is {objective!r}; choose 'pi' (E10) or 'logpi'")
    trie = PrefixTrie(completions, rewards, estimator=estimator)  # A(v|p) of every edge (E7–E9, or B2)
    U, targets, mods = len(trie.edges), trie.targets(), [m for _, m in lora.lora_modules(model)]
    st = StepStats(edges=U, tokens_generated=sum(map(len, completions)), zero_variance=len(set(rewards)) == 1)
    st.nonzero_adv_tokens = round(trie.nonzero_token_fraction() * st.tokens_generated)
    mine = range(len(targets)) if share is None else share([max(tg.positions) for tg in targets])
    trained = full_finetune.trained_parameters(model)  # LoRA's A and B, or (--train full) every weight
    with _this_group_gradient(trained):  # so that the logged norms are this group's
        for tg in (targets[k] for k in mine):
            logp, adv = _prefix_logprobs(model, prompt, completions[tg.completion], tg)  # (N, M) each
            pi = logp.exp() if objective == "pi" else logp  # π_θ(v|p), the paper's; "logpi": log π_θ(v|p), ours
            loss = -(pi * adv).sum() / U * scale  # [E10] −(1/|U|)·Σ π_θ(v|p)·A(v|p), over this prefix's edges
            loss.backward()
            st.loss, st.forwards = st.loss + float(loss.detach()), st.forwards + 1
        st.policy_loss = st.loss
        st.policy_grad_norm, st.policy_grad_norm_A = _policy_grad_norms(mods, summed_grads, trained)
    # λ read literally (reading (a), --lam 0.01). By default ([decided] SPEC.md E10) lam = 0: λ is AdamW's weight
    # decay, nothing is added here (the literal term leaves the miniature's adapter inert: docs/mini.md, "E10's λ")
    if lam:
        reg = lam * lora.l2_penalty(model) * scale  # E10's λ·Σ_W ‖W‖²: − in J, so + in the loss
        reg.backward()
        st.l2_loss, (st.l2_grad_norm, st.l2_grad_norm_A) = float(reg.detach()), _l2_grad_norms(mods, lam * scale)
        st.loss += st.l2_loss
    return st


def _prefix_logprobs(model: Qwen2ForCausalLM, prompt: Sequence[int], y: Sequence[int],
                     tg: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of prompt∘y[:max(tg.positions)], the longest prefix the target needs on completion y: log π_θ(v|p)
    (N, M) for the tokens v of the edges leaving each needed prefix p, and their A(v|p) (N, M), padding A = 0."""
    dev, P = model.lm_head.weight.device, len(prompt)
    ids = list(prompt) + list(y[: max(tg.positions)])
    rows = torch.tensor([P + j - 1 for j in tg.positions], device=dev)  # last token of prompt∘y[:j] predicts v
    width = max(map(len, tg.tokens))
    tokens = torch.tensor([t + [0] * (width - len(t)) for t in tg.tokens], device=dev)  # (N, M), padded
    adv = torch.tensor([a + [0.0] * (width - len(a)) for a in tg.advantages], device=dev)  # padding has A = 0
    h, pos = frozen_bottom(model, [ids])
    return logprobs_at(model, adapted_top(model, h, pos, rows), tokens), adv


@contextlib.contextmanager
def _this_group_gradient(params: list[torch.Tensor]) -> Iterator[None]:
    """Inside, .grad holds this group's gradient alone: another prompt's accumulated one is set aside, and added back
    on leaving (the same sum, with the norms in between read from this group's)."""
    held = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:  # also when a backward fails: the other prompts' gradient is never lost
        for p, g in zip(params, held):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)


def _policy_grad_norms(mods: list, summed_grads=None, trained: list = ()) -> tuple[float, float]:
    """‖.grad‖ over every A and B, and over the A matrices alone (of the gradient summed over the processes, with
    `summed_grads`). No LoRA modules (--train full): over every parameter of `trained`, and 0 for the A alone."""
    A, B = [m.lora_A for m in mods], [m.lora_B for m in mods] or list(trained)
    if summed_grads is None:
        grads_A, grads_B = [p.grad for p in A], [p.grad for p in B]
    else:
        summed = summed_grads(A + B)
        grads_A, grads_B = summed[: len(A)], summed[len(A):]
    sq = lambda g: 0.0 if g is None else float(g.detach().pow(2).sum())  # noqa: E731
    sq_A, sq_B = sum(map(sq, grads_A)), sum(map(sq, grads_B))
    return (sq_A + sq_B) ** 0.5, sq_A ** 0.5


def _l2_grad_norms(mods: list, weight: float) -> tuple[float, float]:
    """‖∇(weight·Σ‖W‖²)‖ over every A and B, and over the A alone: the gradient is 2·weight·W, so no second backward."""
    sq_A = sum(float(m.lora_A.detach().pow(2).sum()) for m in mods)
    sq_B = sum(float(m.lora_B.detach().pow(2).sum()) for m in mods)
    return 2 * weight * (sq_A + sq_B) ** 0.5, 2 * weight * sq_A ** 0.5


def tspmo_objective_bruteforce(pi: dict[tuple[tuple[int, ...], int], torch.Tensor],
                               completions: Sequence[Sequence[int]], rewards: Sequence[float],
                               estimator: str = "local") -> torch.Tensor:
    """The slow, obvious E10 policy term from raw token lists (no trie): U = every distinct (prefix, token) pair,
    E[R|p] and E[R|p∘v] as plain means over the completions that start with p and p∘v; π from `pi[(p, v)]`.
    estimator "treerl": A(v|p) = [(E[R|p∘v] − E[R|root]) + (E[R|p∘v] − E[R|p])]/√n(p∘v) (B2) in place of E7."""
    U = {(tuple(y[:t]), y[t]) for y in completions for t in range(len(y))}

    def through(prefix: tuple[int, ...]) -> list[float]:
        return [r for y, r in zip(completions, rewards) if tuple(y[: len(prefix)]) == prefix]

    def mean_reward(prefix: tuple[int, ...]) -> float:
        return sum(through(prefix)) / len(through(prefix))

    def advantage(p: tuple[int, ...], v: int) -> float:
        local = mean_reward(p + (v,)) - mean_reward(p)  # E9 − E8 = E7
        if estimator == "local":
            return local
        return (mean_reward(p + (v,)) - mean_reward(()) + local) / len(through(p + (v,))) ** 0.5  # B2

    total = sum(pi[(p, v)] * advantage(p, v) for p, v in U)
    return total / len(U)
