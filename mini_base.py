"""The miniature's model, task and bases: what `mini.py` trains the paper's methods on.

One task: 2-digit × 2-digit multiplication, the P1 reward (the last integer equals A·B), a chain of thought of three
steps, " 47*6=282 47*80=3760 282+3760=4042". One model: a Qwen2 of the real architecture at 1 M parameters, with a
character tokenizer. Two settings, each a base built by supervised fine-tuning (SFT) from seed 0, shipped in data/:

    first-token   prompt "47*86="                 The skill hides behind one rare first token. Greedy decoding mostly
    (data/mini-base/)                             writes a bare answer ("4042"), usually wrong; made to open a trace
                                                  (a space) it is right 60% of the time. RL must find that token.
    steps         prompt "47*86= " (the opener,   The paper's premise: the base always writes the chain of thought
    (data/mini-base-steps/)  as the paper's       and fails through slips inside it. At each of the trace's three
                  prefill "Let's break this       results it writes a slip (the leading digit one too high, the
                  problem down step by step.")    rest consistent) a little more often than the right digit, so
                                                  greedy decoding slips almost always, while sampling at temperature
                                                  0.3 takes each right digit often enough to be found but all three
                                                  together rarely. RL must raise three decisions spread along the
                                                  completion: token-level credit, and replay from later cuts.

Problems: fixed test and validation sets of 300 distinct pairs each, disjoint; RL trains on every other pair. The
first-token base's SFT draws from every non-test pair, the validation pairs among them (the shipped base in
data/mini-base is that SFT's, and the miniature's results are measured from it); the steps base's from the training
pairs only.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

import checkpoints
import model as M
import pretrained
import sampling
import tokenizer
import tasks
from reward import exact_match_reward

DATA = Path(__file__).resolve().parent / "data"
SHIPPED = {"first-token": DATA / "mini-base", "steps": DATA / "mini-base-steps"}  # built by build_base from seed 0
SETTINGS = tuple(SHIPPED)

say = functools.partial(print, flush=True)  # progress lines reach a log file as they happen

# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and model

CHARS = "0123456789*+= "
UNK = "<unk>"
EOS = tokenizer.ENDOFTEXT  # pretrained.eos_ids finds <|endoftext|> in any tokenizer that has it
EOS_ID = len(CHARS)
MAX_NEW_TOKENS = 40  # the longest trace, " 99*9=891 99*90=8910 891+8910=9801", is 33 characters, then EOS


def build_tokenizer(path: Path) -> None:
    """One token per character of CHARS, then EOS and <unk>: ids 0..13, 14, 15."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(CHARS)} | {EOS: len(CHARS), UNK: len(CHARS) + 1}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character its own piece
    tk.decoder = decoders.Fuse()  # join the pieces with nothing between them (WordLevel would put spaces)
    tk.add_special_tokens([AddedToken(EOS, special=True)])
    tk.save(str(path))


def mini_config() -> M.Qwen2Config:
    """Qwen2-1.5B's architecture (GQA, RoPE, SwiGLU, RMSNorm, q/k/v biases, tied embeddings) at 1/12 the width."""
    return M.Qwen2Config(vocab_size=len(CHARS) + 2, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=EOS_ID)


def build_model(seed: int) -> M.Qwen2ForCausalLM:
    net = M.Qwen2ForCausalLM(mini_config())
    net.init_weights(torch.Generator().manual_seed(seed), std=0.02)
    return net


# ----------------------------------------------------------------------------------------------------------------------
# The task: 2-digit × 2-digit multiplication, its traces and its slips


def trace(a: int, b: int) -> str:
    """The chain of thought: a times the ones digit of b, a times the tens, their sum (the last integer: a·b)."""
    return " " + steps_trace(a, b, (False, False, False))


def bare(a: int, b: int) -> str:
    return f"{a * b}"


def slip(v: int) -> int:
    """The steps setting's slip: the leading digit one too high (282 → 382, 9 → 10, 960 → 1060)."""
    return v + 10 ** (len(str(v)) - 1)


def steps_trace(a: int, b: int, slips: tuple[bool, bool, bool]) -> str:
    """The trace with a slip at each step where slips[k]; later steps compute from what was written (a slipped
    partial product is added as written), so the trace is right only when no step slipped."""
    ones, tens = b % 10, b - b % 10
    p1 = slip(a * ones) if slips[0] else a * ones
    p2 = slip(a * tens) if slips[1] else a * tens
    s = slip(p1 + p2) if slips[2] else p1 + p2
    return f"{a}*{ones}={p1} {a}*{tens}={p2} {p1}+{p2}={s}"


STEP_NAMES = ("a*ones", "a*tens", "sum")


def step_values(a: int, b: int) -> tuple[int, int, int]:
    """The right value of each step's result."""
    return a * (b % 10), a * (b - b % 10), a * b


def steps_right(text: str, a: int, b: int) -> list[bool]:
    """Whether each step's result (the k-th number after an "=") is its right value; a missing step is wrong."""
    found = re.findall(r"=(\d+)", text)
    return [k < len(found) and found[k] == str(v) for k, v in enumerate(step_values(a, b))]


TEST_SEED, VALIDATION_SEED, SPLIT_SIZE = 20250429, 20250430, 300


def _pairs(seed: int, exclude: frozenset = frozenset()) -> list[tuple[int, int]]:
    rng, pairs = random.Random(seed), {}
    while len(pairs) < SPLIT_SIZE:
        ab = (rng.randint(10, 99), rng.randint(10, 99))
        if ab not in exclude:
            pairs.setdefault(ab, None)  # distinct pairs, in order of first draw
    return list(pairs)


@functools.cache
def split(name: str) -> tuple[tuple[int, int], ...]:
    """The fixed problems of a split: "test" (the reported accuracy) or "validation" (--tune's choice), disjoint."""
    if name == "test":
        return tuple(_pairs(TEST_SEED))
    if name == "validation":
        return tuple(_pairs(VALIDATION_SEED, frozenset(split("test"))))
    raise ValueError(f"unknown split {name!r}: test or validation")


def pair_stream(rng: random.Random, exclude) -> Iterator[tuple[int, int]]:
    """A, B uniform in [10, 99], every pair in `exclude` skipped."""
    while True:
        ab = (rng.randint(10, 99), rng.randint(10, 99))
        if ab not in exclude:
            yield ab


class MiniMult(tasks.Task):
    """The miniature's task in one setting, evaluated on one split. Training pairs exclude both fixed splits."""

    name = "mini-mult"

    def __init__(self, tokenizer: tokenizer.Tokenizer, setting: str = "first-token", split_name: str = "test"):
        super().__init__(tokenizer)
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}: {' or '.join(SETTINGS)}")
        self.setting, self.split_name = setting, split_name

    def test_set(self):
        return list(split(self.split_name))  # what evaluation.evaluate scores: the test set, or --tune's validation set

    def train_stream(self, rng: random.Random):
        return pair_stream(rng, frozenset(split("test")) | frozenset(split("validation")))

    def prompt(self, ex):
        return f"{ex[0]}*{ex[1]}=" + (" " if self.setting == "steps" else "")  # steps: the opener is prefilled

    def reward(self, text, ex):
        return exact_match_reward(text, ex[0] * ex[1])  # P1: the last integer == A·B

    def eval_details(self, text: str, ex) -> dict[str, float]:
        """Logged beside the accuracy (evaluation.evaluate): the steps setting's right rate of each step (the paper's
        "token-level correctness"); the first-token setting's share of outputs that open a trace."""
        if self.setting == "steps":
            return {f"right_{name}": float(r) for name, r in zip(STEP_NAMES, steps_right(text, *ex))}
        return {"trace_rate": float(text.startswith(" "))}


# ----------------------------------------------------------------------------------------------------------------------
# Supervised fine-tuning: a base per setting


@dataclasses.dataclass(frozen=True)
class SftSettings:
    """The first-token base: traces only, then briefly 85% bare answers and 15% traces."""
    cot_steps: int = 1000  # stage 1: traces only (test accuracy of the traces about 80% at the end)
    mix_steps: int = 100  # stage 2, brief: 85% bare answers, 15% traces
    mix_cot: float = 0.15
    batch: int = 64
    lr: float = 3e-3  # stage 1, after a warm-up of 100 steps
    mix_lr: float = 1e-3  # stage 2, its own AdamW (3e-3 there also spoiled the traces in a trial)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class StepsSftSettings:
    """The steps base: traces only, each of the three steps slipped independently with probability `slip`."""
    steps: int = 1000
    slip: float = 0.56  # > 0.5: greedy mostly slips; close to it: sampling at 0.3 still finds the right digit
    batch: int = 64
    lr: float = 3e-3  # after a warm-up of 100 steps
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    steps: int
    lr: float
    warmup: int  # linear warm-up over this many steps (0: none)
    write: Callable[[int, int], tuple[str, str]]  # (a, b) -> (prompt, completion)


def stages(setting: str, s) -> list[Stage]:
    """What each setting's SFT writes. Seeded: the trace-or-bare and slip draws come from Random(s.seed)."""
    rng = random.Random(s.seed)
    if setting == "first-token":
        def mix(cot: float):
            return lambda a, b: (f"{a}*{b}=", trace(a, b) if rng.random() < cot else bare(a, b))
        return [Stage("traces", s.cot_steps, s.lr, 100, mix(1.0)),
                Stage("mix", s.mix_steps, s.mix_lr, 0, mix(s.mix_cot))]
    return [Stage("slips", s.steps, s.lr, 100,
                  lambda a, b: (f"{a}*{b}= ", steps_trace(a, b, tuple(rng.random() < s.slip for _ in range(3)))))]


def sft_pairs(setting: str, seed: int) -> Iterator[tuple[int, int]]:
    """The SFT's problems. first-token: every non-test pair, the validation pairs among them (the pairs the shipped
    base in data/mini-base learned from); steps: the training pairs, disjoint from both fixed splits."""
    held_out = frozenset(split("test")) | (frozenset(split("validation")) if setting == "steps" else frozenset())
    return pair_stream(random.Random(seed + 1), held_out)


def sft_batch(tok: tokenizer.Tokenizer, eos: int, rows: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and the loss mask (B, T−1): completion tokens and EOS, not the prompt or padding."""
    ids_rows, masks = [], []
    for prompt, completion in rows:
        p, c = tok.encode(prompt), tok.encode(completion) + [eos]
        ids_rows.append(p + c)
        masks.append([0] * (len(p) - 1) + [1] * len(c))  # position t predicts token t + 1
    T = max(map(len, ids_rows))
    ids = torch.tensor([r + [eos] * (T - len(r)) for r in ids_rows])  # (B, T)
    mask = torch.tensor([m + [0] * (T - 1 - len(m)) for m in masks], dtype=torch.float32)  # (B, T−1)
    return ids, mask


def sft(net: M.Qwen2ForCausalLM, tok: tokenizer.Tokenizer, setting: str, s, log=say) -> list[dict]:
    """Cross-entropy on the completions, stage by stage, each with its own AdamW (weight decay 0.01). Seeded: the
    pairs, the draws and (by the caller) the initial weights; one thread count gives one result."""
    pairs = sft_pairs(setting, s.seed)
    history: list[dict] = []
    net.train()
    for st in stages(setting, s):
        opt = torch.optim.AdamW(net.parameters(), lr=st.lr, weight_decay=0.01)
        for step in range(st.steps):
            if st.warmup:
                opt.param_groups[0]["lr"] = st.lr * min(1.0, (step + 1) / st.warmup)  # warm-up, then constant
            ids, mask = sft_batch(tok, EOS_ID, [st.write(*next(pairs)) for _ in range(s.batch)])
            logits = net.logits(ids[:, :-1])  # (B, T−1, V)
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T−1)
            loss = (nll * mask).sum() / mask.sum()  # mean over the completion tokens of the batch
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % 100 == 0 or step + 1 == st.steps:
                history.append({"stage": st.name, "step": step + 1, "loss": round(loss.item(), 4)})
                log(f"sft {st.name:<6} step {step + 1:>5}/{st.steps} | loss {history[-1]['loss']:.4f}")
    net.eval()
    return history


# ----------------------------------------------------------------------------------------------------------------------
# Measuring a base


def evaluate_first_token(net, tok: tokenizer.Tokenizer, task: MiniMult, limit: int | None = None) -> dict:
    """Greedy accuracy on the test set, how often greedy decoding starts a trace, and the latent skill: the accuracy
    of greedy decoding made to start a trace (the prompt followed by a space)."""
    data = task.test_set()[:limit]
    with torch.no_grad():
        outs = sampling.greedy(net, [tok.encode(task.prompt(ex)) for ex in data], MAX_NEW_TOKENS, eos=[EOS_ID])
        forced = sampling.greedy(net, [tok.encode(task.prompt(ex) + " ") for ex in data], MAX_NEW_TOKENS, eos=[EOS_ID])
    texts = [tok.decode(o) for o in outs]
    rewards = [task.reward(t, ex) for t, ex in zip(texts, data)]
    cot = [t.startswith(" ") for t in texts]
    n_cot = sum(cot)
    return {"accuracy": sum(rewards) / len(data), "trace_rate": n_cot / len(data),
            "trace_accuracy": sum(r for r, c in zip(rewards, cot) if c) / max(n_cot, 1),
            "bare_accuracy": sum(r for r, c in zip(rewards, cot) if not c) / max(len(data) - n_cot, 1),
            "forced_trace_accuracy": statistics.fmean(task.reward(tok.decode(o), ex) for o, ex in zip(forced, data)),
            "n": len(data)}


def step_of(text: str, position: int) -> int:
    """Which step (0, 1, 2) the character at `position` of a trace belongs to: steps end at each space."""
    return min(text[:position].count(" "), 2)


def branch_points(texts: list[str], rewards: list[float]) -> list[int]:
    """For each failure of a group that holds a success: the position where it leaves the successes (its longest
    common prefix with any success, in tokens = characters). A group without a success has no branch point."""
    wins = [t for t, r in zip(texts, rewards) if r == 1.0]
    common = lambda x, y: next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))  # noqa
    return [max(common(t, w) for w in wins) for t, r in zip(texts, rewards) if r < 1.0] if wins else []


def evaluate_steps(net, tok: tokenizer.Tokenizer, task: MiniMult, limit: int | None = None, group: int = 50,
                   temperature: float = 0.3, seed: int = 0) -> dict:
    """Greedy accuracy; then `group` samples at `temperature` per problem (as T-SPMO's G = 50 draws them): the
    success rate, each step's right rate (and given the earlier steps right: the decision the step is), the share
    of groups with a success, and the branch points (where failures leave the successes), by step."""
    data = task.test_set()[:limit]
    with torch.no_grad():
        outs = sampling.greedy(net, [tok.encode(task.prompt(ex)) for ex in data], MAX_NEW_TOKENS, eos=[EOS_ID])
    greedy_texts = [tok.decode(o) for o in outs]
    gen = torch.Generator().manual_seed(seed)
    rewards, right, wins, branches = [], [], 0, []
    for ex in data:
        with torch.no_grad():
            samples = sampling.sample(net, tok.encode(task.prompt(ex)), group, MAX_NEW_TOKENS, temperature=temperature,
                               generator=gen, eos=[EOS_ID])
        texts = [tok.decode(s) for s in samples]
        rs = [task.reward(t, ex) for t in texts]
        rewards += rs
        right += [steps_right(t, *ex) for t in texts]
        wins += any(r == 1.0 for r in rs)
        failures = [t for t, r in zip(texts, rs) if r < 1.0]
        branches += [(p, step_of(t, p)) for p, t in zip(branch_points(texts, rs), failures)]
    n = len(right)
    given = [sum(r[k] for r in right if all(r[:k])) / max(sum(all(r[:k]) for r in right), 1) for k in range(3)]
    return {"accuracy": statistics.fmean(task.reward(t, ex) for t, ex in zip(greedy_texts, data)),
            "greedy_steps_right": [statistics.fmean(steps_right(t, *ex)[k] for t, ex in zip(greedy_texts, data))
                                   for k in range(3)],
            "sampled_success": sum(rewards) / n, "temperature": temperature, "group": group,
            "steps_right": [sum(r[k] for r in right) / n for k in range(3)], "steps_right_given_earlier": given,
            "groups_with_a_success": wins / len(data),
            "branch_steps": [sum(s == k for _, s in branches) / max(len(branches), 1) for k in range(3)],
            "branch_positions": sorted({p for p, _ in branches}),
            "branch_position_mean": statistics.fmean(p for p, _ in branches) if branches else None,
            "n": len(data)}


CHECK_PROBLEMS = 20  # sampling G = 50 for all 300 test problems takes minutes: a test checks the first 20


def quick_check(net, tok: tokenizer.Tokenizer, setting: str) -> dict:
    """The steps base's sampled numbers on the first CHECK_PROBLEMS test problems, recorded in base.json so that a
    fast test can measure them again (the full 300 are measured when the base is built)."""
    if setting != "steps":
        return {}
    return {f"check_{CHECK_PROBLEMS}": evaluate_steps(net, tok, MiniMult(tok, setting), CHECK_PROBLEMS)}


def evaluate_base(net, tok: tokenizer.Tokenizer, setting: str, limit: int | None = None) -> dict:
    task = MiniMult(tok, setting)
    return (evaluate_first_token if setting == "first-token" else evaluate_steps)(net, tok, task, limit)


# ----------------------------------------------------------------------------------------------------------------------
# Building (or copying) a base


def default_sft(setting: str):
    return SftSettings() if setting == "first-token" else StepsSftSettings()


def base_dir(out: Path, setting: str) -> Path:
    """Where a setting's base lives in an output folder: OUT/base (first-token) or OUT/base-steps."""
    return out / ("base" if setting == "first-token" else "base-steps")


def build_base(out: Path, setting: str, s=None, log=say, shipped: bool = True) -> Path:
    """OUT/base/ (first-token) or OUT/base-steps/: the tokenizer, the SFT'd model and base.json (the SFT settings and
    the base's numbers). Cached: an existing base built with the same settings is reused (delete the folder to
    rebuild); else the shipped base (data/) when it was built with the same settings and `shipped`; else the SFT
    runs here."""
    s = s or default_sft(setting)
    base = base_dir(out, setting)
    meta = base / "base.json"
    key = [dataclasses.asdict(s), None]  # (None: the base is measured on the whole test set)
    if meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        log(f"base ({setting}): reusing {base} (delete it to rebuild)")
        return base
    ship = SHIPPED[setting] / "base.json"
    if shipped and ship.is_file() and json.loads(ship.read_text()).get("key") == key:
        # ours: the repository ships each base its SFT built from seed 0 (4 MB), so that a fresh clone needs no SFT;
        # --rebuild-base builds it again (minutes on one thread; the thread count and the CPU's float sums can
        # change it slightly)
        shutil.copytree(SHIPPED[setting], base, dirs_exist_ok=True)
        log(f"base ({setting}): the shipped SFT base ({SHIPPED[setting]}, copied to {base}); --rebuild-base builds "
            f"it from seed {s.seed}")
        return base
    base.mkdir(parents=True, exist_ok=True)
    build_tokenizer(base / "tokenizer.json")
    tok = tokenizer.Tokenizer(base / "tokenizer.json")
    torch.manual_seed(s.seed)  # nothing draws from it; pinned anyway
    net = build_model(s.seed)
    t0 = time.time()
    history = sft(net, tok, setting, s, log)
    pretrained.save_model(net, base)
    minutes = (time.time() - t0) / 60
    ev = evaluate_base(net, tok, setting)
    info = {"key": key, "setting": setting, "sft": dataclasses.asdict(s), "parameters": M.num_parameters(net),
            "minutes": minutes, "history": history, **ev, **quick_check(net, tok, setting)}
    checkpoints.write_atomic(meta, (json.dumps(info, indent=2) + "\n").encode())
    log(f"base ({setting}): {info['parameters']:,} parameters; SFT {minutes:.1f} min; {describe(info)}")
    return base


def describe(info: dict) -> str:
    """One line of a base's numbers."""
    if info.get("setting", "first-token") == "first-token":
        return (f"greedy accuracy {info['accuracy']:.3f} (a trace in {info['trace_rate']:.3f} of outputs, right in "
                f"{info['trace_accuracy']:.3f} of those; bare answers right in {info['bare_accuracy']:.3f}); made "
                f"to start a trace, right in {info['forced_trace_accuracy']:.3f}")
    pct = lambda xs: "/".join(f"{100 * x:.0f}%" for x in xs)  # noqa: E731
    return (f"greedy accuracy {info['accuracy']:.3f}; sampled at {info['temperature']} (G = {info['group']}): success "
            f"{info['sampled_success']:.3f}, steps right {pct(info['steps_right'])} (given the earlier steps right "
            f"{pct(info['steps_right_given_earlier'])}), groups with a success {info['groups_with_a_success']:.2f}, "
            f"failures leave the successes in step 1/2/3: {pct(info['branch_steps'])}")
