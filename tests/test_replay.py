"""T-SPMO's replay pool (replay.py): the paper's "set of all previously generated completions, each
associated with a scalar reward", against the ablation that replays only the current group.

The groups are built by hand: model.sample is replaced by a script that returns, for each fresh prompt, the
completions the test chose, and for each replay, continuations that complete the replayed completion's own text. The
reward is the real one (P1 on the multiplication task), so what a replay scores against is what the test checks."""
from __future__ import annotations

import random
import re

import pytest
import torch

import lora
import model as M
import tasks
import settings
import tokrl
import training
from replay import ReplayPool

PAIRS = [(11, 11), (12, 12), (13, 13), (14, 14)]  # the problems of steps 1, 2, 3, 4: answers 121, 144, 169, 196


class Script:
    """model.sample for a scripted run. `plan` lists, call by call, either a fresh group (a list of G texts) or
    ("replay", text): continuations that complete `text` from whatever cut the replay chose. Records each call's
    problem (read off the prompt) and prefix."""

    def __init__(self, tok: M.Tokenizer, plan: list):
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
    monkeypatch.setattr(M, "sample", script)
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
