"""The tasks: each gives its examples, its prompt, its stop rule and its reward.

    mult   3×3-digit multiplication (paper Appendix A), exact match of the last integer (P1)
    svamp  SVAMP (Patel et al. 2021), 700 train / 300 test, exact match (P1)
    gsm8k  GSM8K (Cobbe et al. 2021), 7,473 train / 1,319 test, our extension, the SymPy oracle (S1)

SVAMP's and GSM8K's files ship in data/ (their licences and provenance beside them): no task needs the network.

A task's training stream draws all its randomness from one seeded `random.Random`; `TrainStream` counts the examples
drawn, and that count (the data position) is what a checkpoint records.
"""
from __future__ import annotations

import functools
import json
import math
import random
import re
import reprlib
from pathlib import Path

import tokenizer
from reward import exact_match_reward, partial_credit_reward, sympy_reward
from values import is_number


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and the record)."""


class Task:
    name = ""
    mult_prompt = False
    REWARDS: tuple[str, ...] = ("exact",)  # the --reward choices; the first is the paper's (the default)
    reward_name: str | None = None  # the training reward chosen (None: REWARDS[0]); make_task sets it

    def __init__(self, tokenizer: tokenizer.Tokenizer):
        self.tok = tokenizer

    def prompt(self, ex) -> str: ...

    def reward(self, text: str, ex) -> float:
        """The training reward (the one --reward chose)."""
        ...

    def eval_reward(self, text: str, ex) -> float:
        """The reward whose mean is the test accuracy: the task's default, whatever --reward trains with."""
        return self.reward(text, ex)

    def eval_details(self, text: str, ex) -> dict[str, float]:
        """Finer measures than the reward, averaged over the test set in each evaluation (eval.jsonl)."""
        return {}

    def stop(self, prefix=()):
        """A per-row stop rule for sampling (None: EOS and max_new_tokens only); `prefix`: completion tokens that
        precede the sampled ones (a replay's cut), which the rule reads too."""
        return None

    def train_stream(self, rng: random.Random):
        """Training examples, one per step, forever; all randomness from `rng` (see TrainStream)."""
        ...

    def test_set(self) -> list: ...

    def train_set(self) -> list:
        """Training examples whose prompts include the longest the stream can give (checks.py measures them): the
        fixed training list; for a task that generates its examples (mult: every prompt has one format, 3 digits ×
        3 digits), the test examples stand for them."""
        return self.test_set()


class Mult(Task):
    """3×3-digit multiplication (paper Appendix A). A, B uniform in [101, 999]."""

    name = "mult"
    REWARDS = ("exact", "partial")  # the paper's exact match; S2's partial credit (the literature review)
    TEST_SEED, TEST_SIZE = 20250429, 3000  # the test set is fixed: the same on every run, whatever --seed

    @functools.cached_property
    def _test(self) -> list[tuple[int, int]]:
        rng, pairs = random.Random(self.TEST_SEED), {}
        while len(pairs) < self.TEST_SIZE:
            ab = (rng.randint(101, 999), rng.randint(101, 999))
            pairs.setdefault(ab, None)  # distinct pairs, in order of first draw
        return list(pairs)

    def test_set(self):
        return self._test

    def train_stream(self, rng):
        test = set(self._test)
        while True:
            ab = (rng.randint(101, 999), rng.randint(101, 999))
            if ab not in test:  # training pairs exclude the test pairs
                yield ab

    def prompt(self, ex):
        a, b = ex  # [decided] (SPEC.md) Appendix A rendered in Qwen's ChatML, the assistant turn prefilled
        return tokenizer.chatml("You are a helpful AI assistant.", f"What's {a} multiplied by {b}? Don't use a calculator.",
                        "Let's break this problem down step by step.")

    def reward(self, text, ex):
        if self.reward_name == "partial":
            return partial_credit_reward(text, ex[0], ex[1])  # S2: the fraction of the long-multiplication steps
        return self.eval_reward(text, ex)

    def eval_reward(self, text, ex):
        return exact_match_reward(text, ex[0] * ex[1])  # P1: the last integer == A·B

    def eval_details(self, text, ex):
        return {"partial_credit": partial_credit_reward(text, ex[0], ex[1])}  # S2: which steps were right


def _line_stop(tok: tokenizer.Tokenizer, begun: re.Pattern, prefix=()):
    """Stop a row at the first newline after `begun` has matched (checked only when a token holds a newline)."""
    piece = functools.lru_cache(maxsize=None)(lambda t: tok.decode([t], skip_special_tokens=False))

    def stop(tokens: list[int]) -> bool:
        if "\n" not in piece(tokens[-1]):
            return False
        text = tok.decode(list(prefix) + tokens)
        return bool(begun.search(text[: text.rfind("\n")]))

    return stop


DATA_DIR = Path(__file__).resolve().parent / "data"  # data shipped with the project
MAX_TEXT_CHARS = 100_000  # the most text one record may hold (GSM8K's longest question and answer: 1,689)


def read_text(file: Path) -> str:
    """A data file's text, which must be UTF-8 (a byte-order mark is allowed); the first byte that is not is named
    with its line and column."""
    try:
        data = file.read_bytes()
    except OSError as e:
        raise DataError(f"{file}: cannot read it ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line, column = data.count(b"\n", 0, e.start) + 1, e.start - data.rfind(b"\n", 0, e.start)
        raise DataError(f"{file}: line {line} is not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); save "
                        "the file as UTF-8") from None


class Svamp(Task):
    """SVAMP (Patel et al. 2021), 700 train / 300 test; prompt of paper Appendix A-B."""

    name = "svamp"
    SHIPPED = DATA_DIR / "svamp"  # the 700/300 (ChilleD/SVAMP) split the paper's n = 300 numbers use, MIT
    SPLIT_SEED = 0  # a lone SVAMP.json is split with this seed, whatever --seed: one test set for every run

    def __init__(self, tokenizer, data: str | None, split_seed: int = SPLIT_SEED):
        super().__init__(tokenizer)
        self.train, self.test, self.split_note = self.load(data, split_seed)

    @classmethod
    def load(cls, data: str | None, seed: int = SPLIT_SEED):
        """`data`: a directory with train.json + test.json, or a SVAMP.json (file, or a directory holding one),
        split 70/30 with `seed`. None: the shipped 700/300 split (data/svamp/), no network needed."""
        path = Path(data) if data else cls.SHIPPED
        if path.is_dir() and (path / "train.json").is_file() and (path / "test.json").is_file():
            return cls.read(path / "train.json"), cls.read(path / "test.json"), f"train/test files in {path}"
        file = path / "SVAMP.json" if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"{path}: no SVAMP data (a directory with train.json and test.json, or SVAMP.json)")
        records = cls.read(file)
        if len(records) < 2:  # round(0.7 × 1) = 1: one record splits into no test example
            raise DataError(f"{file}: {len(records)} record, which the 70/30 split leaves with no test example; "
                            "allowed: at least 2 records (or train.json and test.json in a directory)")
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)  # no split files: a seeded 70/30 split, reported at start
        n_train = round(0.7 * len(records))
        note = (f"seeded split (seed {seed}) of {file}: {n_train} train / {len(records) - n_train} test; not the "
                f"paper's split (the default, {cls.SHIPPED}, is)")
        return [records[i] for i in order[:n_train]], [records[i] for i in order[n_train:]], note

    @staticmethod
    def read(file: Path) -> list[dict]:
        text = read_text(file)
        try:
            records = json.loads(text)
        except (ValueError, RecursionError) as e:  # bad JSON, or an integer of 5,000 digits
            raise DataError(f"{file}: cannot read SVAMP JSON ({e})") from None
        if not isinstance(records, list) or not records:
            raise DataError(f"{file}: expected a non-empty JSON list of SVAMP records")
        for i, r in enumerate(records):
            if (problem := Svamp.record_problem(r)) is not None:
                rid = str(r.get("ID", "no ID"))[:40] if isinstance(r, dict) else type(r).__name__
                raise DataError(f"{file}: record {i} ({rid}): {problem}")
        return records

    @staticmethod
    def record_problem(r) -> str | None:
        """What is wrong with one SVAMP record (None: nothing), down to an Answer the reward can read."""
        if not (isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("Body", "Question")) and
                is_number(r.get("Answer"))):
            return "needs string Body and Question and a numeric Answer"
        if not math.isfinite(r["Answer"]):
            return f"Answer {r['Answer']} is not a finite number"
        if r["Answer"] != int(r["Answer"]):  # P1 compares it with the completion's last integer
            return (f"Answer {r['Answer']} is not an integer, and exact match (P1) reads a completion's last integer: "
                    "no completion can score it")
        if (n := len(r["Body"]) + len(r["Question"])) > MAX_TEXT_CHARS:
            return f"Body and Question hold {n:,} characters; allowed: at most {MAX_TEXT_CHARS:,}"
        return None

    def train_set(self):
        return self.train

    def train_stream(self, rng):
        while True:  # epochs in a fresh shuffled order
            order = list(range(len(self.train)))
            rng.shuffle(order)
            yield from (self.train[i] for i in order)

    def test_set(self):
        return self.test

    def prompt(self, ex):
        return f"Problem: {ex['Body'].strip()} {ex['Question'].strip()}\nAnswer:"

    def reward(self, text, ex):
        return exact_match_reward(text, ex["Answer"])  # P1

    def stop(self, prefix=()):
        # [decided] (SPEC.md) stop at the first newline after the answer has begun (the prompt asks for one number)
        return _line_stop(self.tok, re.compile(r"\S"), prefix)


class Gsm8k(Task):
    """GSM8K (Cobbe et al. 2021): our extension, with the SymPy oracle (S1) as the reward."""

    name = "gsm8k"
    REWARDS = ("sympy",)
    SHIPPED = DATA_DIR / "gsm8k"  # openai/grade-school-math's 7,473 train / 1,319 test, MIT

    def __init__(self, tokenizer, data: str | None):
        """`data`: a directory with train.jsonl + test.jsonl; None: the shipped files (data/gsm8k/), no network."""
        super().__init__(tokenizer)
        path = Path(data) if data else self.SHIPPED
        self.train, self.test = self.read(path / "train.jsonl"), self.read(path / "test.jsonl")

    @staticmethod
    def read(file: Path) -> list[dict]:
        if not file.is_file():
            raise DataError(f"{file}: GSM8K file not found (a directory with train.jsonl and test.jsonl)")
        out = []
        for i, line in enumerate(read_text(file).splitlines()):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except (ValueError, RecursionError):  # bad JSON, or an integer of 5,000 digits
                r = None
            if (problem := Gsm8k.record_problem(r)) is not None:
                raise DataError(f"{file}: line {i + 1} {problem}")
            out.append({"question": r["question"], "answer": r["answer"].rsplit("####", 1)[1].strip().replace(",", "")})
        if not out:
            raise DataError(f"{file}: no records")
        return out

    @staticmethod
    def record_problem(r) -> str | None:
        """What is wrong with one GSM8K line, parsed (None: nothing), down to an answer the SymPy reward can read."""
        if not (isinstance(r, dict) and isinstance(r.get("question"), str) and isinstance(r.get("answer"), str) and
                r["answer"].rsplit("####", 1)[-1].strip() and "####" in r["answer"]):
            return 'is not a GSM8K record ({"question": ..., "answer": "... #### N"})'
        if (n := len(r["question"]) + len(r["answer"])) > MAX_TEXT_CHARS:
            return f"holds {n:,} characters of question and answer; allowed: at most {MAX_TEXT_CHARS:,}"
        answer = r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        try:
            sympy_reward("", answer)  # S1's oracle reads the ground truth first
        except ValueError:
            return f"has the answer {reprlib.repr(answer)} after '####', which the SymPy reward cannot read as a number"
        return None

    train_set, train_stream = Svamp.train_set, Svamp.train_stream

    def test_set(self):
        return self.test

    def prompt(self, ex):  # ours: the paper has no GSM8K prompt
        return f"Problem: {ex['question'].strip()}\nSolve it step by step, then give the final answer after '####'.\n"

    def reward(self, text, ex):
        return sympy_reward(text, ex["answer"])  # S1

    def stop(self, prefix=()):
        return _line_stop(self.tok, re.compile(r"####\s*\S"), prefix)


TASKS = {"mult": Mult, "svamp": Svamp, "gsm8k": Gsm8k}


def check_reward(task: str, reward: str | None) -> str:
    """The training reward for `task` (None: its default); a reward that does not fit the task is refused."""
    choices = TASKS[task].REWARDS if task in TASKS else ("exact",)
    if reward is None:
        return choices[0]
    if reward not in choices:
        raise ValueError(f"--reward {reward} does not fit --task {task}: choose {' or '.join(choices)}")
    return reward


def make_task(name: str, tokenizer: tokenizer.Tokenizer, data: str | None = None, reward: str | None = None) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose mult, svamp or gsm8k")
    task = TASKS[name](tokenizer) if name == "mult" else TASKS[name](tokenizer, data)
    task.reward_name = check_reward(name, reward)
    return task


class TrainStream:
    """A task's training stream and its position: how many examples it has given.

    A checkpoint records the position; a resume rebuilds the stream from its seed and skips that many examples, so it
    gives the very examples an uninterrupted run would give next, whatever the stream does with its RNG: SVAMP and
    GSM8K shuffle a whole epoch at once, so the RNG's state alone does not say where in the epoch a run stands.
    Skipping is cheap: at most steps × accum examples (3,600 for the paper's longest run), none loaded twice."""

    def __init__(self, task: Task, seed: int, position: int = 0):
        self.examples = task.train_stream(random.Random(seed))
        self.position = 0
        for _ in range(position):
            next(self)

    def __iter__(self):
        return self

    def __next__(self):
        self.position += 1
        return next(self.examples)
