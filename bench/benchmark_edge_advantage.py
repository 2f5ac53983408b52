"""What T-SPMO's update costs under each edge advantage: --edge-advantage local (E7, the paper's) against treerl (B2,
TreeRL's). Run by hand:

    python bench/benchmark_edge_advantage.py [--groups 50] [--steps 50]

On the miniature's shipped SFT bases (data/: a 1 M-parameter Qwen2 and 2-digit multiplication, both settings) with the
miniature's T-SPMO settings (mini_runs.run_settings: G = 50, at most 40 new tokens, one success replay, the tuned rate):
  1. the same groups for both: --groups groups sampled from the base (its adapter B = 0), each group's trie built
     with each estimator. A group whose rewards are all equal has A = 0 on every edge under both and takes no
     forward; over the others ("varied"): forwards a group (its targets: the update's forward passes), |U| a group,
     and the share of their generated tokens whose edge has A ≠ 0;
  2. training: --steps T-SPMO steps with each estimator from the same seed (Trainer.train_step, one thread): forwards
     per step (fresh and replay groups) and seconds per step. The two runs sample alike at step 1 only: from then on
     each samples from its own policy.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import mini  # noqa: E402
import mini_base  # noqa: E402
import mini_runs  # noqa: E402
import training  # noqa: E402
from tasks import TrainStream  # noqa: E402
from trie import ESTIMATORS, PrefixTrie  # noqa: E402


def same_groups(cfg, loaded, setting: str, groups: int) -> dict[str, list[tuple[int, int, int, int]]]:
    """On `groups` groups sampled once, per estimator, per varied group: (forwards, |U|, tokens with A ≠ 0, tokens)."""
    with tempfile.TemporaryDirectory() as tmp:
        tr = training.start(cfg, Path(tmp), mini_base.MiniMult(loaded[1], setting, "test"), loaded, training.World())
        stream = TrainStream(tr.task, cfg.seed + 2)
        out: dict[str, list] = {e: [] for e in ESTIMATORS}
        for _ in range(groups):
            ex = next(stream)
            completions, rewards = tr.sample_group(tr.tok.encode(tr.task.prompt(ex)), ex)
            if len(set(rewards)) == 1:
                continue
            tokens = sum(map(len, completions))
            for e in ESTIMATORS:
                trie = PrefixTrie(completions, rewards, estimator=e)
                out[e].append((len(trie.targets()), len(trie.edges), round(trie.nonzero_token_fraction() * tokens),
                               tokens))
    return out


def training_steps(cfg, loaded, setting: str, steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        tr = training.start(cfg, Path(tmp), mini_base.MiniMult(loaded[1], setting, "test"), loaded, training.World())
        stream, rows = TrainStream(tr.task, cfg.seed + 2), []
        for _ in range(steps):
            t0 = time.process_time()
            m = tr.train_step(stream)
            tr.step = m["step"]
            rows.append({"forwards": m["forwards"], "cpu_s": time.process_time() - t0})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=50)
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args()
    torch.set_num_threads(1)
    rates = mini.read_tuning(mini.TUNING)
    print(f"# T-SPMO, --edge-advantage local against treerl, on the miniature's SFT bases; torch {torch.__version__}")
    print(f"| setting | estimator | varied groups of {a.groups} | forwards a varied group | \\|U\\| a varied group "
          f"| their tokens with A ≠ 0 | forwards a step ({a.steps} steps) | CPU s a step |")
    print("|---|---|---|---|---|---|---|---|")
    for setting, base in mini_base.SHIPPED.items():
        lr = rates[setting]["tspmo-decay"]["lr"]
        cfg = mini_runs.run_settings("tspmo-decay", setting, 0, base, lr)
        loaded = training.load_everything(cfg)
        groups = same_groups(cfg, (copy.deepcopy(loaded[0]), *loaded[1:]), setting, a.groups)
        for e in ESTIMATORS:
            rows = training_steps(dataclasses.replace(cfg, edge_advantage=e), (copy.deepcopy(loaded[0]), *loaded[1:]),
                                  setting, a.steps)
            g, n = groups[e], max(len(groups[e]), 1)
            print(f"| {setting} | {e} | {len(g)} | {sum(x[0] for x in g) / n:.2f} | {sum(x[1] for x in g) / n:.0f} "
                  f"| {100 * sum(x[2] for x in g) / max(sum(x[3] for x in g), 1):.1f}% "
                  f"| {sum(r['forwards'] for r in rows) / len(rows):.2f} "
                  f"| {sum(r['cpu_s'] for r in rows) / len(rows):.3f} |")


if __name__ == "__main__":
    main()
