"""LoRA (Hu et al. 2021) on chosen linear layers of model.py's Qwen2 — tag L1 — in PEFT's format, loaded here and
written by checkpoints.write_adapter.

    h = W0·x + b0 + (α/r)·B·A·x        A (r, C_in) Kaiming-uniform,  B (C_out, r) zero  →  step 0 equals the base model

`LoRALinear` keeps the wrapped layer's own `weight` and `bias` Parameters, so the base model's parameter names do not
change; the adapter adds `lora_A` and `lora_B`. `adapters_off(model)` switches every adapter off, so the same module
serves as π_ref without a second copy of the weights.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import reprlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from values import first_line, is_finite_number, is_integer

if TYPE_CHECKING:  # annotations only: parsing flags reads lora.py's checks (settings.py) without the decoder
    import model as M


TARGETS = ("q_proj", "v_proj")  # the paper adapts the query and value projections
MAX_SCALE = torch.finfo(torch.float32).max  # α/r multiplies the adapter's float32 product: beyond this it is inf


def scale_problem(alpha: float, r: int) -> str | None:
    """Why LoRA's scale α/r cannot be computed with (None: it can). Past float32's largest number the scale is inf in
    the adapter's arithmetic, and inf·B·A·x is NaN at step 0 already, where B = 0."""
    if alpha / r <= MAX_SCALE:
        return None
    return (f"LoRA's scale alpha/r = {alpha:.4g}/{r} = {alpha / r:.4g} overflows the adapter's float32 arithmetic "
            f"(largest {MAX_SCALE:.4g})")


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank update. Shares the base layer's weight and bias Parameters (frozen)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # ours: the adapter is fp32 whatever the base dtype (as PEFT's autocast_adapter_dtype): a 1e-4 AdamW update
        # is below bf16's resolution for most weights, and AdamW's state follows the parameters' dtype
        self.lora_A = nn.Parameter(init_lora_A(r, self.in_features, generator).to(base.weight.device))  # (r, C_in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=base.weight.device, dtype=torch.float32))  # (C_out, r) fp32
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.enabled = True
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # W0·x + b0, in the base dtype
        if self.enabled and not self.merged:
            out_dtype = y.dtype
            a = self.lora_A
            delta = F.linear(F.linear(x.to(a.dtype), a), self.lora_B)  # B·A·x in fp32 (x cast up, as PEFT does)
            y = (y + self.scaling * delta).to(out_dtype)  # [L1] + (α/r)·B·A·x, summed in fp32, back to the base dtype
        return y

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.lora_B @ self.lora_A  # (C_out, C_in), fp32

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False


def init_lora_A(r: int, c_in: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (r, C_in) Kaiming-uniform with a = sqrt(5) (nn.Linear's own default, and PEFT's), drawn in fp32 on the CPU
    from a CPU generator (None: torch's default CPU generator), so one seed gives the same A on every device and
    dtype; the caller moves it. (A CPU generator cannot fill a CUDA tensor, and CUDA's stream differs from the CPU's.)"""
    a = torch.empty(r, c_in, device="cpu", dtype=torch.float32)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # L1's A: Kaiming-uniform
    return a


def num_lora_layers(num_layers: int, fraction: float) -> int:
    """round(fraction·L), rounding halves up. [decided] (SPEC.md): 9 of 28 layers for 1/3, 7 of 28 for 1/4."""
    return int(math.floor(fraction * num_layers + 0.5))


def apply_lora(model: nn.Module, r: int, fraction: float, alpha: float | None = None,
               targets: Sequence[str] = TARGETS, generator: torch.Generator | None = None) -> list[int]:
    """Freeze the model and put LoRA on `targets` of the last round(fraction·L) layers. Returns those layer indices.

    [decided] (SPEC.md): α = r (scale 1) unless given, no dropout."""
    layers = model.model.layers
    n = num_lora_layers(len(layers), fraction)
    if not 1 <= n <= len(layers):
        raise ValueError(f"LoRA fraction {fraction} of {len(layers)} layers selects {n} layers; need 1..{len(layers)}")
    model.requires_grad_(False)
    chosen = list(range(len(layers) - n, len(layers)))
    for i in chosen:
        attn = layers[i].self_attn
        for name in targets:
            setattr(attn, name, LoRALinear(getattr(attn, name), r, r if alpha is None else alpha, generator))
    return chosen


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def first_lora_layer(model: nn.Module) -> int:
    """Index of the lowest layer that holds an adapter: the layers below it have nothing to train."""
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if any(isinstance(m, LoRALinear) for m in layer.modules()):
            return i
    return len(layers)


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """Σ_{W ∈ LoRA} ‖W‖²_2 over every A and B (the squared Frobenius norm), the regulariser of E10."""
    return sum(p.pow(2).sum() for p in lora_parameters(model))  # Σ_W ‖W‖², E10's L2 term


def mean_abs(model: nn.Module) -> tuple[float, float]:
    """Mean |entry| over every LoRA A, and over every B: logged by T-SPMO, where λ·Σ‖W‖² can shrink A toward 0."""
    mods = [m for _, m in lora_modules(model)]
    with torch.no_grad():
        a = sum(float(m.lora_A.abs().sum()) for m in mods) / max(sum(m.lora_A.numel() for m in mods), 1)
        b = sum(float(m.lora_B.abs().sum()) for m in mods) / max(sum(m.lora_B.numel() for m in mods), 1)
    return a, b


def adapter_norms(model: nn.Module) -> dict[str, float]:
    """Mean |entry| of every LoRA A and of every B, and ‖ΔW‖ = (Σ_modules ‖B·A‖²_F)^½, the size of what the adapter
    adds to the base weights (unscaled by α/r). ‖B·A‖²_F = tr((BᵀB)(A·Aᵀ)): r × r products, never d_out × d_in."""
    mean_A, mean_B = mean_abs(model)
    with torch.no_grad():
        sq = sum(float(((m.lora_B.T @ m.lora_B) * (m.lora_A @ m.lora_A.T)).sum()) for _, m in lora_modules(model))
    return {"lora_A_mean_abs": mean_A, "lora_B_mean_abs": mean_B, "lora_BA_norm": max(sq, 0.0) ** 0.5}


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """π_ref: the same module with every adapter switched off (no second copy of the weights)."""
    mods = [m for _, m in lora_modules(model)]
    if any(m.merged for m in mods):
        raise RuntimeError("adapters_off: the adapters are merged into the weights; unmerge() them first")
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


# ----------------------------------------------------------------------------------------------------------------------
# The split forward, for every objective: the layers below the first adapter once without autograd (nothing there
# trains, and π_θ and π_ref share them), the adapted top with it, the LM head only at the positions asked for


@dataclass
class Scored:
    """Per sequence, at its positions: the final-normed states (N_i, C) that predict the targets (a value head reads
    them: baselines.py, K1), log π_θ (N_i,) or (N_i, M) with gradient, and log π_ref (adapters off, or --train full's
    frozen copy; no gradient) or None."""
    states: list[torch.Tensor]
    logp: list[torch.Tensor]
    ref: list[torch.Tensor | None]


def logprobs(model: M.Qwen2ForCausalLM, seqs: Sequence[Sequence[int]], positions: Sequence[torch.Tensor],
             targets: Sequence[torch.Tensor] | None = None, *, with_ref: bool = False,
             reference: nn.Module | None = None) -> Scored:
    """log π(target | seq[:p]) at each position p of each sequence, in one forward of their right-padded batch.

    The target at p is the sequence's own token seq[p] (targets None), or the tokens given per sequence, (N_i,) or
    (N_i, M): T-SPMO's tokens of every edge leaving the prefix seq[:p], p up to len(seq). The state at p − 1 predicts
    the token at p; p ≥ 1. π_ref (with_ref): the adapters switched off, or, given a `reference` (--train full: the
    frozen copy of the starting weights, full_finetune.reference), that copy's own whole forward."""
    h, pos, start = _frozen_bottom(model, seqs)
    rows = _rows(positions, h.shape[1])
    if targets is None:
        targets = [torch.tensor(list(s), device=h.device)[p] for s, p in zip(seqs, positions)]
    targets = torch.cat(list(targets))  # (N,) or (N, M)
    states = _adapted_top(model, h, pos, start, rows)  # (N, C)
    logp = model.logprobs_at(states, targets)
    ref = None
    if with_ref and reference is not None:  # --train full: the starting weights' copy, sharing no layer with the policy
        with torch.no_grad():  # the copy has no adapter and trains nothing: its every layer runs in the bottom
            h_ref, pos_ref, start_ref = _frozen_bottom(reference, seqs)
            ref = reference.logprobs_at(_adapted_top(reference, h_ref, pos_ref, start_ref, rows), targets)
    elif with_ref:
        with torch.no_grad(), adapters_off(model):  # π_ref: same weights, adapters off (SPEC.md)
            ref = model.logprobs_at(_adapted_top(model, h, pos, start, rows), targets)
    return Scored(per_sequence(states, positions), per_sequence(logp, positions), per_sequence(ref, positions))


def states_at(model: M.Qwen2ForCausalLM, seqs: Sequence[Sequence[int]],
              positions: Sequence[torch.Tensor]) -> torch.Tensor:
    """The final-normed states (N, C) that predict each sequence's tokens at its positions, every sequence's rows in
    order, with no LM head: what a separate critic's copy of the model gives its value head (baselines.py)."""
    h, pos, start = _frozen_bottom(model, seqs)
    return _adapted_top(model, h, pos, start, _rows(positions, h.shape[1]))


def per_sequence(t: torch.Tensor | None, positions: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """(N, ...) rows in sequence order back into each sequence's (N_i, ...); None for every sequence when t is None."""
    return list(t.split([len(p) for p in positions])) if t is not None else [None] * len(positions)


def _frozen_bottom(model: M.Qwen2ForCausalLM, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Embedding and the layers below the first LoRA layer, without autograd, for sequences right-padded to the
    longest: (B, T, C) hidden, (B, T) positions, and the index of the first layer that trains. Right padding needs no
    mask: attention is causal, so no real token sees the padding after it. A model trained fully (--train full,
    full_finetune.py) has no frozen bottom: its embedding trains, with autograd, and no layer runs here."""
    trains_embedding = model.model.embed_tokens.weight.requires_grad  # LoRA freezes it; --train full trains it
    dev, T, start = model.lm_head.weight.device, max(map(len, seqs)), 0 if trains_embedding else first_lora_layer(model)
    x = torch.tensor([list(s) + [0] * (T - len(s)) for s in seqs], device=dev)  # (B, T)
    pos = torch.arange(T, device=dev).expand(len(seqs), T)  # (B, T)
    with torch.set_grad_enabled(trains_embedding):
        h = model.run_layers(model.model.embed_tokens(x), pos, 0, start)
    return h, pos, start


def _rows(positions: Sequence[torch.Tensor], T: int) -> torch.Tensor:
    """(N,) flat indices b·T + p − 1 into the (B, T) batch: the state at p − 1 predicts the token at p."""
    return torch.cat([b * T + p for b, p in enumerate(positions)]) - 1


def _adapted_top(model: M.Qwen2ForCausalLM, h: torch.Tensor, pos: torch.Tensor, start: int,
                 rows: torch.Tensor) -> torch.Tensor:
    """The layers from `start` (the first layer that trains) up and the final norm; hidden states (N, C) at `rows`
    only."""
    h = model.run_layers(h, pos, start)
    return model.model.norm(h.flatten(0, 1)[rows])  # RMSNorm is per position: normalise only the rows we read


def merge(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.merge()


def unmerge(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.unmerge()


# ----------------------------------------------------------------------------------------------------------------------
# PEFT's on-disk format: adapter_config.json + adapter_model.safetensors with keys
#   base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   (r, C_in)
#   base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   (C_out, r)

PEFT_PREFIX = "base_model.model."


def adapter_config(model: nn.Module, base_model: str = "") -> dict:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    r, alpha = mods[0][1].r, mods[0][1].alpha
    targets = sorted({n.rsplit(".", 1)[1] for n, _ in mods})
    layers = sorted({int(n.split(".")[2]) for n, _ in mods})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": r,
            "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": targets, "layers_to_transform": layers,
            "layers_pattern": "layers", "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, m in lora_modules(model):
        out[f"{PEFT_PREFIX}{n}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        out[f"{PEFT_PREFIX}{n}.lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()
    return out


def _adapter_files(adapter_dir: Path) -> tuple[Path, Path]:
    cfg_path, w_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found (a PEFT adapter directory holds adapter_config.json and "
                                    "adapter_model.safetensors)")
    return cfg_path, w_path


# PEFT LoraConfig fields, by what loading must do with them. Any other field (including those of PEFT versions after
# 0.21) must be empty (None, False, {}, []): a field we do not know may change the computation, so it is refused.
_IGNORED = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
            "lora_dropout",  # dropout is off at inference; loading is for evaluation
            "runtime_config", "megatron_core", "qalora_group_size", "ensure_weight_tying"}  # no effect without others
_HONOURED = {"peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "layers_to_transform", "layers_pattern",
             "rank_pattern", "alpha_pattern", "bias", "fan_in_fan_out", "init_lora_weights", "use_dora"}
# random inits, whose B·A is 0 (orthogonal: B's and A's rows drawn from orthogonal rows of one matrix): the saved A, B
# are the whole adapter (the other inits alter the base weights)
_PLAIN_INITS = (True, False, "gaussian", "orthogonal")


def check_peft_config(cfg: dict, where: Path) -> None:
    """Refuse, naming the field, every PEFT LoraConfig setting that changes the computation and that we do not do."""
    def refuse(field: str, why: str):
        raise ValueError(f"{where}: {field} = {cfg[field]!r} is not supported ({why})")

    if cfg.get("peft_type", "LORA") != "LORA":
        refuse("peft_type", "only LORA")
    for field, ok, why in [("use_dora", lambda v: not v, "DoRA"), ("bias", lambda v: v == "none", "trained biases"),
                           ("fan_in_fan_out", lambda v: not v, "transposed weights (Conv1D models)"),
                           ("init_lora_weights", lambda v: v in _PLAIN_INITS,
                            "this init rewrites the base weights, which tokrl does not"),
                           ("layers_pattern", lambda v: v in (None, "layers", ["layers"]), "Qwen2's is 'layers'")]:
        if field in cfg and not ok(cfg[field]):
            refuse(field, why)
    for field, value in cfg.items():
        if field not in _IGNORED | _HONOURED and value not in (None, False, {}, [], ""):
            refuse(field, "it changes what the adapter computes, and tokrl does not implement it")


def _pattern_value(pattern: dict, module: str, default):
    r"""PEFT's rank_pattern/alpha_pattern lookup: the first key k with re.match(rf"(.*\.)?({k})$", module)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class AdapterMismatch(ValueError):
    """An adapter whose files are whole but do not fit this model (its layers, projections or tensor shapes)."""


def _integer(v) -> bool:
    return is_integer(v) and v >= 1


def _positive(v) -> bool:
    return is_finite_number(v) and v > 0


# adapter_config.json's fields that loading reads: each value allowed, and what is allowed in words
_FIELD_RULES = {
    "r": (_integer, "an integer >= 1"),
    "lora_alpha": (lambda v: v is None or _positive(v), "a finite number > 0"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "target_modules": (lambda v: isinstance(v, str) and v or isinstance(v, list) and v and
                       all(isinstance(t, str) for t in v), "a non-empty list of module names, or a regular expression"),
    "layers_to_transform": (lambda v: v is None or is_integer(v) or isinstance(v, list) and all(map(is_integer, v)),
                            "a layer index or a list of them"),
    "rank_pattern": (lambda v: v is None or isinstance(v, dict) and all(_integer(r) for r in v.values()),
                     "an object of integers >= 1"),
    "alpha_pattern": (lambda v: v is None or isinstance(v, dict) and all(_positive(a) for a in v.values()),
                      "an object of finite numbers > 0"),
}


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json: a JSON object whose fields loading reads have the types PEFT writes (r is required), and
    no PEFT setting tokrl does not implement (check_peft_config). Errors name the file and the field."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, not UTF-8, a 5,000-digit integer
        raise ValueError(f"{path}: not valid JSON ({first_line(e)})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    check_peft_config(cfg, path)
    for field, (ok, allowed) in _FIELD_RULES.items():
        if field == "r" and field not in cfg or field == "target_modules" and not cfg.get(field):
            raise ValueError(f"{path}: {field} is missing; allowed: {allowed}")
        if field in cfg and not ok(cfg[field]):
            raise ValueError(f"{path}: {field} is {reprlib.repr(cfg[field])}; allowed: {allowed}")
    return cfg


PROJECTION = re.compile(r"model\.layers\.\d+\.self_attn\.[qkvo]_proj")  # the modules tokrl adapts, by full name


def _target_modules(model: nn.Module, cfg: dict, cfg_path: Path) -> list[str]:
    """The full names of the modules adapter_config.json adapts, as PEFT reads target_modules: a list of names, each
    a module's whole name or a dotted tail of it ("q_proj", "self_attn.q_proj"), in the layers of layers_to_transform
    (None: every layer); or a string, a regular expression that a module's whole name must match (re.fullmatch, e.g.
    ".*\\.(q|v)_proj"; layers_to_transform then plays no part, as in PEFT). Every module named must be an attention
    projection (the modules tokrl adapts)."""
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(f"{cfg_path}: target_modules {targets!r} is not a regular expression ({e})") from None
        names = [n for n, _ in model.named_modules() if n and pattern.fullmatch(n)]
    else:
        L = len(model.model.layers)
        layers = cfg.get("layers_to_transform")
        layers = list(range(L)) if layers is None else [layers] if isinstance(layers, int) else list(layers)
        if any(not 0 <= i < L for i in layers):
            raise AdapterMismatch(f"{cfg_path}: layers_to_transform {reprlib.repr(layers)} names layers this model "
                                  f"does not have (it has {L}: 0..{L - 1}); the adapter was trained for another model")
        names = [n for n, _ in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]
        if cfg.get("layers_to_transform") is not None:  # then a module outside the layers (lm_head) is not adapted
            names = [n for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n)) and int(m[1]) in layers]
    other = [n for n in names if not PROJECTION.fullmatch(n)]
    if other:
        raise ValueError(f"{cfg_path}: target_modules = {targets!r} is not supported (it names {other[0]}; tokrl "
                         "adapts the attention projections q_proj, k_proj, v_proj and o_proj only)")
    if not names:
        raise AdapterMismatch(f"{cfg_path}: target_modules {reprlib.repr(targets)} names no module of this model "
                              "(a name matches a module's whole name or its last dotted parts, a regular expression "
                              "its whole name, as model.layers.0.self_attn.q_proj)")
    return names


def _adapter_plan(model: nn.Module, cfg: dict, cfg_path: Path) -> dict[str, tuple[int, float]]:
    """The LoRA modules adapter_config.json asks for: module name -> (r, the α that LoRALinear's α/r needs)."""
    plan = {}
    for full in _target_modules(model, cfg, cfg_path):
        try:
            r = _pattern_value(cfg.get("rank_pattern") or {}, full, cfg["r"])
            alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, full, cfg.get("lora_alpha") or r))
        except re.error as e:
            raise ValueError(f"{cfg_path}: rank_pattern/alpha_pattern holds a bad regular expression ({e})") from None
        plan[full] = (r, alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha)  # rsLoRA: α/√r = (α·√r)/r
        if (why := scale_problem(plan[full][1], r)) is not None:
            raise ValueError(f"{cfg_path}: {full}: {why}")
    return plan


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike,
                 generator: torch.Generator | None = None) -> list[int]:
    """Apply LoRA as described by a PEFT adapter_config.json, then load its weights (strictly). Returns the layers.

    Honoured: r, lora_alpha, use_rslora (scale α/√r), target_modules (names, or a regular expression),
    layers_to_transform, rank_pattern, alpha_pattern.
    Every other field that changes the computation is refused with its name (check_peft_config). Every file is
    checked before the model changes: the config's fields, the tensors' names, shapes, dtypes and finite values."""
    cfg_path, w_path = _adapter_files(Path(adapter_dir))
    plan = _adapter_plan(model, read_adapter_config(cfg_path), cfg_path)
    tensors = read_adapter_tensors(w_path)
    expected = {}
    for name, (r, _) in plan.items():
        base = model.get_submodule(name)
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (r, base.in_features)
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (base.out_features, r)
    _check_tensors(tensors, expected, w_path, f"r in {cfg_path} and the model's layer sizes")
    model.requires_grad_(False)
    for name, (r, alpha) in plan.items():
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, LoRALinear(model.get_submodule(name), r, alpha, generator))
    _copy_adapter(model, tensors)
    return sorted({int(name.split(".")[2]) for name in plan})


ADAPTER_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the floating-point dtypes


def read_adapter_tensors(w_path: Path) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors' tensors: the header first (names, dtypes and shapes, no tensor read), then the
    tensors, which must be finite. Errors name the file and the tensor."""
    # here, not at the top: settings reads lora's limits without the decoder
    from pretrained import load_safetensors, safetensors_header

    for name, (dtype, _) in safetensors_header(w_path).items():  # the reader the model's own files go through
        if dtype not in ADAPTER_DTYPES:
            raise ValueError(f"{w_path}: {name} holds {dtype} numbers; allowed: floating point "
                             f"({', '.join(ADAPTER_DTYPES)})")
    tensors = load_safetensors(w_path)
    for name, t in sorted(tensors.items()):
        if not torch.isfinite(t).all():
            raise ValueError(f"{w_path}: {name} holds non-finite values (NaN or inf)")
    return tensors


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple], w_path: Path, source: str) -> None:
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterMismatch(f"{w_path}: adapter tensors do not match the model's adapters: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise AdapterMismatch(f"{w_path}: {key} has shape {tuple(tensors[key].shape)}, expected {tuple(shape)} "
                                  f"({source})")


def _copy_adapter(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, m in lora_modules(model):
            for ab in ("lora_A", "lora_B"):
                getattr(m, ab).copy_(tensors[f"{PEFT_PREFIX}{n}.{ab}.weight"])


def load_adapter_weights(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Copy a PEFT adapter's A and B into the model's existing adapters; every tensor must match by name and shape."""
    _, w_path = _adapter_files(Path(adapter_dir))
    tensors = read_adapter_tensors(w_path)
    expected = {f"{PEFT_PREFIX}{n}.{ab}.weight": tuple(getattr(m, ab).shape)
                for n, m in lora_modules(model) for ab in ("lora_A", "lora_B")}
    _check_tensors(tensors, expected, w_path, "the model's adapters")
    _copy_adapter(model, tensors)
