"""What the checks on values cost, on the CPU, one thread. By hand:

    python bench/benchmark_checks.py [--no-weights] [--dir DIR] [--keep]

1. The sampler's check for a next-token distribution that is not finite: sampling.next_token as it is, against the same
   draw with the check taken out (the functions below, `unchecked_*`), on (B, V) logits of Qwen2's 151,936-token
   vocabulary at B = 8 and 50 (GRPO's and T-SPMO's G), sampled at T = 0.3 and greedy: milliseconds a decode step.
2. Every base weight's values: pretrained.check_weights (what checks.check_inputs runs before anything is written) against
   pretrained.load_model (the load into fp32, the paper's), at the Qwen2-1.5B shape. Writes a random-weight bf16
   model.safetensors (3.1 GB, as the Hub's Qwen/Qwen2-1.5B ships) into DIR (default: a new temporary directory; a DIR
   that already holds one is used as it is), reads it once into the page cache, then twice over times both. The
   directory is removed at the end unless --keep. Peak memory: about 10 GB (the fp32 copy beside the file's pages).
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import model as M  # noqa: E402
import pretrained  # noqa: E402
import sampling  # noqa: E402

QWEN2_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)


def unchecked_draw(probs: torch.Tensor, generator, block: int = 128) -> torch.Tensor:
    """sampling.draw without the finite check: the same two-level draw."""
    B, V = probs.shape
    pad = -V % block
    blocks = (F.pad(probs, (0, pad)) if pad else probs).view(B, -1, block)
    b = torch.multinomial(blocks.sum(-1), 1, generator=generator)
    inner = torch.multinomial(blocks[torch.arange(B), b[:, 0]], 1, generator=generator)
    return (b * block + inner).squeeze(-1)


def unchecked_next_token(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    """sampling.next_token (top-p off) without the finite check."""
    if temperature == 0:
        return logits.argmax(-1)
    return unchecked_draw(torch.softmax(logits.float() / temperature, dim=-1), generator)


def best_ms(f, g, repeats: int = 30) -> tuple[float, float]:
    """The best time of each of f and g, in ms, over `repeats` rounds that alternate them (a busy machine's load
    falls on both alike)."""
    f(), g()  # warm-up
    times: tuple[list, list] = ([], [])
    for _ in range(repeats):
        for fn, ts in ((f, times[0]), (g, times[1])):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return 1000 * min(times[0]), 1000 * min(times[1])


def sampler() -> None:
    print("1. next_token, one decode step, V = 151,936 (best of 30, ms): with the check | without | ratio")
    for B in (8, 50):
        logits = torch.randn(B, 151936, generator=torch.Generator().manual_seed(B)) * 5
        for T in (0.3, 0.0):
            with_check, without = best_ms(lambda: sampling.next_token(logits, T, 1.0, torch.Generator().manual_seed(0)),
                                          lambda: unchecked_next_token(logits, T, torch.Generator().manual_seed(0)))
            same = torch.equal(sampling.next_token(logits, T, 1.0, torch.Generator().manual_seed(0)),
                               unchecked_next_token(logits, T, torch.Generator().manual_seed(0)))
            print(f"  B {B:>2}, {'T 0.3' if T else 'greedy'}: {with_check:.3f} | {without:.3f} | "
                  f"{with_check / without:.3f}  (same tokens: {same})", flush=True)
    print("   the check's own operations, on the block masses (B, 1187) and the drawn block (B, 128), ms:")
    for B in (8, 50):
        mass, inner, tok = torch.rand(B, 1187), torch.rand(B, 128), torch.zeros(B, dtype=torch.long)

        def added():
            finite = torch.isfinite(mass).all(-1)
            mass.where(finite[:, None], 1.0), inner.where(finite[:, None], 1.0)
            return tok.masked_fill(~finite, sampling.NOT_FINITE)
        print(f"  B {B:>2}: {best_ms(added, added)[0]:.3f}", flush=True)


def build(d: Path) -> None:
    """config.json and a bf16 model.safetensors of N(0, 0.02) weights, one tensor drawn at a time."""
    from safetensors.torch import save_file
    cfg = M.Qwen2Config(**QWEN2_1_5B)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in M.Qwen2ForCausalLM(cfg).state_dict().items() if k != "lm_head.weight"}
    g = torch.Generator().manual_seed(0)
    state = {k: torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02, generator=g) for k, s in shapes.items()}
    d.mkdir(parents=True, exist_ok=True)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(pretrained.config_to_dict(cfg)))


def seconds(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def weights(d: Path) -> None:
    if not (d / "model.safetensors").is_file():
        print(f"building {d / 'model.safetensors'} ({seconds(lambda: build(d)):.0f} s)", flush=True)
    subprocess.run(["cat", str(d / "model.safetensors")], stdout=subprocess.DEVNULL, check=True)  # the page cache
    size = (d / "model.safetensors").stat().st_size
    print(f"2. every weight's values, Qwen2-1.5B shape, {size / 1e9:.2f} GB of bf16 weights")
    for rep in range(2):
        check = seconds(lambda: pretrained.check_weights(d, torch.float32))
        load = seconds(lambda: pretrained.load_model(d, torch.float32))
        gc.collect()
        print(f"  run {rep + 1}: check_weights {check:.2f} s, load_model (fp32) {load:.2f} s, "
              f"ratio {check / load:.3f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-weights", action="store_true", help="section 1 only (no 3.1 GB file, no 10 GB of RAM)")
    p.add_argument("--dir", type=Path, help="where the model is written (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="leave the model there")
    args = p.parse_args()
    torch.set_num_threads(1)
    sampler()
    if args.no_weights:
        return
    d = args.dir or Path(tempfile.mkdtemp(prefix="tokrl-weight-check-"))
    try:
        weights(d)
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
