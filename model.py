"""A hand-written Qwen2 decoder that loads real Hugging Face checkpoints, samples with a KV cache and scores tokens.

Pure PyTorch: no `transformers` import. Module names equal the checkpoint's (`model.layers.0.self_attn.q_proj`, ...),
unfused, so loading is a strict `load_state_dict` and LoRA (lora.py) can target `q_proj`/`v_proj` by name.

Shape letters (README legend): B batch rows, G group size, T tokens, S cached tokens, V vocab, H query heads,
K key/value heads, D head dim, C hidden size (channels), N selected positions.

Sections: config · decoder · loading · model location · tokenizer · sampling · scoring.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import reprlib
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------------
# Config


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype's names


@dataclass(frozen=True)
class Qwen2Config:
    """The architecture fields of a Qwen2 `config.json`; field names are the file's keys."""

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    max_position_embeddings: int = 131072
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (128 for Qwen2-1.5B)
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151643

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> Qwen2Config:
        """Read the keys we implement; refuse a config that turns on anything we do not (naming the key)."""
        if d.get("model_type") != "qwen2":
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}; tokrl implements only 'qwen2'")
        if d.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window is true; sliding-window attention is not implemented")
        if d.get("rope_scaling"):
            raise ValueError(f"{source}: rope_scaling is {d['rope_scaling']!r}; RoPE scaling is not implemented")
        rope = d.get("rope_parameters") or {}  # transformers >= 5 writes rope_theta here
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope_parameters.rope_type is {rope['rope_type']!r}; only 'default' RoPE")
        if any(t != "full_attention" for t in d.get("layer_types") or []):
            raise ValueError(f"{source}: layer_types has {set(d['layer_types'])}; only full_attention is implemented")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act is {d['hidden_act']!r}; Qwen2 uses 'silu'")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None}
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = tuple(kw["eos_token_id"])
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in kw:
                raise ValueError(f"{source}: required key {key!r} is missing")
        if "eos_token_id" not in d:
            kw["eos_token_id"] = None
        for key, value in kw.items():
            if value is not None and (why := _config_value_problem(key, value)) is not None:
                raise ValueError(f"{source}: {key} is {reprlib.repr(value)}; {why}")
        cfg = cls(**kw)
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(f"{source}: num_attention_heads ({cfg.num_attention_heads}) is not a multiple of "
                             f"num_key_value_heads ({cfg.num_key_value_heads})")
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Qwen2Config:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config.json not found (a model directory needs config.json, "
                                    "tokenizer.json and model.safetensors)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_ids) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
                "use_sliding_window": False, **{k: v for k, v in d.items() if v is not None}}


MAX_SIZE = 2**31  # a config's sizes and token ids are below this (PyTorch's shapes and the tokenizers' u32 ids)


def _config_value_problem(key: str, value) -> str | None:
    """What is wrong with one value of config.json (None: nothing): sizes are integers >= 1, token ids integers >= 0,
    RoPE's theta and the norm's epsilon finite numbers > 0, tie_word_embeddings true or false."""
    def integer(v, least: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and least <= v < MAX_SIZE

    if key in ("rope_theta", "rms_norm_eps"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        return None if ok else "expected a finite number > 0"
    if key == "tie_word_embeddings":
        return None if isinstance(value, bool) else "expected true or false"
    if key in ("bos_token_id", "eos_token_id"):
        ids = value if isinstance(value, tuple) else (value,)
        return None if all(integer(i, 0) for i in ids) else "expected a token id (an integer >= 0) or a list of them"
    return None if integer(value, 1) else "expected an integer >= 1 and below 2^31"


# Named presets so tests and benchmarks can build real shapes offline.
PRESETS: dict[str, Qwen2Config] = {
    "qwen2-1.5b": Qwen2Config(),  # Qwen/Qwen2-1.5B (base): 1,543,714,304 parameters, tied embeddings
    # CPU-sized, with the real vocabulary, for the benchmark: the LM head is as wide as Qwen2-1.5B's.
    "qwen2-tiny-realvocab": Qwen2Config(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2),
}


# ----------------------------------------------------------------------------------------------------------------------
# Decoder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as Qwen2 does), then scale in the weight's dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, T, D) for integer positions (B, T); frequencies in fp32 like the reference."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D): the rotate-half convention pairs i with i + D/2
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by the angles in cos/sin (B, T, D), rotate-half convention."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def cache_bytes(cfg: Qwen2Config, rows: int, positions: int, dtype: torch.dtype) -> int:
    """Bytes of a KV cache: keys and values, (rows, K, positions, D) each, in every layer, and the (rows, positions)
    boolean mask."""
    per_position = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_size * dtype.itemsize + 1
    return rows * positions * per_position


class CacheTooLarge(RuntimeError):
    """The KV cache could not be allocated on its device. `nbytes`: what it asked for; `flags`: the settings behind
    its size, filled in by the caller that knows them (train.py)."""

    def __init__(self, rows: int, positions: int, nbytes: int, device, reason: BaseException):
        super().__init__()
        self.rows, self.positions, self.nbytes, self.device = rows, positions, nbytes, str(device)
        self.reason, self.flags = f"{type(reason).__name__}: {_first_line(reason)[:160]}", ""

    def __str__(self) -> str:
        return (f"the KV cache{' for ' + self.flags if self.flags else ''} (rows × positions = {self.rows} × "
                f"{self.positions}) needs {self.nbytes:,} bytes ({self.nbytes / 2**30:.2f} GiB) on {self.device}, "
                f"which could not be allocated ({self.reason})")


class KVCache:
    """Preallocated keys and values for every layer: (B, K, S_max, D) each, filled up to `length`.

    `valid` (B, S_max) marks real tokens; it is False for left padding (batched greedy evaluation). An allocation
    that fails raises CacheTooLarge, naming the bytes asked for.
    """

    def __init__(self, cfg: Qwen2Config, batch: int, max_len: int, device, dtype):
        self.cfg, self.max_len, self.device, self.dtype = cfg, max_len, device, dtype
        self.k, self.v, self.valid = self.allocate(batch)
        self.valid.fill_(True)
        self.padded = False
        self.length = 0

    def allocate(self, rows: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Uninitialised keys and values (rows, K, S_max, D) for every layer, and the (rows, S_max) mask."""
        shape = (rows, self.cfg.num_key_value_heads, self.max_len, self.cfg.head_size)
        layers = range(self.cfg.num_hidden_layers)
        try:
            return ([torch.empty(shape, device=self.device, dtype=self.dtype) for _ in layers],
                    [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in layers],
                    torch.empty(rows, self.max_len, dtype=torch.bool, device=self.device))
        except RuntimeError as e:  # CUDA's torch.OutOfMemoryError, or the CPU allocator's "can't allocate memory"
            nbytes = cache_bytes(self.cfg, rows, self.max_len, self.dtype)
            raise CacheTooLarge(rows, self.max_len, nbytes, self.device, e) from None

    def expand_rows(self, n: int) -> None:
        """Copy a one-row cache (after a shared prefill) into n rows that can then be written independently.

        A real copy, not `expand()`: expanded views share one storage, so the rows' decoded tokens would overwrite
        each other (tests/test_model.py::test_group_rows_draw_independent_tokens tells this bug's story)."""
        assert self.k[0].shape[0] == 1
        k, v, valid = self.allocate(n)
        for new, old in zip([*k, *v, valid], [*self.k, *self.v, self.valid]):
            new.copy_(old)  # the one row broadcast to n
        self.k, self.v, self.valid = k, v, valid

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows so that they stop costing compute."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.valid = self.valid.index_select(0, rows)


# The attention kernel of a fixed-shape decode step on CUDA (fp32, grouped queries, a boolean mask over the slots):
# "efficient" (PyTorch's memory-efficient kernel, math where it refuses the inputs) or "math". Not yet measured: no
# GPU was lent to this work. `python bench/benchmark.py --device cuda` times both and prints the faster; efficient is
# the prior (one fused kernel, no (B, K, H/K, S) score tensor written and read back).
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


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | StaticCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:  # training / scoring: one unpadded sequence per row, plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif isinstance(cache, StaticCache):  # a fixed-shape decode step: one token per row
            y = self.attend_static(q, k, v, cache, layer)
        else:
            start = cache.length
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k, v = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]  # (B, K, S, D)
            if T == 1:  # a decode step: its query sees every real cached key, itself included
                y = self.grouped(q, k, v, cache.valid[:, None, None, :start + 1] if cache.padded else None)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache_mask(cache, start, T), enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def grouped(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """One query per row, q (B, H, 1, D), against keys and values (B, K, S, D): the H/K query heads that share a
        key/value head are passed as that head's H/K query rows, (B, K, H/K, D), so no key or value is copied
        (enable_gqa would repeat each to H/K heads, every layer, every step). Head h reads key/value head h // (H/K),
        as enable_gqa's repeat_interleave pairs them. mask: (B, 1, 1, S) or None."""
        B, g = q.shape[0], self.n_head // self.n_kv
        y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, g, self.head_dim), k, v, attn_mask=mask)
        return y.reshape(B, self.n_head, 1, self.head_dim)

    def attend_static(self, q, k, v, cache: StaticCache, layer: int) -> torch.Tensor:
        """q (B, H, 1, D) against every slot of the fixed-shape cache, after writing k, v (B, K, 1, D) at its slot;
        the slots not yet written, and left padding, are masked."""
        cache.k[layer].index_copy_(2, cache.slot, k)
        cache.v[layer].index_copy_(2, cache.slot, v)
        with cache.attention_kernel():
            return self.grouped(q, cache.k[layer], cache.v[layer], cache.valid[:, None, None, :])


def cache_mask(cache: KVCache, start: int, T: int) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask for T new queries at cache slots start..start+T-1 over S = start+T keys.

    The cache-aware causal mask: query i sits at slot start+i, so it may see keys 0..start+i -- every cached key
    plus the new ones up to itself; padded slots are never seen, except that a padding query sees itself, so that
    no row is fully masked (some attention kernels return NaN for such a row, and 0·NaN would then reach the real
    rows through the padding's values). A single unpadded decode step needs no mask."""
    if T == 1 and not cache.padded:
        return None
    S = start + T
    slots = torch.arange(S, device=cache.valid.device)
    query_slots = (start + torch.arange(T, device=slots.device))[:, None]  # (T, 1)
    causal = slots[None, :] <= query_slots  # (T, S)
    itself = slots[None, :] == query_slots  # (T, S)
    return ((causal[None] & cache.valid[:, None, :S]) | itself[None])[:, None]  # (B, 1, T, S)


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    """The decoder. `forward` returns final-normed hidden states; `lm_head` is applied by the caller only where
    logits are needed (the vocabulary is 151,936 wide: a (T, V) tensor is built only when asked for)."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def run_layers(self, h: torch.Tensor, positions: torch.Tensor, start: int = 0, end: int | None = None,
                   cache: KVCache | None = None) -> torch.Tensor:
        """Layers start..end-1 on hidden states h (B, T, C) at integer positions (B, T)."""
        cos, sin = rope_cos_sin(positions, self.config.head_size, self.config.rope_theta, h.dtype)
        for i in range(start, self.config.num_hidden_layers if end is None else end):
            h = self.model.layers[i](h, cos, sin, cache, i)
        return h

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> final-normed hidden states (B, T, C). With a cache, the tokens go at its end."""
        B, T = input_ids.shape
        if positions is None:
            start = 0 if cache is None else cache.length
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        h = self.run_layers(self.model.embed_tokens(input_ids), positions, cache=cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(h)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """One token per row, tokens (B,) at positions (B,), into `cache` at its slot -> logits (B, V). Every shape
        is fixed and no value leaves the device, so a CUDA graph can capture it once and replay it every step."""
        cache.valid.index_fill_(1, cache.slot, True)
        h = self.run_layers(self.model.embed_tokens(tokens[:, None]), positions[:, None], cache=cache)  # (B, 1, C)
        return self.lm_head(self.model.norm(h[:, 0]))

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full (B, T, V) logits: for tests and small inputs only."""
        return self.lm_head(self(input_ids))

    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Random weights for tests and benchmarks: norms 1, every other tensor normal(0, std), biases included
        (nonzero biases are exercised by the parity tests)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, model.norm
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=generator)


def num_parameters(model: nn.Module) -> int:
    """Parameter count with shared (tied) tensors counted once."""
    return sum(p.numel() for p in model.parameters())  # .parameters() already yields a tied tensor once


# ----------------------------------------------------------------------------------------------------------------------
# Loading a Hugging Face model directory (config.json + model.safetensors, or shards + model.safetensors.index.json)

IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")  # some old checkpoints store RoPE buffers; we recompute
# The dtypes a weight may have on disk: --dtype's three floating types (safetensors' names); an integer, boolean or
# quantized (F8) tensor is not a weight this decoder computes with, and casting it would load zeros or nonsense
WEIGHT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_SAFETENSORS_NAME = {v: k for k, v in WEIGHT_DTYPES.items()}  # a loaded tensor's dtype by its safetensors name


def dtype_problem(name: str, dtype: str) -> str | None:
    """Why a tensor of this safetensors dtype cannot be a weight (None: it can)."""
    if dtype in WEIGHT_DTYPES or IGNORED_TENSORS.match(name):
        return None
    return (f"tensor {name} is {dtype}; allowed: {', '.join(WEIGHT_DTYPES)} (floating point: an integer, boolean or "
            "quantized tensor is not a weight this model computes with)")


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: the shards of the index, or the single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard listed in {index.name} is missing")
        return files
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                                "(tokrl reads safetensors weights only)")
    return [single]


def read_state_dict(model_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, up-cast (or cast) to `dtype`, with errors that name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = {}
    for f in weight_files(model_dir):
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"{f}: cannot read safetensors file, it may be truncated or corrupt ({e})") from None
        for name, t in tensors.items():
            if name in state:
                raise ValueError(f"{f}: tensor {name} also appears in another shard")
            if (problem := dtype_problem(name, _SAFETENSORS_NAME.get(t.dtype, str(t.dtype)))) is not None:
                raise ValueError(f"{f}: {problem}")
            state[name] = t.to(dtype)
    return state


def check_state_dict(model: Qwen2ForCausalLM, state: dict[str, torch.Tensor], where: Path) -> None:
    """Name every missing, unexpected or mis-shaped tensor before loading."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # tied: the head is the embedding, the file need not repeat it
        state.pop("lm_head.weight", None)  # some tied checkpoints store it anyway; the embedding is used
    for name in [k for k in state if IGNORED_TENSORS.match(k)]:
        state.pop(name)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs config {expected[k]}" for k in sorted(set(state) & set(expected))
              if tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if shapes:
        problems.append("mis-shaped tensors " + "; ".join(shapes[:5]))
    if problems:
        raise ValueError(f"{where}: checkpoint does not match config.json: " + "; ".join(problems))


def load_model(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Qwen2ForCausalLM:
    """Build the decoder from `model_dir/config.json` on the meta device (no allocation), then assign the checkpoint.

    bf16/fp16 tensors are up-cast to `dtype` (fp32 by default: the paper trains in fp32)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory not found")
    cfg = Qwen2Config.from_json(model_dir / "config.json")
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    state = read_state_dict(model_dir, dtype)
    check_state_dict(model, state, model_dir)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:  # assign=True replaced the Parameters: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device).eval()


def check_model_dir(model_dir: str | os.PathLike) -> tuple[Qwen2Config, Tokenizer]:
    """What `load_model` would refuse, found in seconds: config.json, the tokenizer against the config's vocabulary,
    generation_config.json, and the safetensors headers (names, shapes, and files whose offsets cover them exactly),
    no weights read."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, not UTF-8, an integer of 5,000 digits
        raise ValueError(f"{path}: cannot read config.json ({_first_line(e)})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: config.json holds a JSON {type(d).__name__}, expected an object of settings")
    cfg = Qwen2Config.from_dict(d, source=str(path))
    tok = Tokenizer(model_dir / "tokenizer.json")
    n_ids = tok.tk.get_vocab_size(with_added_tokens=True)
    if n_ids > cfg.vocab_size:
        raise ValueError(f"{model_dir / 'tokenizer.json'}: the tokenizer has {n_ids} ids, more than the model's "
                         f"vocab_size {cfg.vocab_size} in config.json (tokenizer and model do not belong together)")
    eos_ids(model_dir, cfg, tok)  # generation_config.json
    shapes, files = {}, weight_files(model_dir)
    for f in files:
        header = safetensors_header(f)
        if bad := next(filter(None, (dtype_problem(k, dtype) for k, (dtype, _) in header.items())), None):
            raise ValueError(f"{f}: {bad}")
        shapes.update({k: torch.empty(shape, device="meta") for k, (_, shape) in header.items()})
    layers = {m.group(1) for k in shapes if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if len(layers) != cfg.num_hidden_layers:  # before the model is built: config.json may claim a billion layers
        raise ValueError(f"{path}: num_hidden_layers is {cfg.num_hidden_layers}, but the weights in {model_dir} hold "
                         f"{len(layers)} layers (config and weights do not belong together)")
    with torch.device("meta"):  # a mismatch names the one file, or the index that lists the shards' tensors
        check_state_dict(Qwen2ForCausalLM(cfg), shapes,
                         files[0] if len(files) == 1 else model_dir / "model.safetensors.index.json")
    return cfg, tok


def check_weights(model_dir: str | os.PathLike, dtype: torch.dtype) -> None:
    """Every weight's values, read once through the file's memory map (check_model_dir has checked the headers and the
    dtypes): finite, and within the range of `dtype`, which the load casts them to. One min-max pass a tensor: about
    1 s for Qwen2-1.5B's 3.1 GB, a twentieth of its load on the CPU (docs/performance.md)."""
    from safetensors import safe_open

    for f in weight_files(Path(model_dir)):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                t = st.get_tensor(name)
                if IGNORED_TENSORS.match(name) or not t.numel():
                    continue
                low, high = torch.aminmax(t)  # NaN propagates to both, inf to one
                if not (torch.isfinite(low) and torch.isfinite(high)):
                    raise ValueError(f"{f}: tensor {name} holds non-finite values (NaN or inf); the file is damaged, "
                                     "or was saved from a model that diverged")
                largest = max(-float(low), float(high))
                if largest > torch.finfo(dtype).max and not torch.isfinite(t.to(dtype)).all():
                    raise ValueError(f"{f}: tensor {name} holds values up to {largest:.4g}, beyond the largest "
                                     f"{str(dtype).removeprefix('torch.')} ({torch.finfo(dtype).max:.4g}) the weights "
                                     "are loaded in; allowed: a --dtype that holds them (float32 or bfloat16)")


MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header


def safetensors_header(f: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A safetensors file's tensors, name -> (dtype, shape), from its header alone (no tensor is read), checked by the
    safetensors library itself (the header parses, its offsets cover the file exactly). Errors name the file; a file
    shorter than its header announces is named as truncated."""
    from safetensors import SafetensorError, safe_open

    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(fh.read(n)) if 0 < n <= MAX_HEADER_BYTES else None
        except (ValueError, RecursionError):
            header = None
    if not isinstance(header, dict):
        raise ValueError(f"{f}: not a safetensors file (unreadable header); it may be truncated or corrupt")
    try:
        end = 8 + n + max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] + [0])
    except (TypeError, KeyError, IndexError):
        end = 0  # a malformed entry: the library names it below
    if f.stat().st_size < end:
        raise ValueError(f"{f}: {f.stat().st_size} bytes, but its header announces {end}: the file is truncated "
                         "(an interrupted download or copy)")
    try:
        with safe_open(str(f), "pt") as st:
            return {k: (st.get_slice(k).get_dtype(), tuple(st.get_slice(k).get_shape())) for k in st.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{f}: not a safetensors file ({_first_line(e)}); it may be truncated or corrupt") from None


def save_model(model: Qwen2ForCausalLM, model_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors in the Hugging Face layout (tests and benchmarks build checkpoints)."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: (v if dtype is None else v.to(dtype)).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")



# ----------------------------------------------------------------------------------------------------------------------
# Model location: a local directory as it is; else a repo id through huggingface_hub, which owns the cache layout,
# offline mode, tokens, mirrors and resumable, verified downloads (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN,
# HF_ENDPOINT, as it defines them). tokrl decides only which files it needs and what to say when they cannot be had.

# What tokrl reads (fnmatch patterns); nothing else of a repo is fetched (no *.bin, *.gguf, *.pth, README, ...).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")


class ModelNotFoundError(RuntimeError):
    """The model is neither a directory, nor cached, nor downloadable; the message says how to place it by hand."""


def resolve_model_dir(name_or_path: str, *, revision: str | None = None) -> Path:
    """A directory holding config.json, tokenizer.json and the safetensors weights.

    An existing directory is used as it is, even where a cached repo has the same name. Anything else must be a
    repo id: found in the Hugging Face cache (with the network off too), else downloaded into it.
    `revision`: a branch, tag or commit hash (None: the repo's main branch)."""
    path = Path(name_or_path).expanduser()
    if is_dir(name_or_path):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError

    if not is_repo_id(name_or_path):
        raise ValueError(f"{name_or_path!r} is neither an existing directory nor a Hugging Face repo id "
                         "(owner/name, e.g. Qwen/Qwen2-1.5B)")
    try:
        snap = Path(snapshot_download(name_or_path, revision=revision, allow_patterns=list(MODEL_FILES)))
    except RepositoryNotFoundError as e:  # a gated or private repo without a token looks the same
        why = (f"no such directory, and no such repo on {constants.ENDPOINT} or a gated/private one (set HF_TOKEN): "
               f"{_first_line(e)}")
    except RevisionNotFoundError as e:
        why = f"no revision {revision!r}: {_first_line(e)}"
    except Exception as e:  # unreachable Hub, HF_HUB_OFFLINE, a connection cut after the library's retries, ...
        how = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"cannot be fetched from {constants.ENDPOINT}"
        why = f"not (whole) in the cache {constants.HF_HUB_CACHE} and {how} ({type(e).__name__}: {_first_line(e)})"
    else:
        if not (missing := _missing_files(snap)):
            return snap
        why = f"{snap} is incomplete: {'; '.join(missing)}"
    raise ModelNotFoundError(f"{name_or_path} (revision {revision or 'main'}): {why}. "
                             f"{_by_hand(name_or_path, revision, constants.ENDPOINT, constants.HF_HUB_CACHE)}")


def is_dir(name: str) -> bool:
    """`name` is an existing directory (False, not an OSError, for a name too long to be a path)."""
    try:
        return Path(name).expanduser().is_dir()
    except OSError:
        return False


def is_repo_id(name: str) -> bool:
    """A Hugging Face repo id (owner/name), as resolve_model_dir reads a name that is not a directory."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _missing_files(snap: Path) -> list[str]:
    """What tokrl needs that a snapshot lacks: a repo without safetensors weights, or a partial offline cache."""
    missing = [f"no {name}" for name in ("config.json", "tokenizer.json") if not (snap / name).is_file()]
    try:
        weight_files(snap)
    except FileNotFoundError as e:  # its message names the file from the snapshot folder on: keep the part after it
        missing.append(str(e).replace(f"{snap}/", "").replace(f"{snap}: ", ""))
    return missing


def _by_hand(repo_id: str, revision: str | None, endpoint: str, cache: str) -> str:
    page = f"{endpoint}/{repo_id}" + (f"/tree/{revision}" if revision else "")
    folder = "models--" + repo_id.replace("/", "--")  # the library's cache folder of the repo
    return (f"To place it by hand, on a machine with network access: either download config.json, "
            f"generation_config.json, tokenizer.json and model.safetensors (or model.safetensors.index.json and the "
            f"model-*-of-*.safetensors shards it lists) from {page} into one directory, copy it here and pass "
            f"--model DIR; or run `hf download {repo_id}{f' --revision {revision}' if revision else ''}` there and "
            f"copy its {folder} cache folder to {Path(cache) / folder}")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


class Tokenizer:
    """`tokenizer.json` through the `tokenizers` library. Special tokens written in the text are recognised."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer.json not found")
        try:
            self.tk = _Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{path}: cannot read tokenizer ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)


def chatml(system: str, user: str, assistant_prefix: str = "") -> str:
    """Qwen's ChatML: system and user turns, then the assistant turn opened (and optionally prefilled)."""
    return (f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{user}{IM_END}\n"
            f"{IM_START}assistant\n{assistant_prefix}")


def eos_ids(model_dir: str | os.PathLike | None, cfg: Qwen2Config, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """Token ids that end a completion: config.json's and generation_config.json's eos_token_id, plus
    <|endoftext|> and <|im_end|> when the tokenizer has them (SPEC.md: both end a completion)."""
    ids = set(cfg.eos_ids)
    gen = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if gen is not None and gen.is_file():
        try:
            d = json.loads(gen.read_text())
        except (OSError, ValueError, RecursionError) as err:
            raise ValueError(f"{gen}: not valid JSON ({_first_line(err)})") from None
        e = d.get("eos_token_id") if isinstance(d, dict) else None
        e = [e] if isinstance(e, int) else e or []
        if not isinstance(d, dict) or not isinstance(e, list) or _config_value_problem("eos_token_id", tuple(e)):
            raise ValueError(f"{gen}: expected a JSON object whose eos_token_id is a token id or a list of them")
        ids.update(e)
    for tok in (ENDOFTEXT, IM_END):
        if tokenizer is not None and (i := tokenizer.token_id(tok)) is not None:
            ids.add(i)
    return tuple(sorted(ids))


# ----------------------------------------------------------------------------------------------------------------------
# Sampling


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
DECODES = ("eager", "static", "graph")  # how sample() and greedy() run their decode steps (`decode`)
PRECISIONS = ("fp32", "tf32", "bf16")  # sample()'s matrix products (`precision`)
SLOT_BLOCK = 16  # a fixed-shape cache's slots are rounded up to a multiple: prompts of other lengths reuse its graph


def default_decode(device) -> str:
    """CUDA: the fixed-shape step, replayed as a CUDA graph. The CPU: the eager step, which drops finished rows
    from its cache (on a CPU every row costs compute, and there are no kernel launches to save)."""
    return "graph" if torch.device(device).type == "cuda" else "eager"


def _decode(steps, logits: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float, generator,
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
    """Decode steps of fixed shape: every row stays in the Decoder's batch; the live rows' logits are read out."""

    def __init__(self, model: Qwen2ForCausalLM, decoder: Decoder, prefill: KVCache, pad: torch.Tensor):
        self.model, self.decoder, self.pad = model, decoder, pad
        decoder.cache.load_prefix(prefill)
        self.slot = prefill.length  # the slot of the next token, the same in every row
        self.live = torch.arange(decoder.cache.rows, device=pad.device)

    def __call__(self, tok: torch.Tensor, keep: list[int]) -> torch.Tensor:
        if len(keep) < tok.shape[0]:
            idx = torch.tensor(keep, device=tok.device)
            tok, self.live = tok[idx], self.live[idx]
        d = self.decoder
        d.tokens.index_copy_(0, self.live, tok)  # a finished row keeps feeding its last token, unread
        d.positions.copy_(self.slot - self.pad)  # a left-padded row's positions start at 0 after its pad
        d.cache.slot.fill_(self.slot)
        self.slot += 1
        logits = d.run(self.model)  # (B, V), every row
        return logits if self.live.shape[0] == d.cache.rows else logits.index_select(0, self.live)


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


class Decoder:
    """A model's decode step over one StaticCache of rows × slots, with fixed input buffers (tokens, positions, the
    cache's slot). graph=False runs the step as it is; graph=True captures it once as a CUDA graph and replays it:
    one launch for the ~1,300 small kernels of a Qwen2-1.5B step, which launched one by one cost more than the
    GPU's work at 8 to 50 rows. The graph reads the model's weights where they lie, so an adapter trained in place
    (the optimizer's step) is seen at the next replay."""

    captures = 0  # CUDA graphs captured in this process (a test counts them)
    refused = 0  # captures that failed (each decodes without a graph)

    def __init__(self, model: Qwen2ForCausalLM, rows: int, slots: int, graph: bool, tf32: bool):
        p = next(model.parameters())
        self.cache = StaticCache(model.config, rows, slots, p.device, p.dtype)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=p.device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=p.device)
        self.tf32, self.graph, self.logits = tf32, None, None
        if graph:
            try:
                self.capture(model)
            except RuntimeError as e:  # a driver or build that refuses the capture: decode without the graph, slower
                self.graph = None
                if oom := out_of_memory(e):  # not a refusal: these rows do not fit, with or without the graph
                    nbytes = cache_bytes(model.config, rows, slots, p.dtype)
                    raise CaptureOutOfMemory(rows, slots, nbytes, p.device, oom) from None
                if not Decoder.refused:
                    print(f"warning: the decode step could not be captured as a CUDA graph ({_first_line(e)[:200]}); "
                          "decoding without it, slower", file=sys.stderr)
                Decoder.refused += 1

    def capture(self, model: Qwen2ForCausalLM) -> None:
        """Two warm-up steps, then the capture, on one side stream: cuBLAS's handle and workspace, kept per stream,
        exist before the capture starts (made during it, they would be an illegal allocation)."""
        with torch.cuda.device(self.cache.device), matmul_precision(self.tf32):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    model.decode_step(self.tokens, self.positions, self.cache)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=side):
                self.logits = model.decode_step(self.tokens, self.positions, self.cache)
            torch.cuda.current_stream().wait_stream(side)
        self.cache.valid.zero_()  # the warm-up steps wrote slot 0; load_prefix overwrites it
        Decoder.captures += 1

    def run(self, model: Qwen2ForCausalLM) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        with matmul_precision(self.tf32):
            return model.decode_step(self.tokens, self.positions, self.cache)


def structure(model: nn.Module) -> tuple:
    """Where every parameter lies, and every module's switches (LoRA's enabled, merged): what a captured graph and a
    bf16 copy depend on. Parameters updated in place keep it; replaced or re-wrapped ones change it."""
    params = tuple((p.data_ptr(), p.dtype, p.requires_grad) for p in model.parameters())
    return params + tuple((getattr(m, "enabled", None), getattr(m, "merged", None)) for m in model.modules())


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (structure, {shape: Decoder})
_BF16: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (structure, its bf16 copy)


def decoder(model: Qwen2ForCausalLM, rows: int, length: int, graph: bool, tf32: bool = False) -> Decoder:
    """The model's Decoder for rows × length (slots rounded up to SLOT_BLOCK), made on first use and kept with the
    model, so that a shape is captured once per run, not once per call; made again after the model changes."""
    sig = structure(model)
    kept = _DECODERS.get(model)
    if kept is None or kept[0] != sig:
        kept = _DECODERS[model] = (sig, {})
    key = (rows, -(-length // SLOT_BLOCK) * SLOT_BLOCK, graph, tf32)
    if key not in kept[1]:
        kept[1][key] = Decoder(model, *key)
    return kept[1][key]


def release_decoders(model: Qwen2ForCausalLM) -> None:
    """Free the model's fixed-shape caches and graphs (the evaluation's large batch holds gigabytes)."""
    _DECODERS.pop(model, None)
    if model in _BF16:
        _DECODERS.pop(_BF16[model][1], None)


def bf16_copy(model: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
    """The model for sampling in bf16: a bf16 copy of every frozen weight, and the very tensors of the trained ones
    (the LoRA adapter, fp32, applied as in training), so each update is sampled from at once. Made once per model."""
    sig = structure(model)
    kept = _BF16.get(model)
    if kept is None or kept[0] != sig:
        memo = {id(p): p if p.requires_grad else nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
                for p in model.parameters()}
        kept = _BF16[model] = (sig, copy.deepcopy(model, memo))
    return kept[1]


def _prepare(model: Qwen2ForCausalLM, decode: str | None, precision: str = "fp32"):
    """The network that samples (the model, or its bf16 copy) and the decode to use."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: allowed {', '.join(PRECISIONS)}")
    decode = decode or default_decode(next(model.parameters()).device)
    if decode not in DECODES:
        raise ValueError(f"decode {decode!r}: allowed {', '.join(DECODES)}")
    return (bf16_copy(model) if precision == "bf16" else model), decode


@torch.no_grad()
def sample(model: Qwen2ForCausalLM, prompt: Sequence[int], num_samples: int, max_new_tokens: int, *,
           temperature: float, generator: torch.Generator | None, top_p: float = 1.0, eos: Sequence[int] = (),
           stop: StopFn | None = None, suppress: Sequence[int] = (), decode: str | None = None,
           precision: str = "fp32", entropy: bool = False):
    """G = num_samples completions of one prompt: the prompt is prefilled once and its cache copied to G rows.

    Each row stops at an EOS token (kept in its completion), when `stop(tokens)` is true, or at max_new_tokens.
    Returns the G completions as token lists (generated tokens only). `decode`: eager, static (fixed shape) or
    graph (fixed shape, a CUDA graph); None: default_decode. The draws come from `generator` in the same order
    whatever the decode. `precision`: fp32 (the paper's), tf32 (CUDA matrix products in TF32) or bf16 (a bf16 copy
    of the frozen weights): the samples are then slightly off the fp32 policy (docs/performance.md measures it).
    entropy=True (T-SPMO's --replay-cut entropy): returns (completions, entropies), entropies[i][t] the entropy in
    nats of the distribution completions[i][t] was drawn from (next_token's), the same draws as without it."""
    if not prompt:
        raise ValueError("sample: the prompt is empty")
    net, decode = _prepare(model, decode, precision)
    p = next(net.parameters())
    length = len(prompt) + max_new_tokens
    with matmul_precision(precision == "tf32"):
        cache = KVCache(net.config, 1, length if decode == "eager" else len(prompt), p.device, p.dtype)
        h = net(torch.tensor([list(prompt)], device=p.device), cache)[:, -1]  # (1, C)
        logits = net.lm_head(h).expand(num_samples, -1).clone()  # (G, V): G independent draws from one distribution
        pad = torch.zeros(num_samples, dtype=torch.long, device=p.device)
        if decode == "eager":
            cache.expand_rows(num_samples)
            steps = EagerSteps(net, cache, pad)
        else:
            fixed = decoder(net, num_samples, length, decode == "graph", precision == "tf32")
            steps = FixedSteps(net, fixed, cache, pad)
        return _decode(steps, logits, max_new_tokens, temperature, top_p, generator, eos, stop, suppress, entropy)


@torch.no_grad()
def greedy(model: Qwen2ForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
           eos: Sequence[int] = (), stop: StopFn | None = None, decode: str | None = None) -> list[list[int]]:
    """Greedy completions of B different prompts in one batch (left-padded; padding is masked out), in fp32."""
    net, decode = _prepare(model, decode)
    p = next(net.parameters())
    B, T = len(prompts), max(len(x) for x in prompts)
    pad = torch.tensor([T - len(x) for x in prompts], device=p.device)  # (B,)
    ids = torch.tensor([[0] * (T - len(x)) + list(x) for x in prompts], device=p.device)  # (B, T)
    with matmul_precision(False):
        cache = KVCache(net.config, B, T + max_new_tokens if decode == "eager" else T, p.device, p.dtype)
        cache.valid[:, :T] = torch.arange(T, device=p.device)[None] >= pad[:, None]
        cache.padded = bool(pad.any())
        positions = (torch.arange(T, device=p.device)[None] - pad[:, None]).clamp(min=0)  # (B, T)
        logits = net.lm_head(net(ids, cache, positions)[:, -1])  # (B, V)
        if decode == "eager":
            steps = EagerSteps(net, cache, pad)
        else:
            steps = FixedSteps(net, decoder(net, B, T + max_new_tokens, decode == "graph"), cache, pad)
        return _decode(steps, logits, max_new_tokens, 0.0, 1.0, None, eos, stop, ())


# ----------------------------------------------------------------------------------------------------------------------
# Scoring


def logprobs_at(model: Qwen2ForCausalLM, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log π(target | prefix) from final-normed hidden states (N, C) of the prefixes; targets (N,) or (N, M).

    The LM head runs on these N rows only: a (N, V) tensor, never (T, V) for a whole sequence."""
    logits = model.lm_head(hidden).float()  # (N, V)
    t = targets[:, None] if targets.dim() == 1 else targets  # (N, M)
    lp = logits.gather(-1, t) - logits.logsumexp(-1, keepdim=True)  # (N, M): no (N, V) log_softmax copy
    return lp.squeeze(-1) if targets.dim() == 1 else lp


def token_logprobs(model: Qwen2ForCausalLM, input_ids: Sequence[int] | torch.Tensor,
                   positions: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """log π(x_p | x_<p) for each position p (p >= 1) of one sequence x: (N,)."""
    p = next(model.parameters())
    ids = torch.as_tensor(input_ids, device=p.device)
    pos = torch.as_tensor(positions, device=p.device)
    if pos.numel() and int(pos.min()) < 1:
        raise ValueError("token_logprobs: position 0 has no prefix to condition on")
    hidden = model(ids[None])[0]  # (T, C)
    return logprobs_at(model, hidden[pos - 1], ids[pos])  # the state at p-1 predicts the token at p
