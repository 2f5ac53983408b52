"""T-SPMO's replay pool (replay.py): the paper's "set of all previously generated completions, each
associated with a scalar reward", against the ablation that replays only the current group.

The groups are built by hand: sampling.sample is replaced by a script that returns, for each fresh prompt, the
completions the test chose, and for each replay, continuations that complete the replayed completion's own text. The
reward is the real one (P1 on the multiplication task), so what a replay scores against is what the test checks.

Where a replay branches (--replay-cut): the paper's uniform cut pinned to its draws of the replay generator; B1's
entropy cut, P(j) ∝ H_j of the redrawn token y[j], checked exactly (its probabilities, and draws on an even grid of
[0, 1)) and by chi-square, with the all-zero fallback; through the trainer, every cut lands on the one token whose H
is not 0; the pool's entropies through a checkpoint; through train.main, an entropy-cut run resumes bit-exactly and
--replay-cut uniform is the run without the flag."""
from __future__ import annotations

import collections
import json
import random
import re
import shutil

import pytest
import torch

import checkpoints
import lora
import sampling
import tokenizer
import replay
import tasks
import settings
import test_faults as faults
import tokrl
import train
import training
from replay import ReplayPool

PAIRS = [(11, 11), (12, 12), (13, 13), (14, 14)]  # the problems of steps 1, 2, 3, 4: answers 121, 144, 169, 196


class Script:
    """sampling.sample for a scripted run. `plan` lists, call by call, either a fresh group (a list of G texts) or
    ("replay", text): continuations that complete `text` from whatever cut the replay chose. Records each call's
    problem (read off the prompt) and prefix."""

    def __init__(self, tok: tokenizer.Tokenizer, plan: list):
        self.tok, self.plan, self.calls, self.limits = tok, list(plan), [], []

    def __call__(self, net, prompt, n, max_new_tokens, **kw):
        text = self.tok.decode(list(prompt))
        a, b = map(int, re.search(r"What's (\d+) multiplied by (\d+)\?", text).groups())
        prefix = text.split("step by step.", 1)[1]  # the replayed cut, after the prefilled opener
        self.calls.append(((a, b), prefix))
        self.limits.append(max_new_tokens)
        assert self.plan, f"an unplanned sample call for {(a, b)} after {prefix!r}"
        what = self.plan.pop(0)
        if isinstance(what, tuple):  # a replay: finish the replayed completion's own text
            assert what[1].startswith(prefix), f"replay of {what[1]!r} cut at {prefix!r}"
            return [self.tok.encode(what[1][len(prefix):])] * n
        assert prefix == "" and len(what) == n
        return [self.tok.encode(t) for t in what]


def trainer(tiny, tmp_path, monkeypatch, **kw) -> training.Trainer:
    cfg = settings.Settings(**{**settings.paper_defaults("tspmo", "mult"), "device": "cpu", "group_size": 4,
                            "max_new_tokens": 12, "lora_fraction": 0.5, "model": str(tiny), "seed": 3, **kw})
    monkeypatch.setattr(tasks.Mult, "train_stream", lambda self, rng: iter(PAIRS))
    net, tok, eos = training.load_everything(cfg)
    lora.apply_lora(net, cfg.lora_rank, cfg.lora_fraction, generator=torch.Generator().manual_seed(0))
    return training.Trainer(cfg, tmp_path, net, tok, tasks.make_task("mult", tok), eos)


def run_steps(tr: training.Trainer, script: Script, monkeypatch, steps: int) -> list[dict]:
    monkeypatch.setattr(sampling, "sample", script)
    stream, out = tasks.TrainStream(tr.task, 0), []
    for _ in range(steps):
        m = tr.train_step(stream)
        tr.step = m["step"]
        out.append(m)
    assert script.plan == [], f"planned calls never made: {script.plan}"
    return out


STEP1 = ["121", "5", "6", "7"]  # one success (11·11 = 121), three failures
NONE2 = ["8", "9", "1", "2"]  # no success for 12·12
NONE3 = ["3", "4", "5", "6"]  # no success for 13·13


def test_history_replays_a_step_1_success_at_step_3_against_its_own_problem(tiny, tmp_path, monkeypatch):
    """Steps 2 and 3 generate no success; the pool still holds step 1's "121", so each step replays it, from 11 × 11's
    prompt, and its continuations score 1 against 11 × 11 (they would score 0 against 12 × 12 or 13 × 13)."""
    tr = trainer(tiny, tmp_path, monkeypatch)  # --replay-pool history: the default
    plan = [STEP1, ("replay", "121"), NONE2, ("replay", "121"), NONE3, ("replay", "121")]
    script = Script(tr.tok, plan)
    ms = run_steps(tr, script, monkeypatch, 3)
    replays = [m["replays"] for m in ms]
    assert [len(r) for r in replays] == [1, 1, 1]
    for r in replays:
        assert (r[0]["replay_source_step"], r[0]["replay_source_reward"], r[0]["replay_reward"]) == (1, 1.0, 1.0)
    replay_calls = [script.calls[i] for i in (1, 3, 5)]
    assert [problem for problem, _ in replay_calls] == [(11, 11)] * 3  # its own problem's prompt, not 12 or 13
    assert [problem for problem, _ in (script.calls[i] for i in (0, 2, 4))] == PAIRS[:3]  # the fresh prompts
    assert len(tr.pool) == 12 and list(tr.pool.success) == [0] and list(tr.pool.step) == [1] * 4 + [2] * 4 + [3] * 4


def test_group_pool_replays_nothing_when_the_step_has_no_success(tiny, tmp_path, monkeypatch):
    """The ablation: only the G completions just generated. Step 1 replays its own success; steps 2 and 3 have none."""
    tr = trainer(tiny, tmp_path, monkeypatch, replay_pool="group")
    ms = run_steps(tr, Script(tr.tok, [STEP1, ("replay", "121"), NONE2, NONE3]), monkeypatch, 3)
    assert [len(m["replays"]) for m in ms] == [1, 0, 0]
    assert len(tr.pool) == 0  # nothing kept between steps


def test_failures_are_drawn_from_earlier_problems_with_their_own_rewards(tiny, tmp_path, monkeypatch):
    """C_failure = 1, C_success = 0. Step 1 (11 × 11) writes "144" three times: failures for 11 × 11. Step 2 (12 × 12)
    writes "144" four times: all successes, no failure of its own. Step 2's replay draws a step-1 "144" as the
    failure it was (reward 0), restarts it from 11 × 11's prompt, and scores its continuations against 11 × 11: 0.
    Scored against the current problem, 12 × 12, they would be 1."""
    tr = trainer(tiny, tmp_path, monkeypatch, replay_success=0, replay_failure=1)
    step1, step2 = ["144", "144", "144", "121"], ["144"] * 4
    script = Script(tr.tok, [step1, ("replay", "144"), step2, ("replay", "144")])
    ms = run_steps(tr, script, monkeypatch, 2)
    r = ms[1]["replays"]
    assert len(r) == 1 and (r[0]["replay_source_step"], r[0]["replay_source_reward"], r[0]["replay_reward"]) == \
        (1, 0.0, 0.0)
    assert script.calls[3][0] == (11, 11)
    assert list(tr.pool.failure) == [0, 1, 2] and list(tr.pool.reward) == [0.0, 0.0, 0.0, 1.0] + [1.0] * 4
    # the ablation has no failure to draw at step 2
    tr = trainer(tiny, tmp_path, monkeypatch, replay_success=0, replay_failure=1, replay_pool="group")
    ms = run_steps(tr, Script(tr.tok, [step1, ("replay", "144"), step2]), monkeypatch, 2)
    assert [len(m["replays"]) for m in ms] == [1, 0]


class EndOfRange(random.Random):
    """The replay generator, with every cut drawn at one end of the range the trainer asks randint for."""

    def __init__(self, end: str):
        super().__init__(0)
        self.end = end

    def randint(self, a: int, b: int) -> int:
        return a if self.end == "low" else b


@pytest.mark.parametrize("end,cut", [("low", 0), ("high", 2)])
def test_a_replay_cut_is_a_strict_prefix_of_its_source_completion(tiny, tmp_path, monkeypatch, end, cut):
    """The cut j is uniform in [0, |y| − 1], and the replay restarts from prompt + y_1 … y_j: at its highest the prefix
    leaves y's last token (EOS, when y has one) to be generated again, never the whole completion. "121" is three
    byte tokens: j is 0 at the bottom of the range and 2 at its top (a cut of 3 would replay all of "121")."""
    tr = trainer(tiny, tmp_path, monkeypatch)
    tr.gens["replay"] = EndOfRange(end)
    script = Script(tr.tok, [STEP1, ("replay", "121")])
    [m] = run_steps(tr, script, monkeypatch, 1)
    [r] = m["replays"]
    prefix = script.calls[1][1]  # the replay's prompt after the prefilled opener: the cut's tokens
    assert r["replay_cut"] == cut and prefix == "121"[:cut] and len(prefix) < len("121")


def test_a_replayed_update_continues_its_own_prompt_and_prefix_and_scores_against_its_own_problem(
        tiny, tmp_path, monkeypatch):
    """What the replayed group's T-SPMO update is given, read off the real tokrl.tspmo_backward as it runs: at step 2
    (12 × 12, no success of its own) the history pool replays step 1's "121", cut at j = 2 (the top of its range).
    The update's prompt is 11 × 11's prompt followed by y[:2] = "12", its completions are the continuations ("1"),
    sampled with --max-new-tokens − 2 new tokens, and its rewards are theirs against 11 × 11 (1; against 12 × 12,
    the step's own problem, they would be 0). The bugs it is written for: the update scored after the bare prompt,
    the continuations scored against the current problem or without their prefix, the length limit not counting the
    prefix."""
    tr = trainer(tiny, tmp_path, monkeypatch)
    tr.gens["replay"] = EndOfRange("high")
    updates, real = [], tokrl.tspmo_backward

    def recording(net, prompt, completions, rewards, **kw):
        updates.append((list(prompt), [list(y) for y in completions], list(rewards)))
        return real(net, prompt, completions, rewards, **kw)

    monkeypatch.setattr(tokrl, "tspmo_backward", recording)
    script = Script(tr.tok, [STEP1, ("replay", "121"), NONE2, ("replay", "121")])
    ms = run_steps(tr, script, monkeypatch, 2)
    assert len(updates) == 4  # step 1: fresh, replay; step 2: fresh, replay
    enc = tr.tok.encode
    prompt_11, prompt_12 = (enc(tr.task.prompt(pair)) for pair in PAIRS[:2])
    [r] = ms[1]["replays"]
    assert (r["replay_cut"], r["replay_source_step"]) == (2, 1)
    prompt, completions, rewards = updates[3]
    assert prompt == prompt_11 + enc("12") and prompt != prompt_11
    assert completions == [enc("1")] * 4 and rewards == [1.0] * 4
    assert tr.task.reward("121", PAIRS[1]) == 0.0  # scored against 12 × 12 they would fail
    assert updates[2][0] == prompt_12  # the step's own fresh group, after its own bare prompt
    assert script.limits == [tr.cfg.max_new_tokens, tr.cfg.max_new_tokens - 2] * 2


# --- the pool itself -----------------------------------------------------------------------------------------------

def filled(threshold=1.0) -> ReplayPool:
    pool = ReplayPool(threshold)
    pool.add_group((11, 11), [[1, 2, 3], [4], [5, 6]], [1.0, 0.0, 0.5], step=1)
    pool.add_group({"ID": "chal-1", "Answer": 3.0}, [[151935, 7]], [1.0], step=2)
    return pool


def test_the_pool_keeps_each_completion_with_its_problem_reward_and_step():
    pool = filled()
    assert len(pool) == 4 and [pool.completion(i) for i in range(4)] == [[1, 2, 3], [4], [5, 6], [151935, 7]]
    assert [pool.example(i) for i in range(4)] == [(11, 11)] * 3 + [{"ID": "chal-1", "Answer": 3.0}]
    assert list(pool.step) == [1, 1, 1, 2] and list(pool.reward) == [1.0, 0.0, 0.5, 1.0]
    assert (list(pool.success), list(pool.failure)) == ([0, 3], [1, 2])  # R ≥ r = 1.0; 0.5 is a failure
    assert (list(filled(0.5).success), list(filled(0.5).failure)) == ([0, 2, 3], [1])
    # compact: 4 bytes a token id, 8 an end offset, 4 + 8 + 4 per completion, 4 in one of the two subsets
    assert pool.nbytes() == 4 * 8 + 8 * 4 + (4 + 8 + 4) * 4 + 4 * 4


def test_draws_are_uniform_without_repeats_and_from_the_right_subset():
    pool = filled()
    rng, counts = random.Random(0), {0: 0, 3: 0}
    for _ in range(4000):
        picks = pool.draw(rng, 1, 0)
        counts[picks[0]] += 1
    assert 1850 < counts[0] < 2150  # uniform over R_success = {0, 3}: 2,000 each, ±5σ ≈ ±160
    assert sorted(pool.draw(rng, 5, 5)) == [0, 1, 2, 3]  # fewer if a subset is smaller, never a repeat
    assert pool.draw(rng, 0, 1)[0] in (1, 2)


def test_failures_are_drawn_as_many_as_asked_whatever_the_successes():
    """C_failure counts failures only: a pool with no success still gives C_failure failures (and one with one
    success, three). The bug it is written for: C_failure capped by the number of successes (a copy-paste slip)."""
    pool = ReplayPool(1.0)
    pool.add_group((12, 12), [[1], [2], [3], [4]], [0.0, 0.0, 0.5, 0.0], step=1)
    rng = random.Random(0)
    picks = pool.draw(rng, 1, 2)
    assert len(picks) == 2 and set(picks) <= {0, 1, 2, 3} and len(set(picks)) == 2
    pool.add_group((11, 11), [[5]], [1.0], step=2)
    picks = pool.draw(rng, 1, 3)
    assert picks[0] == 4 and len(picks) == 4 and set(picks[1:]) <= {0, 1, 2, 3}


@pytest.mark.parametrize("threshold", [1.0, 0.5])
def test_the_pool_round_trips_through_a_checkpoint_s_weights_only_load(tmp_path, threshold):
    """Every array, the problems and the threshold r come back; a completion added after the round trip is split by
    the same r (0.5: a reward of 0.5 is a success; 1.0: a failure). The bug it is written for: the pool's resume
    state forgetting --replay-threshold, or its problems."""
    pool = filled(threshold)
    torch.save({"replay_pool": pool.state()}, tmp_path / "state.pt")
    back = ReplayPool.from_state(torch.load(tmp_path / "state.pt", weights_only=True)["replay_pool"])
    for name in ReplayPool.ARRAYS:
        assert getattr(back, name) == getattr(pool, name), name
    assert back.problems == pool.problems and back.threshold == pool.threshold
    assert [back.completion(i) for i in range(4)] == [pool.completion(i) for i in range(4)]
    back.add_group((7, 7), [[9]], [0.5], step=3)
    assert (4 in back.success) == (threshold == 0.5)
    empty = ReplayPool.from_state(ReplayPool(1.0).state())
    assert len(empty) == 0 and empty.draw(random.Random(0), 1, 1) == []


# --- where a replay branches: the paper's uniform cut, and B1's entropy cut (--replay-cut) -----------------------

def test_the_uniform_cut_is_randint_on_the_replay_generator_after_the_pool_s_picks(tiny, tmp_path, monkeypatch):
    """--replay-cut uniform (the default) is the paper's cut, pinned to its draws: each step, pool.draw's two
    rng.sample calls, then rng.randint(0, |y| − 1) for the pick, from the replay generator (seed + 3), and nothing
    else from it. Three steps replay step 1's "121" (|y| = 3): the cuts logged are those this recipe draws from
    random.Random(3 + 3), and the pool keeps no entropies."""
    tr = trainer(tiny, tmp_path, monkeypatch)  # seed 3
    assert tr.cfg.replay_cut == "uniform" and not tr.pool.keeps_entropy
    script = Script(tr.tok, [STEP1, ("replay", "121"), NONE2, ("replay", "121"), NONE3, ("replay", "121")])
    ms = run_steps(tr, script, monkeypatch, 3)
    rng, want = random.Random(3 + 3), []
    for step in (1, 2, 3):
        failures = [i for i in range(4 * step) if i != 0]  # every completion but step 1's "121" is a failure
        assert rng.sample([0], 1) + rng.sample(failures, 0) == [0]
        want.append(rng.randint(0, 2))
    assert [m["replays"][0]["replay_cut"] for m in ms] == want and len(set(want)) > 1
    assert all("replay_cut_entropy" not in r for m in ms for r in m["replays"])
    assert [prefix for _, prefix in (script.calls[i] for i in (1, 3, 5))] == ["121"[:j] for j in want]


H = [0.5, 0.0, 1.5, 2.0]  # H_j of y[0..3]; Σ = 4: P(j) = H_j / 4 = 1/8, 0, 3/8, 1/2 (exact in binary)


class Grid(random.Random):
    """random() returns 0, 1/n, 2/n, …: n draws sweep [0, 1) evenly, so the cut counts are n·P(j) exactly."""

    def __init__(self, n: int):
        super().__init__(0)
        self.n, self.k = n, 0

    def random(self) -> float:
        self.k += 1
        return (self.k - 1) % self.n / self.n


def test_the_entropy_cut_is_proportional_to_the_entropy_of_the_redrawn_token_B1():
    """B1: P(j) ∝ H_j, the cut j in [0, |y| − 1], H_j the entropy of the distribution y[j] was drawn from (the cut
    restarts from prompt + y[:j] and draws y[j] again). The probabilities by hand, then 800 draws on an even grid of
    [0, 1): exactly 100, 0, 300, 400; then a seeded generator, 40,000 draws: the counts within chi-square's 0.1%
    bound (3 degrees of freedom: 16.27), the cut whose H is 0 never drawn, and none outside [0, |y| − 1]."""
    assert replay.cut_probabilities(H) == [1 / 8, 0.0, 3 / 8, 1 / 2]
    grid = Grid(800)
    counts = [0] * 4
    for _ in range(800):
        counts[replay.entropy_cut(grid, H)] += 1
    assert counts == [100, 0, 300, 400]
    rng, n = random.Random(0), 40_000
    seen = collections.Counter(replay.entropy_cut(rng, H) for _ in range(n))
    assert set(seen) == {0, 2, 3}
    chi2 = sum((seen[j] - n * p) ** 2 / (n * p) for j, p in enumerate(replay.cut_probabilities(H)) if p)
    assert chi2 < 16.27, (seen, chi2)


def test_a_completion_whose_entropies_are_all_0_is_cut_uniformly_B1():
    """Every H_j = 0 (greedy draws, or a policy sure of every token): nothing to prefer, the cut is uniform."""
    assert replay.cut_probabilities([0.0, 0.0, 0.0]) == [1 / 3] * 3 and replay.cut_probabilities([0.0]) == [1.0]
    grid, counts = Grid(300), [0, 0, 0]
    for _ in range(300):
        counts[replay.entropy_cut(grid, [0.0, 0.0, 0.0])] += 1
    assert counts == [100, 100, 100]


class EntropyScript(Script):
    """Script, with entropies: a fresh group sampled with entropy=True gets, for each text, the H_j the test sets
    (ENTROPIES; 0 for the others). Replays are sampled without (their continuations never join the pool)."""

    def __init__(self, tok, plan, entropies: dict[str, list[float]]):
        super().__init__(tok, plan)
        self.entropies, self.asked = entropies, []

    def __call__(self, net, prompt, n, max_new_tokens, entropy=False, **kw):
        outs = super().__call__(net, prompt, n, max_new_tokens, **kw)
        self.asked.append(entropy)
        if not entropy:
            return outs
        return outs, [self.entropies.get(self.tok.decode(y), [0.0] * len(y)) for y in outs]


@pytest.mark.parametrize("h,cut", [([0.0, 0.0, 0.75], 2), ([0.75, 0.0, 0.0], 0), ([0.0, 0.75, 0.0], 1)])
def test_an_entropy_cut_redraws_the_token_whose_entropy_it_weighs_B1(tiny, tmp_path, monkeypatch, h, cut):
    """Through Trainer.replay: "121" sampled with H = h, one H_j > 0: every cut lands at that j, the replay's prefix
    is "121"[:j] (so the token redrawn is y[j], the one whose H was weighed) and the log has replay_cut j and
    replay_cut_entropy H_j. Three steps, the pool restored in between from its state (a resume's), so the pool keeps
    each token's H beside it."""
    tr = trainer(tiny, tmp_path, monkeypatch, replay_cut="entropy")
    assert tr.pool.keeps_entropy
    plan = [STEP1, ("replay", "121"), NONE2, ("replay", "121"), NONE3, ("replay", "121")]
    script = EntropyScript(tr.tok, plan, {"121": h, "5": [0.25]})
    monkeypatch.setattr(sampling, "sample", script)
    stream, ms = tasks.TrainStream(tr.task, 0), []
    for _ in range(3):
        ms.append(tr.train_step(stream))
        tr.step = ms[-1]["step"]
        tr.pool = ReplayPool.from_state(tr.pool.state())
    assert script.asked == [True, False] * 3  # fresh groups with entropies; replays without
    assert [(r["replay_cut"], r["replay_cut_entropy"]) for m in ms for r in m["replays"]] == [(cut, 0.75)] * 3
    assert [prefix for _, prefix in (script.calls[i] for i in (1, 3, 5))] == ["121"[:cut]] * 3
    assert tr.pool.entropies(0) == h and tr.pool.entropies(1) == [0.25]
    assert len(tr.pool.entropy) == len(tr.pool.tokens) == (3 + 1 + 1 + 1) + 4 + 4


def test_the_pool_keeps_one_entropy_a_token_through_a_weights_only_checkpoint(tmp_path):
    """The entropies in one float32 array beside the token ids (4 bytes a token), through torch.save and
    torch.load(weights_only=True); a pool state without them (no entropy array, no keeps_entropy: a run of the
    paper's cut recorded without --replay-cut) loads as a pool that keeps none."""
    pool = ReplayPool(1.0, entropy=True)
    pool.add_group((11, 11), [[1, 2, 3], [4]], [1.0, 0.0], step=1, entropies=[[0.5, 0.25, 0.125], [2.0]])
    pool.add_group((12, 12), [[5, 6]], [0.0], step=2, entropies=[[0.0, 1.0 / 3]])
    torch.save({"replay_pool": pool.state()}, tmp_path / "state.pt")
    back = ReplayPool.from_state(torch.load(tmp_path / "state.pt", weights_only=True)["replay_pool"])
    assert back.keeps_entropy and back.entropy == pool.entropy
    assert [back.entropies(i) for i in range(3)] == [[0.5, 0.25, 0.125], [2.0], [0.0, torch.tensor(1 / 3).item()]]
    assert [back.completion(i) for i in range(3)] == [[1, 2, 3], [4], [5, 6]]
    assert pool.nbytes() == filled_bytes(tokens=6, completions=3, subsets=3) + 4 * 6
    old = {k: v for k, v in filled().state().items() if k not in ("entropy", "keeps_entropy")}
    back = ReplayPool.from_state(old)
    assert not back.keeps_entropy and len(back.entropy) == 0 and back.completion(3) == [151935, 7]
    with pytest.raises(ValueError, match="one entropy a token"):
        pool.add_group((13, 13), [[7, 8]], [0.0], step=3, entropies=[[0.5]])  # one H for two tokens
    with pytest.raises(ValueError, match="one entropy a token"):
        back.add_group((13, 13), [[7]], [0.0], step=3, entropies=[[0.5]])  # a pool that keeps none


def filled_bytes(tokens: int, completions: int, subsets: int) -> int:
    """A pool's bytes without entropies: 4 a token id, 8 an end offset, 4 + 8 + 4 per completion, 4 in a subset."""
    return 4 * tokens + 8 * completions + (4 + 8 + 4) * completions + 4 * subsets


# --- B1 through train.main: an entropy-cut run resumes bit-exactly; --replay-cut uniform is the run without it ------

@pytest.fixture
def cli_run(tiny, tmp_path, monkeypatch):
    """train.main on the tiny model as tests/test_faults.py runs it (T-SPMO with a success replay, 4 steps, a
    checkpoint each), with its reward that varies (a completion's length parity): returns run(name, *flags)."""
    for cls in (tasks.Mult, tasks.Svamp, tasks.Gsm8k):
        monkeypatch.setattr(cls, "reward", lambda self, text, ex: float(len(text) % 2))
    monkeypatch.setattr(checkpoints, "KEEP", faults.STEPS + 1)

    def run(name: str, *flags: str):
        out = tmp_path / name
        assert train.main(faults.argv(tiny, tmp_path, "mult", "tspmo", out, "--eval-every", "0", "--eval-limit", "1",
                                      *flags)) == 0
        return out
    return run


def test_an_entropy_cut_run_resumes_bit_exactly_from_every_step_B1(cli_run, tmp_path):
    """--replay-cut entropy through train.main: recorded in config.json, every replay logs its cut's H (the
    entropy of the distribution y[j] was drawn from: > 0 at temperature 1), the checkpoints' pools keep one H a
    token, and later steps replay completions of earlier ones, so a resumed run cuts by entropies restored from the
    checkpoint. Stopped after any step and resumed, it is the uninterrupted run, bit for bit (Trainer.replay)."""
    ref = cli_run("ref", "--replay-cut", "entropy")
    assert json.loads((ref / "config.json").read_text())["replay_cut"] == "entropy"
    metrics = checkpoints.read_jsonl(ref / "metrics.jsonl")
    replays = [(m["step"], r) for m in metrics for r in m["replays"]]
    assert len(replays) >= 2 and all(r["replay_cut_entropy"] > 0 for _, r in replays)
    assert any(r["replay_source_step"] < step for step, r in replays)
    pool = torch.load(ref / "checkpoints" / f"step-{faults.STEPS:06d}" / "state.pt", weights_only=True)["replay_pool"]
    assert pool["keeps_entropy"] and pool["entropy"].dtype == torch.float32
    assert len(pool["entropy"]) == len(pool["tokens"]) > 0 and (pool["entropy"] > 0).all()
    for k in range(1, faults.STEPS):
        run = tmp_path / f"stopped-at-{k}"
        shutil.copytree(ref, run)
        shutil.rmtree(run / "adapter")
        for later in range(k + 1, faults.STEPS + 1):
            shutil.rmtree(run / "checkpoints" / f"step-{later:06d}")
        (run / "checkpoints" / "latest").write_text(f"step-{k:06d}\n")
        assert train.main(["--resume", str(run)]) == 0
        faults.assert_same_run(ref, run)


def test_replay_cut_uniform_is_the_run_without_the_flag_and_entropy_is_not(cli_run):
    """--replay-cut uniform (recorded as such) gives the run the same command without the flag gives, bit for bit:
    adapter, optimizer, generators, pool, metrics. --replay-cut entropy cuts elsewhere (it reads the replay
    generator by random(), not randint), so its replays and its adapter differ."""
    plain, uniform, entropy = cli_run("plain"), cli_run("uniform", "--replay-cut", "uniform"), \
        cli_run("entropy", "--replay-cut", "entropy")
    assert json.loads((plain / "config.json").read_text())["replay_cut"] == "uniform"
    faults.assert_same_run(plain, uniform)
    assert replay_cuts(plain) != replay_cuts(entropy)
    a, b = faults.outcome(plain)["adapter"], faults.outcome(entropy)["adapter"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def replay_cuts(run) -> list[int]:
    return [r["replay_cut"] for m in checkpoints.read_jsonl(run / "metrics.jsonl") for r in m["replays"]]
