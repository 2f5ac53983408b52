"""A mutation campaign over the rooms around the equations: plausible one-line bugs, planted one at a time, each
run against the whole test suite. A mutant the suite passes is a bug the tests cannot see.

    python3 bench/mutate.py --list                 the mutants, and whether each one's text is found exactly once
    python3 bench/mutate.py                        every mutant, one at a time (--jobs N: N at once)
    python3 bench/mutate.py --only NAME,NAME       some of them
    python3 bench/mutate.py --rev COMMIT           the same mutants planted in a commit's files, against its tests

A mutant is (the original text, its replacement, the bug it models, the test files likeliest to catch it). It is
found by its exact text, which must occur exactly once among the project's .py files outside tests/ and bench/, not
by file and line, so that the mutant follows its code when the code moves between files; a text found nowhere or
more than once is reported as such, and that mutant is not run. Nothing is written to the working tree: the
repository's files (git ls-files: tracked, and untracked but not ignored; with --rev, that commit's) are copied once
into a temporary directory, and each mutant runs in a copy of that copy with its one replacement.

Each mutant runs the whole suite, `python3 -m pytest -q -x -p no:cacheprovider` over every tests/test_*.py, with one
thread (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1) and the caller's environment otherwise (TOKRL_ASSETS passes through;
set TOKRL_SLOW=1 to include the slow tests). The order: the mutant's hint files, then the files that import the
mutated module, then the rest, so that a killed mutant stops early (-x). Verdicts:

    killed      the suite fails; the first failing test is named. That test is then run alone on the unmutated
                copy: if it fails there too, the verdict is "broken suite" (the kill is the suite's fault, not the
                mutant's), never a kill
    timeout     the suite runs past --timeout seconds (a hang): counted as killed, and said
    SURVIVED    the whole suite passes

The report is a markdown table (mutant, room, file, verdict, seconds) with each mutant's bug in words, printed and
written to --out after every mutant (an interrupted campaign keeps what it measured), then a summary line:
mutants, killed, survivors, the kill rate.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    room: str
    original: str  # exact text, found exactly once among the project's .py files
    replacement: str
    bug: str  # the plausible bug it models, in one line
    hints: tuple[str, ...] = ()  # test files likeliest to kill it, run first


SAMPLER = ("tests/test_wiring.py", "tests/test_model.py")
LOOP = ("tests/test_wiring.py", "tests/test_paper_runs.py", "tests/test_train.py", "tests/test_replay.py")
REPLAY = ("tests/test_replay.py", "tests/test_wiring.py", "tests/test_paper_runs.py")
FAULTS = ("tests/test_faults.py", "tests/test_files.py", "tests/test_fuzz.py")
RESUME = ("tests/test_faults.py", "tests/test_baselines.py", "tests/test_train.py")
CLI = ("tests/test_cli.py", "tests/test_files.py", "tests/test_fuzz.py")
PEFT = ("tests/test_lora.py",)
DIST = ("tests/test_distributed.py",)

# Chosen as plausible slips before any was run; none is dropped for surviving (a survivor is reported with a reason).
MUTANTS = [
    # -- the sampler (model.py: next_token, draw, the decode loops, the fixed-shape cache and its positions) --------
    Mutant("temperature-ignored", "sampler",
           "probs = torch.softmax(logits.float() / temperature, dim=-1)",
           "probs = torch.softmax(logits.float(), dim=-1)",
           "next_token samples from softmax(l), whatever the temperature", SAMPLER),
    Mutant("top-p-crossing-token-dropped", "sampler",
           "drop = sorted_p.cumsum(-1) - sorted_p >= top_p",
           "drop = sorted_p.cumsum(-1) >= top_p",
           "the nucleus loses the token whose mass crosses top_p (off by one)", SAMPLER),
    Mutant("top-p-never-applied", "sampler",
           "if top_p < 1.0:",
           "if top_p > 1.0:",
           "a flipped comparison: nucleus sampling never runs", SAMPLER),
    Mutant("draw-global-rng", "sampler",
           "generator=generator)  # (B, 1) index within the block",
           "generator=None)  # (B, 1) index within the block",
           "the draw within a block reads the global RNG, not the run's generator: a seed no longer fixes samples",
           SAMPLER),
    Mutant("decode-one-step-short", "sampler",
           "for step in range(max_new_tokens):",
           "for step in range(max_new_tokens - 1):",
           "off by one: a completion stops one token before max_new_tokens", SAMPLER),
    Mutant("prefill-logits-not-copied", "sampler",
           "logits = net.lm_head(h).expand(num_samples, -1).clone()",
           "logits = net.lm_head(h).expand(num_samples, -1)",
           "a dropped .clone(): the G rows' first logits are one expanded view (suppression writes into it)", SAMPLER),
    Mutant("eager-positions-ignore-padding", "sampler",
           "positions = (self.cache.length - self.pad)[:, None]",
           "positions = torch.full_like(self.pad, self.cache.length)[:, None]",
           "the eager decode's positions ignore left padding", SAMPLER),
    Mutant("eager-pad-not-dropped", "sampler",
           "tok, self.pad = tok[idx], self.pad[idx]",
           "tok = tok[idx]",
           "finished rows leave the cache but their padding counts stay: positions of the wrong rows", SAMPLER),
    Mutant("static-positions-ignore-padding", "sampler",
           "r.positions.copy_(self.slot - self.pad)",
           "r.positions.fill_(self.slot)",
           "the fixed-shape decode's positions ignore left padding (the GPU's evaluation of prompts of many lengths)",
           SAMPLER),
    Mutant("static-first-slot-off-by-one", "sampler",
           "self.slot = prefill.length  # the slot of the next token",
           "self.slot = prefill.length - 1  # the slot of the next token",
           "off by one: the first decoded token overwrites the prompt's last key and value", SAMPLER),
    Mutant("static-padding-attended", "sampler",
           "self.valid[:, :P].copy_(prefill.valid[:, :P])",
           "self.valid[:, :P].fill_(True)",
           "the fixed-shape cache marks left padding as real tokens: padded rows attend to it", SAMPLER),
    Mutant("static-own-slot-masked", "sampler",
           "cache.valid.index_fill_(1, cache.slot, True)",
           "cache.valid.index_fill_(1, cache.slot, False)",
           "a decode step's token never attends to itself (its slot left invalid)", SAMPLER),
    Mutant("greedy-prefill-positions-ignore-padding", "sampler",
           "positions = (torch.arange(T, device=p.device)[None] - pad[:, None]).clamp(min=0)",
           "positions = torch.arange(T, device=p.device)[None].expand(B, T)",
           "the left-padded prefill numbers positions from the padding, not from each prompt's first token", SAMPLER),
    Mutant("greedy-padding-unmasked-in-decode", "sampler",
           "cache.padded = bool(pad.any())",
           "cache.padded = False",
           "the eager decode steps of a left-padded batch attend to the padding", SAMPLER),
    Mutant("cache-mask-not-self", "sampler",
           "causal = slots[None, :] <= query_slots",
           "causal = slots[None, :] < query_slots",
           "a flipped comparison: a prefill query in a padded cache does not see its own key", SAMPLER),
    # -- the training loop (training.py) -------------------------------------------------------------------------
    Mutant("accum-scale-dropped", "training loop",
           "st = self.backward(prompt_ids, completions, rewards, 1 / self.cfg.accum)",
           "st = self.backward(prompt_ids, completions, rewards, 1.0)",
           "--accum N backpropagates the sum of N groups' losses, not their mean", LOOP),
    Mutant("grpo-ignores-scale", "objectives",
           "loss = loss - J_i / G * scale",
           "loss = loss - J_i / G",
           "grpo_backward ignores `scale`: --accum N backpropagates and logs N times the averaged loss",
           ("tests/test_wiring.py", "tests/test_tokrl.py")),
    Mutant("dpo-ignores-scale", "objectives",
           "grad_terms = [float(coef[i]) * scale * logp.sum() for i, logp in zip(part, logps)]",
           "grad_terms = [float(coef[i]) * logp.sum() for i, logp in zip(part, logps)]",
           "dpo_backward's gradient ignores `scale` (its logged loss still has it)",
           ("tests/test_wiring.py", "tests/test_baselines.py")),
    Mutant("replay-update-after-bare-prompt", "training loop",
           "st = self.backward(list(prompt_ids) + list(y[:j]), conts, rs, 1.0)",
           "st = self.backward(list(prompt_ids), conts, rs, 1.0)",
           "a replayed group's T-SPMO update scores its continuations after the bare prompt, not prompt + y[:j]",
           REPLAY),
    Mutant("replay-scored-against-current-problem", "training loop",
           "conts, rs = self.sample_group(prompt_ids, source, y[:j])",
           "conts, rs = self.sample_group(prompt_ids, pool.example(len(pool) - 1), y[:j])",
           "a replay's continuations are scored against the pool's newest problem (this step's), not the replayed "
           "one's", REPLAY),
    Mutant("replay-cut-whole-completion", "training loop",
           "j = rng.randint(0, len(y) - 1)",
           "j = rng.randint(0, len(y))",
           "off by one: a replay may restart after the whole completion (nothing left to generate)", REPLAY),
    Mutant("replay-reward-reads-continuation-only", "training loop",
           "self.task.reward(self.tok.decode(list(prefix) + o), ex)",
           "self.task.reward(self.tok.decode(o), ex)",
           "a replay's reward reads the continuation without the replayed prefix", REPLAY),
    Mutant("replay-length-limit-ignores-prefix", "training loop",
           "cfg.max_new_tokens - len(prefix),",
           "cfg.max_new_tokens,",
           "a replay's prefix plus continuation may run past --max-new-tokens", REPLAY),
    Mutant("resume-empty-replay-pool", "training loop",
           "tr.pool = ReplayPool.from_state(state[\"replay_pool\"])",
           "tr.pool = ReplayPool(tr.cfg.replay_threshold)",
           "a resumed T-SPMO run starts with an empty replay pool (the pool's resume state lost)",
           ("tests/test_faults.py", "tests/test_replay.py")),
    Mutant("resume-rng-not-restored", "training loop",
           "tr.set_rng_state(own_rng(tr.world, state))",
           "own_rng(tr.world, state)",
           "a skipped restore: a resumed run's generators start fresh", RESUME),
    Mutant("resume-critic-not-restored", "training loop",
           "tr.critic.load_state(state.get(\"extra\", {}))",
           "tr.critic.state()",
           "a skipped restore: PPO's value head starts from zero on resume", RESUME),
    Mutant("checkpoint-select-rng-is-sample-rng", "training loop",
           "\"select\": g[\"select\"].get_state()",
           "\"select\": g[\"sample\"].get_state()",
           "a copy-paste slip: the checkpoint saves the sampling generator as S-GRPO's selection generator", RESUME),
    Mutant("nonfinite-gradient-unchecked", "training loop",
           "bad = not math.isfinite(st.loss) or any(",
           "bad = not math.isfinite(st.loss) and any(",
           "a flipped boolean: a NaN gradient with a finite loss reaches AdamW", LOOP + FAULTS),
    Mutant("logged-loss-drops-replays", "training loop",
           "\"loss\": sum(s.loss for s in every)",
           "\"loss\": sum(s.loss for s in fresh)",
           "the logged loss leaves out T-SPMO's replay groups", LOOP),
    Mutant("logged-kl-summed-over-accum", "training loop",
           "\"kl\": sum(s.kl for s in fresh) / len(fresh)",
           "\"kl\": sum(s.kl for s in fresh)",
           "a wrong reduction: with --accum N the logged KL is the sum of N groups' means", LOOP),
    Mutant("logged-reward-std-sample", "training loop",
           "math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)",
           "math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))",
           "the logged reward σ divides by n − 1, not n as E2's σ does", LOOP),
    Mutant("ppo-logged-stats-summed", "training loop",
           "st.extra = {k: sum(p.extra[k] for p in passes) / n for k in st.extra}",
           "st.extra = {k: sum(p.extra[k] for p in passes) for k in st.extra}",
           "a logged PPO statistic (clip fraction, approx. KL, entropy, value loss) summed over the μ passes, not "
           "averaged", ("tests/test_wiring.py", "tests/test_baselines.py")),
    Mutant("eval-accuracy-over-own-share", "evaluation",
           "return {\"accuracy\": correct / len(data),",
           "return {\"accuracy\": correct / len(mine),",
           "with N processes the summed correct count is divided by one process's share", DIST),
    Mutant("no-checkpoint-at-last-step", "training loop",
           "if tr.step % cfg.save_every == 0 or tr.step == cfg.steps or tr.stopping(stop):",
           "if tr.step % cfg.save_every == 0 or tr.stopping(stop):",
           "the last step is checkpointed only when --save-every divides it", RESUME),
    Mutant("lambda-on-every-rank", "training loop",
           "if lam and world.main:  # N processes: rank 0's alone",
           "if lam:  # N processes: rank 0's alone",
           "the wrong rank's branch: every process adds λ·Σ‖W‖², so N processes apply it N times", DIST),
    Mutant("every-rank-writes-checkpoints", "training loop",
           "self.cfg.model)\n                           if self.world.main else",
           "self.cfg.model)\n                           if not self.world.main else",
           "the wrong rank's branch: rank 1 writes the checkpoints, rank 0 none", DIST),
    # -- the replay pool (replay.py) ------------------------------------------------------------------------------
    Mutant("pool-threshold-strict", "replay pool",
           "(self.success if r >= self.threshold else self.failure).append(i)",
           "(self.success if r > self.threshold else self.failure).append(i)",
           "a flipped boundary: a reward equal to r is a failure", REPLAY),
    Mutant("pool-completion-offset", "replay pool",
           "self.tokens[self.ends[i - 1] if i else 0: self.ends[i]]",
           "self.tokens[self.ends[i - 1] if i > 1 else 0: self.ends[i]]",
           "off by one: the second completion is read from the first one's start", REPLAY),
    Mutant("pool-failures-counted-as-successes", "replay pool",
           "rng.sample(self.failure, min(n_failure, len(self.failure)))",
           "rng.sample(self.failure, min(n_failure, len(self.success)))",
           "a copy-paste slip: C_failure is capped by the number of successes", REPLAY),
    Mutant("pool-problems-not-restored", "replay pool",
           "pool.problems = list(state[\"problems\"])",
           "pool.problems = []",
           "the pool's resume state loses the problems its completions belong to", REPLAY),
    Mutant("pool-threshold-not-restored", "replay pool",
           "pool = cls(state[\"threshold\"], bool(",
           "pool = cls(1.0, bool(",
           "the pool's resume state forgets --replay-threshold (the default r = 1 comes back)",
           REPLAY + ("tests/test_faults.py",)),
    # -- checkpoints (checkpoints.py) -----------------------------------------------------------------------------
    Mutant("state-step-unchecked", "checkpoints",
           "if not is_integer(state[\"step\"]) or state[\"step\"] != step:",
           "if not is_integer(state[\"step\"]):",
           "checkpoint validation: a state.pt of another step is taken for this one", FAULTS),
    Mutant("data-position-bound-strict", "checkpoints",
           "not 0 <= state[\"data_position\"] <= most",
           "not 0 <= state[\"data_position\"] < most",
           "checkpoint validation off by one: a checkpoint that drew its last allowed example is refused", FAULTS),
    Mutant("oldest-checkpoint-first", "checkpoints",
           "for ck in sorted(root.glob(\"step-*\"), reverse=True):",
           "for ck in sorted(root.glob(\"step-*\")):",
           "a resume takes the oldest intact checkpoint, not the newest", FAULTS),
    Mutant("checkpoint-adapter-config-unread", "checkpoints",
           "    lora.read_adapter_config(ck / \"adapter\" / \"adapter_config.json\")\n",
           "",
           "checkpoint validation skips the adapter's config: a damaged one is found only when loading", FAULTS),
    Mutant("torn-line-off-by-one", "checkpoints",
           "if i == len(lines) - 1:  # no newline after it",
           "if i >= len(lines) - 2:  # no newline after it",
           "a bad complete last line (newline after it) is dropped as torn instead of named", FAULTS),
    Mutant("append-not-cut-back", "checkpoints",
           "                f.truncate(size)\n",
           "                f.flush()\n",
           "a failed append leaves its half line in the log", FAULTS),
    Mutant("hold-shared-lock", "checkpoints",
           "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
           "fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)",
           "a shared lock: two processes hold one run directory", FAULTS),
    Mutant("stale-trash-kept", "checkpoints",
           "p.name.startswith((\".tmp-step-\", \".trash-step-\"))",
           "p.name.startswith((\".tmp-step-\",))",
           "a half-deleted checkpoint (.trash-step-*) is never removed", FAULTS),
    # -- input checks (checks.py, tasks.py) -----------------------------------------------------------------------
    Mutant("length-bound-off-by-one", "input checks",
           "if u.prompt_len + u.new_tokens > limit:",
           "if u.prompt_len + u.new_tokens >= limit:",
           "the input checks' length bound refuses a prompt + new tokens that exactly fill the positions", CLI),
    Mutant("resume-steps-from-first-resume", "input checks",
           "steps = resumes[-1].get(\"steps\")",
           "steps = resumes[0].get(\"steps\")",
           "a resumed run reads --steps from its first resume, not its latest", CLI + ("tests/test_faults.py",)),
    Mutant("resume-at-last-step-refused", "input checks",
           "if cfg.steps < state[\"step\"]:",
           "if cfg.steps <= state[\"step\"]:",
           "a flipped boundary: a run resumed at its last step (to write what is missing) is refused",
           CLI + ("tests/test_faults.py",)),
    Mutant("gsm8k-answer-length-unbounded", "input checks",
           "if (n := len(r[\"question\"]) + len(r[\"answer\"])) > MAX_TEXT_CHARS:",
           "if (n := len(r[\"question\"])) > MAX_TEXT_CHARS:",
           "a GSM8K record's answer escapes the text size limit", ("tests/test_fuzz.py", "tests/test_files.py")),
    # -- the reward's size limits (reward.py) ---------------------------------------------------------------------
    Mutant("reward-scans-whole-text", "reward limits",
           "tail = text[-MAX_SCAN_CHARS:]",
           "tail = text",
           "the final-answer search scans the whole completion, not its last MAX_SCAN_CHARS characters",
           ("tests/test_reward.py",)),
    Mutant("reward-power-denominator-unbounded", "reward limits",
           "if max(abs(base.p).bit_length(), base.q.bit_length()) * abs(e) > MAX_BITS:",
           "if abs(base.p).bit_length() * abs(e) > MAX_BITS:",
           "a rational power's denominator escapes the MAX_BITS limit", ("tests/test_reward.py",)),
    # -- PEFT reading (lora.py) -----------------------------------------------------------------------------------
    Mutant("rslora-scale-inverted", "PEFT reading",
           "alpha * math.sqrt(r) if cfg.get(\"use_rslora\") else alpha",
           "alpha / math.sqrt(r) if cfg.get(\"use_rslora\") else alpha",
           "an rsLoRA adapter loaded at α/r^1.5, not α/√r", PEFT),
    Mutant("rslora-ignored", "PEFT reading",
           "alpha * math.sqrt(r) if cfg.get(\"use_rslora\") else alpha",
           "alpha",
           "use_rslora read and ignored: the adapter is loaded at α/r", PEFT),
    Mutant("bias-lora-only-accepted", "PEFT reading",
           "(\"bias\", lambda v: v == \"none\", \"trained biases\")",
           "(\"bias\", lambda v: v in (\"none\", \"lora_only\"), \"trained biases\")",
           "an adapter with trained biases (bias = lora_only) loads without them", PEFT),
    Mutant("alpha-from-rank-pattern", "PEFT reading",
           "_pattern_value(cfg.get(\"alpha_pattern\") or {}, full,",
           "_pattern_value(cfg.get(\"rank_pattern\") or {}, full,",
           "a copy-paste slip: a module's α is looked up in rank_pattern", PEFT),
    Mutant("pattern-unanchored", "PEFT reading",
           "re.match(rf\"(.*\\.)?({key})$\", module)",
           "re.match(rf\"(.*\\.)?({key})\", module)",
           "rank_pattern/alpha_pattern keys match a prefix of a module name, not the whole last part", PEFT),
    Mutant("adapter-inf-accepted", "PEFT reading",
           "        if not torch.isfinite(t).all():\n            raise ValueError(f\"{w_path}: {name} holds non-finite",
           "        if torch.isnan(t).any():\n            raise ValueError(f\"{w_path}: {name} holds non-finite",
           "an adapter weight of ±inf passes the check (only NaN is refused)", PEFT + ("tests/test_files.py",)),
    # -- several processes (distributed.py) -----------------------------------------------------------------------
    Mutant("counts-off-by-one", "distributed",
           "n // self.size + (r < n % self.size)",
           "n // self.size + (r <= n % self.size)",
           "off by one: the ranks' shares of a group add up to more than G", DIST),
    Mutant("share-start-off-by-one", "distributed",
           "start = sum(c[: self.rank])",
           "start = sum(c[: self.rank + 1])",
           "off by one: each rank's evaluation slice starts one share late", DIST),
    Mutant("every-rank-same-seed", "distributed",
           "return (seed + self.rank * GOLDEN) % 2**64",
           "return seed % 2**64",
           "every process samples from the same seed: a group of N identical copies of one share", DIST),
    Mutant("dpo-loss-summed-over-ranks", "distributed",
           "\"dpo\": (\"forwards\", \"tokens_in_loss\"),",
           "\"dpo\": (\"loss\", \"forwards\", \"tokens_in_loss\"),",
           "DPO's loss, already the whole group's on every rank, is summed over the ranks (logged N times)", DIST),
    Mutant("every-rank-restores-rank-0-rng", "distributed",
           "return state[\"rng\"] if world.size == 1 else state[\"rng_ranks\"][world.rank]",
           "return state[\"rng\"] if world.size == 1 else state[\"rng_ranks\"][0]",
           "the wrong rank's state: every process resumes with rank 0's generators", DIST),
]


# ----------------------------------------------------------------------------------------------------------------------
# The copy of the repository, and where each mutant's text lies in it


def snapshot(rev: str | None, into: Path) -> Path:
    """The repository's files in `into`: the working tree's tracked and untracked-not-ignored files, or `rev`'s."""
    into.mkdir(parents=True)
    if rev:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev], check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
            tar.extractall(into, filter="data")
        return into
    names = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():  # a tracked file deleted in the working tree is not copied
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, into / name)
    return into


def project_files(root: Path) -> list[Path]:
    """The .py files a mutant may live in: the project's code, not its tests or benchmarks."""
    return sorted(p for p in root.rglob("*.py") if p.relative_to(root).parts[0] not in ("tests", "bench"))


def locate(m: Mutant, root: Path) -> tuple[Path | None, str]:
    """(the file holding m.original exactly once, "") or (None, why it cannot be planted)."""
    hits = [(p, p.read_text().count(m.original)) for p in project_files(root)]
    hits = [(p, n) for p, n in hits if n]
    total = sum(n for _, n in hits)
    if total == 0:
        return None, "not found"
    if total > 1:
        return None, "not unique (" + ", ".join(f"{p.relative_to(root)} ×{n}" for p, n in hits) + ")"
    return hits[0][0], ""


def test_order(root: Path, m: Mutant, module: str) -> list[str]:
    """Every test file: the mutant's hints, then the files that import the mutated module, then the rest."""
    files = sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py"))
    imports = re.compile(rf"^\s*(import|from)\s+{re.escape(module)}\b", re.M)
    hinted = [f for f in m.hints if f in files]
    importers = [f for f in files if f not in hinted and imports.search((root / f).read_text())]
    return hinted + importers + [f for f in files if f not in hinted and f not in importers]


# ----------------------------------------------------------------------------------------------------------------------
# Running the suite


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def pytest(cwd: Path, args: list[str], timeout: float) -> tuple[int | None, str]:
    """(exit status, output) of pytest in `cwd`; status None when it ran past `timeout` (its process group killed)."""
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args], cwd=cwd,
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return None, out


FAILED = re.compile(r"^(FAILED|ERROR) (.+?)(?: - .*)?$", re.M)


def first_failure(out: str) -> str:
    found = FAILED.search(out)
    if found:
        return found.group(2)
    tail = [line for line in out.strip().splitlines() if line.strip()]
    return f"pytest error ({tail[-1][:100] if tail else 'no output'})"


class Pristine:
    """The unmutated copy, where each killing test is run once more: it must pass there for the kill to count."""

    def __init__(self, root: Path, timeout: float):
        self.root, self.timeout, self.seen, self.lock = root, timeout, {}, threading.Lock()

    def passes(self, test: str) -> bool:
        with self.lock:
            if test not in self.seen:
                args = [test] if "::" in test else ["--collect-only", test]  # a file that failed to collect
                code, _ = pytest(self.root, args, self.timeout)
                self.seen[test] = code == 0
            return self.seen[test]


@dataclass
class Result:
    mutant: Mutant
    file: str
    verdict: str  # killed, timeout, SURVIVED, broken suite, not found, not unique (...)
    by: str = ""
    seconds: float = 0.0

    @property
    def killed(self) -> bool:
        return self.verdict in ("killed", "timeout")

    @property
    def ran(self) -> bool:
        return self.verdict in ("killed", "timeout", "SURVIVED")


def run_mutant(m: Mutant, base: Path, work: Path, pristine: Pristine, timeout: float) -> Result:
    where, why = locate(m, base)
    if where is None:
        return Result(m, "", why)
    rel = where.relative_to(base)
    root = work / m.name
    shutil.copytree(base, root)
    try:
        target = root / rel
        target.write_text(target.read_text().replace(m.original, m.replacement, 1))
        t0 = time.time()
        code, out = pytest(root, test_order(root, m, rel.stem), timeout)
        secs = time.time() - t0
        if code is None:
            return Result(m, str(rel), "timeout", f"ran past {timeout:.0f} s (a hang)", secs)
        if code == 0:
            return Result(m, str(rel), "SURVIVED", "", secs)
        by = first_failure(out)
        if not pristine.passes(by if not by.startswith("pytest error") else "tests"):
            return Result(m, str(rel), "broken suite", f"{by} fails unmutated too", secs)
        return Result(m, str(rel), "killed", by, secs)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------
# The report


def table(results: list[Result], command: str) -> str:
    rows = ["| mutant | room | file | killed by | s | the bug it models |", "|---|---|---|---|---|---|"]
    for r in results:
        verdict = {"killed": f"`{r.by}`", "timeout": f"timeout: {r.by}", "SURVIVED": "**SURVIVED**"}.get(
            r.verdict, f"{r.verdict}{': ' + r.by if r.by else ''}")
        rows.append(f"| `{r.mutant.name}` | {r.mutant.room} | {r.file or '—'} | {verdict} | "
                    f"{r.seconds:.0f} | {r.mutant.bug} |")
    return f"`{command}`\n\n" + "\n".join(rows) + "\n\n" + summary(results) + "\n"


def summary(results: list[Result]) -> str:
    ran = [r for r in results if r.ran]
    killed = sum(r.killed for r in ran)
    timeouts = sum(r.verdict == "timeout" for r in ran)
    survivors = [r.mutant.name for r in ran if not r.killed]
    other = [f"{r.mutant.name} ({r.verdict})" for r in results if not r.ran]
    rate = f"{killed / len(ran):.0%}" if ran else "n/a"
    return (f"{len(ran)} mutants run: {killed} killed ({timeouts} by timeout), {len(survivors)} survived: kill rate "
            f"{rate}. Survivors: {', '.join(survivors) or 'none'}."
            + (f" Not run: {', '.join(other)}." if other else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the mutants and where each is found; run nothing")
    ap.add_argument("--only", default="", help="comma-separated mutant names")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds a mutant's suite may run (default 3600)")
    ap.add_argument("--rev", default=None, help="plant the mutants in this commit's files (default: the working tree)")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "tokrl-mutants.md"),
                    help="where the markdown report is written (default: tokrl-mutants.md in the temp directory)")
    a = ap.parse_args(argv)
    names = [n for n in a.only.split(",") if n]
    unknown = sorted(set(names) - {m.name for m in MUTANTS})
    if unknown:
        ap.error(f"--only: unknown mutants {', '.join(unknown)}")
    if len({m.name for m in MUTANTS}) != len(MUTANTS):
        raise SystemExit("error: two mutants share a name")
    chosen = [m for m in MUTANTS if not names or m.name in names]
    command = ("python3 bench/mutate.py" + (f" --rev {a.rev}" if a.rev else "") + (f" --only {a.only}" if names else "")
               + (f" --jobs {a.jobs}" if a.jobs != 1 else "") + (f" --timeout {a.timeout:g}" if a.timeout != 3600 else ""))

    with tempfile.TemporaryDirectory(prefix="tokrl-mutate-") as tmp:
        base = snapshot(a.rev, Path(tmp) / "base")
        if a.list:
            for m in chosen:
                where, why = locate(m, base)
                print(f"{m.name:42} {m.room:14} {where.relative_to(base) if where else why}")
            return 0
        pristine = Pristine(Path(tmp) / "pristine", a.timeout)
        shutil.copytree(base, pristine.root)
        done: dict[str, Result] = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(a.jobs, 1)) as pool:
            futures = {pool.submit(run_mutant, m, base, Path(tmp), pristine, a.timeout): m for m in chosen}
            for f in concurrent.futures.as_completed(futures):
                r = f.result()
                done[r.mutant.name] = r
                print(f"[{len(done)}/{len(chosen)}] {r.mutant.name}: {r.verdict} {r.by} ({r.seconds:.0f} s)",
                      flush=True)
                ordered = [done[m.name] for m in chosen if m.name in done]
                Path(a.out).write_text(table(ordered, command))
        results = [done[m.name] for m in chosen]
    report = table(results, command)
    Path(a.out).write_text(report)
    print("\n" + report + f"\n(written to {a.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
