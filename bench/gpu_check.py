"""The GPU check: what tokrl's decode, sampling, evaluation and training steps cost on one GPU, measured in under 8
minutes by one command that anyone with a GPU can run on a copy of the repository (no network, no shared files):

    python bench/gpu_check.py OUT                              # on a machine with CUDA
    python bench/gpu_check.py OUT --tokenizer PATH             # PATH: Qwen2's tokenizer.json (see "Tokenizer")
    python bench/gpu_check.py OUT --parts decode,eval --work DIR --cap eval=120   # some parts again, longer
    python bench/gpu_check.py OUT --dry-run                    # the whole check on the CPU with a tiny model

Seven parts, each a process of its own in its own process group, under its own time cap (seconds, on the GPU):

    model     60  a random-weight model of Qwen2-1.5B's shape (fp32, normal std 0.02) built on the GPU and written,
                  with a tokenizer, to the work folder, where the other parts load it (their caps include the load)
    tests     60  the CUDA tests, tests/test_gpu.py
    decode    70  one decode step at 8 and 50 rows over a 400-slot cache: eager, graphed (fp32, each attention kernel,
                  cuBLASLt) and the lower precisions; the step through torch.profiler (kernels, launches, host
                  syncs and the lines that cause them, host-device copies, GPU busy fraction); bf16's log-prob gaps
    sampling  45  sampling.sample against transformers' generate, G = 8 and 50, 64 tokens
    eval      70  greedy evaluation throughput at the default --eval-batch, then at 32 rows (eager), 64, 256 and
                  1024, and a batch whose rows end at different steps, fixed-shape against eager
    memory    90  a whole step (sampling 300 tokens + the update) of every algorithm under LoRA at the paper's mult
                  settings: seconds and peak memory (torch.cuda.max_memory_allocated); T-SPMO also with bf16 sampling;
                  then one GRPO step with --train full (every weight, fp32, the reference copy), its peak beside
                  full_finetune.memory_parts's arithmetic
    main      55  python train.py --algo tspmo --task mult, 2 steps, --eval-limit 128

The caps add up to 450 s, and the whole check stops at --budget (470 s) after its start whatever the parts do: a
part that would start with less than its cap gets what is left, and none starts with under 15 s. Everything lands in
OUT: each part's log (PART.log, its command first) and summary.md, rewritten when a part starts and when it ends, so a
run cut short still reports what it measured (the parts print each measurement as it is made). With the model
part's device and the repository's commit, summary.md gives every table, the projected paper run (Table II's T-SPMO
on mult) and the targets beside the figures.

Every process the check starts ends with it: a part is killed with its whole process group at its cap; on SIGTERM,
SIGINT or SIGHUP the check kills the running part's group, writes summary.md (the part "stopped by SIGTERM") and
exits with 128 + the signal; and each part's leader dies with the check (Linux's parent-death signal) if the check
itself is killed outright. The model is built in a temporary folder (/dev/shm when it has room, else the system's
temporary folder), removed at the end; --work DIR keeps it there for the next run, which reuses it.

Tokenizer. Only the main part reads text (the others feed random token ids). [decided] Without --tokenizer the check
builds a byte-level tokenizer with Qwen2's special tokens at Qwen2's ids rather than stopping: the main command's
mult prompt is then 156 tokens instead of the 49 Qwen2's tokenizer gives, so its prefill and cache are longer (the
completions, random ids, decode to little text either way); every other figure is the same.

Exit status: 0 when every part exited 0, 1 when one failed or was cut off, 2 on bad input (one line, before anything
is written), 128 + the signal when one stopped the check.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's rooms: values.py here, the others inside each part
from values import first_line  # noqa: E402

BUDGET_S = 470  # the whole check, from its start to summary.md's last write
RESERVE_S = 10  # kept back from the budget to end a part, write summary.md and remove the model
MIN_CAP_S = 15  # a part that would get less is not started
DRY_CAP_S, DRY_BUDGET_S = 120, 900  # the dry run on a CPU, whose figures mean nothing: only that every part runs
PARTS = {"model": 60, "tests": 60, "decode": 70, "sampling": 45, "eval": 70, "memory": 90, "main": 55}  # caps, s
NEEDS_MODEL = ("decode", "sampling", "eval", "memory", "main")
MODEL_BYTES = 7 * 2**30  # room for the model folder: Qwen2-1.5B's 6.2 GB of fp32 weights, the tokenizer, the run
QWEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
MULT_STEPS, MULT_TEST = 350, 3000  # T-SPMO's steps on mult and the mult test set (Table II)
TARGETS = {"decode": "≤ 8 / ≤ 12 ms (fp32), ≤ 4 ms (lower precision)", "sampling": "≥ 1.5× generate",
           "memory": "peak < 12 GB", "run": "T-SPMO mult < 50 min (defaults), < 20 min (bf16 sampling)"}


@dataclass(frozen=True)
class Sizes:
    """What the parts run at: the paper's shapes on a GPU; a tiny model and a few tokens in the dry run."""
    config: dict = field(default_factory=dict)  # Qwen2Config fields over Qwen2-1.5B's
    decode_rows: tuple = (8, 50)
    decode_prompt: int = 280
    decode_slots: int = 400
    decode_k1: int = 20
    profile_prompt: int = 200
    profile_steps: tuple = (8, 24)
    # (rows, decode, a row ends at 1 token in N or never: 0); "fixed": the graph on CUDA, the fixed-shape step without
    # it on the CPU
    profile: tuple = ((8, "fixed", 0), (50, "fixed", 0), (50, "fixed", 50), (50, "eager", 0), (8, "eager", 0))
    sample_groups: tuple = (8, 50)
    sample_tokens: int = 64
    eval_prompt: int = 60
    eval_tokens: int = 300
    eval_eager_batch: int = 32
    eval_batches: tuple = (64, 256, 1024)
    eval_steps: tuple = (8, 40)
    eval_early_batch: int = 256
    eval_early_every: int = 100  # a row ends at a token id divisible by this: a mean length of about 100 tokens
    step_prompt: int = 50
    step_tokens: int = 300
    main: tuple = ("--steps", "2", "--eval-limit", "128")


GPU = Sizes()
DRY = Sizes(config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, max_position_embeddings=1024),
            decode_rows=(2, 3), decode_prompt=4, decode_slots=12, decode_k1=2, profile_prompt=4,
            profile_steps=(1, 3), profile=((3, "fixed", 3), (2, "eager", 0)), sample_groups=(2, 3),
            sample_tokens=3, eval_prompt=4, eval_tokens=6, eval_eager_batch=2, eval_batches=(3,), eval_steps=(2, 4),
            eval_early_batch=3, eval_early_every=3, step_prompt=4, step_tokens=4,
            main=("--steps", "1", "-G", "2", "--max-new-tokens", "3", "--eval-limit", "2"))


# ----------------------------------------------------------------------------------------------------------------------
# The parts (each in its own process: `gpu_check.py --part NAME ...`, started by the check)


def emit(table: str, **row) -> None:
    """One measurement, as soon as it is made: a line of the part's log that summary.md turns into a table row.
    Keys starting with "_" travel with the row but are not shown."""
    print("@row " + json.dumps({"table": table, **row}, ensure_ascii=False), flush=True)


def gib(x: float) -> float:
    return x / 2**30


def part_model(a, sz: Sizes, dev) -> None:
    """The model folder, built in model.partial and renamed when its weights are complete (a folder named model
    holds whole weights); one that a previous run left with the same config.json is reused."""
    import torch

    import model as M
    import pretrained
    import sampling
    import tokenizer
    import tasks
    cfg = M.Qwen2Config(**sz.config)
    final, partial = a.work / "model", a.work / "model.partial"
    t0 = time.time()
    reused = (final / "model.safetensors").is_file() and (final / "config.json").is_file() and \
        json.loads((final / "config.json").read_text()) == json.loads(json.dumps(pretrained.config_to_dict(cfg)))
    if not reused:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        with torch.device(dev):
            m = M.Qwen2ForCausalLM(cfg)
        m.init_weights(torch.Generator(dev).manual_seed(0), std=0.02)
        pretrained.save_model(m, partial)
        del m
        (partial / "generation_config.json").write_text(json.dumps({"eos_token_id": [151643, 151645]}))
        partial.rename(final)
    if a.tokenizer:  # this run's tokenizer, also in a reused folder
        shutil.copy(a.tokenizer, final / "tokenizer.json")
    else:
        write_tokenizer(final / "tokenizer.json")
    pretrained.check_model_dir(final)  # what train.py checks before it loads
    tok = tokenizer.Tokenizer(final / "tokenizer.json")
    mult = tasks.make_task("mult", tok)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (dry run)"
    memory = f"{gib(torch.cuda.get_device_properties(dev).total_memory):.1f} GiB" if dev.type == "cuda" else "-"
    with torch.device("meta"):
        parameters = M.num_parameters(M.Qwen2ForCausalLM(cfg))
    emit("model", device=name, **{"device memory": memory, "torch": torch.__version__,
                                  "parameters": f"{parameters:,}",
                                  "weights GB": (final / "model.safetensors").stat().st_size / 1e9,
                                  "built in s": "reused" if reused else time.time() - t0,
                                  "tokenizer": "Qwen2's, from --tokenizer" if a.tokenizer else "built by the check",
                                  "mult prompt tokens": len(tok.encode(mult.prompt(mult.test_set()[0])))})


def write_tokenizer(path: Path) -> None:
    """A byte-level BPE without merges that reads any text (one token a byte, ids 0-255), with <|endoftext|>,
    <|im_start|> and <|im_end|> at Qwen2's ids; any other id a random model draws decodes to nothing."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord))} | QWEN_IDS
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True) for t in QWEN_IDS])  # recognised in the text, at their ids
    tk.save(str(path))


def load(a, dev):
    import model as M
    import pretrained
    import sampling
    import tokenizer
    tk = pretrained.load_model(a.work / "model", device=dev)
    tk.requires_grad_(False)  # frozen, as under LoRA: the bf16 copy casts every frozen weight
    return tk


def part_decode(a, sz: Sizes, dev) -> None:
    import benchmark as B
    tk, cuda = load(a, dev), dev.type == "cuda"
    shape = dict(prompt_len=sz.decode_prompt, slots=sz.decode_slots, k1=sz.decode_k1)
    if cuda:
        weights = sum(p.numel() * p.element_size() for p in tk.parameters())
        bandwidth = B.copy_bandwidth(dev)
        emit("the floor of a step", **{"weights GB": weights / 1e9, "copy bandwidth GB/s": bandwidth / 1e9,
                                       "reading the weights once, ms": weights / bandwidth * 1000})
        variants = [B.DECODE_VARIANTS[i] for i in (0, 2, 5, 1, 3, 4)]  # eager, the default graph and bf16 first
    else:  # the fixed-shape step without its graph stands for the graph
        variants = [B.DECODE_VARIANTS[0], ("fixed shape, no graph (CUDA's step)", {"mode": "static"}, None, None)]
    fixed = "graph" if cuda else "static"

    def step_rows(vs):
        for v in vs:
            name = v[0]
            target = "≤ 4 ms at 8 rows" if "bf16" in name or "TF32" in name else \
                "≤ 8 / ≤ 12 ms" if name.startswith("graph, fp32") else "-"
            try:
                ms = B.decode_variant_ms(tk, dev, v, sz.decode_rows, **shape)
                cells = {f"{r} rows, ms": x for r, x in zip(sz.decode_rows, ms)}
            except RuntimeError as e:  # a kernel that refuses these inputs is a result too
                cells = {f"{r} rows, ms": "failed" for r in sz.decode_rows} | {"error": first_line(e)[:200]}
            emit(f"one decode step over a {sz.decode_slots}-slot cache", decode=name, **cells, target=target)

    step_rows(variants[:3])
    for rows, mode, ends in sz.profile:
        mode = fixed if mode == "fixed" else mode
        try:
            p = B.step_profile(tk, dev, rows, mode, sz.profile_prompt, sz.profile_steps, ends)
        except Exception as e:  # a profiler that cannot read this machine must not hide the rest
            emit("the decode step, profiled", decode=mode, rows=rows,
                 error=f"{type(e).__name__}: {first_line(e)[:200]}")
            continue
        emit("the decode step, profiled", decode=mode, rows=rows,
             **{"rows end": f"1 in {ends} a step" if ends else "none", "step ms": p["wall_ms"],
                "GPU busy ms" if cuda else "CPU ms in aten ops": p["busy_ms"],
                "busy fraction": p["busy_ms"] / p["wall_ms"], "kernels" if cuda else "aten ops": p["kernels"],
                "launches": p["launches"], "host syncs": p["syncs"], "host-device copies": p["copies"],
                "syncing lines (times a step)": p["sites"] or "-"})
    step_rows(variants[3:])
    if cuda:
        for r in B.mismatch_rows(tk, dev):
            emit("sampled tokens' log π against fp32 (16 × 64 tokens)", **r)


def part_sampling(a, sz: Sizes, dev) -> None:
    import benchmark as B
    tk = load(a, dev)
    hf = B.load_hf(a.work / "model", dev)
    emit("sampling: sampling.sample against transformers' generate", G="parity",
         **{"tokrl tok/s": f"max abs logit error {B.parity(tk, hf, dev):.1e}"})
    for G in sz.sample_groups:
        r = B.sampling_row(tk, hf, dev, G, sz.sample_tokens)
        emit("sampling: sampling.sample against transformers' generate", G=G,
             **{"tokrl tok/s": r["tokrl"], "transformers tok/s": r["transformers"],
                "tokrl ÷ transformers": r["tokrl"] / r["transformers"], "target": "≥ 1.5",
                "eager ÷ transformers": r["eager"] / r["transformers"] if "eager" in r else "-"})


def part_eval(a, sz: Sizes, dev) -> None:
    """Greedy evaluation as evaluation.evaluate runs it (random weights: no row meets EOS, every row makes
    eval_tokens tokens unless a stop rule ends it), at several batch sizes."""
    import torch

    import benchmark as B
    import evaluation
    import model as M
    import pretrained
    import sampling
    import tokenizer
    import settings
    tk = load(a, dev)
    default = evaluation.eval_batch(settings.Settings(device=str(dev), max_new_tokens=sz.eval_tokens), tk.config,
                                sz.eval_prompt, MULT_TEST)
    fixed = sampling.default_mode(dev) if dev.type == "cuda" else "static"
    sampler = sampling.Sampler(tk)  # the evaluation's, as in a run: the warm-up's graph is the timed one's
    g = torch.Generator().manual_seed(14)
    prompts = [B.rand_tokens(sz.eval_prompt, g) for _ in range(max(default, *sz.eval_batches, sz.eval_eager_batch))]

    def run(batch: int, mode: str, stop) -> float:
        t0 = B.sync(dev)
        sampler.greedy(prompts[:batch], sz.eval_tokens, stop=stop, mode=mode)
        return B.sync(dev) - t0

    batches = [(default, fixed), (sz.eval_eager_batch, "eager")] + [(b, fixed) for b in sz.eval_batches if b < default]
    for batch, mode in batches:
        k1, k2 = sz.eval_steps
        run(batch, mode, lambda y: len(y) >= k1)  # warm-up: the capture, cuBLAS's choices
        t1, t2 = (run(batch, mode, lambda y, k=k: len(y) >= k) for k in (k1, k2))
        step = (t2 - t1) / (k2 - k1)
        prefill = max(t1 - (k1 - 1) * step, 0.0)  # k1 tokens: the prefill's, then k1 − 1 steps
        one = prefill + (sz.eval_tokens - 1) * step  # a batch of eval_tokens new tokens
        emit(f"greedy evaluation, {sz.eval_prompt}-token prompts, {sz.eval_tokens} new tokens", batch=batch,
             decode=mode, **{"default": "yes" if batch == default else "", "prefill s": prefill,
                               "step ms": step * 1000, "problems a second": batch / one,
                               f"{MULT_TEST:,} problems, s": math.ceil(MULT_TEST / batch) * one,
                               "_s_per_problem": one / batch})
        sampler.release()  # a large batch's cache holds gigabytes
    every, batch = sz.eval_early_every, min(sz.eval_early_batch, default)
    for mode in (fixed, "eager"):  # rows that end early: kept computing (fixed shape) or dropped (eager)
        t0 = B.sync(dev)
        outs = sampler.greedy(prompts[:batch], sz.eval_tokens, stop=lambda y: y[-1] % every == 0, mode=mode)
        s = B.sync(dev) - t0
        emit("greedy evaluation, rows ending at different steps", batch=batch, decode=mode,
             **{"mean length": sum(map(len, outs)) / batch, "longest": max(map(len, outs)), "s": s,
                "useful tokens a second": sum(map(len, outs)) / s})
        sampler.release()


def part_memory(a, sz: Sizes, dev) -> None:
    """One whole step of every algorithm (benchmark.whole_step: the group sampled, then the update) in this one
    process, each from the same fresh adapter with its own optimizer (and critic) and its own Sampler (whole_step's),
    freed between them, so that each peak (max_memory_allocated, reset before the step) is its own."""
    import gc

    import torch

    import benchmark as B
    import lora
    import model as M
    import pretrained
    import tokenizer
    net = pretrained.load_model(a.work / "model", device=dev)
    lora.apply_lora(net, r=B.LORA_R, fraction=B.LORA_FRACTION, generator=torch.Generator().manual_seed(4))
    fresh = [p.detach().clone() for p in lora.lora_parameters(net)]
    g, T = torch.Generator().manual_seed(7), sz.step_tokens
    prompt = B.rand_tokens(sz.step_prompt, g)
    w = B.workload(prompt, [B.rand_tokens(T, g) for _ in range(B.G_GRPO)], T, seed=8)
    for kind, precision in [(k, "fp32") for k in B.PAPER + B.BASELINES] + [("tspmo", "bf16")]:
        with torch.no_grad():
            for p, f in zip(lora.lora_parameters(net), fresh):
                p.copy_(f)
        params, opt, backward = B.tokrl_step(net, kind)
        r = B.whole_step(net, params, opt, backward, B.step_groups(w, kind), dev, sample=T, precision=precision)
        emit(f"a whole step under LoRA, {T} sampled tokens a completion", algorithm=B.NAMES[kind] +
             (", bf16 sampling" if precision == "bf16" else ""),
             **{"sampling s": r["sample"][0], "training s": r["train"], "step s": r["sample"][0] + r["train"],
                "peak GiB": gib(r["peak"]), "growth GiB": gib(r["inc"]),
                "peak < 12 GB": "yes" if r["peak"] < 12e9 else "NO", "_kind": kind, "_precision": precision})
        del params, opt, backward, r
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    del net, fresh
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    part_memory_full(a, sz, dev, w)


def part_memory_full(a, sz: Sizes, dev, w: dict) -> None:
    """One whole GRPO step with --train full (F1): every weight trained in fp32 by AdamW, the frozen reference copy
    beside it; its peak against full_finetune.memory_parts's arithmetic for the same shape."""
    import torch

    import benchmark as B
    import full_finetune
    import pretrained
    import settings
    net = pretrained.load_model(a.work / "model", device=dev)
    full_finetune.prepare(net, "grpo", B.BETA)
    params = full_finetune.trained_parameters(net)
    opt = torch.optim.AdamW(params, lr=settings.FULL_LR, weight_decay=B.WD)
    backward = lambda *x, n=1: B.ours_backward(net, "grpo", *x, opt=opt, backward_batch=n)  # noqa: E731
    T = sz.step_tokens
    r = B.whole_step(net, params, opt, backward, B.step_groups(w, "grpo"), dev, sample=T)
    parts = full_finetune.memory_parts(net.config, "grpo", B.BETA, sz.step_prompt, T, B.G_GRPO)
    emit(f"a whole GRPO step with --train full, {T} sampled tokens a completion", algorithm="GRPO, --train full",
         **{"sampling s": r["sample"][0], "training s": r["train"], "step s": r["sample"][0] + r["train"],
            "peak GiB": gib(r["peak"]), "growth GiB": gib(r["inc"]), "arithmetic GiB": gib(sum(parts.values()))})


PART_RUNS = {"model": part_model, "decode": part_decode, "sampling": part_sampling, "eval": part_eval,
             "memory": part_memory}


def die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGKILL when the check that started it dies, however it dies (the signal survives
    the exec into a part's command)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the check died before the line above
        os._exit(1)


def part_main(argv: list[str]) -> None:
    """`--part NAME --parent PID [--work DIR] [--dry-run] [--tokenizer PATH] [-- COMMAND...]`: run the part, or exec
    its command (tests, main)."""
    cmd = argv[argv.index("--") + 1:] if "--" in argv else None
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv[:argv.index("--")] if cmd else argv)
    die_with_parent(a.parent)
    if cmd:
        os.execv(cmd[0], cmd)
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    import torch
    dev = torch.device("cpu" if a.dry_run else "cuda")
    PART_RUNS[a.part](a, DRY if a.dry_run else GPU, dev)


# ----------------------------------------------------------------------------------------------------------------------
# The check: the parts one after another, each under its cap; summary.md after each


class Stopped(Exception):
    """The check got a signal that ends it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def on_signal(signum, frame):
    for sig in SIGNALS:  # the first signal ends the check; the clean-up it starts is not interrupted again
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the group has no process left
        pass


def exited(p: subprocess.Popen) -> bool:
    """Whether the child has exited, leaving it unreaped where the system allows (Linux): its pid, and so its process
    group's id, stays reserved until kill_group has ended whatever else is in the group."""
    if hasattr(os, "waitid"):
        return os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    return p.poll() is not None


class Check:
    def __init__(self, args, out: Path, work: Path, temporary: bool, parts: list[str], caps: dict, start: float):
        self.args, self.out, self.work, self.temporary, self.parts, self.caps = args, out, work, temporary, parts, caps
        self.sizes = DRY if args.dry_run else GPU
        self.start, self.started = start, time.strftime("%Y-%m-%d %H:%M:%S")  # the budget runs from the start
        self.budget = args.budget or (DRY_BUDGET_S if args.dry_run else BUDGET_S)
        self.state = {name: {"status": "not started", "seconds": None, "pgid": None} for name in parts}
        self.commit = commit()

    def command(self, name: str) -> list[str]:
        child = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--parent", str(os.getpid()),
                 "--work", str(self.work)] + (["--dry-run"] if self.args.dry_run else []) + \
            (["--tokenizer", str(self.args.tokenizer)] if self.args.tokenizer else [])
        dev = "cpu" if self.args.dry_run else "cuda"
        if name == "tests":
            return child + ["--", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
        if name == "main":
            return child + ["--", sys.executable, "train.py", "--algo", "tspmo", "--task", "mult", "--model",
                            str(self.work / "model"), "--device", dev, "--out", str(self.work / "run"),
                            *self.sizes.main]
        return child

    def run(self) -> int:
        for name in self.parts:
            self.run_part(name)
            st = self.state[name]
            print(f"{name}: {st['status']}, {st['seconds'] or 0:.0f} s", flush=True)
        self.write_summary()
        return 0 if all(s["status"] == "exit 0" for s in self.state.values()) else 1

    def run_part(self, name: str) -> None:
        st = self.state[name]
        left = self.budget - (time.monotonic() - self.start) - RESERVE_S
        cap = min(self.caps[name], left)
        if name in NEEDS_MODEL and not (self.work / "model").is_dir():
            st["status"] = "not run: no model (the model part did not build one)"
            return
        if left < MIN_CAP_S:
            st["status"] = f"not run: {max(left, 0):.0f} s of the check's {self.budget:g} s left"
            return
        if name == "main":
            shutil.rmtree(self.work / "run", ignore_errors=True)
        cmd = self.command(name)
        with open(self.out / f"{name}.log", "w") as log:
            log.write("$ " + shlex.join(cmd) + "\n\n")
            log.flush()
            t0 = time.monotonic()
            p = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            st.update(status=f"running (cap {cap:.0f} s)", pgid=p.pid)
            try:
                self.write_summary()
                while not exited(p):
                    if time.monotonic() - t0 > cap:
                        st["status"] = f"cut off at its cap of {cap:.0f} s"
                        break
                    time.sleep(0.1)
            except Stopped as e:
                st["status"] = f"stopped by {e}: the check ended"
                raise
            finally:
                kill_group(p.pid)  # at a cap, on a signal, and whatever the part left behind after its exit
                p.wait()
                st["seconds"] = time.monotonic() - t0
                if st["status"].startswith("running"):
                    st["status"] = f"exit {p.returncode}" + ("" if p.returncode == 0 else f": {last_line(log.name)}")
                if name == "main":
                    self.keep_run()
                self.write_summary()

    def keep_run(self) -> None:
        """The main command's small files, copied to OUT/main-run (the work folder is removed at the end)."""
        dst = self.out / "main-run"
        dst.mkdir(exist_ok=True)
        for f in ("config.json", "metrics.jsonl", "eval.jsonl"):
            if (self.work / "run" / f).is_file():
                shutil.copy(self.work / "run" / f, dst / f)

    def write_summary(self) -> None:
        try:
            text = summary(self)
        except Exception as e:  # the parts' states at least, whatever a log holds
            text = "# tokrl GPU check\n\n" + "\n".join(f"- {n}: {s['status']}" for n, s in self.state.items()) + \
                f"\n\nThe tables could not be written: {type(e).__name__}: {first_line(e)[:200]}\n"
        tmp = self.out / "summary.md.partial"
        tmp.write_text(text)
        os.replace(tmp, self.out / "summary.md")  # whole, even if the check is killed while writing


def last_line(path: str) -> str:
    lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip() and
             not ln.startswith("@row ")]
    return lines[-1][:200] if lines else "no output"


def commit() -> str:
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h"], capture_output=True, text=True,
                           timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    if r.returncode:
        return "unknown (not a git checkout)"
    return r.stdout.strip() + (" with uncommitted changes" if dirty else "")


# ----------------------------------------------------------------------------------------------------------------------
# summary.md


def rows_of(log: Path) -> dict[str, list[dict]]:
    """The measurements a part's log holds, by table, in order; a line cut off by a kill is skipped."""
    tables: dict[str, list[dict]] = {}
    if log.is_file():
        for ln in log.read_text(errors="replace").splitlines():
            if ln.startswith("@row "):
                try:
                    row = json.loads(ln[5:])
                    tables.setdefault(row.pop("table"), []).append(row)
                except (ValueError, KeyError, AttributeError):
                    continue
    return tables


def cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v).replace("|", "\\|")


def markdown(rows: list[dict]) -> list[str]:
    cols = list(dict.fromkeys(k for r in rows for k in r if not k.startswith("_")))
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + \
        ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]


def jsonl(path: Path, keys: tuple[str, ...]) -> list[dict]:
    rows = []
    if path.is_file():
        for ln in path.read_text().splitlines():
            try:
                d = json.loads(ln)
            except ValueError:
                continue
            rows.append({k: d[k] for k in keys if k in d})
    return rows


def projection(tables: dict[str, list[dict]]) -> list[dict]:
    """Table II's T-SPMO run (350 steps, mult) from the memory part's whole step and the eval part's default batch:
    steps × a step's seconds + evaluations (steps 0, 50, ..., 350) × 3,000 problems × seconds a problem. Random
    weights never end a completion early: an upper bound for a trained model's run."""
    steps = {(r["_kind"], r["_precision"]): r["step s"] for rows in tables.values() for r in rows if "_kind" in r}
    per = next((r["_s_per_problem"] for rows in tables.values() for r in rows if r.get("default") == "yes"), None)
    if ("tspmo", "fp32") not in steps or per is None:
        return []
    evals = 1 + MULT_STEPS // 50 + (1 if MULT_STEPS % 50 else 0)
    ev = evals * MULT_TEST * per
    return [{"sampling": prec, "s a step": steps[("tspmo", prec)], "evaluations, min": ev / 60,
             "run, min": (MULT_STEPS * steps[("tspmo", prec)] + ev) / 60,
             "target, min": "< 50" if prec == "fp32" else "< 20"}
            for prec in ("fp32", "bf16") if ("tspmo", prec) in steps]


def summary(c: Check) -> str:
    tables = {name: rows_of(c.out / f"{name}.log") for name in c.parts}
    model = (tables.get("model", {}).get("model") or [{}])[0]
    dry = " (a CPU dry run, with a tiny model: its figures say only that every part runs)" if c.args.dry_run else ""
    lines = [f"# tokrl GPU check{dry}", "",
             f"Device: {model.get('device', 'not known yet (the model part reports it)')}; commit {c.commit}; "
             f"started {c.started}, {time.monotonic() - c.start:.0f} s of the {c.budget} s budget used. Targets: "
             + "; ".join(TARGETS.values()) + ".", "",
             "| part | status | seconds | cap | log | process group |", "|---|---|---|---|---|---|"]
    for name in c.parts:
        st = c.state[name]
        secs = f"{st['seconds']:.0f}" if st["seconds"] is not None else ""
        lines.append(f"| {name} | {st['status']} | {secs} | {c.caps[name]:g} | {name}.log | {st['pgid'] or ''} |")
    if c.args.tokenizer:
        lines += ["", f"Tokenizer: {c.args.tokenizer} (Qwen2's)."]
    else:
        lines += ["", "Tokenizer: built by the check (byte-level, Qwen2's special-token ids): only the main part reads "
                      "text; its mult prompt is longer in tokens than with Qwen2's tokenizer (the model table gives "
                      "the count), so its prefill and cache are longer. --tokenizer PATH gives the real one."]
    for name in c.parts:
        for title, rows in tables[name].items():
            lines += ["", f"## {name}: {title}", "", *markdown(rows)]
        if name == "main":
            run = c.out / "main-run"
            for f, keys in (("metrics.jsonl", ("step", "seconds", "tokens_per_s", "peak_mem_gb", "len_mean",
                                               "forwards", "reward_mean")),
                            ("eval.jsonl", ("step", "n", "accuracy", "seconds"))):
                if rows := jsonl(run / f, keys):
                    lines += ["", f"## main: {f}", "", *markdown(rows)]
    if rows := projection({title: rows for part in tables.values() for title, rows in part.items()}):
        lines += ["", f"## Projected: Table II's T-SPMO run on mult ({MULT_STEPS} steps, evaluations at 0, 50, ..., "
                      f"{MULT_STEPS} on {MULT_TEST:,} problems; random weights: every completion at its limit)", "",
                  *markdown(rows)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check_tokenizer(path: Path) -> None:
    """A tokenizer.json with Qwen2's <|endoftext|> and <|im_end|> at Qwen2's ids, read as JSON (the model part
    loads it fully)."""
    if not path.is_file():
        fail(f"--tokenizer {path}: no such file (Qwen2's tokenizer.json)")
    try:
        added = {t["content"]: t["id"] for t in json.loads(path.read_text())["added_tokens"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"--tokenizer {path}: not a tokenizer.json with added_tokens ({type(e).__name__}: {first_line(e)[:200]})")
    for tok in ("<|endoftext|>", "<|im_end|>"):
        if added.get(tok) != QWEN_IDS[tok]:
            fail(f"--tokenizer {path}: {tok} has id {added.get(tok)}, not Qwen2's {QWEN_IDS[tok]}")


def seconds_of_cap(flag: str) -> tuple[str, float]:
    name, _, secs = flag.partition("=")
    try:
        s = float(secs)
    except ValueError:
        s = 0.0
    if name not in PARTS or not (s > 0 and math.isfinite(s)):
        fail(f"--cap {flag}: expected PART=SECONDS, a part among {', '.join(PARTS)} and seconds above 0")
    return name, s


def work_folder(args) -> tuple[Path, bool]:
    """(the folder the model is built in, whether it is a temporary one to remove at the end)."""
    need = 2**28 if args.dry_run else MODEL_BYTES
    if args.work:
        w = Path(args.work).resolve()
        try:
            w.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(f"--work {w}: cannot be made ({e.strerror})")
        if not (w / "model").is_dir() and shutil.disk_usage(w).free < need:
            fail(f"--work {w}: {gib(shutil.disk_usage(w).free):.1f} GiB free, the model needs {gib(need):.1f} GiB")
        return w, False
    tried = []
    for d in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(d) and os.access(d, os.W_OK):
            free = shutil.disk_usage(d).free
            if free >= need:
                return Path(tempfile.mkdtemp(prefix="tokrl-gpu-check-", dir=d)), True
            tried.append(f"{d}: {gib(free):.1f} GiB")
    fail(f"no folder with {gib(need):.1f} GiB free for the model ({', '.join(tried) or 'none writable'}); "
         "name one with --work DIR")


def main(argv: list[str]) -> int:
    start = time.monotonic()
    if argv[:1] == ["--part"]:
        part_main(argv)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder for the logs and summary.md")
    ap.add_argument("--tokenizer", type=Path, help="Qwen2's tokenizer.json (default: one the check builds)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated among {','.join(PARTS)}")
    ap.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS", help="another cap for a part")
    ap.add_argument("--budget", type=float, help=f"seconds for the whole check (default {BUDGET_S}; dry run "
                                                 f"{DRY_BUDGET_S})")
    ap.add_argument("--work", help="folder to build the model in, kept and reused (default: a temporary one)")
    ap.add_argument("--dry-run", action="store_true", help="the whole check on the CPU with a tiny model")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if not parts or any(p not in PARTS for p in parts):
        fail(f"--parts {args.parts}: expected parts among {', '.join(PARTS)}, comma-separated")
    parts = [p for p in PARTS if p in parts]  # in the check's order
    caps = {name: DRY_CAP_S if args.dry_run else cap for name, cap in PARTS.items()}
    caps.update(seconds_of_cap(c) for c in args.cap)
    if args.budget is not None and not (args.budget > 0 and math.isfinite(args.budget)):
        fail(f"--budget {args.budget}: expected seconds above 0")
    if args.tokenizer:
        args.tokenizer = args.tokenizer.resolve()
        check_tokenizer(args.tokenizer)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a folder")
    if not args.dry_run:
        import torch  # only to ask; the parts use the GPU, each in its own process
        if not torch.cuda.is_available():
            fail("no CUDA device here: the check measures a GPU (--dry-run runs it on the CPU)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text("# tokrl GPU check: starting\n")
    except OSError as e:
        fail(f"{out}: cannot be written ({e.strerror})")
    work, temporary = work_folder(args)
    for sig in SIGNALS:
        signal.signal(sig, on_signal)
    check = Check(args, out, work, temporary, parts, caps, start)
    try:
        status = check.run()
    except Stopped as e:  # the running part's group is killed (run_part)
        check.write_summary()
        status = 128 + e.signum
        print(f"stopped by {e}; {out / 'summary.md'} has what was measured", file=sys.stderr)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    if status < 128:
        print((out / "summary.md").read_text())
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
