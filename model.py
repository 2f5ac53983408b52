"""A hand-written Qwen2 decoder: what a reader audits against the checkpoint.

Pure PyTorch: no `transformers` import. Module names equal the checkpoint's (`model.layers.0.self_attn.q_proj`, ...),
unfused, so loading (pretrained.py) is a strict `load_state_dict` and LoRA (lora.py) can target `q_proj`/`v_proj`
by name. Sampling from it, with its fixed-shape cache and CUDA graph, is sampling.py.

Shape letters (README legend): B batch rows, G group size, T tokens, S cached tokens, V vocab, H query heads,
K key/value heads, D head dim, C hidden size (channels), N selected positions.

Sections: config · decoder (with its KV cache) · scoring.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from values import first_line

# ----------------------------------------------------------------------------------------------------------------------
# Config (config.json's keys; reading and checking the file: pretrained.py)


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
        self.reason, self.flags = f"{type(reason).__name__}: {first_line(reason)[:160]}", ""

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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """q (B, H, T, D) for T new tokens at the cache's end, after writing their k, v (B, K, T, D) there."""
        T, start = q.shape[2], self.length
        self.k[layer][:, :, start:start + T] = k
        self.v[layer][:, :, start:start + T] = v
        k, v = self.k[layer][:, :, :start + T], self.v[layer][:, :, :start + T]  # (B, K, S, D)
        if T == 1:  # a decode step: its query sees every real cached key, itself included
            return grouped_attention(q, k, v, self.valid[:, None, None, :start + 1] if self.padded else None)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=cache_mask(self, start, T), enable_gqa=True)


class Cache(Protocol):
    """What a layer's attention asks of a cache: store this step's keys and values of `layer`, and attend q to every
    key the cache holds for it. KVCache here; the sampler's fixed-shape StaticCache (sampling.py)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor: ...


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One query per row, q (B, H, 1, D), against keys and values (B, K, S, D): the H/K query heads that share a
    key/value head are passed as that head's H/K query rows, (B, K, H/K, D), so no key or value is copied
    (enable_gqa would repeat each to H/K heads, every layer, every step). Head h reads key/value head h // (H/K),
    as enable_gqa's repeat_interleave pairs them. mask: (B, 1, 1, S) or None."""
    B, H, _, D = q.shape
    K = k.shape[1]
    y = F.scaled_dot_product_attention(q.reshape(B, K, H // K, D), k, v, attn_mask=mask)
    return y.reshape(B, H, 1, D)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache: Cache | None = None, layer: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:  # training / scoring: one unpadded sequence per row, plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # the cache stores k, v and attends with the mask its layout needs
            y = cache.attend(q, k, v, layer)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


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
                   cache: Cache | None = None) -> torch.Tensor:
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

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full (B, T, V) logits: for tests and small inputs only."""
        return self.lm_head(self(input_ids))

    def logprobs_at(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log π(target | prefix) from final-normed hidden states (N, C) of the prefixes; targets (N,) or (N, M).

        The LM head runs on these N rows only: a (N, V) tensor, never (T, V) for a whole sequence."""
        logits = self.lm_head(hidden).float()  # (N, V)
        t = targets[:, None] if targets.dim() == 1 else targets  # (N, M)
        lp = logits.gather(-1, t) - logits.logsumexp(-1, keepdim=True)  # (N, M): no (N, V) log_softmax copy
        return lp.squeeze(-1) if targets.dim() == 1 else lp

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
# Scoring


def token_logprobs(model: Qwen2ForCausalLM, input_ids: Sequence[int] | torch.Tensor,
                   positions: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """log π(x_p | x_<p) for each position p (p >= 1) of one sequence x: (N,)."""
    p = next(model.parameters())
    ids = torch.as_tensor(input_ids, device=p.device)
    pos = torch.as_tensor(positions, device=p.device)
    if pos.numel() and int(pos.min()) < 1:
        raise ValueError("token_logprobs: position 0 has no prefix to condition on")
    hidden = model(ids[None])[0]  # (T, C)
    return model.logprobs_at(hidden[pos - 1], ids[pos])  # the state at p-1 predicts the token at p
