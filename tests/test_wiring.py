"""The wiring between the equations, each test written against one plausible bug (named in its docstring): the
sampler draws from softmax(l/T) and its nucleus, through next_token and through sampling.sample; the fixed-shape and
eager decodes of left-padded prompts give each row the logits of its own unpadded prompt, with weights large enough
that a position error shows; every objective's gradient and loss are exactly proportional to `scale`; --accum N
averages the N groups' gradients, losses and KL; PPO logs the mean of its μ passes' statistics."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import make_checkpoint
import baselines as B
import lora
import pretrained
import sampling
import settings
import tasks
import tokrl
import training
from distributed import World
from test_tokrl import COMPLETIONS, PROMPT, REWARDS, adapted_model


def chi_square(counts: torch.Tensor, p: torch.Tensor) -> tuple[float, int]:
    """Pearson's χ² of `counts` against the probabilities `p`, and its degrees of freedom. Entries whose expected
    count is below 5 are pooled into one bin (χ²'s usual rule); entries of probability 0 must have no count."""
    assert counts[p == 0].sum() == 0, "a token of probability 0 was drawn"
    n, expected = counts.sum(), p * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big & (p > 0)].sum()[None]])
    exp = torch.cat([expected[big], expected[~big & (p > 0)].sum()[None]])
    keep = exp > 0
    chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    assert n > 0
    return chi2, int(keep.sum()) - 1


def bound(df: int) -> float:
    """χ² with df degrees of freedom has mean df and sd sqrt(2·df): df + 6 sd is never reached by chance here."""
    return df + 6 * (2 * df) ** 0.5


def nucleus(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus distribution by its definition, one token at a time: the most probable tokens, in order, until
    their mass reaches top_p (the token that crosses it included), renormalised."""
    keep, mass = torch.zeros_like(p, dtype=torch.bool), 0.0
    for i in p.argsort(descending=True).tolist():
        if mass >= top_p:
            break
        keep[i], mass = True, mass + float(p[i])
    q = torch.where(keep, p, torch.zeros_like(p))
    return q / q.sum()


LOGITS = torch.tensor([2.0, 1.6, 1.0, 0.5, 0.0, -0.4, -1.0, -2.5])


@pytest.mark.parametrize("temperature,top_p", [(0.3, 1.0), (1.0, 1.0), (1.0, 0.8), (0.3, 0.9)])
def test_next_token_draws_from_softmax_of_logits_over_T_and_its_nucleus(temperature, top_p):
    """80,000 draws of next_token from one row of logits against nucleus(softmax(l/T), top_p), by χ². The bugs it is
    written for: the temperature ignored (at T = 0.3 the first token is drawn 39% of the time instead of 77%), the
    nucleus cut one token short or not applied. The same draws are far from softmax(l) (the temperature ignored)."""
    g = torch.Generator().manual_seed(int(temperature * 10 + top_p * 100))
    want = nucleus(torch.softmax(LOGITS.double() / temperature, -1), top_p)
    counts = torch.zeros(len(LOGITS), dtype=torch.float64)
    for _ in range(4):
        tok = sampling.next_token(LOGITS.expand(20_000, -1).clone(), temperature, top_p, g)
        counts += torch.bincount(tok, minlength=len(LOGITS)).double()
    chi2, df = chi_square(counts, want)
    print(f"\nT = {temperature}, top-p = {top_p}: χ² {chi2:.1f} for {df} degrees of freedom; first token drawn "
          f"{counts[0] / counts.sum():.3f} of the time, expected {want[0]:.3f}")
    assert chi2 < bound(df), f"χ² {chi2:.0f} for {df} degrees of freedom"
    if temperature != 1.0 and top_p == 1.0:  # the draws tell T from 1: softmax(l) is far off
        assert chi_square(counts, torch.softmax(LOGITS.double(), -1))[0] > 50 * bound(df)


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """A tiny model whose first-token logits spread over a few units (the final norm's weight scaled up), so that
    a temperature of 0.3 and of 1.0 give clearly different distributions."""
    m = pretrained.load_model(make_checkpoint(tmp_path_factory.mktemp("peaked") / "m", std=0.1))
    with torch.no_grad():
        m.model.norm.weight.mul_(4.0)
    return m


@pytest.mark.parametrize("temperature,top_p", [(0.3, 1.0), (1.0, 1.0), (1.0, 0.7)])
def test_model_sample_first_tokens_follow_softmax_at_the_temperature(peaked, temperature, top_p):
    """Through the sampler's real path (sampling.sample: the prefill, the decode loop, next_token, the two-level draw):
    the first tokens of 20,000 samples of one prompt against nucleus(softmax(l/T), top_p), l the full forward's
    logits. The bug it is written for: a temperature or top-p lost between sample() and the draw."""
    prompt = [10, 20, 30, 40]
    with torch.no_grad():
        l = peaked.logits(torch.tensor([prompt]))[0, -1].double()
    want = nucleus(torch.softmax(l / temperature, -1), top_p)
    ys = sampling.sample(peaked, prompt, 20_000, 1, temperature=temperature, top_p=top_p,
                  generator=torch.Generator().manual_seed(5))
    counts = torch.bincount(torch.tensor([y[0] for y in ys]), minlength=len(l)).double()
    chi2, df = chi_square(counts, want)
    print(f"\nmodel.sample T = {temperature}, top-p = {top_p}: χ² {chi2:.1f} for {df} degrees of freedom "
          f"(most likely token {want.max():.3f})")
    assert chi2 < bound(df)
    if top_p == 1.0:  # the draws tell the two temperatures apart: the other one's distribution is far off
        assert chi_square(counts, torch.softmax(l / (1.3 - temperature), -1))[0] > 10 * bound(df)


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_sampling_with_suppressed_tokens_writes_no_shared_view_and_warns_nothing(peaked, mode):
    """The G rows' first logits are one distribution copied G times: suppressing tokens writes -inf into each row,
    which must be the rows' own memory. Every warning is an error here: PyTorch warns (and is to refuse) an index_put_
    on an expanded tensor. The bug it is written for: the copy dropped after the prefill (the G rows one expanded
    view), which samples the same today and prints a warning at every step."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys = sampling.sample(peaked, [10, 20, 30, 40], 8, 3, temperature=1.0, suppress=[5, 9], mode=mode,
                      generator=torch.Generator().manual_seed(0))
    assert len(ys) == 8 and not any(t in (5, 9) for y in ys for t in y)


# --- left-padded prompts of different lengths, each row against its own prompt alone ---------------------------------

@pytest.fixture(scope="module")
def large_weights(tmp_path_factory):
    """Weights of std 0.3: a position that ignores left padding moves the logits by units, not by the 1e-3 that
    a 0.02-std model shows (whose greedy tokens then do not change)."""
    return pretrained.load_model(make_checkpoint(tmp_path_factory.mktemp("large") / "m", std=0.3))


PROMPTS = [[3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1], [1], [200, 100, 50, 25, 12, 6]]


@pytest.mark.parametrize("mode", ["static", "eager"])
@pytest.mark.parametrize("early_ends", [False, True])
def test_left_padded_greedy_logits_equal_each_prompt_alone_at_every_step(large_weights, monkeypatch, mode,
                                                                        early_ends):
    """greedy() of four prompts of 1 to 9 tokens in one left-padded batch: at every step, every live row's logits
    equal a full forward of its own unpadded prompt and tokens (within 1e-4; the logits reach ±9). mode="static"
    is the fixed-shape step CUDA runs (here without its graph). With early ends, rows 0 and 2 stop at an EOS and the
    others decode on (the eager decode drops the finished rows from its cache; the fixed-shape one keeps them). The
    bugs it is written for: positions that ignore left padding (in the prefill, in either decode's steps), padding
    attended, a finished row's padding count kept for another row, the first decoded slot off by one."""
    m, seen, real = large_weights, [], sampling.next_token

    def spy(logits, *args):
        seen.append(logits.clone())
        return real(logits, *args)

    eos = []
    if early_ends:
        alone = sampling.greedy(m, PROMPTS, 8, mode="eager")
        eos = [alone[0][2], alone[2][4]]
    monkeypatch.setattr(sampling, "next_token", spy)
    outs = sampling.greedy(m, PROMPTS, 8, eos=eos, mode=mode)
    if early_ends:
        assert len({len(y) for y in outs}) > 1 and min(map(len, outs)) < 8  # rows did end early
    worst = 0.0
    with torch.no_grad():
        for step, logits in enumerate(seen):
            live = [i for i, y in enumerate(outs) if len(y) > step]
            assert logits.shape[0] == len(live)
            for got, i in zip(logits, live):
                full = m.logits(torch.tensor([PROMPTS[i] + outs[i][:step]]))[0, -1]
                worst = max(worst, float((got - full).abs().max()))
                assert outs[i][step] == int(full.argmax())
    print(f"\n{mode} decode, left-padded, early ends {early_ends}: max abs logit error {worst:.1e}")
    assert worst < 1e-4


# --- every objective exactly proportional to `scale` (the --accum N averaging) ---------------------------------------

def lora_grads(m, critic=None) -> list[torch.Tensor]:
    params = [*lora.lora_parameters(m), *(critic.parameters() if critic else [])]
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def backward(algo: str, m, scale: float, n: int, critic=None, batch=None) -> tokrl.StepStats:
    """One backward of the group (PROMPT, COMPLETIONS, REWARDS) with the objective `algo`, n completions a batch."""
    for p in [*lora.lora_parameters(m), *(critic.parameters() if critic else [])]:
        p.grad = None
    if algo in ("grpo", "sgrpo"):
        selection = [[0, 2], [1], [0, 3, 5, 6], [0, 1]] if algo == "sgrpo" else None
        return tokrl.grpo_backward(m, PROMPT, COMPLETIONS, REWARDS, beta=0.1, selection=selection, scale=scale,
                                   backward_batch=n)
    if algo == "tspmo":
        return tokrl.tspmo_backward(m, PROMPT, COMPLETIONS, REWARDS, lam=0.01, scale=scale)
    if algo == "ppo":
        return B.ppo_backward(m, critic, batch, clip_eps=0.2, w1=0.05, w2=0.1, w3=0.5, scale=scale, backward_batch=n)
    return B.dpo_backward(m, PROMPT, COMPLETIONS, REWARDS, beta=0.1, scale=scale, backward_batch=n)


@pytest.mark.parametrize("algo,n", [("grpo", 1), ("grpo", 3), ("sgrpo", 1), ("sgrpo", 2), ("tspmo", 1),
                                    ("ppo", 1), ("ppo", 3), ("dpo", 1), ("dpo", 3)])
def test_every_objective_s_gradient_and_loss_are_exactly_proportional_to_scale(tmp_path, algo, n):
    """scale = 1/4 (a power of two, so every product and sum scales exactly): each gradient (the policy's LoRA, and
    PPO's value head) and the logged loss are exactly 1/4 of scale = 1's, for the per-completion backward (n = 1)
    and the batched one (n completions a forward); the other statistics do not change. This is what --accum N
    relies on (training.Trainer.train_step passes 1/N). The bug it is written for: an objective that ignores
    `scale` (--accum N then backpropagates and logs N times the averaged loss; AdamW's scale invariance hides it
    from every learning test)."""
    m = adapted_model(tmp_path)
    critic = batch = None
    if algo == "ppo":
        critic = B.Critic(m, "shared")
        with torch.no_grad():
            critic.head.proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        batch = B.ppo_prepare(m, critic, PROMPT, COMPLETIONS, REWARDS, gamma=1.0, gae_lambda=0.95)
    one = backward(algo, m, 1.0, n, critic, batch)
    g_one = lora_grads(m, critic)
    quarter = backward(algo, m, 0.25, n, critic, batch)
    g_quarter = lora_grads(m, critic)
    assert one.loss != 0 and quarter.loss == one.loss / 4
    assert sum(float(g.abs().sum()) for g in g_one) > 0
    for a, b in zip(g_quarter, g_one):
        assert torch.equal(a * 4, b)
    assert (quarter.kl, quarter.forwards, quarter.extra) == (one.kl, one.forwards, one.extra)


# --- --accum N through the training step ------------------------------------------------------------------------------

GROUPS = [([[5, 6, 7], [5, 9], [8], [5, 6]], [1.0, 0.0, 0.0, 1.0]), ([[7, 7], [9, 1, 2], [4]], [0.0, 1.0, 0.0])]


def mult_trainer(tiny, tmp_path, algo="grpo", world=World(), **kw) -> training.Trainer:
    cfg = settings.Settings(**{**settings.paper_defaults(algo, "mult"), "algo": algo, "device": "cpu",
                            "group_size": 4, "max_new_tokens": 12, "lora_fraction": 0.5, "model": str(tiny), **kw})
    net, tok, eos = training.load_everything(cfg)
    lora.apply_lora(net, cfg.lora_rank, cfg.lora_fraction, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a trained-looking adapter: π_θ ≠ π_ref, so the KL term is not zero
        for p in lora.lora_parameters(net):
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    return training.Trainer(cfg, tmp_path, net, tok, tasks.make_task("mult", tok), eos, world)


def test_accum_averages_the_groups_gradients_losses_and_kl(tiny, tmp_path, monkeypatch):
    """--accum 2 (GRPO): the gradient AdamW steps with is the mean of the two prompts' gradients, each computed
    alone with grpo_backward at scale 1 on the same weights; the logged loss and KL are the means of theirs. The bugs
    it is written for: the 1/N dropped (the sum of the gradients), the KL summed over the groups."""
    seen = []

    def fake(self, prompt, ex, prefix=()):
        seen.append(list(prompt))
        return GROUPS[len(seen) - 1]

    monkeypatch.setattr(training.Trainer, "sample_group", fake)
    tr = mult_trainer(tiny, tmp_path, accum=2)
    params = lora.lora_parameters(tr.net)
    before = [p.detach().clone() for p in params]
    stepped = []
    real_step = tr.opt.step

    def step(*a, **k):
        stepped.append([p.grad.clone() for p in params])
        return real_step(*a, **k)

    monkeypatch.setattr(tr.opt, "step", step)
    m = tr.train_step(tasks.TrainStream(tr.task, 2))
    assert len(seen) == 2 and seen[0] != seen[1] and len(stepped) == 1
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    alone = []
    for prompt, (ys, rs) in zip(seen, GROUPS):
        for p in params:
            p.grad = None
        st = tokrl.grpo_backward(tr.net, prompt, ys, rs, beta=tr.cfg.beta)
        alone.append((st, [p.grad.clone() for p in params]))
    (st1, g1), (st2, g2) = alone
    for got, a, b in zip(stepped[0], g1, g2):
        assert torch.allclose(got, (a + b) / 2, rtol=1e-6, atol=1e-9)
    assert m["loss"] == pytest.approx((st1.loss + st2.loss) / 2, rel=1e-6)
    assert st1.kl > 0 and m["kl"] == pytest.approx((st1.kl + st2.kl) / 2, rel=1e-6)
    assert m["reward_mean"] == pytest.approx(3 / 7) and m["len_mean"] == pytest.approx(14 / 7)


# --- PPO: what one step logs is the mean of its μ passes ------------------------------------------------------------

def test_ppo_logs_the_mean_of_its_passes_statistics(tiny, tmp_path, monkeypatch):
    """--ppo-passes 3: each pass's clip fraction, approximate KL, entropy and value loss (read off the real
    baselines.ppo_backward as it runs) differ, and the step logs their means, with the loss and KL averaged the same
    way and the forwards summed. The bug it is written for: a statistic summed over the passes, or the last pass's
    logged."""
    passes = []
    real = B.ppo_backward

    def recording(*a, **k):
        st = real(*a, **k)
        passes.append(copy.deepcopy(st))  # as it was returned: ppo_update then writes the means into the last one
        return st

    monkeypatch.setattr(training.Trainer, "sample_group", lambda self, prompt, ex, prefix=(): GROUPS[0])
    monkeypatch.setattr(B, "ppo_backward", recording)
    tr = mult_trainer(tiny, tmp_path, algo="ppo", ppo_passes=3, lr=0.05)
    m = tr.train_step(tasks.TrainStream(tr.task, 2))
    assert len(passes) == 3
    for key in ("clip_fraction", "approx_kl", "entropy", "value_loss"):
        values = [p.extra[key] for p in passes]
        assert m[key] == pytest.approx(sum(values) / 3, rel=1e-12), key
    assert len({p.extra["entropy"] for p in passes}) == 3 and passes[-1].extra["approx_kl"] > 0  # the passes moved
    assert m["loss"] == pytest.approx(sum(p.loss for p in passes) / 3, rel=1e-12)
    assert m["kl"] == pytest.approx(sum(p.kl for p in passes) / 3, rel=1e-12)
    assert m["forwards"] == sum(p.forwards for p in passes)
    assert math.isfinite(m["explained_variance"])


# --- what stops a step, and whose stream each process samples from ----------------------------------------------------

def test_a_non_finite_gradient_stops_the_step_before_adamw_even_with_a_finite_loss(tiny, tmp_path, monkeypatch):
    """One NaN in one gradient entry after GRPO's backward (whose loss is finite): the step stops with NonFiniteLoss
    and AdamW never runs (the adapter is unchanged). The bug it is written for: the guard reading the loss only."""
    real = tokrl.grpo_backward

    def poisoned(net, *a, **k):
        st = real(net, *a, **k)
        lora.lora_parameters(net)[-1].grad.view(-1)[0] = float("nan")
        return st

    monkeypatch.setattr(training.Trainer, "sample_group", lambda self, prompt, ex, prefix=(): GROUPS[0])
    monkeypatch.setattr(tokrl, "grpo_backward", poisoned)
    tr = mult_trainer(tiny, tmp_path)
    before = [p.detach().clone() for p in lora.lora_parameters(tr.net)]
    monkeypatch.setattr(tr.opt, "step", lambda *a, **k: pytest.fail("AdamW stepped on a NaN gradient"))
    with pytest.raises(training.NonFiniteLoss, match="or its gradient is not finite"):
        tr.train_step(tasks.TrainStream(tr.task, 2))
    assert all(torch.equal(p, b) for p, b in zip(lora.lora_parameters(tr.net), before))


def test_each_process_samples_from_its_own_stream_and_shares_the_others(tiny, tmp_path):
    """Two processes' Trainers (rank 0 and rank 1 of 2, built without a process group): rank 0 samples from the
    one-process run's seed, rank 1 from another, so their completions of one prompt differ; S-GRPO's selection and
    the replay draws read the same stream on both (every process computes the same selection and replay picks). The
    bug it is written for: every process seeded alike, so a group holds N copies of one process's share."""
    one = mult_trainer(tiny, tmp_path / "one")
    r0, r1 = (mult_trainer(tiny, tmp_path / f"r{r}", world=World(rank=r, size=2)) for r in (0, 1))
    assert r0.gens["sample"].initial_seed() == one.gens["sample"].initial_seed() == one.cfg.seed
    assert r1.gens["sample"].initial_seed() != r0.gens["sample"].initial_seed()
    draws = [sampling.sample(tr.net, [10, 20, 30], 4, 6, temperature=1.0, generator=tr.gens["sample"]) for tr in (r0, r1)]
    assert draws[0] != draws[1]
    assert torch.equal(r0.gens["select"].get_state(), r1.gens["select"].get_state())
    assert r0.gens["replay"].getstate() == r1.gens["replay"].getstate()
