"""T-SPMO's replay pool at the paper's scale: its memory, and what it adds to each checkpoint. Run by hand:

    python bench/benchmark_replay_pool.py [--steps 350] [--group 50] [--tokens 300] [--entropy]

Fills a replay.ReplayPool as a paper run would (one fresh group of G completions a step, every completion at the
token limit: the worst case), with random Qwen2 token ids and rewards, and prints: the pool's own bytes, the growth
of the process's resident memory while it filled, the bytes its state adds to a checkpoint's state.pt (torch.save),
the time to save and load that state, and, beside them, the same completions held the plain way (a Python list of
lists of ints: the reference) for the ratio. --entropy: the pool of --replay-cut entropy, one H a token beside the ids
(random floats), and what they add; and what recording them costs the sampler: sampling.next_token on G rows of
V = 151,936 random logits at the paper's temperature, without and with the entropy (the median of 5 alternating runs,
torch's threads).
"""
from __future__ import annotations

import argparse
import gc
import io
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import sampling  # noqa: E402
from replay import ReplayPool  # noqa: E402

VOCAB = 151_936  # Qwen2's


def rss_mb() -> float:
    """The resident set size now (Linux: /proc/self/statm), in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 1e6


def groups(steps: int, G: int, T: int, seed: int = 0):
    rng = random.Random(seed)
    for step in range(1, steps + 1):
        completions = [[rng.randrange(VOCAB) for _ in range(T)] for _ in range(G)]
        yield (rng.randint(101, 999), rng.randint(101, 999)), completions, [float(rng.random() < 0.05)] * G, step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=350)
    p.add_argument("--group", type=int, default=50)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--entropy", action="store_true", help="keep one entropy a token (--replay-cut entropy)")
    a = p.parse_args()
    ids = a.steps * a.group * a.tokens
    print(f"# replay pool: {a.steps} steps x G {a.group} x {a.tokens} tokens = {ids:,} token ids "
          f"({a.steps * a.group:,} completions); torch {torch.__version__}")

    gc.collect()
    before = rss_mb()
    pool, h = ReplayPool(1.0, entropy=a.entropy), random.Random(1)
    for ex, completions, rewards, step in groups(a.steps, a.group, a.tokens):
        pool.add_group(ex, completions, rewards, step,
                       [[h.random() * 5 for _ in y] for y in completions] if a.entropy else None)
    gc.collect()
    pool_rss = rss_mb() - before

    t0 = time.perf_counter()
    buf = io.BytesIO()
    torch.save({"replay_pool": pool.state()}, buf)
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = ReplayPool.from_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["replay_pool"])
    t_load = time.perf_counter() - t0
    assert back.tokens == pool.tokens and back.ends == pool.ends and back.problems == pool.problems
    assert back.entropy == pool.entropy
    del back

    gc.collect()
    before = rss_mb()
    plain = [completions for _, group, _, _ in groups(a.steps, a.group, a.tokens) for completions in group]
    gc.collect()
    plain_rss = rss_mb() - before
    assert len(plain) == len(pool)

    print(f"| what | MB | vs a list of lists |")
    print(f"|---|---|---|")
    print(f"| pool arrays (ReplayPool.nbytes) | {pool.nbytes() / 1e6:.1f} | |")
    if a.entropy:
        print(f"| of which the entropies (float32, one a token) | {4 * len(pool.entropy) / 1e6:.1f} | |")
    print(f"| resident memory growth while filling the pool | {pool_rss:.1f} | {pool_rss / plain_rss:.3f} |")
    print(f"| resident memory growth, the same ids as a list of lists of ints | {plain_rss:.1f} | 1.000 |")
    print(f"| added to each checkpoint's state.pt | {len(buf.getvalue()) / 1e6:.1f} | |")
    print(f"save the pool's state: {t_save:.2f} s; load it back (weights_only): {t_load:.2f} s")
    if a.entropy:
        without, with_h = next_token_ms(a.group)
        print(f"next_token, G {a.group} x V {VOCAB:,}, {torch.get_num_threads()} thread(s): {without:.1f} ms a step "
              f"without the entropy, {with_h:.1f} ms with it")


def next_token_ms(G: int, runs: int = 5) -> tuple[float, float]:
    """Milliseconds of one sampling.next_token call on (G, V) logits at temperature 0.3, without and with entropy=True."""
    logits = torch.randn(G, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(runs):
        for entropy in (False, True):
            g = torch.Generator().manual_seed(1)
            t0 = time.perf_counter()
            sampling.next_token(logits, 0.3, 1.0, g, entropy)
            times[entropy].append(1000 * (time.perf_counter() - t0))
    return sorted(times[False])[runs // 2], sorted(times[True])[runs // 2]


if __name__ == "__main__":
    main()
