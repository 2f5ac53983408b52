"""baselines.py — K1–K4 (PPO with a critic, GAE) and D1 (online DPO): hand-computed numbers, every per-completion
backward against the slow batched loss on a tiny model, both learning the toy task, and exact resume."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import make_checkpoint
import baselines as B
import checkpoints
import checks
import lora
import tokrl
import settings
import train
import training
from test_train import SevenTask, adapter_tensors, digit_model, learn_toy_task
from test_tokrl import COMPLETIONS, PROMPT, REWARDS, adapted_model

TIMING = ("seconds", "tokens_per_s", "peak_mem_gb")


# --- K2: GAE ------------------------------------------------------------------------------------------------------

def test_gae_by_hand():
    """4 tokens, r = [0, 0, 0, 1] (the reward at the last token), V = [0.5, 0.4, 0.6, 0.8], γ = 0.9, λ = 0.5.

    δ_3 = 1 + 0.9·0 − 0.8 = 0.2; δ_2 = 0 + 0.9·0.8 − 0.6 = 0.12; δ_1 = 0.9·0.6 − 0.4 = 0.14; δ_0 = 0.9·0.4 − 0.5 = −0.14
    γλ = 0.45: A_3 = 0.2; A_2 = 0.12 + 0.45·0.2 = 0.21; A_1 = 0.14 + 0.45·0.21 = 0.2345;
    A_0 = −0.14 + 0.45·0.2345 = −0.034475. Targets R_t = A_t + V_t = [0.465525, 0.6345, 0.81, 1.0]."""
    r = B.terminal_rewards(4, 1.0)
    assert r.tolist() == [0, 0, 0, 1]
    v = torch.tensor([0.5, 0.4, 0.6, 0.8], dtype=torch.float64)
    a = B.gae(r, v, gamma=0.9, gae_lambda=0.5)
    assert a.tolist() == pytest.approx([-0.034475, 0.2345, 0.21, 0.2], abs=1e-12)
    assert (a + v).tolist() == pytest.approx([0.465525, 0.6345, 0.81, 1.0], abs=1e-12)
    assert a.tolist() == pytest.approx(B.gae_by_definition(r.tolist(), v.tolist(), 0.9, 0.5), abs=1e-12)
    # γ = λ = 1: the Monte-Carlo return (here 1 at every t) minus the value
    assert B.gae(r, v, 1.0, 1.0).tolist() == pytest.approx([0.5, 0.6, 0.4, 0.2], abs=1e-12)
    # λ = 0: one-step TD errors
    assert B.gae(r, v, 0.9, 0.0).tolist() == pytest.approx([-0.14, 0.14, 0.12, 0.2], abs=1e-12)


def test_gae_recursion_equals_the_double_sum_on_random_input():
    g = torch.Generator().manual_seed(0)
    for T in (1, 2, 7, 30):
        r, v = torch.randn(T, generator=g, dtype=torch.float64), torch.randn(T, generator=g, dtype=torch.float64)
        for gamma, gae_lambda in ((1.0, 0.95), (0.99, 0.9), (0.5, 1.0)):
            assert B.gae(r, v, gamma, gae_lambda).tolist() == pytest.approx(
                B.gae_by_definition(r.tolist(), v.tolist(), gamma, gae_lambda), abs=1e-10)


def test_whitening_is_over_all_tokens_of_the_step():
    a = [torch.tensor([1.0, 3.0]), torch.tensor([5.0])]  # mean 3, population std sqrt(8/3)
    s = math.sqrt(8 / 3)
    w = B.whiten(a)
    assert [t.tolist() for t in w] == [pytest.approx([-2 / s, 0.0]), pytest.approx([2 / s])]
    assert [t.tolist() for t in B.whiten([torch.tensor([0.7, 0.7])])] == [[0.0, 0.0]]  # all equal: Â = 0
    assert B.explained_variance(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert B.explained_variance(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 3.0])) == 0.0  # no better than a mean
    assert B.explained_variance(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])) is None


# --- K1 ------------------------------------------------------------------------------------------------------------

def test_value_head_is_linear_fp32_and_starts_at_zero():
    head = B.ValueHead(4)
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.bfloat16)
    assert head(h).tolist() == [0.0] and head(h).dtype == torch.float32
    with torch.no_grad():
        head.proj.weight.copy_(torch.tensor([[0.5, 0.0, -1.0, 0.25]]))
        head.proj.bias.fill_(0.1)
    assert head(h).tolist() == pytest.approx([0.5 - 3 + 1 + 0.1])  # [K1] w·h + b


def test_separate_critic_holds_its_own_copy_of_the_weights(tmp_path):
    m = adapted_model(tmp_path)
    shared, sep = B.Critic(m, "shared"), B.Critic(m, "separate")
    assert shared.net is None and len(shared.parameters()) == 2
    assert sep.net.model.embed_tokens.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert len(sep.parameters()) == 2 + len(lora.lora_parameters(m))
    assert not set(map(id, sep.parameters())) & set(map(id, lora.lora_parameters(m)))  # its own LoRA
    with pytest.raises(ValueError, match="shared or separate"):
        B.Critic(m, "both")


# --- K3 / K4 -------------------------------------------------------------------------------------------------------

def test_surrogate_gradient_by_hand_and_clipped_tokens_give_zero():
    """ε = 0.2. Token 0: c = 1.5, Â = +1 → clipped at 1.2: gradient 0. Token 1: c = 0.5, Â = −1 → clipped at 0.8:
    gradient 0. Token 2: c = 1.5, Â = −1 → min picks c·Â (−1.5 < −1.2): d/dlogp = c·Â = −1.5.
    Token 3: c = 1, Â = 2 → d/dlogp = 2 (μ = 1: the advantage-weighted log-prob gradient)."""
    old = torch.log(torch.tensor([0.2, 0.4, 0.2, 0.3]))
    logp = torch.log(torch.tensor([0.3, 0.2, 0.3, 0.3])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0])
    J = B.ppo_token_objective(logp, old, None, adv, torch.zeros(4), torch.zeros(4), clip_eps=0.2, w1=0, w2=0, w3=0)
    assert J.tolist() == pytest.approx([1.2, -0.8, -1.5, 2.0], abs=1e-6)  # [K3]
    J.sum().backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0, -1.5, 2.0], abs=1e-6)


def test_ppo_objective_terms_by_hand():
    """[K4] one token, c = 1: L = Â + w1·(−log π) − w2·KL − w3·(V − R)²; π = 0.5, π_ref = 0.25, V = 0.3, R = 1."""
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    J = B.ppo_token_objective(logp, logp, ref, torch.tensor([0.7]), torch.tensor([0.3]), torch.tensor([1.0]),
                              clip_eps=0.2, w1=0.1, w2=0.01, w3=0.5)
    kl = 0.5 - math.log(0.5) - 1  # E4 with π_ref/π_θ = 0.5
    assert float(J) == pytest.approx(0.7 + 0.1 * math.log(2) - 0.01 * kl - 0.5 * 0.49, abs=1e-6)


def critic_grads(m, critic):
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in [*lora.lora_parameters(m), *critic.parameters()]])


def zero_all(m, critic):
    for p in [*lora.lora_parameters(m), *critic.parameters()]:
        p.grad = None


def batched_ppo_loss(m, critic, batch, **w):
    """The obvious way: a full forward of the padded group (policy logits, and values from the whole hidden state)."""
    ys = batch.completions
    T = len(PROMPT) + max(map(len, ys))
    ids = torch.tensor([PROMPT + y + [0] * (T - len(PROMPT) - len(y)) for y in ys])
    pos = torch.arange(T)[None].expand(len(ys), T)

    def hidden(net):
        return net.model.norm(net.run_layers(net.model.embed_tokens(ids), pos))  # (G, T, C)

    h = hidden(m)
    values = critic.head(h if critic.net is None else hidden(critic.net))  # (G, T)
    return B.ppo_loss_batched(m.lm_head(h), values, ids, tokrl.loss_mask(len(PROMPT), [len(y) for y in ys], T),
                              batch, **w)


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_ppo_per_completion_gradient_equals_batched_after_the_policy_moved(tmp_path, mode):
    """Pass 1 (π_θ = π_θold), one large optimizer step, then pass 2 where many tokens are clipped: at both, the
    accumulated per-completion gradient (policy LoRA, value head, separate critic LoRA) equals the batched loss's."""
    m = adapted_model(tmp_path)
    critic = B.Critic(m, mode)
    with torch.no_grad():
        critic.head.proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))  # a non-trivial critic
    w = dict(clip_eps=0.2, w1=0.05, w2=0.1, w3=0.5)
    batch = B.ppo_prepare(m, critic, PROMPT, COMPLETIONS, REWARDS, gamma=1.0, gae_lambda=0.95)
    assert batch.n_tokens == 17
    opt = torch.optim.SGD([*lora.lora_parameters(m), *critic.parameters()], lr=2.0)
    for k in range(2):
        zero_all(m, critic)
        loss_slow = batched_ppo_loss(m, critic, batch, **w)
        loss_slow.backward()
        slow = critic_grads(m, critic)
        zero_all(m, critic)
        st = B.ppo_backward(m, critic, batch, **w)
        fast = critic_grads(m, critic)
        rel = (fast - slow).norm() / slow.norm()
        print(f"\nPPO ({mode}) pass {k + 1}: clip fraction {st.extra['clip_fraction']:.2f}, "
              f"per-completion vs batched gradient relative error {rel:.2e}")
        # relative: after the large step the loss at pass 2 is tens (17.7 on one machine, 24.1 on another: the step
        # amplifies the kernels' rounding), where fp32 sums in another order differ by a few 1e-6 of it
        assert st.loss == pytest.approx(float(loss_slow.detach()), rel=1e-5, abs=1e-5) and rel < 1e-5
        if k == 0:
            assert st.extra["clip_fraction"] == 0 and st.extra["approx_kl"] == 0  # c ≡ 1 at the first pass
        else:
            assert st.extra["clip_fraction"] > 0.2 and st.extra["approx_kl"] > 0  # the clip really acts
        opt.step()


def test_ppo_with_one_pass_is_the_advantage_weighted_logprob_gradient(tmp_path):
    """μ = 1, w1 = w2 = w3 = 0: the surrogate's gradient is −(1/N) Σ_t Â_t ∇log π_θ(y_t|s_t)."""
    m = adapted_model(tmp_path)
    critic = B.Critic(m, "shared")
    batch = B.ppo_prepare(m, critic, PROMPT, COMPLETIONS, REWARDS, gamma=1.0, gae_lambda=0.95)
    B.ppo_backward(m, critic, batch, clip_eps=0.2, w1=0, w2=0, w3=0)
    fast = torch.cat([p.grad.flatten() for p in lora.lora_parameters(m)])
    for p in lora.lora_parameters(m):
        p.grad = None
    pg = sum((a * lora.logprobs(m, [PROMPT + y], [torch.arange(4, 4 + len(y))]).logp[0]).sum()
             for y, a in zip(COMPLETIONS, batch.advantages))
    (-pg / 17).backward()
    slow = torch.cat([p.grad.flatten() for p in lora.lora_parameters(m)])
    assert slow.norm() > 0 and (fast - slow).norm() / slow.norm() < 1e-6
    # V ≡ 0 at the start, γ = 1, rewards at the last token: A_t = (γλ)^{T−1−t}·R before whitening
    raw = B.gae(B.terminal_rewards(5, 1.0), torch.zeros(5), 1.0, 0.95)
    assert raw.tolist() == pytest.approx([0.95 ** 4, 0.95 ** 3, 0.95 ** 2, 0.95, 1.0])
    assert batch.returns[0].tolist() == pytest.approx(raw.tolist())  # R_t = A_t + V_t with V = 0


# --- D1 ------------------------------------------------------------------------------------------------------------

def test_dpo_pairs_and_a_hand_computed_two_completion_case():
    assert B.dpo_pairs([1.0, 0.0, 0.0, 1.0]) == [(0, 1), (0, 2), (3, 1), (3, 2)]
    assert B.dpo_pairs([0.5, 0.5]) == [] and B.dpo_pairs([0.0, 0.5, 1.0]) == [(1, 0), (2, 0), (2, 1)]
    # two completions, R = [1, 0], log-ratios [0.5, −0.3], β_D = 0.1: z = 0.1·0.8 = 0.08
    loss, z, coef = B.dpo_coefficients(torch.tensor([0.5, -0.3], dtype=torch.float64), [(0, 1)], beta=0.1)
    assert z.tolist() == pytest.approx([0.08])
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-0.08)), abs=1e-12)  # −log σ(0.08) = 0.653947
    s = 1 / (1 + math.exp(0.08))  # σ(−z) = 0.48001
    assert coef.tolist() == pytest.approx([-0.1 * s, 0.1 * s], abs=1e-12)
    # the same numbers by autograd on the loss as a function of the log-ratios
    lr = torch.tensor([0.5, -0.3], dtype=torch.float64, requires_grad=True)
    (-torch.nn.functional.logsigmoid(0.1 * (lr[0] - lr[1]))).backward()
    assert lr.grad.tolist() == pytest.approx(coef.tolist(), abs=1e-12)


def test_dpo_per_completion_gradient_equals_batched_gradient(tmp_path):
    m = adapted_model(tmp_path)
    for rewards in (REWARDS, [0.0, 0.5, 1.0, 0.5]):
        ys = COMPLETIONS
        T = len(PROMPT) + max(map(len, ys))
        ids = torch.tensor([PROMPT + y + [0] * (T - len(PROMPT) - len(y)) for y in ys])
        mask = tokrl.loss_mask(len(PROMPT), [len(y) for y in ys], T)
        with torch.no_grad(), lora.adapters_off(m):
            ref_logits = m.logits(ids)
        loss_slow = B.dpo_loss_batched(m.logits(ids), ref_logits, ids, mask, rewards, beta=0.1)
        loss_slow.backward()
        slow = torch.cat([p.grad.flatten() for p in lora.lora_parameters(m)])
        for p in lora.lora_parameters(m):
            p.grad = None
        st = B.dpo_backward(m, PROMPT, ys, rewards, beta=0.1)
        fast = torch.cat([p.grad.flatten() for p in lora.lora_parameters(m)])
        for p in lora.lora_parameters(m):
            p.grad = None
        rel = (fast - slow).norm() / slow.norm()
        print(f"\nDPO {rewards}: {st.extra['pairs']} pairs, per-completion vs batched relative error {rel:.2e}")
        assert st.loss == pytest.approx(float(loss_slow.detach()), abs=1e-6) and rel < 1e-5
        assert st.extra["pairs"] == len(B.dpo_pairs(rewards)) and 0 <= st.extra["preference_accuracy"] <= 1


@pytest.mark.parametrize("algo", ["ppo-shared", "ppo-separate", "dpo"])
@pytest.mark.parametrize("n", [2, 3])
def test_batched_backward_gives_the_per_completion_gradient(tmp_path, algo, n):
    """--backward-batch N for PPO (policy LoRA, value head, the separate critic's LoRA) and DPO: the gradient and
    loss of the per-completion backward, within fp32 rounding, in ceil(G/N) passes."""
    m = adapted_model(tmp_path)
    if algo == "dpo":
        critic, params = None, lora.lora_parameters(m)

        def backward(k):
            return B.dpo_backward(m, PROMPT, COMPLETIONS, [0.0, 0.5, 1.0, 0.5], beta=0.1, backward_batch=k)
    else:
        critic = B.Critic(m, algo.split("-")[1])
        params = [*lora.lora_parameters(m), *critic.parameters()]
        with torch.no_grad():
            critic.head.proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        batch = B.ppo_prepare(m, critic, PROMPT, COMPLETIONS, REWARDS, gamma=1.0, gae_lambda=0.95)

        def backward(k):
            return B.ppo_backward(m, critic, batch, clip_eps=0.2, w1=0.05, w2=0.1, w3=0.5, backward_batch=k)
    one = backward(1)
    per_completion = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    st = backward(n)
    rel = (torch.cat([p.grad.flatten() for p in params]) - per_completion).norm() / per_completion.norm()
    assert per_completion.norm() > 0 and rel < 1e-5
    assert st.loss == pytest.approx(one.loss, rel=1e-6, abs=1e-6) and st.kl == pytest.approx(one.kl, abs=1e-6)
    assert st.forwards == -(-one.forwards // n)


def test_dpo_with_no_pair_takes_no_update(tmp_path):
    m = adapted_model(tmp_path)
    st = B.dpo_backward(m, PROMPT, COMPLETIONS, [1.0] * 4, beta=0.1)
    assert st.forwards == 0 and st.extra == {"pairs": 0, "dpo_skipped": True} and st.zero_variance
    assert all(p.grad is None for p in lora.lora_parameters(m))
    before = [p.detach().clone() for p in lora.lora_parameters(m)]
    opt = torch.optim.AdamW(lora.lora_parameters(m), lr=0.1, weight_decay=0.01)
    opt.step()  # what the trainer does next: AdamW skips parameters without a gradient (no decay either)
    assert all(torch.equal(a, b) for a, b in zip(before, lora.lora_parameters(m)))


# --- train.py: the CLI, learning, resume -----------------------------------------------------------------------------

def test_ppo_and_dpo_defaults_and_help(capsys):
    cfg = train.resolve(train.build_parser().parse_args(["--algo", "ppo", "--task", "svamp"]))
    assert (cfg.steps, cfg.group_size, cfg.lora_rank, cfg.lora_fraction) == (325, 8, 16, 1 / 3)
    assert (cfg.critic, cfg.gamma, cfg.gae_lambda, cfg.clip_eps, cfg.ppo_passes, cfg.w1, cfg.beta, cfg.w3) == \
        ("shared", 1.0, 0.95, 0.2, 4, 0.0, 0.01, 0.5)
    cfg = train.resolve(train.build_parser().parse_args(["--algo", "dpo", "--task", "mult"]))
    assert (cfg.steps, cfg.group_size, cfg.lora_rank, cfg.dpo_beta) == (450, 8, 8, 0.1)
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    assert "mult   ppo    450" in out and "svamp  dpo    325" in out and "--critic {shared,separate}" in out


def test_bad_baseline_settings_are_named(capsys):
    for args, word in ((["--algo", "ppo", "--accum", "2"], "error: --accum 2: PPO and DPO take one prompt per step"),
                       (["--algo", "ppo", "--ppo-passes", "0"], "error: --ppo-passes 0: PPO's μ"),
                       (["--algo", "dpo", "--dpo-beta", "-1"], "error: --dpo-beta -1.0: allowed"),
                       (["--algo", "ppo", "--gamma", "1.5"], "error: --gamma 1.5: a discount")):
        with pytest.raises(SystemExit) as e:
            train.main(args)
        assert e.value.code == 2 and capsys.readouterr().err.startswith(word)  # one line, argparse's exit status


def toy_settings(tmp_path, algo, **kw):
    d = digit_model(tmp_path / "digits")
    return dataclasses.replace(settings.Settings(), algo=algo, task="seven", model=str(d), device="cpu", steps=40,
                               group_size=8, max_new_tokens=1, temperature=1.0, lr=3e-2, lora_fraction=1.0,
                               lora_rank=4, eval_every=0, save_every=100, seed=1, **kw)


@pytest.mark.parametrize("algo,critic", [("ppo", "shared"), ("ppo", "separate"), ("dpo", "shared")])
def test_ppo_and_dpo_learn_the_toy_task(tmp_path, algo, critic):
    """The same budget as test_train's learning test (G = 8, 40 steps, lr 3e-2), from chance (π(7) ≈ 0.09)."""
    cfg = toy_settings(tmp_path, algo, critic=critic)
    p7, ms, final = learn_toy_task(tmp_path, cfg)
    rewards = [m["reward_mean"] for m in ms]
    late = sum(rewards[-5:]) / 5
    print(f"\n{algo} ({critic}): π(7) at start {float(p7):.3f}; rewards of steps 1-5 {rewards[:5]}, "
          f"mean of the last 5 {late:.2f}")
    assert float(p7) < 0.25 and rewards[0] <= 0.25  # from chance: the first group is sampled before any update
    assert late > 0.8 and final["accuracy"] == 1.0
    if algo == "ppo":
        assert all(m["forwards"] == 4 * 8 for m in ms)  # μ = 4 passes over G = 8 completions
        assert max(m["clip_fraction"] for m in ms) > 0 and all(m["approx_kl"] >= 0 for m in ms)
        assert {"value_loss", "explained_variance", "entropy"} <= ms[0].keys()
        # the value head learns V(prompt) → 1. (Explained variance is 0 or None on this task: one-token completions
        # share their only state, the prompt, so V is one number per group and R − V varies exactly as R.)
        assert ms[0]["value_loss"] > 0.1 and ms[-1]["value_loss"] < 0.01
        assert all(m["explained_variance"] in (0.0, None) for m in ms)
    else:
        assert {"pairs", "preference_accuracy", "reward_margin", "dpo_skipped"} <= ms[0].keys()
        assert any(m["dpo_skipped"] for m in ms[-10:])  # all 8 say 7: no pair, no update, logged


@pytest.mark.parametrize("algo,critic", [("ppo", "shared"), ("ppo", "separate"), ("dpo", "shared")])
def test_ppo_and_dpo_resume_bit_exact(tmp_path, algo, critic, monkeypatch):
    """4 steps straight, or 2, stop, resume for 2 more: the same policy adapter, the same value head and critic
    LoRA, the same metrics. (PPO's π_θold lives within a step: at a step boundary it is the current policy.)"""
    d = digit_model(tmp_path / "digits")
    for where in (training, checks):  # checks.check_inputs reads the task main trains on
        monkeypatch.setattr(where, "make_task", lambda name, tok, *a: SevenTask(tok))
    common = ["--algo", algo, "--critic", critic, "--model", str(d), "--device", "cpu", "-G", "6",
              "--max-new-tokens", "1", "--temperature", "1.0", "--lr", "3e-2", "--lora-fraction", "1",
              "--eval-every", "0", "--save-every", "2"]
    train.main([*common, "--steps", "4", "--out", str(tmp_path / "a")])
    train.main([*common, "--steps", "2", "--out", str(tmp_path / "b")])
    train.main(["--resume", str(tmp_path / "b"), "--steps", "4"])
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if "lora_B" in k)
    sa, sb = (torch.load(r / "checkpoints" / "step-000004" / "state.pt", weights_only=True) for r in
              (tmp_path / "a", tmp_path / "b"))
    if algo == "ppo":
        assert sa["extra"].keys() == sb["extra"].keys() and all(torch.equal(sa["extra"][k], sb["extra"][k])
                                                                 for k in sa["extra"])
        assert float(sa["extra"]["value_head.proj.weight"].abs().sum()) > 0  # the value head did train
        assert any("critic_lora" in k for k in sa["extra"]) == (critic == "separate")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    ma, mb = (checkpoints.read_jsonl(r / "metrics.jsonl") for r in (tmp_path / "a", tmp_path / "b"))
    assert strip(ma) == strip(mb) and len(ma) == 4


def test_resume_with_a_different_critic_is_named(tmp_path, monkeypatch, capsys):
    d = digit_model(tmp_path / "digits")
    for where in (training, checks):  # checks.check_inputs reads the task main trains on
        monkeypatch.setattr(where, "make_task", lambda name, tok, *a: SevenTask(tok))
    common = ["--algo", "ppo", "--model", str(d), "--device", "cpu", "-G", "4", "--max-new-tokens", "1",
              "--lora-fraction", "1", "--eval-every", "0", "--save-every", "1", "--out", str(tmp_path / "r")]
    train.main([*common, "--steps", "1"])
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(tmp_path / "r"), "--steps", "2", "--critic", "separate"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: --critic separate:" in err and "recorded with critic = 'shared'" in err


@pytest.mark.parametrize("algo,critic", [("ppo", "shared"), ("ppo", "separate"), ("dpo", "shared")])
def test_ppo_and_dpo_run_end_to_end_on_mult(tmp_path, algo, critic):
    """Multi-token completions through the real CLI: every PPO/DPO statistic logged, with its range."""
    from test_train import SMALL
    tiny = make_checkpoint(tmp_path / "tiny")
    run = tmp_path / "run"
    assert train.main(["--algo", algo, "--critic", critic, "--task", "mult", "--model", str(tiny), "--steps", "2",
                       "--out", str(run), *SMALL, "--temperature", "1.0"]) == 0
    ms = checkpoints.read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in ms] == [1, 2]
    for m in ms:
        if algo == "ppo":
            assert m["loss_token_fraction"] == 1.0 and m["forwards"] == 4 * 4 and m["value_loss"] >= 0
            assert 0 <= m["clip_fraction"] <= 1 and m["approx_kl"] >= 0 and m["entropy"] > 0
            assert m["explained_variance"] is None or m["explained_variance"] <= 1
        else:  # a random tiny model never answers a product: equal rewards, no pair, no update
            assert (m["pairs"], m["dpo_skipped"], m["forwards"]) == (0, True, 0)
    state = torch.load(run / "checkpoints" / "step-000002" / "state.pt", weights_only=True)
    assert ("extra" in state) == (algo == "ppo")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ppo_and_dpo_on_cuda_equal_the_cpu(tmp_path):
    """The same PPO pass (separate critic: both bodies on the GPU) and DPO step on CUDA as on the CPU."""
    import copy
    cpu = adapted_model(tmp_path)
    gpu = copy.deepcopy(cpu).cuda()
    out = []
    for m in (cpu, gpu):
        critic = B.Critic(m, "separate")
        batch = B.ppo_prepare(m, critic, PROMPT, COMPLETIONS, REWARDS, gamma=1.0, gae_lambda=0.95)
        st = B.ppo_backward(m, critic, batch, clip_eps=0.2, w1=0.0, w2=0.1, w3=0.5)
        grads = critic_grads(m, critic).cpu()
        dpo = B.dpo_backward(m, PROMPT, COMPLETIONS, REWARDS, beta=0.1)
        out.append((grads, st.loss, dpo.loss, batch.explained_variance))
    (g0, l0, d0, e0), (g1, l1, d1, e1) = out
    assert (g1 - g0).norm() / g0.norm() < 1e-4 and l1 == pytest.approx(l0, rel=1e-4)
    assert d1 == pytest.approx(d0, rel=1e-5)
    assert e0 == pytest.approx(0.0) and e1 == pytest.approx(0.0)  # V ≡ 0 at the start: explains nothing
