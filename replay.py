"""T-SPMO's replay pool: the completions a run has generated, each with its problem, its reward and its step.

The paper: "Let R denote the set of all previously generated completions, each associated with a scalar reward R",
split by a threshold r into R_success = {R ≥ r} and R_fail = {R < r}; at each update step C_success completions are
picked from the first and C_failure from the second, each restarted from a random cut of its own tokens.

    pool (--replay-pool history, the default)     every completion of every fresh group generated so far in the run
                                                  (this step's groups included: replay follows their update)
    pool (--replay-pool group, an ablation)        the G completions just generated for this prompt only

A completion keeps its own problem (the example its reward reads, whose prompt it continues) and its own reward,
measured once, when it was generated: a replay restarts from that problem's prompt and scores its continuations
against that problem, whatever the current step's problem is. [decided] (SPEC.md) replay continuations do not join
the pool: they continue a prefix; they are not completions of the problem drawn from the policy.

Layout (compact: at the paper's scale, 350 steps × 50 completions × up to 300 tokens, about 5 M token ids):

    tokens   int32   every completion's ids, one after another     completion i = tokens[ends[i-1]:ends[i]]
    entropy  float32 H of the distribution each token was drawn from, beside it (--replay-cut entropy only; else empty)
    ends     int64   the end offset of each completion
    problem  int32   index into `problems` (one entry per fresh group: the task's own example object)
    reward   float64 R_i, as scored when generated
    step     int32   the training step that generated it (1-based, as metrics.jsonl counts)
    success  int32   indices with R ≥ r, in the order they joined    failure  int32   indices with R < r

Where a replay branches (--replay-cut): the cut j restarts from prompt + y[:j] (0-based: the prefix y_1 … y_j of
the paper's 1-based notation) and draws y[j] again. uniform, the paper's: j uniform in [0, |y| − 1] (training.py
draws it). entropy (B1, beyond the paper): P(j) ∝ H_j, the entropy of the distribution y[j] was drawn from, the one
the replay draws from again (cut_probabilities, entropy_cut):

    y        y[0]   y[1]   y[2]   y[3]=EOS        cut j = 2: prefix prompt + y[0] y[1]; y[2], y[3] drawn again
    H        0.00   0.90   0.30   0.00            P(j) = (0, 0.75, 0.25, 0)

The pool is part of a run's state: `state()` goes into each checkpoint's state.pt and `from_state` gives it back, so
a resumed run draws the same replays as an uninterrupted one. With N processes every process holds the whole pool
(every process holds the whole group, distributed.py) and draws from the same replay RNG: the pools and the picks
are the same everywhere.
"""
from __future__ import annotations

import math
import random
from array import array
from collections.abc import Sequence

import torch


def cut_probabilities(entropies: Sequence[float]) -> list[float]:
    """P(j) for the cut j in [0, |y| − 1] of a completion y, entropies[j] = H_j the entropy (nats) of the distribution
    y[j] was drawn from: the token the cut draws again. Uniform when every H_j is 0 (nothing to prefer)."""
    total = math.fsum(entropies)
    if total == 0:
        return [1 / len(entropies)] * len(entropies)
    # [decided] (SPEC.md, B1) P(j) ∝ H_j of y[j], the token the replay redraws; all H_j = 0: uniform
    return [h / total for h in entropies]  # [B1] P(j) = H_j / Σ_k H_k


def entropy_cut(rng: random.Random, entropies: Sequence[float]) -> int:
    """One cut j with cut_probabilities' P(j), from one rng.random() (random.choices' inverse of the cumulative sum)."""
    return rng.choices(range(len(entropies)), weights=cut_probabilities(entropies))[0]


class ReplayPool:
    def __init__(self, threshold: float, entropy: bool = False):
        self.threshold = threshold  # r: R ≥ r is a success ([decided] (SPEC.md) r = 1.0 by default)
        self.keeps_entropy = entropy  # one H a token, for --replay-cut entropy; the paper's uniform cut needs none
        self.tokens, self.entropy, self.ends = array("i"), array("f"), array("q")
        self.problem, self.reward, self.step = array("i"), array("d"), array("i")
        self.success, self.failure = array("i"), array("i")
        self.problems: list = []

    def __len__(self) -> int:
        return len(self.ends)

    def add_group(self, example, completions: Sequence[Sequence[int]], rewards: Sequence[float], step: int,
                  entropies: Sequence[Sequence[float]] | None = None) -> None:
        """One fresh group: G completions of one problem, with their rewards, generated at `step`; a pool that keeps
        entropies takes each completion's, one H a token (sampling.sample's)."""
        if (entropies is not None) != self.keeps_entropy or (
                entropies is not None and [len(h) for h in entropies] != [len(y) for y in completions]):
            raise ValueError("a pool with --replay-cut entropy takes one entropy a token, and only such a pool does")
        self.problems.append(example)
        for k, (y, r) in enumerate(zip(completions, rewards)):
            i = len(self.ends)
            self.tokens.extend(y)
            if entropies is not None:
                self.entropy.extend(entropies[k])
            self.ends.append(len(self.tokens))
            self.problem.append(len(self.problems) - 1)
            self.reward.append(float(r))
            self.step.append(step)
            (self.success if r >= self.threshold else self.failure).append(i)  # R_success = {y : R(y) ≥ r}

    def completion(self, i: int) -> list[int]:
        return self.tokens[self.ends[i - 1] if i else 0: self.ends[i]].tolist()

    def entropies(self, i: int) -> list[float]:
        """H_j of completion i's tokens, as float32 held them."""
        return self.entropy[self.ends[i - 1] if i else 0: self.ends[i]].tolist()

    def example(self, i: int):
        return self.problems[self.problem[i]]

    def draw(self, rng: random.Random, n_success: int, n_failure: int) -> list[int]:
        """C_success indices uniformly from R_success and C_failure from R_fail, without repeats (fewer if a subset
        is smaller). The draws depend only on the two subsets' sizes, so a pool that holds one group draws as that
        group alone would (--replay-pool group)."""
        return (rng.sample(self.success, min(n_success, len(self.success))) +
                rng.sample(self.failure, min(n_failure, len(self.failure))))

    def nbytes(self) -> int:
        """The arrays' bytes (the examples themselves not counted: one small object per fresh group)."""
        return sum(a.itemsize * len(a) for a in (self.tokens, self.entropy, self.ends, self.problem, self.reward,
                                                  self.step, self.success, self.failure))

    # -- a checkpoint's share ---------------------------------------------------------------------------------------

    ARRAYS = {"tokens": torch.int32, "entropy": torch.float32, "ends": torch.int64, "problem": torch.int32,
              "reward": torch.float64, "step": torch.int32, "success": torch.int32, "failure": torch.int32}

    def state(self) -> dict:
        """Tensors (loadable with torch.load(weights_only=True)) and the examples, as the task made them."""
        out = {name: torch.frombuffer(getattr(self, name), dtype=dtype).clone() if len(getattr(self, name)) else
               torch.zeros(0, dtype=dtype) for name, dtype in self.ARRAYS.items()}  # one copy, no Python ints
        return {**out, "threshold": self.threshold, "keeps_entropy": self.keeps_entropy,
                "problems": list(self.problems)}

    @classmethod
    def from_state(cls, state: dict) -> ReplayPool:
        pool = cls(state["threshold"], bool(state.get("keeps_entropy", False)))
        for name in cls.ARRAYS:
            if name == "entropy" and name not in state:  # saved by a run of the paper's uniform cut: none kept
                continue
            getattr(pool, name).frombytes(state[name].to(cls.ARRAYS[name]).contiguous().numpy().tobytes())
        pool.problems = list(state["problems"])
        return pool
