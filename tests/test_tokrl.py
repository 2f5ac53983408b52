"""tokrl.py — E2, E4, E5/E6/Alg1, E3/Alg2, E10: hand-computed numbers, and every per-completion fast path against
the slow, obvious batched computation (full forward, full log_softmax) on a tiny model."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_checkpoint, tiny_config
import lora
import model as M
import pretrained
import tokrl


# --- E2 ---------------------------------------------------------------------------------------------------------------

def test_advantages_by_hand():
    # rewards [1,0,0,1]: μ = 0.5, σ (population) = 0.5 -> Â = ±0.5/(0.5 + 1e-4) = ±0.99980004
    a = tokrl.group_advantages([1, 0, 0, 1])
    assert a.tolist() == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001, -0.5 / 0.5001, 0.5 / 0.5001], abs=1e-12)
    assert a.abs().sub(1).abs().max() < 1e-3  # ±1 within the epsilon
    # [2, 0, 1]: μ = 1, σ = sqrt(2/3) (divide by G = 3, not G − 1)
    s = math.sqrt(2 / 3)
    assert tokrl.group_advantages([2, 0, 1]).tolist() == pytest.approx([1 / (s + 1e-4), -1 / (s + 1e-4), 0.0])
    assert tokrl.group_advantages([0.7] * 5).tolist() == [0.0] * 5  # zero-variance group


# --- E4 ---------------------------------------------------------------------------------------------------------------

def test_kl_estimator_closed_form():
    logp = torch.log(torch.tensor([0.5, 0.2, 0.9]))
    assert tokrl.kl_estimator(logp, logp).tolist() == [0.0, 0.0, 0.0]
    # π_θ = 0.5, π_ref = 0.25: 0.5 − log 0.5 − 1 = 0.19314718
    got = tokrl.kl_estimator(torch.log(torch.tensor(0.5)), torch.log(torch.tensor(0.25)))
    assert float(got) == pytest.approx(0.5 - math.log(0.5) - 1, abs=1e-7)
    # π_θ = 0.25, π_ref = 0.5: 2 − log 2 − 1 = 0.30685282; always >= 0
    got = tokrl.kl_estimator(torch.log(torch.tensor(0.25)), torch.log(torch.tensor(0.5)))
    assert float(got) == pytest.approx(2 - math.log(2) - 1, abs=1e-7)
    x = torch.randn(1000)
    assert (tokrl.kl_estimator(x, torch.randn(1000)) >= 0).all()


# --- E5 / E6 / Alg1 ---------------------------------------------------------------------------------------------------

def test_selection_rules():
    """E6/Alg1 against its closed form, with the same uniforms: T_i = the first min(α, T) positions, then the first
    max(0, k − min(α, T)) of the later positions whose uniform is below P, and nothing after. So a selection that
    keeps going after k, skips a coin, or drops one of the first α goes red."""
    g = torch.Generator().manual_seed(0)
    stopped_at_k = 0
    for T, alpha, k, p in [(300, 50, 100, 0.5), (300, 100, 100, 0.5), (40, 50, 100, 0.5), (300, 0, 25, 0.5),
                           (200, 3, 5, 0.5), (200, 3, 5, 0.9), (60, 10, 12, 0.3), (5, 0, 100, 0.5)]:
        for _ in range(20):
            same = torch.Generator()
            same.set_state(g.get_state())
            u = torch.rand(T, generator=same).tolist()  # the uniforms select_tokens is about to draw
            s = tokrl.select_tokens(T, alpha, k, p, g)
            head = list(range(min(alpha, T)))
            coins = [t for t in range(alpha, T) if u[t] < p]
            assert s == head + coins[: max(0, k - len(head))]
            stopped_at_k += len(coins) > k - len(head) > 0  # cases where the cap cut real coin wins
    assert stopped_at_k > 20  # the cap was exercised, not only the α rule
    # α = 3, k = 5, P = 1: positions 0, 1, 2 by rule, 3 and 4 by coin, then stop
    assert tokrl.select_tokens(100, 3, 5, 1.0, g) == [0, 1, 2, 3, 4]
    assert tokrl.select_tokens(100, 3, 5, 0.0, g) == [0, 1, 2]  # P = 0: only the first α


def test_selected_fraction_matches_P_and_is_seeded():
    s = tokrl.select_tokens(20000, 0, 10**9, 0.5, torch.Generator().manual_seed(1))
    assert abs(len(s) / 20000 - 0.5) < 0.02  # binomial sd = 0.0035
    s3 = tokrl.select_tokens(20000, 0, 10**9, 0.3, torch.Generator().manual_seed(1))
    assert abs(len(s3) / 20000 - 0.3) < 0.02
    a = tokrl.select_tokens(300, 50, 100, 0.5, torch.Generator().manual_seed(7))
    b = tokrl.select_tokens(300, 50, 100, 0.5, torch.Generator().manual_seed(7))
    assert a == b


# --- the loss mask ----------------------------------------------------------------------------------------------------

def test_loss_mask_holds_eos_and_not_padding():
    # prompt of 2; completion 0 = [a, b, EOS] (3 tokens), completion 1 = [EOS] (1 token), padded to 5
    m = tokrl.loss_mask(2, [3, 1], 5)
    assert m.int().tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]


# --- gradients: per-completion fast path == batched slow path ---------------------------------------------------------

EOS = 256
PROMPT = [10, 11, 12, 13]
# completions share prefixes (for T-SPMO), have different lengths, two end with EOS
COMPLETIONS = [[5, 6, 7, 8, EOS], [5, 6, 9], [5, 7, 7, 7, 7, 7, EOS], [6, 6]]
REWARDS = [1.0, 0.0, 0.0, 1.0]


def adapted_model(tmp_path, seed=0):
    m = pretrained.load_model(make_checkpoint(tmp_path / "m", tiny_config(num_hidden_layers=4), std=0.1))
    lora.apply_lora(m, r=4, fraction=0.5, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # a trained-looking adapter, so π_θ ≠ π_ref and the KL term has a gradient
        for p in lora.lora_parameters(m):
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed + p.numel()))
    return m


def grads(m):
    return torch.cat([p.grad.flatten() for p in lora.lora_parameters(m)])


def zero(m):
    for p in lora.lora_parameters(m):
        p.grad = None


def batched_grpo_loss(m, selection=None, pad=EOS):
    T = len(PROMPT) + max(map(len, COMPLETIONS))
    ids = torch.tensor([PROMPT + y + [pad] * (T - len(PROMPT) - len(y)) for y in COMPLETIONS])
    mask = tokrl.loss_mask(len(PROMPT), [len(y) for y in COMPLETIONS], T)
    if selection is not None:
        sel = torch.zeros_like(mask)
        for i, s in enumerate(selection):
            sel[i, [len(PROMPT) + t for t in s]] = True
        mask = mask & sel
    logits = m.logits(ids)  # (G, T, V): the whole thing
    with torch.no_grad(), lora.adapters_off(m):
        ref_logits = m.logits(ids)
    return tokrl.grpo_loss_batched(logits, ref_logits, ids, mask, REWARDS, beta=0.5)


@pytest.mark.parametrize("algo", ["grpo", "sgrpo"])
def test_per_completion_gradient_equals_batched_gradient(tmp_path, algo):
    """Alg2's per-completion backward (grpo_backward) gives the gradient of the batched E3 (GRPO) / E5 (S-GRPO)
    loss computed the slow way (full forward, full log_softmax, masked means)."""
    m = adapted_model(tmp_path)
    selection = None
    if algo == "sgrpo":
        g = torch.Generator().manual_seed(3)
        selection = [tokrl.select_tokens(len(y), 2, 3, 0.5, g) for y in COMPLETIONS]
        assert any(len(s) < len(y) for s, y in zip(selection, COMPLETIONS))  # the selection drops tokens
    loss_slow = batched_grpo_loss(m, selection)
    loss_slow.backward()
    slow = grads(m)
    zero(m)
    st = tokrl.grpo_backward(m, PROMPT, COMPLETIONS, REWARDS, beta=0.5, selection=selection)
    fast = grads(m)
    assert st.loss == pytest.approx(loss_slow.item(), abs=1e-6)
    assert st.forwards == 4 and st.tokens_in_loss == (17 if selection is None else sum(map(len, selection)))
    rel = (fast - slow).norm() / slow.norm()
    print(f"\n{algo}: per-completion vs batched gradient, relative error {rel:.2e}")
    assert slow.norm() > 0 and rel < 1e-5


@pytest.mark.parametrize("algo", ["grpo", "sgrpo"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_batched_backward_gives_the_per_completion_gradient(tmp_path, algo, n):
    """--backward-batch N: N completions (of different lengths, right-padded) in one forward and backward give the
    per-completion gradient and loss within fp32 rounding, in ceil(G/N) passes."""
    m = adapted_model(tmp_path)
    selection = None
    if algo == "sgrpo":
        selection = [tokrl.select_tokens(len(y), 2, 3, 0.5, torch.Generator().manual_seed(3)) for y in COMPLETIONS]
    one = tokrl.grpo_backward(m, PROMPT, COMPLETIONS, REWARDS, beta=0.5, selection=selection)
    per_completion = grads(m)
    zero(m)
    st = tokrl.grpo_backward(m, PROMPT, COMPLETIONS, REWARDS, beta=0.5, selection=selection, backward_batch=n)
    rel = (grads(m) - per_completion).norm() / per_completion.norm()
    assert per_completion.norm() > 0 and rel < 1e-5
    assert st.loss == pytest.approx(one.loss, abs=1e-6) and st.kl == pytest.approx(one.kl, abs=1e-6)
    assert st.forwards == -(-4 // n) and st.tokens_in_loss == one.tokens_in_loss


def test_padding_is_outside_the_loss_even_when_pad_is_eos(tmp_path):
    """Pad with EOS or with another id: the batched loss (and so its gradient) must not change, and it must
    equal the per-completion loss, where no padding exists at all."""
    m = adapted_model(tmp_path)
    with torch.no_grad():
        a, b = batched_grpo_loss(m, pad=EOS), batched_grpo_loss(m, pad=99)
    st = tokrl.grpo_backward(m, PROMPT, COMPLETIONS, REWARDS, beta=0.5)
    assert float(a) == pytest.approx(float(b), abs=1e-7) and st.loss == pytest.approx(float(a), abs=1e-6)


def test_eos_is_in_the_loss(tmp_path):
    """E3: the final EOS of a completion is an action in the loss. grpo_backward's gradient on a group whose
    completion 0 ends with EOS equals, by hand, −(1/G)·Σ_i Â_i·(1/|y_i|)·Σ_t ∇log π(y_i,t) with EOS among the
    t (|y_0| = 5), and differs from the same sum without it (|y_0| = 4). (β = 0: ρ ≡ 1, so the gradient is that.)"""
    m = adapted_model(tmp_path)
    group, rewards = [COMPLETIONS[0], COMPLETIONS[1]], [1.0, 0.0]
    assert group[0][-1] == EOS
    adv = tokrl.group_advantages(rewards)
    st = tokrl.grpo_backward(m, PROMPT, group, rewards, beta=0.0)
    fast = grads(m)
    assert st.tokens_in_loss == 5 + 3

    def by_hand(n_scored_0):
        zero(m)
        J = 0
        for i, y in enumerate(group):
            n = n_scored_0 if i == 0 else len(y)
            lp = torch.log_softmax(m.logits(torch.tensor([PROMPT + y]))[0], -1)  # (T, V)
            pos = torch.arange(len(PROMPT) - 1, len(PROMPT) - 1 + n)  # position t − 1 predicts token t
            J = J + float(adv[i]) * lp[pos, torch.tensor(y[:n])].mean()
        (-J / len(group)).backward()
        return grads(m)

    with_eos, without_eos = by_hand(5), by_hand(4)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(fast, with_eos) < 1e-5 and rel(fast, without_eos) > 1e-2


def test_frozen_bottom_and_adapters_off_give_the_full_model_logprobs(tmp_path):
    m = adapted_model(tmp_path)
    ids = PROMPT + COMPLETIONS[2]
    pos = torch.tensor([4, 6, 10])
    scored = lora.logprobs(m, [ids], [pos], with_ref=True)
    lp, ref = scored.logp[0], scored.ref[0]
    assert lp.requires_grad and not ref.requires_grad
    with torch.no_grad():
        assert (lp - M.token_logprobs(m, ids, pos)).abs().max() < 1e-5
        with lora.adapters_off(m):
            assert (ref - M.token_logprobs(m, ids, pos)).abs().max() < 1e-5
    assert (lp - ref).abs().max() > 1e-3  # the adapter matters


def tspmo_slow(m, lam, use_log=False, estimator="local"):
    """E10 the obvious way: every completion's full forward and log_softmax, U and A from the raw lists."""
    pi = {}
    for y in COMPLETIONS:
        lp = torch.log_softmax(m.logits(torch.tensor([PROMPT + y]))[0], -1)  # (T, V)
        for t in range(len(y)):
            v = lp[len(PROMPT) + t - 1, y[t]]
            pi[(tuple(y[:t]), y[t])] = v if use_log else v.exp()
    return -tokrl.tspmo_objective_bruteforce(pi, COMPLETIONS, REWARDS, estimator) + lam * lora.l2_penalty(m)


def test_tspmo_gradient_equals_bruteforce_and_uses_pi_not_log_pi(tmp_path):
    m = adapted_model(tmp_path)
    tspmo_slow(m, lam=0.01).backward()
    slow = grads(m)
    zero(m)
    st = tokrl.tspmo_backward(m, PROMPT, COMPLETIONS, REWARDS, lam=0.01)
    fast = grads(m)
    # |U| by hand: completion 0 gives 5 edges; completion 1 adds (5,6)->9: 1; completion 2 adds (5)->7, then four
    # more 7s and EOS: 6; completion 3 adds (root)->6 and (6)->6: 2. 5 + 1 + 6 + 2 = 14
    assert st.edges == 14
    rel = (fast - slow).norm() / slow.norm()
    print(f"\nT-SPMO: per-target vs brute-force gradient, relative error {rel:.2e}")
    assert rel < 1e-5
    zero(m)
    tspmo_slow(m, lam=0.01, use_log=True).backward()
    assert (grads(m) - fast).norm() / fast.norm() > 0.05  # a log-π objective gives a different gradient


def test_tspmo_evaluates_each_needed_prefix_once(tmp_path):
    """Rewards [1,0,0,1]: root mean 1/2. Needed prefixes (an edge with A ≠ 0): root (5: 1/3−1/2, 6: 1−1/2),
    [5] (6: 1/2−1/3, 7: 0−1/3), [5,6] (7: 1−1/2, 9: 0−1/2). The deepest, [5,6], lies on completion 0 together
    with [5] and the root: one forward pass covers all three."""
    m = adapted_model(tmp_path)
    st = tokrl.tspmo_backward(m, PROMPT, COMPLETIONS, REWARDS, lam=0.0)
    assert st.forwards == 1
    # nonzero-advantage tokens: c0 at 0,1,2; c1 at 0,1,2; c2 at 0,1; c3 at 0 -> 9 of 17 generated tokens
    assert st.nonzero_adv_tokens == 9 and st.tokens_generated == 17 and st.tokens_in_loss == 0
    zero(m)
    st = tokrl.tspmo_backward(m, PROMPT, COMPLETIONS, [0.3] * 4, lam=0.0)
    assert st.forwards == 0 and st.zero_variance


def test_tspmo_with_treerl_advantages_equals_bruteforce_B2(tmp_path):
    """estimator="treerl": E10's form with B2's A(v|p) in place of E7's. Its gradient equals the brute-force sum's
    (A from the raw lists) and differs from E7's. Rewards [1,0,0,1], root mean 1/2: B2 is 0 only where E[R|p∘v] is
    the mean of E[R|root] and E[R|p], and no edge here is, so every prefix with a child is needed; the deepest ones,
    [5,6,7,8] (completion 0: it covers [5,6], [5] and the root), [5,7,7,7,7,7] (completion 2) and [6] (completion
    3), take three forwards (E7: one), and all 17 generated tokens have A ≠ 0 (E7: 9)."""
    m = adapted_model(tmp_path)
    tspmo_slow(m, lam=0.0, estimator="treerl").backward()
    slow = grads(m)
    zero(m)
    st = tokrl.tspmo_backward(m, PROMPT, COMPLETIONS, REWARDS, lam=0.0, estimator="treerl")
    fast = grads(m)
    assert (st.forwards, st.edges, st.nonzero_adv_tokens, st.tokens_generated) == (3, 14, 17, 17)
    assert float((fast - slow).norm() / slow.norm()) < 1e-5
    zero(m)
    tspmo_slow(m, lam=0.0).backward()  # E7's
    assert float((grads(m) - fast).norm() / fast.norm()) > 0.05



# --- T-SPMO logs its two terms and their gradient norms ---------------------------------------------------------------

def test_tspmo_logs_policy_and_l2_terms_and_their_gradient_norms(tmp_path):
    """loss = policy_loss + l2_loss; each gradient norm equals the norm of that term's gradient computed alone by
    the slow path (brute-force E10 policy term; λ·Σ‖W‖² by autograd), also when .grad already holds another
    prompt's gradient (accumulation) and with a scale."""
    lam, scale = 0.3, 0.5
    m = adapted_model(tmp_path)
    A_params = [mod.lora_A for _, mod in lora.lora_modules(m)]
    params = lora.lora_parameters(m)

    def norms(loss):
        g = torch.autograd.grad(loss, params, allow_unused=True)
        g = [torch.zeros_like(p) if x is None else x for p, x in zip(params, g)]
        gA = [x for p, x in zip(params, g) if any(p is a for a in A_params)]
        return float(torch.cat([x.flatten() for x in g]).norm()), float(torch.cat([x.flatten() for x in gA]).norm())

    policy = tspmo_slow(m, lam=0.0) * scale
    l2 = lam * lora.l2_penalty(m) * scale
    want_policy, want_l2 = norms(policy), norms(l2)
    total = torch.autograd.grad(tspmo_slow(m, lam=lam) * scale, params, allow_unused=True)
    for p in params:  # another prompt's gradient already accumulated: it must not count
        p.grad = torch.full_like(p, 0.7)
    st = tokrl.tspmo_backward(m, PROMPT, COMPLETIONS, REWARDS, lam=lam, scale=scale)
    assert st.policy_loss == pytest.approx(policy.item(), rel=1e-5)
    assert st.l2_loss == pytest.approx(l2.item(), rel=1e-6)
    assert st.loss == pytest.approx(st.policy_loss + st.l2_loss, rel=1e-9)
    assert (st.policy_grad_norm, st.policy_grad_norm_A) == pytest.approx(want_policy, rel=1e-4)
    assert (st.l2_grad_norm, st.l2_grad_norm_A) == pytest.approx(want_l2, rel=1e-5)
    assert want_policy[0] > 0 and want_l2[0] > 0 and want_policy[1] > 0
    for p, g in zip(params, total):  # .grad holds the earlier 0.7 plus both terms of this group
        assert (p.grad - 0.7 - (0 if g is None else g)).abs().max() < 1e-6


def test_tspmo_keeps_the_accumulated_gradient_when_a_forward_fails(tmp_path, monkeypatch):
    """tspmo_backward sets another prompt's accumulated .grad aside while it reads this group's norms; a failure in
    this group's forward (a device out of memory, injected) hands the accumulated gradient back as it was: every
    entry exactly 0.7, none lost (None)."""
    m = adapted_model(tmp_path)
    params = lora.lora_parameters(m)
    for p in params:
        p.grad = torch.full_like(p, 0.7)

    def fails(*a):
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(tokrl, "_prefix_logprobs", fails)
    with pytest.raises(RuntimeError, match="injected"):
        tokrl.tspmo_backward(m, PROMPT, COMPLETIONS, REWARDS, lam=0.0)
    assert all(p.grad is not None and bool((p.grad == 0.7).all()) for p in params)
