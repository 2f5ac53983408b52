"""The greedy evaluation, for training.py (between steps and for --eval-only) and mini.py: test accuracy is the mean of
the task's own reward over the test set, batched, at most --eval-max-new-tokens a completion.

    evaluate     each batch of prompts decoded greedily (sampling.greedy), scored by task.eval_reward; with N
                 processes each takes its slice of the test set and the counts are summed (distributed.py)
    eval_batch   the prompts in one batch: --eval-batch, else CPU_EVAL_BATCH on the CPU, else as many rows as half
                 of the CUDA device's free memory holds (checks.py reads CPU_EVAL_BATCH to size the cache it checks)

A stop asked for during an evaluation (stopping.StopRequest) abandons it between batches: EvalStopped.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

import model as M
import pretrained
import sampling
from distributed import World
from settings import Settings
from tasks import Task

if TYPE_CHECKING:
    from stopping import StopRequest

CPU_EVAL_BATCH = 32  # --eval-batch's default on the CPU


class EvalStopped(Exception):
    """Ctrl-C during an evaluation: it is abandoned between batches (and run again on resume)."""


# [decided] (SPEC.md) Evaluation: greedy, batched, accuracy = mean reward
def evaluate(net, tok, task: Task, cfg: Settings, eos, stop: StopRequest | None = None,
             world: World = World(), sampler: sampling.Sampler | None = None) -> dict:
    """With N processes each takes a slice of the test set (distributed.py) and the counts are summed. A greedy
    distribution that is not finite stops it before anything is counted (sampling.NonFiniteLogits, on every process).
    `sampler`: the run's (the Trainer's); None: one for this evaluation."""
    sampler = sampler or sampling.Sampler(net)
    data = task.test_set()[: cfg.eval_limit]
    if not data:  # the checks refuse every way to get here (--eval-limit 0, an empty split): an accuracy of nothing
        raise ValueError(f"{task.name}: an evaluation of no test example")
    mine = [data[i] for i in world.share(len(data))]
    new_tokens = cfg.eval_max_new_tokens or cfg.max_new_tokens
    t0, correct, examples, details = time.time(), 0.0, [], {}
    encoded = [tok.encode(task.prompt(ex)) for ex in mine]
    rows = eval_batch(cfg, net.config, max(map(len, encoded), default=1), len(mine))
    # minutes for 3,000 problems: a progress bar on a terminal; none when stderr is not one (disable=None), so that
    # logs and CI output stay one line per event
    with tqdm(total=len(mine), desc=f"eval {task.name}", unit="problem", disable=None if world.main else True,
              leave=False) as bar:
        for i in range(0, len(mine), rows):
            if stop is not None and stop.requested and world.size == 1:  # N processes: between steps only
                raise EvalStopped
            batch, prompts = mine[i: i + rows], encoded[i: i + rows]
            try:
                outs = sampling.greedy(net, prompts, new_tokens, eos=eos, stop=task.stop(), sampler=sampler)
            except M.CacheTooLarge as e:
                e.flags = f"--eval-batch {cfg.eval_batch or f'{rows} (its default here)'}, " \
                          f"--eval-max-new-tokens {new_tokens}"
                raise
            except sampling.NonFiniteLogits as e:  # sent to the other processes in place of this one's examples
                examples = [e]
                break
            for ex, out in zip(batch, outs):
                text = tok.decode(out)
                r = task.eval_reward(text, ex)  # the task's own reward, whatever --reward trains with
                correct += r
                for k, v in task.eval_details(text, ex).items():  # mult: S2's partial credit
                    details[k] = details.get(k, 0.0) + v
                if len(examples) < 3:
                    examples.append({"example": list(ex) if isinstance(ex, tuple) else ex, "completion": text,
                                     "reward": r})
            bar.update(len(batch))
            bar.set_postfix(accuracy=f"{correct / (i + len(batch)):.3f}", refresh=False)
    sampler.release()  # the evaluation's fixed-shape caches and graphs: gigabytes at a large batch
    correct, examples = world.sum([correct])[0], world.gather(examples)  # one process: unchanged
    if failed := [e for e in examples if isinstance(e, sampling.NonFiniteLogits)]:
        raise failed[0]
    examples = examples[:3]
    totals: dict[str, float] = {}
    for part in world.gather([details]):  # N processes: a rank with no problem has no keys
        for k, v in part.items():
            totals[k] = totals.get(k, 0.0) + v
    return {"accuracy": correct / len(data), "n": len(data), "seconds": round(time.time() - t0, 2),
            **{k: v / len(data) for k, v in sorted(totals.items())}, "examples": examples}


def eval_batch(cfg: Settings, model_cfg: M.Qwen2Config, prompt_len: int, examples: int) -> int:
    """Prompts per greedy batch: --eval-batch if given; on the CPU 32; on CUDA as many as half the device's free
    memory holds, at most `examples`. A row holds its KV cache (cache_bytes: the prompt, once more for the prefill,
    and the new tokens), its logits with their two working copies (fp32), and its prompt's activations in one
    layer of the prefill."""
    if cfg.eval_batch:
        return cfg.eval_batch
    if torch.device(cfg.device).type != "cuda":
        return CPU_EVAL_BATCH
    dtype = pretrained.DTYPES[cfg.dtype]
    new_tokens = cfg.eval_max_new_tokens or cfg.max_new_tokens
    per_row = (M.cache_bytes(model_cfg, 1, 2 * prompt_len + new_tokens + sampling.SLOT_BLOCK, dtype)
               + 3 * model_cfg.vocab_size * 4
               + prompt_len * (3 * model_cfg.intermediate_size + 4 * model_cfg.hidden_size) * dtype.itemsize)
    free, _ = torch.cuda.mem_get_info(torch.device(cfg.device))
    return max(1, min(examples, free // 2 // per_row))
