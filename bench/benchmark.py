"""tokrl against transformers (+ PEFT) on random-weight Qwen2 models. Run by hand (bench/gpu_check.py reuses its
pieces on a GPU).

    python bench/benchmark.py                 # CPU: all three sections (about 15 min on 2 cores, 18 GiB of RAM)
    python bench/benchmark.py --no-full       # CPU: sections 1-2 only, on qwen2-tiny-realvocab (about 6 min)
    python bench/benchmark.py --device cuda   # GPU: sections 0, 1, 3, 4 and 5 at the full shape (about 5 min)
    python bench/benchmark.py --quick         # short sequences, no section 3: checks that the script runs

0. (CUDA) One decode step (forward + LM head + draw) at 8 and 50 rows over a 400-slot cache: the eager step (the
   CPU's path) against the fixed-shape step replayed as a CUDA graph, in fp32 with each attention kernel, and with
   the opt-in lower precisions; the step through torch.profiler (kernels, launches, host syncs and the lines that
   cause them, host-device copies, GPU busy fraction); how far lower-precision samples are from the fp32 policy.
1. Sampling: new tokens per second, G = 8 and G = 50 completions of one prompt, N new tokens (EOS suppressed in
   both), tokrl `sampling.sample` against `generate(num_return_sequences=G, do_sample=True)`.
2. (CPU) One training step per algorithm (paper's multiplication settings) on fixed completions: seconds and peak
   memory, tokrl against transformers + PEFT computing the same loss the obvious way (full forward, full
   log_softmax).
3. Full Qwen2-1.5B shape, fp32: peak memory and time of a whole step of GRPO (G=8), S-GRPO (G=8), T-SPMO (G=50,
   one replay) on 300-token completions; on CUDA also against transformers + PEFT (time, memory, gradient), and
   GRPO's step at --backward-batch 1, 2, 4, 8.
4. (CUDA) Greedy evaluation: problems per second at the default --eval-batch against 32 rows of eager decode.
5. (CUDA) The projected paper run of each row of Tables I and II, evaluations included, with the defaults and with
   --sample-precision bf16.
Sections 2 and 3 also time the baselines the paper argues against (baselines.py, tokrl only: transformers has no
such trainer to compare with): PPO with a shared or a separate critic (μ = 4 passes) and DPO, on GRPO's completions,
against tokrl's GRPO. `--kinds ppo,pposep,dpo` (say) runs only those rows of sections 2 and 3.

Both libraries load the same safetensors directory (written by tokrl) and must give the same logits before anything
is timed. Each training measurement runs in a fresh subprocess (this script with --one NAME) so that its peak memory
is its own: the GPU's max_memory_allocated, or on the CPU the peak resident set size (VmHWM, reset through
/proc/self/clear_refs just before the step; Δ = peak − resident size before the step).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import baselines  # noqa: E402
import checkpoints  # noqa: E402
import lora  # noqa: E402
import model as M  # noqa: E402
import pretrained  # noqa: E402
import sampling  # noqa: E402
import settings  # noqa: E402
import tokrl  # noqa: E402
from training import ppo_update  # noqa: E402
from trie import PrefixTrie  # noqa: E402
from values import first_line  # noqa: E402

# The paper's multiplication settings (SPEC.md "Training settings", S-GRPO / T-SPMO).
# T-SPMO's λ: the literal reading's term in the loss (--lam 0.01), not the CLI's default (--lam 0: λ as AdamW's weight
# decay, nothing in the loss): the benchmark times the costlier reading, and its shipped tables were measured so.
TEMPERATURE, BETA, LAM, LR, WD = 0.3, 0.01, 0.01, 1e-4, 0.01
LORA_R, LORA_FRACTION = 8, 1 / 4
ALPHA, K, P_SELECT = 50, 100, 0.5  # S-GRPO (α, k) for mult; P is [decided]
G_GRPO, G_TSPMO = 8, 50
STEPS = {"grpo": 450, "sgrpo": 450, "tspmo": 350, "ppo": 450, "pposep": 450, "dpo": 450}  # mult (PPO/DPO: GRPO's)
NAMES = {"grpo": "GRPO (G=8)", "sgrpo": "S-GRPO (G=8)", "tspmo": "T-SPMO (G=50, +1 replay)",
         "ppo": "PPO (G=8, shared critic, μ=4)", "pposep": "PPO (G=8, separate critic, μ=4)", "dpo": "DPO (G=8)"}
PAPER, BASELINES = ("grpo", "sgrpo", "tspmo"), ("ppo", "pposep", "dpo")
PPO = dataclasses.replace(settings.Settings(), beta=BETA)  # SPEC-baselines.md's decided γ, λ_GAE, ε, μ, w1, w3
EOS = (151643, 151645)  # <|endoftext|>, <|im_end|>: both suppressed, so every row makes exactly N tokens
GiB = 2 ** 30


# ----------------------------------------------------------------------------------------------------------------------
# Machine, models, memory


def header(dev: torch.device) -> None:
    import peft
    import transformers
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    gpu = f", GPU {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ", no GPU used"
    print(f"# tokrl benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}\n")
    print(f"CPU {cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads){gpu}, "
          f"RAM {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB, "
          f"load average {os.getloadavg()[0]:.1f} at start (other work on the machine skews the times)")
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}; fp32 everywhere; random weights (normal, std 0.02)")
    print("Ratios: speed = tokrl tok/s ÷ transformers tok/s (> 1: tokrl faster); time and memory = tokrl ÷ "
          "reference (< 1: tokrl better). GiB = 2^30 bytes.\n")


def build_checkpoint(preset: str, path: Path) -> None:
    """Random weights made once by tokrl and written as a Hugging Face directory that both libraries load."""
    with torch.device("meta"):  # no allocation yet: the 1.5B shape would otherwise be initialised twice
        m = M.Qwen2ForCausalLM(M.PRESETS[preset])
    m.to_empty(device="cpu")
    m.lm_head.weight = m.model.embed_tokens.weight  # to_empty unties the shared tensor
    m.init_weights(torch.Generator().manual_seed(0), std=0.02)
    pretrained.save_model(m, path)


def load_hf(path: Path, dev: torch.device):
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()


@torch.no_grad()
def parity(tk, hf, dev) -> float:
    """Max abs logit difference on 16 tokens: the two models must be the same function before we time them."""
    ids = torch.randint(0, EOS[0], (1, 16), generator=torch.Generator().manual_seed(3)).to(dev)
    err = float((tk.logits(ids) - hf(ids).logits).abs().max())
    assert err < 1e-4, f"tokrl and transformers disagree on the same weights: max abs logit error {err:.2e}"
    return err


def memory_reset(dev: torch.device) -> int:
    """Start a peak-memory region; returns the memory in use now (bytes)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        return torch.cuda.memory_allocated(dev)
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: the peak RSS (VmHWM) := the current RSS
    return status_bytes("VmRSS")


def memory_peak(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev)
    # VmHWM, not ru_maxrss: ru_maxrss also keeps the parent's peak from before exec, which clear_refs cannot reset
    return status_bytes("VmHWM")


def status_bytes(key: str) -> int:
    return next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith(key + ":"))


def sync(dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------------------------------
# Section 1: sampling


def sampling_row(tk, hf, dev, G: int, N: int) -> dict:
    """New tokens per second of tokrl's `sampling.sample` and of transformers' `generate`, G completions of N tokens
    after a 40-token prompt (EOS suppressed in both), best of 2 after a warm-up; on CUDA also tokrl's eager decode
    (the CPU's path: the reference the graph is timed against)."""
    prompt = torch.randint(0, EOS[0], (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ids = torch.tensor([prompt], device=dev)
    sampler = sampling.Sampler(tk)  # one for the calls, as a run holds one: on CUDA its graph is captured once

    def ours(G, n, mode=None):
        out = sampler.sample(prompt, G, n, temperature=TEMPERATURE, top_p=1.0, eos=EOS, suppress=EOS,
                             generator=torch.Generator(dev).manual_seed(2), mode=mode)
        assert all(len(y) == n for y in out)

    def theirs(G, n):  # min_new_tokens = N: transformers' own way of suppressing EOS until N tokens
        torch.manual_seed(2)
        out = hf.generate(ids, do_sample=True, num_return_sequences=G, max_new_tokens=n, min_new_tokens=n,
                          temperature=TEMPERATURE, top_k=0, top_p=1.0, pad_token_id=EOS[0], eos_token_id=list(EOS))
        assert out.shape == (G, len(prompt) + n)

    def tok_per_s(fn, G):
        fn(G, 4)  # warm-up
        best = float("inf")
        for _ in range(2):  # best of 2
            t0 = sync(dev)
            fn(G, N)
            best = min(best, sync(dev) - t0)
        return G * N / best

    row = {"tokrl": tok_per_s(ours, G), "transformers": tok_per_s(theirs, G)}
    if dev.type == "cuda":
        row["eager"] = tok_per_s(lambda G, n: ours(G, n, mode="eager"), G)
    return row


def sampling_section(tk, hf, dev, N: int) -> None:
    print(f"## 1. Sampling: {N} new tokens per completion after a 40-token prompt, temperature {TEMPERATURE}, "
          "top_p 1.0, EOS suppressed; best of 2 after a warm-up\n")
    rows = []
    for G in (G_GRPO, G_TSPMO):
        r = sampling_row(tk, hf, dev, G, N)
        a, b = r["tokrl"], r["transformers"]
        row = [f"G = {G}", f"{a:.0f}", f"{b:.0f}", f"{a / b:.2f}"]
        if "eager" in r:
            row += [f"{r['eager']:.0f}", f"{r['eager'] / b:.2f}"]
        rows.append(row)
    eager = ["tokrl eager tok/s", "eager ÷ transformers"] if dev.type == "cuda" else []
    table(["completions", "tokrl tok/s", "transformers tok/s", "speed ratio", *eager], rows)


def table(head: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Section 0 (CUDA): the decode step


DECODE_VARIANTS = [  # (name, sample()'s keywords, sampling.DECODE_ATTENTION, cuBLAS library)
    ("eager (the CPU's path; kernels launched one by one)", {"mode": "eager"}, None, None),
    ("graph, fp32, math attention", {}, "math", None),
    ("graph, fp32, memory-efficient attention", {}, "efficient", None),
    ("graph, fp32, memory-efficient attention, cuBLASLt", {}, "efficient", "cublaslt"),
    ("graph, TF32 products (--sample-precision tf32)", {"precision": "tf32"}, None, None),
    ("graph, bf16 weights (--sample-precision bf16)", {"precision": "bf16"}, None, None),
]


def decode_step_ms(tk, dev, rows: int, prompt_len: int = 280, slots: int = 400, k1: int = 20, **kw) -> float:
    """Milliseconds of one decode step (forward + LM head + draw) at `rows` over a cache of `slots`: two sample()
    calls of k1 and k2 steps on one cache shape (a stop rule ends them), the difference over k2 − k1 steps (no
    prefill in it), after a warm-up. The eager step attends to the tokens so far (here positions 300 to 400)."""
    prompt = rand_tokens(prompt_len, torch.Generator().manual_seed(12))
    k2 = slots - prompt_len
    sampler = sampling.Sampler(tk)  # its graphs are captured under the attention kernel and library set now

    def run(k: int) -> float:
        t0 = sync(dev)
        sampler.sample(prompt, rows, slots - prompt_len, temperature=TEMPERATURE, eos=EOS, suppress=EOS,
                       generator=torch.Generator(dev).manual_seed(2), stop=lambda y: len(y) >= k, **kw)
        return sync(dev) - t0
    run(k1)  # warm-up: the graph's capture, cuBLAS's choices
    return (run(k2) - run(k1)) / (k2 - k1) * 1000


def decode_variant_ms(tk, dev, variant: tuple, rows: tuple[int, ...], **shape) -> list[float]:
    """decode_step_ms at each row count under one of DECODE_VARIANTS (its attention kernel and cuBLAS library set
    for the call and restored after; each decode_step_ms captures its graph under them)."""
    name, kw, attention, blas = variant
    before = (sampling.DECODE_ATTENTION, torch.backends.cuda.preferred_blas_library())
    sampling.DECODE_ATTENTION = attention or before[0]
    if blas:
        torch.backends.cuda.preferred_blas_library(blas)
    try:
        return [decode_step_ms(tk, dev, r, **shape, **kw) for r in rows]
    finally:
        sampling.DECODE_ATTENTION = before[0]
        torch.backends.cuda.preferred_blas_library(before[1])


def decode_section(tk, dev) -> str:
    """Section 0: the decode step's table; returns the DECODE_ATTENTION the table finds faster in fp32."""
    print("## 0. One decode step (forward + LM head + draw), ms, over a 400-slot cache, after a warm-up\n")
    weights = sum(p.numel() * p.element_size() for p in tk.parameters())
    print(f"Reading the weights once ({weights / 1e9:.2f} GB fp32) takes {weights / copy_bandwidth(dev) * 1000:.2f} "
          "ms at this GPU's measured copy bandwidth: the floor of a step at these row counts.\n")
    rows, fp32 = [], {}
    for variant in DECODE_VARIANTS:
        name, _, attention, blas = variant
        try:
            ms = decode_variant_ms(tk, dev, variant, (G_GRPO, G_TSPMO))
            if attention and not blas:
                fp32[attention] = ms[1]
        except RuntimeError as e:  # a kernel that refuses these inputs is a result too
            ms = None
            print(f"{name}: failed: {first_line(e)[:200]}")
        rows.append([name, *(f"{x:.2f}" for x in ms)] if ms else [name, "-", "-"])
    table(["decode", f"{G_GRPO} rows, ms", f"{G_TSPMO} rows, ms"], rows)
    for part in (profile, mismatch):
        try:
            part(tk, dev)
        except Exception as e:  # a profiler that cannot read this machine must not hide the rest
            print(f"{part.__name__}: failed: {type(e).__name__}: {first_line(e)[:200]}\n")
    return min(fp32, key=fp32.get) if fp32 else sampling.DECODE_ATTENTION


def copy_bandwidth(dev) -> float:
    """Bytes per second of a large device-to-device copy (read + written), the GPU's usable memory bandwidth."""
    x = torch.empty(2**28, device=dev)  # 1 GiB
    y = torch.empty_like(x)
    y.copy_(x)
    t0 = sync(dev)
    for _ in range(10):
        y.copy_(x)
    return 10 * 2 * x.numel() * 4 / (sync(dev) - t0)


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")  # the host waits for the GPU
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def step_profile(tk, dev, rows: int, mode: str, prompt_len: int = 200, steps: tuple[int, int] = (8, 24),
                 ends: int = 0) -> dict:
    """One decode step as the device sees it, at `rows` rows after a prompt of `prompt_len` tokens. sample() runs
    n1 and n2 steps with the same draws (the n2 run extends the n1 run), and every figure is the difference over the
    n2 − n1 steps, so the prefill and the setup drop out. ends > 0: a row also stops at a token id divisible by
    `ends` (about one row in `ends` a step), so that a finishing row's host work shows; 0: no row ends early.

    Per step: the wall milliseconds (without the profiler); from torch.profiler the kernels the GPU ran and their busy
    milliseconds (on the CPU: aten ops and their own CPU time), the launches from the host (a graph's replay is one),
    the host synchronisations (CUDA runtime calls that wait for the GPU) and the host↔device copies; from CUDA's
    sync debug mode the lines of Python that synchronise (file:line × times a step)."""
    import collections
    import warnings
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    cuda, (n1, n2) = dev.type == "cuda", steps
    prompt = rand_tokens(prompt_len, torch.Generator().manual_seed(12))
    sampler = sampling.Sampler(tk)

    def run(n: int) -> float:
        t0 = sync(dev)
        sampler.sample(prompt, rows, n2, temperature=TEMPERATURE, eos=EOS, suppress=EOS, mode=mode,
                       generator=torch.Generator(dev).manual_seed(2),
                       stop=lambda y: len(y) >= n or bool(ends and y[-1] % ends == 0))
        return sync(dev) - t0

    def profiled(n: int) -> dict:
        with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            run(n)
        c = collections.Counter()
        for e in prof.key_averages():
            if cuda and e.device_type.name == "CUDA":
                c["copies" if e.key.startswith("Memcpy") else "kernels"] += e.count
                c["busy_us"] += 0 if e.key.startswith("Mem") else e.device_time_total
            elif not cuda and e.key.startswith("aten::"):
                c["kernels"] += e.count
                c["busy_us"] += e.self_cpu_time_total
            c["launches"] += e.count if e.key in LAUNCH_CALLS else 0
            c["syncs"] += e.count if e.key in SYNC_CALLS else 0
        return c

    def sync_sites(n: int) -> collections.Counter:
        if not cuda:
            return collections.Counter()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run(n)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                   if "synchroniz" in str(w.message))

    run(n1)  # warm-up: the graph's capture, cuBLAS's choices
    n = n2 - n1
    wall = (min(run(n2) for _ in range(2)) - min(run(n1) for _ in range(2))) / n * 1000
    a, b = profiled(n1), profiled(n2)
    per = {k: (b[k] - a[k]) / n for k in ("kernels", "busy_us", "launches", "syncs", "copies")}
    sa, sb = sync_sites(n1), sync_sites(n2)
    sites = {k: (sb[k] - sa[k]) / n for k in sb}
    return {"wall_ms": wall, "busy_ms": per["busy_us"] / 1000, "kernels": per["kernels"], "launches": per["launches"],
            "syncs": per["syncs"], "copies": per["copies"],
            "sites": ", ".join(f"{k} ×{v:.2g}" for k, v in sorted(sites.items(), key=lambda kv: -kv[1]) if v > 0)}


def profile(tk, dev) -> None:
    """A decode step as the GPU sees it (step_profile), eager and graphed, at 8 and 50 rows."""
    print("One decode step through torch.profiler, per step over 16 steps after a 200-token prompt (no row ends):\n")
    rows = []
    for r in (G_GRPO, G_TSPMO):
        for mode in ("eager", "graph"):
            p = step_profile(tk, dev, r, mode)
            rows.append([f"{mode}, {r} rows", f"{p['wall_ms']:.2f}", f"{p['busy_ms']:.2f}",
                         f"{p['busy_ms'] / p['wall_ms']:.2f}", f"{p['kernels']:.0f}", f"{p['launches']:.1f}",
                         f"{p['syncs']:.1f}", f"{p['copies']:.1f}", p["sites"] or "-"])
    table(["decode", "step ms", "GPU busy ms", "busy fraction", "kernels", "launches", "host syncs",
           "host↔device copies", "syncing lines (a step)"], rows)


@torch.no_grad()
def mismatch_rows(tk, dev) -> list[dict]:
    """How far the opt-in precisions' samples are from the fp32 policy: log π of each sampled token under the
    sampler's precision against fp32's (the same forward, T = 1: the log-probs a ratio π_θ/π_θold would read)."""
    prompt = rand_tokens(40, torch.Generator().manual_seed(13))
    rows, sampler = [], sampling.Sampler(tk)
    for precision in ("tf32", "bf16"):
        ys = sampler.sample(prompt, 16, 64, temperature=TEMPERATURE, eos=EOS, suppress=EOS, precision=precision,
                            generator=torch.Generator(dev).manual_seed(3))
        diffs = []
        for y in ys:
            pos = torch.arange(len(prompt), len(prompt) + len(y), device=dev)
            fp32 = lora.logprobs(tk, [prompt + y], [pos]).logp[0]
            with sampling.matmul_precision(precision == "tf32"):
                net = sampler.bf16() if precision == "bf16" else tk
                low = lora.logprobs(net, [prompt + y], [pos]).logp[0]
            diffs.append((low.float() - fp32).abs())
        d = torch.cat(diffs)
        rows.append({"precision": precision, "mean |Δ log π|": f"{float(d.mean()):.2e}",
                     "max |Δ log π|": f"{float(d.max()):.2e}",
                     "% tokens with |Δ| > 0.01": f"{float((d > 0.01).float().mean()) * 100:.1f}"})
    return rows


def mismatch(tk, dev) -> None:
    rows = mismatch_rows(tk, dev)
    print("Sampled tokens' log π under the sampling precision against fp32 (16 × 64 tokens; random weights give "
          "near-uniform distributions, so a trained model's gaps may differ):\n")
    table(list(rows[0]), [list(r.values()) for r in rows])


# ----------------------------------------------------------------------------------------------------------------------
# Sections 4 and 5 (CUDA): evaluation, and the projected paper runs

TABLES = [("II", "mult", 3000, {"grpo": 450, "sgrpo": 450, "tspmo": 350}),
          ("I", "svamp", 300, {"grpo": 325, "sgrpo": 325, "tspmo": 400})]  # the paper's steps, test-set sizes
EVAL_EVERY = 50


def evaluations(steps: int) -> int:
    """Evaluations in a run: at step 0, every EVAL_EVERY steps, and at the end (train.py's rule)."""
    return 1 + steps // EVAL_EVERY + (1 if steps % EVAL_EVERY else 0)


@torch.no_grad()
def evaluation_section(tk, dev) -> float:
    """Section 4: greedy evaluation, 300 new tokens (random weights: no EOS, every row runs to the end), 60-token
    prompts; returns seconds per problem at the default --eval-batch."""
    import evaluation
    from settings import Settings
    rows = evaluation.eval_batch(Settings(device=str(dev)), tk.config, 60, 3000)
    n = min(rows, 512)
    g = torch.Generator().manual_seed(14)
    prompts = [rand_tokens(60, g) for _ in range(n)]
    sampler = sampling.Sampler(tk)

    def per_problem(batch: list, mode=None) -> float:
        sampler.greedy(batch[:2], 4, mode=mode)  # warm-up
        t0 = sync(dev)
        sampler.greedy(batch, 300, mode=mode)
        return (sync(dev) - t0) / len(batch)
    eager = per_problem(prompts[:32], "eager")
    graph = per_problem(prompts)
    sampler.release()
    print(f"## 4. Greedy evaluation, 60-token prompts, 300 new tokens each\n\nThe default --eval-batch here is {rows} "
          f"rows (half the free memory: evaluation.eval_batch); measured on {n} problems in one batch.\n")
    table(["evaluation", "s per problem", "3,000 problems (mult), s", "300 (SVAMP), s"],
          [["--eval-batch 32, eager decode (before)", f"{eager:.4f}", f"{3000 * eager:.0f}", f"{300 * eager:.0f}"],
           [f"--eval-batch {rows} (default), {sampling.default_mode(dev)} decode", f"{graph:.4f}", f"{3000 * graph:.0f}", f"{300 * graph:.0f}"]])
    return graph


def projection_section(steps: dict, eval_s: float) -> None:
    """Section 5: steps × a whole step's seconds (section 3) + evaluations × the test set × seconds per problem."""
    print("## 5. Projected paper runs on this GPU, evaluations included (every 50 steps, at the start and the end)\n")
    print("Step seconds from section 3 (the multiplication settings; SVAMP's rows use them too: its LoRA, 1/3 of the "
          "layers at rank 16, backpropagates through 9 layers where mult's 1/4 does 7, so its steps cost somewhat "
          "more); opt-in: the same steps with sampling in bf16 (--sample-precision bf16).\n")
    rows = []
    for tab, task, n_test, runs in TABLES:
        for kind, n_steps in runs.items():
            if kind not in steps:
                continue
            s, s_opt = steps[kind]
            ev = evaluations(n_steps) * n_test * eval_s
            rows.append([f"Table {tab}, {task}", NAMES[kind], str(n_steps), f"{s:.1f}", f"{ev / 60:.1f}",
                         f"{(n_steps * s + ev) / 60:.0f}", f"{(n_steps * s_opt + ev) / 60:.0f}"])
    table(["table", "algorithm", "steps", "s/step", "evaluations, min", "run, min", "run with bf16 sampling, min"],
          rows)


# ----------------------------------------------------------------------------------------------------------------------
# Fixed workloads: the completions every training measurement uses


def rand_tokens(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(0, EOS[0], (n,), generator=g).tolist()


def tree_completions(G: int, T: int, g: torch.Generator) -> list[list[int]]:
    """G completions of T tokens that share prefixes like low-temperature samples of a trained model: each follows an
    earlier one (picked at random) up to a uniform random cut, then goes its own way (the trie has G−1 branches)."""
    ys = [rand_tokens(T, g)]
    for i in range(1, G):
        j, cut = int(torch.randint(i, (), generator=g)), int(torch.randint(T, (), generator=g))
        ys.append(ys[j][:cut] + rand_tokens(T - cut, g))
    return ys


def rewards(G: int, g: torch.Generator) -> list[float]:
    r = (torch.rand(G, generator=g) < 0.3).float().tolist()  # exact-match-like 0/1 rewards
    r[0], r[1] = 1.0, 0.0  # never a zero-variance group: it would give no gradient and time nothing
    return r


def common_prefix(ys: list[list[int]]) -> float:
    """Mean length of the shared prefix over all pairs of completions."""
    lens = [next((t for t, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b)))
            for i, a in enumerate(ys) for b in ys[i + 1:]]
    return sum(lens) / len(lens)


def workload(prompt: list[int], ys8: list[list[int]], T: int, seed: int) -> dict:
    """GRPO/S-GRPO on ys8 (8 completions) and a T-SPMO step: 50 tree completions plus one replay group.

    Replay (SPEC.md, mult C_success = 1): one successful completion, a uniform cut j, 50 continuations of T − j
    tokens from prompt + y[:j] (so no training sequence is longer than prompt + T)."""
    g = torch.Generator().manual_seed(seed)
    sel = [tokrl.select_tokens(len(y), ALPHA, K, P_SELECT, g) for y in ys8]
    ys50, r50 = tree_completions(G_TSPMO, T, g), rewards(G_TSPMO, g)
    y = ys50[next(i for i, r in enumerate(r50) if r >= 1.0)]
    j = int(torch.randint(len(y), (), generator=g))
    return {"prompt": prompt, "grpo": [ys8, rewards(G_GRPO, g), sel],
            "tspmo": [ys50, r50], "replay": [prompt + y[:j], tree_completions(G_TSPMO, T - j, g),
                                             rewards(G_TSPMO, g)]}


def trie_info(w: dict) -> str:
    t = PrefixTrie(*w["tspmo"])
    return (f"T-SPMO group: {len(t.edges)} edges, {len(t.targets())} forwards, "
            f"{100 * t.nonzero_token_fraction():.1f}% of tokens with A != 0; replay cut after "
            f"{len(w['replay'][0]) - len(w['prompt'])} tokens")


# ----------------------------------------------------------------------------------------------------------------------
# The two implementations of a training step


def sample_group(sampler, prompt, G: int, L: int, n: int, dev, precision: str = "fp32") -> tuple[float, float]:
    """Sample G completions of L tokens (EOS suppressed) through `sampler` (the step's: its graphs and bf16 copy kept
    between the calls); returns (seconds measured, seconds for L tokens).

    n < L (CPU, section 3): sample 1 and n tokens and extrapolate the per-token cost to L, and fill a KV cache of the
    full length first, so that the step's memory includes what full-length sampling would hold."""
    def run(k: int) -> float:
        t0 = sync(dev)
        sampler.sample(prompt, G, k, temperature=TEMPERATURE, eos=EOS, suppress=EOS, precision=precision,
                       generator=torch.Generator(dev).manual_seed(5))
        return sync(dev) - t0
    if n >= L:
        t = run(L)
        return t, t
    cache = M.KVCache(sampler.model.config, G, len(prompt) + L, dev, torch.float32)
    for x in cache.k + cache.v:
        x.zero_()  # written pages only: an untouched allocation does not count in the RSS
    del cache
    t1, tn = run(1), run(n)  # the prefill is paid once, the decoding cost grows with the tokens
    return t1 + tn, t1 + (tn - t1) * (L - 1) / (n - 1)


def ours_backward(model, kind, prompt, ys, rs, sel, critic=None, opt=None, backward_batch=1):
    if kind == "tspmo":
        tokrl.tspmo_backward(model, prompt, ys, rs, lam=LAM)
    elif kind in ("ppo", "pposep"):  # what train.py runs: the no-grad pass, then μ passes (μ − 1 optimizer steps here)
        ppo_update(model, critic, opt, prompt, ys, rs, dataclasses.replace(PPO, backward_batch=backward_batch))
    elif kind == "dpo":
        baselines.dpo_backward(model, prompt, ys, rs, beta=PPO.dpo_beta, backward_batch=backward_batch)
    else:
        tokrl.grpo_backward(model, prompt, ys, rs, beta=BETA, selection=sel if kind == "sgrpo" else None,
                            backward_batch=backward_batch)


def padded(prompt, ys, dev):
    T = len(prompt) + max(map(len, ys))
    # Right padding needs no attention mask: attention is causal, so no real token sees the padding.
    return torch.tensor([prompt + y + [EOS[0]] * (T - len(prompt) - len(y)) for y in ys], device=dev)  # (G, T)


def hf_backward(pm, kind, prompt, ys, rs, sel, rows: int = G_GRPO):
    """The obvious way: full forward of every row with grad, full (G, T, V) log_softmax, reference forward with the
    adapters disabled, tokrl's batched loss. T-SPMO goes 8 rows at a time (50 rows at once would not fit in 24 GiB)."""
    dev, P = pm.device, len(prompt)
    if kind != "tspmo":
        ids = padded(prompt, ys, dev)
        mask = tokrl.loss_mask(P, [len(y) for y in ys], ids.shape[1])  # (G, T)
        if kind == "sgrpo":
            chosen = torch.zeros_like(mask)
            for i, s in enumerate(sel):
                chosen[i, [P + t for t in s]] = True
            mask &= chosen
        logits = pm(input_ids=ids, use_cache=False).logits  # (G, T, V)
        with torch.no_grad(), pm.disable_adapter():
            ref = pm(input_ids=ids, use_cache=False).logits
        tokrl.grpo_loss_batched(logits, ref, ids, mask.to(dev), rs, BETA).backward()
        return
    t = PrefixTrie(ys, rs)
    U = len(t.edges)
    for s in range(0, len(ys), rows):
        ids = padded(prompt, ys[s:s + rows], dev)
        w = torch.zeros(ids.shape)  # (B, T) weight of π at each token
        for b, y in enumerate(ys[s:s + rows]):
            for j in range(len(y)):  # an edge (p, v) lies on count(p∘v) rows: each row carries 1/count of it
                c = t.paths[s + b][j + 1]
                w[b, P + j] = t.advantage(c) / (U * t.count[c])
        w = w.to(dev)
        logits = pm(input_ids=ids, use_cache=False).logits  # (B, T, V)
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        (-(logp.exp() * w[:, 1:]).sum()).backward()  # E10: π, not log π
    (LAM * sum(p.pow(2).sum() for p in pm.parameters() if p.requires_grad)).backward()


def tokrl_step(model, kind: str) -> tuple[list, torch.optim.Optimizer, Callable]:
    """tokrl's training step of `kind` on a model with LoRA on: (the trained parameters, AdamW over them,
    backward(prompt, ys, rs, sel, n=1)). PPO gets its critic (separate: a second copy of the base weights, resident
    before the step)."""
    critic = None
    if kind in ("ppo", "pposep"):
        critic = baselines.Critic(model, "separate" if kind == "pposep" else "shared")
    params = lora.lora_parameters(model) + (critic.parameters() if critic else [])
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    return params, opt, lambda *a, n=1: ours_backward(model, kind, *a, critic=critic, opt=opt, backward_batch=n)


def step_groups(w: dict, kind: str) -> list[list]:
    """The groups one step of `kind` trains on (prompt, completions, rewards, S-GRPO's selection): GRPO's group, or
    T-SPMO's fresh group and its replay."""
    return [[w["prompt"], *w["grpo"]]] if kind != "tspmo" else [[w["prompt"], *w["tspmo"], None],
                                                                [*w["replay"], None]]


def whole_step(model, params, opt, backward, groups, dev, sample: int = 0, precision: str = "fp32") -> dict:
    """A warm-up, then one optimizer step per group (each group sampled first when `sample` > 0, see sample_group),
    inside one peak-memory region: the seconds, the peak and its growth, and `grads`, the first update's gradient
    (to check that both sides compute the same loss)."""
    # Warm-up, so that first-call costs stay out of the timing and every weight is resident before the memory is
    # read (safetensors maps the file: a weight is paged in when first touched). The two warm-up completions differ
    # at their first token, so that T-SPMO too has an edge with A != 0 and runs a forward.
    backward(groups[0][0], [list(range(1, 9)), list(range(11, 19))], [0.0, 1.0], [[0, 1]] * 2)
    opt.zero_grad(set_to_none=True)
    base = memory_reset(dev)
    t_sample, t_train, grads, sampler = [], [], None, sampling.Sampler(model)
    for prompt, ys, rs, sel in groups:
        if sample:  # section 3: a whole step samples the group first
            t_sample.append(sample_group(sampler, prompt, len(ys), len(ys[0]), sample, dev, precision))
        t0 = sync(dev)
        backward(prompt, ys, rs, sel)
        if grads is None:
            grads = [p.grad.cpu().clone() for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_train.append(sync(dev) - t0)
    peak = memory_peak(dev)
    return {"train": sum(t_train), "sample": [sum(x) for x in zip(*t_sample)] or [0, 0], "peak": peak,
            "inc": peak - base, "grads": grads}


def one(args) -> None:
    """--one BACKEND-KIND: load, add LoRA, warm up, then measure one optimizer step (and sampling, if asked; with
    --batches N,M,..., one step at each --backward-batch, its own peak; with --opt-in, the sampling again in bf16)."""
    backend, kind = args.one.split("-")
    dev, work = torch.device(args.device), Path(args.work)
    if dev.type == "cpu":
        torch.set_flush_denormal(True)  # as train.py does, for both libraries
    w = json.loads((work / "work.json").read_text())
    if backend == "parity":
        print("RESULT", json.dumps({"err": parity(pretrained.load_model(args.ckpt, device=dev), load_hf(args.ckpt, dev), dev)}))
        return
    if backend == "tokrl":
        model = pretrained.load_model(args.ckpt, device=dev)
        lora.apply_lora(model, r=LORA_R, fraction=LORA_FRACTION, generator=torch.Generator().manual_seed(4))
        checkpoints.write_adapter(model, work / "adapter")  # PEFT starts from these very A and B
        params, opt, backward = tokrl_step(model, kind)
    else:
        import peft
        from safetensors.torch import load_file
        hf, model = load_hf(args.ckpt, dev), None
        L = hf.config.num_hidden_layers
        cfg = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_R, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                              layers_to_transform=list(range(L - lora.num_lora_layers(L, LORA_FRACTION), L)))
        pm = peft.get_peft_model(hf, cfg)
        res = peft.set_peft_model_state_dict(pm, load_file(str(work / "adapter" / "adapter_model.safetensors")))
        assert not res.unexpected_keys, res.unexpected_keys
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
        backward = lambda *a, n=1: hf_backward(pm, kind, *a)  # noqa: E731
    groups = step_groups(w, kind)
    result = whole_step(model, params, opt, backward, groups, dev, args.sample)
    torch.save(result.pop("grads"), work / f"grad-{args.one}.pt")
    for n in map(int, filter(None, args.batches.split(","))):  # --backward-batch n: the training part alone
        base, t0 = memory_reset(dev), sync(dev)
        for prompt, ys, rs, sel in groups:
            backward(prompt, ys, rs, sel, n=n)
            opt.step()
            opt.zero_grad(set_to_none=True)
        result[f"batch{n}"] = {"train": sync(dev) - t0, "peak": memory_peak(dev), "inc": memory_peak(dev) - base}
    if args.opt_in:  # the same groups sampled in bf16 (a bf16 copy of the base beside the fp32 weights)
        base = memory_reset(dev)
        sampler = sampling.Sampler(model)
        s = [sample_group(sampler, prompt, len(ys), len(ys[0]), args.sample, dev, "bf16") for prompt, ys, _, _ in groups]
        result["opt_in"] = {"sample": [sum(x) for x in zip(*s)], "peak": memory_peak(dev)}
    print("RESULT", json.dumps(result))


def measure(name: str, ckpt: Path, work: Path, dev: torch.device, sample: int = 0, batches: str = "",
            opt_in: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--ckpt", str(ckpt), "--work", str(work), "--device", str(dev),
           "--sample", str(sample), "--batches", batches] + (["--opt-in"] if opt_in else [])
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"{name} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(line[7:])


def grad_err(work: Path, kind: str) -> float:
    """Largest relative error over the LoRA gradient tensors (at step 0, B = 0 makes the policy term's grad of A
    zero, so a single norm over all of them would only see the largest tensors)."""
    a, b = (torch.load(work / f"grad-{x}-{kind}.pt") for x in ("tokrl", "hf"))
    return max(float((x - y).norm() / y.norm()) if y.norm() > 0 else float(x.norm()) for x, y in zip(a, b))


def gib(x: float) -> str:
    return f"{x / GiB:.2f}"


# ----------------------------------------------------------------------------------------------------------------------
# Sections 2 and 3


def training(preset: str, ckpt: Path, work: Path, dev, prompt, ys8, T, kinds) -> None:
    mem = "max_memory_allocated" if dev.type == "cuda" else "peak RSS"
    print(f"## 2. One training step, {preset}: seconds and {mem} (GiB; Δ = growth during the step)\n")
    w = workload(prompt, ys8, T, seed=6)
    (work / "work.json").write_text(json.dumps(w))
    print(f"Prompt {len(prompt)} tokens; GRPO/S-GRPO: the {len(ys8)} completions of {len(ys8[0])} tokens sampled "
          f"above (mean shared prefix {common_prefix(ys8):.1f} tokens: a random-weight model diverges at once, so "
          f"T-SPMO uses {G_TSPMO} tree-structured completions of {T} tokens instead, see tree_completions). "
          f"{trie_info(w)}. LoRA r={LORA_R} on q_proj/v_proj of the last {LORA_FRACTION:g} of the layers, AdamW "
          f"lr {LR:g}, wd {WD:g}, β = λ = {BETA:g}, S-GRPO (α, k, P) = ({ALPHA}, {K}, {P_SELECT}). Reference: "
          "transformers + PEFT, full forward + full log_softmax + reference forward, tokrl.grpo_loss_batched "
          "(T-SPMO: E10 as per-token weights, 8 rows at a time), same LoRA init. Each cell is a fresh process.\n")
    rows, ours, batch_rows = [], {}, []
    for kind in [k for k in PAPER if k in kinds]:
        a = measure(f"tokrl-{kind}", ckpt, work, dev, batches="1,2,4,8" if kind == "grpo" else "")
        b = measure(f"hf-{kind}", ckpt, work, dev)
        ours[kind] = a
        batch_rows += [[f"GRPO (G=8), --backward-batch {k[5:]}", f"{v['train']:.2f}", gib(v["peak"]), gib(v["inc"])]
                       for k, v in a.items() if k.startswith("batch")]
        rows.append([NAMES[kind], f"{a['train']:.2f}", f"{b['train']:.2f}", f"{a['train'] / b['train']:.2f}",
                     f"{gib(a['peak'])} (Δ {gib(a['inc'])})", f"{gib(b['peak'])} (Δ {gib(b['inc'])})",
                     f"{a['peak'] / b['peak']:.2f} (Δ {a['inc'] / b['inc']:.2f})", f"{grad_err(work, kind):.1e}"])
    if rows:
        table(["algorithm", "tokrl s", "reference s", "time ratio", "tokrl peak", "reference peak", "memory ratio",
               "grad rel. err"], rows)
    if batch_rows:
        print("GRPO's training step with N completions per forward and backward (--backward-batch N; 1: the paper's "
              "per-completion backward), in one process, each its own peak:\n")
        table(["training", "s", "peak", "Δ"], batch_rows)
    if any(k in kinds for k in BASELINES):
        baseline_rows(ckpt, work, dev, kinds, ours.get("grpo") or measure("tokrl-grpo", ckpt, work, dev))


def baseline_rows(ckpt: Path, work: Path, dev, kinds, grpo: dict) -> None:
    """PPO (shared, separate critic) and DPO on GRPO's completions and rewards, against tokrl's GRPO step."""
    print("Baselines (SPEC-baselines.md), tokrl only, on the GRPO completions and rewards above; ratios against "
          f"tokrl's GRPO step ({grpo['train']:.2f} s, peak {gib(grpo['peak'])} GiB, Δ {gib(grpo['inc'])}). PPO: one "
          "no-gradient pass (π_θold, π_ref, V), then μ = 4 passes of per-completion forward+backward, each an "
          "optimizer step; separate critic: a second copy of the base weights with its own LoRA. DPO: one "
          "no-gradient pass (log-ratios), then one forward+backward per completion in a pair.\n")
    rows = []
    for kind in [k for k in BASELINES if k in kinds]:
        a = measure(f"tokrl-{kind}", ckpt, work, dev)
        rows.append([NAMES[kind], f"{a['train']:.2f}", f"{a['train'] / grpo['train']:.2f}",
                     f"{gib(a['peak'])} (Δ {gib(a['inc'])})", f"{a['peak'] / grpo['peak']:.2f}",
                     f"{a['inc'] / grpo['inc']:.2f}"])
    table(["algorithm", "s", "time ÷ GRPO", "peak (Δ)", "peak ÷ GRPO", "Δ ÷ GRPO"], rows)


def full_size(ckpt: Path, work: Path, dev, n_sample: int, kinds) -> dict:
    T, on_gpu = 300, dev.type == "cuda"
    g = torch.Generator().manual_seed(7)
    prompt = rand_tokens(50, g)
    w = workload(prompt, [rand_tokens(T, g) for _ in range(G_GRPO)], T, seed=8)
    (work / "work.json").write_text(json.dumps(w))
    mem = "max_memory_allocated" if on_gpu else "peak RSS"
    print(f"## 3. Full Qwen2-1.5B shape, fp32: a whole step ({mem}, GiB)\n")
    print(f"Training sequences: 50-token prompt + {T}-token completions (random tokens for GRPO/S-GRPO; "
          f"{trie_info(w)}). "
          + ("Sampling runs for real (300 tokens, EOS suppressed)." if n_sample >= T else
             f"SAMPLING IS SHORTENED (CPU): 1 and {n_sample} new tokens per group, the per-token time extrapolated "
             "to the group's length; a KV cache of the full length is filled in its place, so the memory is that of "
             "full-length sampling. The training sequences are never shortened.") + "\n")
    print(f"Parity with transformers: max abs logit error {measure('parity-x', ckpt, work, dev)['err']:.1e}\n")

    def row(name, r, s_meas):
        return [name, f"{s_meas:.1f}" if s_meas else "-", f"{r['train']:.1f}", f"{s_meas + r['train']:.1f}",
                gib(r["peak"]), gib(r["inc"]), "yes" if r["peak"] < 40 * GiB else "NO",
                "yes" if r["peak"] < 12 * GiB else "no"]

    rows, proj, steps, batch_rows = [], [], {}, []
    for kind in [k for k in PAPER + BASELINES if k in kinds]:  # PPO, DPO: GRPO's completions and rewards
        r = measure(f"tokrl-{kind}", ckpt, work, dev, sample=n_sample, opt_in=on_gpu and kind in PAPER,
                    batches="1,2,4,8" if on_gpu and kind == "grpo" else "")
        s_meas, s_full = r["sample"]  # equal when nothing was shortened
        rows.append(row(NAMES[kind], r, s_meas))
        proj.append([NAMES[kind], str(STEPS[kind]), f"{s_full + r['train']:.0f}",
                     f"{STEPS[kind] * (s_full + r['train']) / 3600:.1f}"])
        if "opt_in" in r:
            o = r["opt_in"]
            steps[kind] = (s_full + r["train"], o["sample"][1] + r["train"])
            rows.append(row(f"{NAMES[kind]}, bf16 sampling", {**r, "peak": max(r["peak"], o["peak"])}, o["sample"][0]))
        batch_rows += [[f"GRPO (G=8), --backward-batch {k[5:]}", f"{b['train']:.2f}", gib(b["peak"]), gib(b["inc"])]
                       for k, b in r.items() if k.startswith("batch")]
    for kind in [k for k in (PAPER if on_gpu else ("grpo",)) if k in kinds]:  # on the CPU the reference: GRPO only
        ref = row(f"reference {NAMES[kind]}: transformers + PEFT, no sampling", measure(f"hf-{kind}", ckpt, work, dev),
                  0.0)
        rows.append(ref + ([f"{grad_err(work, kind):.1e}"] if on_gpu else []))
    table(["step", "sampling s" + ("" if on_gpu else f" (1 + {n_sample} tok)"), "training s", "step s", "peak", "Δ",
           "< 40 GiB", "< 12 GiB"] + (["grad rel. err"] if on_gpu else []), rows)
    if batch_rows:
        print("The training part of GRPO's step (8 completions of 300 tokens) with N completions per forward and "
              "backward (--backward-batch N; 1: the paper's per-completion backward):\n")
        table(["training", "s", "peak", "Δ"], batch_rows)
    where = "GPU" if on_gpu else f"THIS CPU ({os.cpu_count()} cores, NOT a GPU; sampling extrapolated)"
    print(f"Projected full paper run (mult step counts, SPEC.md) on {where}; evaluation not included:\n")
    table(["algorithm", "steps", "s/step (sampling + training)", "hours"], proj)
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full", action=argparse.BooleanOptionalAction, default=None,
                    help="section 3, the full Qwen2-1.5B shape (default: on, except with --quick)")
    ap.add_argument("--quick", action="store_true", help="short sequences in sections 1-2")
    ap.add_argument("--kinds", default=",".join(PAPER + BASELINES),
                    help="rows of sections 2-3, comma-separated among " + ",".join(PAPER + BASELINES))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement in this fresh process
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--sample", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--batches", default="", help=argparse.SUPPRESS)
    ap.add_argument("--opt-in", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt-dir", help="(CUDA) a Qwen2-1.5B-shaped model directory to use instead of building one")
    args = ap.parse_args()
    if args.one:
        return one(args)
    dev = torch.device(args.device)
    full = not args.quick if args.full is None else args.full
    kinds = args.kinds.split(",")
    if bad := set(kinds) - set(PAPER + BASELINES):
        ap.error(f"--kinds: unknown {', '.join(sorted(bad))}")
    header(dev)
    if dev.type == "cuda":
        return gpu_main(dev, args.ckpt_dir, full, kinds)
    N, T = (16, 48) if args.quick else (64, 200)
    with tempfile.TemporaryDirectory(prefix="tokrl-bench-") as tmp:
        for preset in ["qwen2-tiny-realvocab"]:
            ckpt, work = Path(tmp) / preset, Path(tmp) / f"work-{preset}"
            work.mkdir()
            build_checkpoint(preset, ckpt)
            tk, hf = pretrained.load_model(ckpt, device=dev), load_hf(ckpt, dev)
            print(f"{preset}: {M.num_parameters(tk) / 1e6:.0f} M parameters; parity with transformers: max abs "
                  f"logit error {parity(tk, hf, dev):.1e}\n")
            sampling_section(tk, hf, dev, N)
            prompt = torch.randint(0, EOS[0], (40,), generator=torch.Generator().manual_seed(9)).tolist()
            ys8 = sampling.sample(tk, prompt, G_GRPO, T, temperature=TEMPERATURE, eos=EOS, suppress=EOS,
                           generator=torch.Generator(dev).manual_seed(10))
            del tk, hf  # the measurements run in subprocesses: free this memory for them
            training(preset, ckpt, work, dev, prompt, ys8, T, kinds)
        if full:
            ckpt, work = Path(tmp) / "qwen2-1.5b", Path(tmp) / "work-full"
            work.mkdir()
            build_checkpoint("qwen2-1.5b", ckpt)
            full_size(ckpt, work, dev, n_sample=16, kinds=kinds)


def gpu_main(dev: torch.device, ckpt_dir: str | None, full: bool, kinds: list[str]) -> None:
    """CUDA: everything at the full Qwen2-1.5B shape, the quick sections first (section 2's small-model comparison
    is the CPU's: section 3 compares with transformers + PEFT here, gradients included)."""
    with tempfile.TemporaryDirectory(prefix="tokrl-bench-") as tmp:
        ckpt, work = Path(ckpt_dir or Path(tmp) / "qwen2-1.5b"), Path(tmp) / "work-full"
        work.mkdir()
        if not ckpt_dir:
            build_checkpoint("qwen2-1.5b", ckpt)
        tk, hf = pretrained.load_model(ckpt, device=dev), load_hf(ckpt, dev)
        tk.requires_grad_(False)  # frozen, as under LoRA: the bf16 copy casts every weight
        print(f"qwen2-1.5b: {M.num_parameters(tk) / 1e6:.0f} M parameters; parity with transformers: max abs logit "
              f"error {parity(tk, hf, dev):.1e}\n", flush=True)
        faster = decode_section(tk, dev)
        print(f"In fp32 at {G_TSPMO} rows the faster attention kernel here is {faster!r}; sampling.DECODE_ATTENTION is "
              f"{sampling.DECODE_ATTENTION!r}.\n", flush=True)
        sampling_section(tk, hf, dev, 64)
        eval_s = evaluation_section(tk, dev)
        del tk, hf  # the measurements run in subprocesses: free this memory for them
        torch.cuda.empty_cache()
        if full:
            projection_section(full_size(ckpt, work, dev, n_sample=300, kinds=kinds), eval_s)


if __name__ == "__main__":
    main()
