"""Sampling from the decoder (model.py): temperature and top-p draws, the decode loop, and its two ways of running a
step: eager, on a KVCache of the live rows, or of fixed shape, on a StaticCache, which a CUDA graph captures once and
replays.

    next_token, draw        one token per row (greedy, or temperature + top-p, drawn in two levels)
    StaticCache             keys and values of one fixed shape for a whole decode; decode_step, the step over it
    decode_loop             a token per live row, step by step, until each row stops
    EagerSteps              the loop's steps on the live rows' KVCache (mode "eager", the CPU's)
    StepRunner, FixedSteps  decode_step for one shape, run as it is ("static") or replayed as a CUDA graph
                            ("graph"); the loop's steps over it, the live rows' logits read out
    Sampler                 what is kept between calls for one model: a StepRunner per shape, the bf16 copy
    sample, greedy          G completions of one prompt; B prompts' greedy completions, left-padded in one batch
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import CacheTooLarge, KVCache, Qwen2Config, Qwen2ForCausalLM, cache_bytes, grouped_attention
from values import first_line

# ----------------------------------------------------------------------------------------------------------------------
# The fixed-shape cache and its step


# The attention kernel of a fixed-shape decode step on CUDA (fp32, grouped queries, a boolean mask over the slots):
# "efficient" (PyTorch's memory-efficient kernel, math where it refuses the inputs) or "math". `python
# bench/benchmark.py --device cuda` times both and prints the faster; efficient is the prior (one fused kernel, no
# (B, K, H/K, S) score tensor written and read back).
DECODE_ATTENTION = "efficient"


class StaticCache:
    """Keys and values of one fixed shape for a whole decode, (B, K, S, D) in every layer, allocated and zeroed once.

    `valid` (B, S) marks the slots that hold a real token (False for left padding and for the slots not yet
    written); `slot` (a one-element tensor, so that a CUDA graph replays the step at each new slot) is where the
    next token of every row goes. Rows that have finished keep decoding into their own slots, unread: on a GPU,
    compute on a few idle rows costs less than copying the cache to drop them."""

    def __init__(self, cfg: Qwen2Config, rows: int, slots: int, device, dtype):
        shape = (rows, cfg.num_key_value_heads, slots, cfg.head_size)
        try:
            self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
            self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
            self.valid = torch.zeros(rows, slots, dtype=torch.bool, device=device)
        except RuntimeError as e:  # as KVCache.allocate
            raise CacheTooLarge(rows, slots, cache_bytes(cfg, rows, slots, dtype), device, e) from None
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.rows, self.slots, self.device = rows, slots, torch.device(device)

    def load_prefix(self, prefill: KVCache) -> None:
        """The prompt's keys and values from an eager prefill: one row (copied to every row) or one per row."""
        P = prefill.length
        for dst, src in zip(self.k + self.v, prefill.k + prefill.v):
            dst[:, :, :P].copy_(src[:, :, :P])  # a one-row prefill broadcasts to every row
        self.valid.zero_()
        self.valid[:, :P].copy_(prefill.valid[:, :P])

    def attention_kernel(self):
        """On CUDA, the decode's attention kernel (DECODE_ATTENTION); elsewhere PyTorch's own choice."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        if DECODE_ATTENTION == "efficient":  # memory-efficient attention where it takes these inputs, else math
            return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
        return sdpa_kernel([SDPBackend.MATH])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """q (B, H, 1, D) against every slot, after writing k, v (B, K, 1, D) at the cache's slot; the slots not yet
        written, and left padding, are masked."""
        self.k[layer].index_copy_(2, self.slot, k)
        self.v[layer].index_copy_(2, self.slot, v)
        with self.attention_kernel():
            return grouped_attention(q, self.k[layer], self.v[layer], self.valid[:, None, None, :])


def decode_step(model: Qwen2ForCausalLM, tokens: torch.Tensor, positions: torch.Tensor,
                cache: StaticCache) -> torch.Tensor:
    """One token per row, tokens (B,) at positions (B,), into `cache` at its slot -> logits (B, V). Every shape
    is fixed and no value leaves the device, so a CUDA graph can capture it once and replay it every step."""
    cache.valid.index_fill_(1, cache.slot, True)
    h = model.run_layers(model.model.embed_tokens(tokens[:, None]), positions[:, None], cache=cache)  # (B, 1, C)
    return model.lm_head(model.model.norm(h[:, 0]))


NOT_FINITE = -1  # next_token's "token" for a row whose distribution is not finite


class NonFiniteLogits(RuntimeError):
    """A row's next-token distribution is not finite: NaN or +inf in the model's logits (`logits_finite` False), or
    only in the logits divided by the temperature (True: l/T overflows float32). `largest`: the largest finite
    |logit| of the row. `where`: what was sampling (the training loop names it)."""

    where = "sampling"

    def __init__(self, new_token: int, temperature: float, logits_finite: bool, largest: float):
        super().__init__(new_token, temperature, logits_finite, largest)
        self.new_token, self.temperature = new_token, temperature
        self.logits_finite, self.largest = logits_finite, largest

    def __str__(self) -> str:
        if self.logits_finite:
            return (f"the logits (largest |logit| {self.largest:.4g}) divided by the temperature {self.temperature:g} "
                    f"overflow float32 at new token {self.new_token}")
        return f"the model's logits are not finite (NaN or inf) at new token {self.new_token}"


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
               entropy: bool = False):
    """One token per row from logits (B, V): greedy when temperature == 0, else temperature + top-p sampling.

    A row whose distribution is not finite (NaN or +inf in its logits, or in l/T) gets NOT_FINITE instead of a token,
    decided on the device: the caller reads the tokens anyway, and that one read per step tells it (no other sync).
    -inf is a token never drawn (a suppressed one), not a fault.

    entropy=True: (tokens, H), H (B,) the entropy in nats of the distribution each token is drawn from (softmax(l/T),
    top-p's nucleus renormalised; 0 for greedy), from the very probabilities the draw reads: the draws are unchanged
    and it adds no read of the device (H stays there until the caller reads it)."""
    if temperature == 0:
        tok = logits.argmax(-1)  # a row with a NaN: argmax lands on one
        top = logits.gather(-1, tok[:, None])[:, 0]  # (B,)
        tok = tok.masked_fill(~torch.isfinite(top), NOT_FINITE)
        return (tok, torch.zeros(tok.shape, device=tok.device)) if entropy else tok
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:  # nucleus: keep the smallest prefix of the sorted distribution whose mass reaches top_p
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # mass strictly before a token already reaches top_p
        probs = probs.scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
    tok = draw(probs, generator)
    if not entropy:
        return tok
    # H = −Σ_v q log q of q = probs / S, S = Σ_v probs (top-p leaves S < 1; draw() needs no normalised input), as
    # −(1/S) Σ_v probs log probs + log S: no (B, V) copy for q; entr(0) = 0 for the tokens cut or suppressed. Nats.
    mass = probs.sum(-1)  # (B,)
    return tok, torch.special.entr(probs).sum(-1) / mass + mass.log()


def draw(probs: torch.Tensor, generator: torch.Generator | None, block: int = 128) -> torch.Tensor:
    """One index per row of probs (B, V), distributed exactly as torch.multinomial(probs, 1), drawn in two levels:
    a block of `block` entries by its total mass, then an entry of that block by its mass: P(b)·P(i|b) = p_i.

    torch.multinomial draws one random number per entry, B·V of them: the slowest part of a CPU decode step with
    V = 151,936. Two levels draw B·(V/block + block); 151,936 = 1187·128 needs no padding.

    A row whose mass is not finite (a NaN or inf in probs) draws from a uniform stand-in, which multinomial accepts
    (a NaN is an error on the CPU, a device-side assert on CUDA), and returns NOT_FINITE; the other rows' draws are
    unchanged."""
    B, V = probs.shape
    pad = -V % block
    blocks = (F.pad(probs, (0, pad)) if pad else probs).view(B, -1, block)  # (B, V/block, block); padding: mass 0
    mass = blocks.sum(-1)  # (B, V/block)
    finite = torch.isfinite(mass).all(-1)  # (B,): read off the block masses, no second pass over B·V
    b = torch.multinomial(mass.where(finite[:, None], 1.0), 1, generator=generator)  # (B, 1) block index
    rows = torch.arange(B, device=probs.device)
    inner = torch.multinomial(blocks[rows, b[:, 0]].where(finite[:, None], 1.0), 1,
                              generator=generator)  # (B, 1) index within the block
    return (b * block + inner).squeeze(-1).masked_fill(~finite, NOT_FINITE)


StopFn = Callable[[list[int]], bool]
MODES = ("eager", "static", "graph")  # how sample() and greedy() run their decode steps (`mode`)
PRECISIONS = ("fp32", "tf32", "bf16")  # sample()'s matrix products (`precision`)
SLOT_BLOCK = 16  # a fixed-shape cache's slots are rounded up to a multiple: prompts of other lengths reuse its graph


def default_mode(device) -> str:
    """CUDA: the fixed-shape step, replayed as a CUDA graph. The CPU: the eager step, which drops finished rows
    from its cache (on a CPU every row costs compute, and there are no kernel launches to save)."""
    return "graph" if torch.device(device).type == "cuda" else "eager"


def decode_loop(steps, logits: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float, generator,
                eos: Sequence[int], stop: StopFn | None, suppress: Sequence[int], entropy: bool = False):
    """Decode from the rows' last logits (B, V) until each row stops. `steps(tok, keep)` feeds the live rows' new
    tokens (n,) to the model and returns the next logits of the rows it keeps (indices into the live rows).
    entropy=True: (tokens, entropies), each token's H (next_token's) beside it, the rows' H read once at the end."""
    out: list[list[int]] = [[] for _ in range(logits.shape[0])]
    live = list(range(logits.shape[0]))  # original row of each live row
    eos = set(eos)
    hs, owners = [], []  # entropy: each step's H (n,), on the device; the original row of each of their entries
    for step in range(max_new_tokens):
        if suppress:
            logits[:, list(suppress)] = float("-inf")
        if entropy:  # outside any CUDA graph: from the logits the step returned, as the draw
            tok, h = next_token(logits, temperature, top_p, generator, True)
            hs.append(h)
            owners += live
        else:
            tok = next_token(logits, temperature, top_p, generator)  # (n,): one draw per live row, from `generator`
        keep = []
        for i, t in enumerate(tok.tolist()):  # the step's one read of the device
            if t == NOT_FINITE:  # the rare path: what made it so, read off the row's logits
                row = logits[i][~torch.isneginf(logits[i])]  # -inf: a token never drawn
                fin = row[torch.isfinite(row)]
                raise NonFiniteLogits(step + 1, temperature, temperature > 0 and 0 < fin.numel() == row.numel(),
                                      float(fin.abs().max()) if fin.numel() else math.nan)
            out[live[i]].append(t)
            if t not in eos and not (stop and stop(out[live[i]])):
                keep.append(i)
        if not keep or step == max_new_tokens - 1:
            break
        logits = steps(tok, keep)
        live = [live[i] for i in keep]
    if not entropy:
        return out
    entropies: list[list[float]] = [[] for _ in out]
    for row, h in zip(owners, torch.cat(hs).tolist() if hs else []):  # step by step: each row's H in token order
        entropies[row].append(h)
    return out, entropies


class EagerSteps:
    """Decode steps on a KVCache of the live rows only: finished rows are dropped from the cache (a copy of it)."""

    def __init__(self, model: Qwen2ForCausalLM, cache: KVCache, pad: torch.Tensor):
        self.model, self.cache, self.pad = model, cache, pad

    def __call__(self, tok: torch.Tensor, keep: list[int]) -> torch.Tensor:
        if len(keep) < tok.shape[0]:  # drop finished rows from the cache: they stop costing compute
            idx = torch.tensor(keep, device=tok.device)
            self.cache.keep_rows(idx)
            tok, self.pad = tok[idx], self.pad[idx]
        positions = (self.cache.length - self.pad)[:, None]  # (B, 1): a left-padded row starts at 0 after its pad
        return self.model.lm_head(self.model(tok[:, None], self.cache, positions)[:, -1])  # (B, V)


class FixedSteps:
    """Decode steps of fixed shape: every row stays in the StepRunner's batch; the live rows' logits are read out."""

    def __init__(self, model: Qwen2ForCausalLM, runner: StepRunner, prefill: KVCache, pad: torch.Tensor):
        self.model, self.runner, self.pad = model, runner, pad
        runner.cache.load_prefix(prefill)
        self.slot = prefill.length  # the slot of the next token, the same in every row
        self.live = torch.arange(runner.cache.rows, device=pad.device)

    def __call__(self, tok: torch.Tensor, keep: list[int]) -> torch.Tensor:
        if len(keep) < tok.shape[0]:
            idx = torch.tensor(keep, device=tok.device)
            tok, self.live = tok[idx], self.live[idx]
        r = self.runner
        r.tokens.index_copy_(0, self.live, tok)  # a finished row keeps feeding its last token, unread
        r.positions.copy_(self.slot - self.pad)  # a left-padded row's positions start at 0 after its pad
        r.cache.slot.fill_(self.slot)
        self.slot += 1
        logits = r.run(self.model)  # (B, V), every row
        return logits if self.live.shape[0] == r.cache.rows else logits.index_select(0, self.live)


@contextlib.contextmanager
def matmul_precision(tf32: bool):
    """CUDA matrix products in fp32 (the paper's, and the default whatever the process set) or TF32."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class CaptureOutOfMemory(CacheTooLarge):
    """The decode step ran out of device memory while being captured as a CUDA graph: the graph's own memory (the
    step's activations for every row), beside the fixed-shape cache already allocated, did not fit. Not a refused
    capture: decoding the same rows without the graph needs that memory too, so the run stops, naming the batch and,
    through `flags` (filled in by the caller, as for CacheTooLarge), the settings that lower it."""

    def __str__(self) -> str:
        return (f"the decode step{' for ' + self.flags if self.flags else ''} (rows × slots = {self.rows} × "
                f"{self.positions}) ran out of memory on {self.device} while captured as a CUDA graph, beside its "
                f"{self.nbytes / 2**30:.2f} GiB fixed-shape cache ({self.reason}); fewer rows lower it")


def out_of_memory(e: BaseException) -> BaseException | None:
    """The out-of-memory error in e's chain (e, then its cause or context), or None: torch's OutOfMemoryError, or a
    RuntimeError whose text says so (a driver's "CUDA error: out of memory"). A capture that fails on an allocation
    often surfaces as the graph's own error ("operation failed due to a previous error during capture"), raised while
    the capture ends, with the allocator's error as its context."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            return e
        e = e.__cause__ or e.__context__
    return None


class StepRunner:
    """A model's decode step over one StaticCache of rows × slots, with fixed input buffers (tokens, positions, the
    cache's slot). graph=False runs the step as it is; graph=True captures it once as a CUDA graph and replays it:
    one launch for the ~1,300 small kernels of a Qwen2-1.5B step, which launched one by one cost more than the
    GPU's work at 8 to 50 rows. The graph reads the model's weights where they lie, so an adapter trained in place
    (the optimizer's step) is seen at the next replay. A capture the driver or build refuses leaves `graph` None
    and the error in `refusal`: the step then runs without the graph, slower."""

    def __init__(self, model: Qwen2ForCausalLM, rows: int, slots: int, graph: bool, tf32: bool):
        p = next(model.parameters())
        self.cache = StaticCache(model.config, rows, slots, p.device, p.dtype)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=p.device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=p.device)
        self.tf32, self.graph, self.logits = tf32, None, None
        self.refusal: RuntimeError | None = None
        if graph:
            try:
                self.capture(model)
            except RuntimeError as e:  # a driver or build that refuses the capture: decode without the graph, slower
                self.graph = None
                if oom := out_of_memory(e):  # not a refusal: these rows do not fit, with or without the graph
                    nbytes = cache_bytes(model.config, rows, slots, p.dtype)
                    raise CaptureOutOfMemory(rows, slots, nbytes, p.device, oom) from None
                self.refusal = e

    def capture(self, model: Qwen2ForCausalLM) -> None:
        """Two warm-up steps, then the capture, on one side stream: cuBLAS's handle and workspace, kept per stream,
        exist before the capture starts (made during it, they would be an illegal allocation)."""
        with torch.cuda.device(self.cache.device), matmul_precision(self.tf32):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    decode_step(model, self.tokens, self.positions, self.cache)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=side):
                self.logits = decode_step(model, self.tokens, self.positions, self.cache)
            torch.cuda.current_stream().wait_stream(side)
        self.cache.valid.zero_()  # the warm-up steps wrote slot 0; load_prefix overwrites it

    def run(self, model: Qwen2ForCausalLM) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        with matmul_precision(self.tf32):
            return decode_step(model, self.tokens, self.positions, self.cache)


def structure(model: nn.Module) -> tuple:
    """Where every parameter lies, and every module's switches (LoRA's enabled, merged): what a captured graph and a
    bf16 copy depend on. Parameters updated in place keep it; replaced or re-wrapped ones change it."""
    params = tuple((p.data_ptr(), p.dtype, p.requires_grad) for p in model.parameters())
    return params + tuple((getattr(m, "enabled", None), getattr(m, "merged", None)) for m in model.modules())


class Sampler:
    """What sampling keeps between calls for one model: its StepRunners, one per shape (a CUDA graph captured once
    per shape, not once per call), and its bf16 copy; both made again after the model's structure changes (LoRA
    put on, switched off, merged). A run holds one Sampler, as the training loop and its evaluations do.

    `runners`: (bf16, rows, slots, graph, tf32) -> StepRunner. `captures`: the CUDA graphs it captured; `refused`:
    the captures refused (each decodes without a graph), warned about at the first."""

    def __init__(self, model: Qwen2ForCausalLM):
        self.model = model
        self.runners: dict[tuple, StepRunner] = {}
        self.captures = self.refused = 0
        self._bf16: Qwen2ForCausalLM | None = None
        self._structure: tuple | None = None  # the model's, when the runners and the bf16 copy were made

    def _follow_model(self) -> None:
        """Drop the runners and the bf16 copy when the model's structure has changed since they were made."""
        sig = structure(self.model)
        if sig != self._structure:
            self.runners, self._bf16, self._structure = {}, None, sig

    def bf16(self) -> Qwen2ForCausalLM:
        """The model for sampling in bf16: a bf16 copy of every frozen weight, and the very tensors of the trained ones
        (the LoRA adapter, fp32, applied as in training), so each update is sampled from at once. Made once."""
        self._follow_model()
        if self._bf16 is None:
            memo = {id(p): p if p.requires_grad else nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
                    for p in self.model.parameters()}
            self._bf16 = copy.deepcopy(self.model, memo)
        return self._bf16

    def runner(self, net: Qwen2ForCausalLM, rows: int, length: int, graph: bool, tf32: bool = False) -> StepRunner:
        """The StepRunner of `net` (the model, or its bf16 copy) for rows × length (slots rounded up to SLOT_BLOCK),
        made on first use and kept."""
        self._follow_model()
        key = (net is not self.model, rows, -(-length // SLOT_BLOCK) * SLOT_BLOCK, graph, tf32)
        if key not in self.runners:
            r = self.runners[key] = StepRunner(net, *key[1:])
            self.captures += r.graph is not None
            if r.refusal is not None:
                if not self.refused:
                    print(f"warning: the decode step could not be captured as a CUDA graph "
                          f"({first_line(r.refusal)[:200]}); decoding without it, slower", file=sys.stderr)
                self.refused += 1
        return self.runners[key]

    def release(self) -> None:
        """Free the fixed-shape caches and graphs (the evaluation's large batch holds gigabytes); the bf16 copy and the
        counts stay."""
        self.runners = {}

    def _prepare(self, mode: str | None, precision: str = "fp32"):
        """The network that samples (the model, or its bf16 copy) and the mode to decode in."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: allowed {', '.join(PRECISIONS)}")
        mode = mode or default_mode(next(self.model.parameters()).device)
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: allowed {', '.join(MODES)}")
        return (self.bf16() if precision == "bf16" else self.model), mode

    @torch.no_grad()
    def sample(self, prompt: Sequence[int], num_samples: int, max_new_tokens: int, *, temperature: float,
               generator: torch.Generator | None, top_p: float = 1.0, eos: Sequence[int] = (),
               stop: StopFn | None = None, suppress: Sequence[int] = (), mode: str | None = None,
               precision: str = "fp32", entropy: bool = False):
        """G = num_samples completions of one prompt: the prompt is prefilled once and its cache copied to G rows.

        Each row stops at an EOS token (kept in its completion), when `stop(tokens)` is true, or at max_new_tokens.
        Returns the G completions as token lists (generated tokens only). `mode`: eager, static (fixed shape) or
        graph (fixed shape, a CUDA graph); None: default_mode. The draws come from `generator` in the same order
        whatever the mode. `precision`: fp32 (the paper's), tf32 (CUDA matrix products in TF32) or bf16 (a bf16 copy
        of the frozen weights): the samples are then slightly off the fp32 policy (docs/performance.md measures it).
        entropy=True (T-SPMO's --replay-cut entropy): returns (completions, entropies), entropies[i][t] the entropy in
        nats of the distribution completions[i][t] was drawn from (next_token's), the same draws as without it."""
        if not prompt:
            raise ValueError("sample: the prompt is empty")
        net, mode = self._prepare(mode, precision)
        p = next(net.parameters())
        length = len(prompt) + max_new_tokens
        with matmul_precision(precision == "tf32"):
            cache = KVCache(net.config, 1, length if mode == "eager" else len(prompt), p.device, p.dtype)
            h = net(torch.tensor([list(prompt)], device=p.device), cache)[:, -1]  # (1, C)
            logits = net.lm_head(h).expand(num_samples, -1).clone()  # (G, V): G independent draws from one distribution
            pad = torch.zeros(num_samples, dtype=torch.long, device=p.device)
            if mode == "eager":
                cache.expand_rows(num_samples)
                steps = EagerSteps(net, cache, pad)
            else:
                fixed = self.runner(net, num_samples, length, mode == "graph", precision == "tf32")
                steps = FixedSteps(net, fixed, cache, pad)
            return decode_loop(steps, logits, max_new_tokens, temperature, top_p, generator, eos, stop, suppress,
                               entropy)

    @torch.no_grad()
    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, eos: Sequence[int] = (),
               stop: StopFn | None = None, mode: str | None = None) -> list[list[int]]:
        """Greedy completions of B different prompts in one batch (left-padded; padding is masked out), in fp32."""
        net, mode = self._prepare(mode)
        p = next(net.parameters())
        B, T = len(prompts), max(len(x) for x in prompts)
        pad = torch.tensor([T - len(x) for x in prompts], device=p.device)  # (B,)
        ids = torch.tensor([[0] * (T - len(x)) + list(x) for x in prompts], device=p.device)  # (B, T)
        with matmul_precision(False):
            cache = KVCache(net.config, B, T + max_new_tokens if mode == "eager" else T, p.device, p.dtype)
            cache.valid[:, :T] = torch.arange(T, device=p.device)[None] >= pad[:, None]
            cache.padded = bool(pad.any())
            positions = (torch.arange(T, device=p.device)[None] - pad[:, None]).clamp(min=0)  # (B, T)
            logits = net.lm_head(net(ids, cache, positions)[:, -1])  # (B, V)
            if mode == "eager":
                steps = EagerSteps(net, cache, pad)
            else:
                steps = FixedSteps(net, self.runner(net, B, T + max_new_tokens, mode == "graph"), cache, pad)
            return decode_loop(steps, logits, max_new_tokens, 0.0, 1.0, None, eos, stop, ())


# The functions the training loop and the evaluation call (a test replaces one of them to script the completions):
# `sampler` keeps the model's fixed-shape steps and bf16 copy between calls; None makes a fresh one for this call.
def _sampler_of(model: Qwen2ForCausalLM, sampler: Sampler | None) -> Sampler:
    if sampler is None:
        return Sampler(model)
    if sampler.model is not model:
        raise ValueError("sampling: the sampler was made for another model")
    return sampler


def sample(model: Qwen2ForCausalLM, prompt: Sequence[int], num_samples: int, max_new_tokens: int, *,
           sampler: Sampler | None = None, **kw):
    """Sampler.sample of `model`, through `sampler` (None: a fresh Sampler, kept for this call only)."""
    return _sampler_of(model, sampler).sample(prompt, num_samples, max_new_tokens, **kw)


def greedy(model: Qwen2ForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
           sampler: Sampler | None = None, **kw) -> list[list[int]]:
    """Sampler.greedy of `model`, through `sampler` (None: a fresh Sampler, kept for this call only)."""
    return _sampler_of(model, sampler).greedy(prompts, max_new_tokens, **kw)
