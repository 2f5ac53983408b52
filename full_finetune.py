"""Full fine-tuning (`--train full`, tag F1, beyond the paper): the paper's section V left it open ("we do not compare
against full model fine-tuning baselines, as this was infeasible given our single 40GB GPU"). Here every parameter of
the model trains, in fp32, by AdamW, with the same objectives and the same per-completion backward; no LoRA.

    prepare             every parameter trainable; the KL reference, a frozen copy of the starting weights
    reference           that copy (None under LoRA, whose reference is the adapters switched off)
    trained_parameters  what AdamW trains: every parameter (a tied embedding once), or LoRA's A and B
    memory_parts        the bytes a full run holds on its device, by part; memory_problem checks them
    disk_parts          the bytes its checkpoints and final model take on disk; disk_problem checks them
    write_model_dir     the trained model as a Hugging Face model directory (what --model and transformers load)
    load_weights        a checkpoint's weights back into the model

Memory, fp32, n parameters (per-completion backward: one completion's activations at a time):

    weights 4n  +  reference 4n (an algorithm with a KL term; T-SPMO has none)  +  gradients 4n  +  AdamW moments 8n
    +  the activations of one completion  +  the KV cache of sampling

Qwen2-1.5B (n = 1,543,714,304, its embedding tied): 6.2 + 6.2 + 6.2 + 12.3 GB = 30.9 GB before activations.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import weakref
from pathlib import Path

import torch
import torch.nn as nn

import checkpoints
import lora
import model as M

GB = 1e9  # the memory and disk lines print decimal gigabytes, as the specification's arithmetic does
_REFERENCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # policy -> its frozen reference copy


def has_kl(algo: str, beta: float) -> bool:
    """Whether the algorithm reads π_ref: GRPO, S-GRPO and PPO through β·KL (none at β = 0), DPO always (its
    log-ratios); T-SPMO never."""
    return algo == "dpo" or (algo in ("grpo", "sgrpo", "ppo") and beta != 0)


def prepare(net: nn.Module, algo: str, beta: float) -> None:
    """Every parameter of `net` trainable (no LoRA is applied, no layer is frozen), and, for an algorithm with a KL
    term, its reference: a copy of the starting weights with no gradient, kept beside the net (not inside it, so that
    it is never trained, saved or counted as the net's). A tied embedding stays tied in the copy."""
    net.requires_grad_(True)  # [F1] every weight trains, in fp32, by AdamW: no adapter, no frozen bottom
    _REFERENCES.pop(net, None)
    if has_kl(algo, beta):
        # [decided] (SPEC.md, F1) the KL reference is a frozen copy of the starting weights (under LoRA: the adapters
        # switched off); T-SPMO, which has no KL term, keeps no copy
        _REFERENCES[net] = copy.deepcopy(net).requires_grad_(False).eval()


def trains_fully(net: nn.Module) -> bool:
    """A model trained fully: its embedding trains (LoRA freezes every base weight, the embedding among them)."""
    return net.model.embed_tokens.weight.requires_grad


def reference(net: nn.Module) -> nn.Module | None:
    """π_ref for a model trained fully: its frozen copy of the starting weights. None under LoRA (the reference is
    the same module with its adapters off). A fully trained model without a copy has no reference to read: an error,
    never the policy itself (its KL would be 0 whatever the policy did)."""
    if not trains_fully(net):
        return None
    if net not in _REFERENCES:
        raise RuntimeError("a KL reference was asked of a model trained fully without one (full_finetune.prepare "
                           "makes it for the algorithms with a KL term)")
    return _REFERENCES[net]


def trained_parameters(net: nn.Module) -> list[nn.Parameter]:
    """What AdamW trains and the guards check: every parameter of a model trained fully (.parameters() yields a tied
    embedding once: one parameter, one gradient, one pair of moments), else the LoRA A and B."""
    return list(net.parameters()) if trains_fully(net) else lora.lora_parameters(net)


# ----------------------------------------------------------------------------------------------------------------------
# Memory: the arithmetic, checked against the device before loading, printed at the start of a run


def activation_bytes(mc: M.Qwen2Config, seq_len: int, new_tokens: int, rows: int = 1) -> int:
    """An estimate of what autograd keeps for the backward of `rows` sequences of seq_len tokens (prompt and
    completion), fp32. Per layer and token, the tensors saved for the backward: the two RMSNorms' inputs and outputs
    (4C), q and k before and after RoPE and v (2C + 3·K·D), the attention output that o_proj reads (C), and the MLP's
    gate, its SiLU, up and their product (4I): 7C + 3·K·D + 4I numbers. Per layer besides, the attention weights of
    the math kernel, twice (2·H·S², an upper bound: flash kernels keep O(S)). The LM head's logits at the completion's
    positions, three times (logits, their exponentials for the log-sum-exp, the gradient): 3·new_tokens·V."""
    C, I, K, D, H = mc.hidden_size, mc.intermediate_size, mc.num_key_value_heads, mc.head_size, mc.num_attention_heads
    per_layer = seq_len * (7 * C + 3 * K * D + 4 * I) + 2 * H * seq_len ** 2
    return rows * 4 * (mc.num_hidden_layers * per_layer + 3 * new_tokens * mc.vocab_size)


def memory_parts(mc: M.Qwen2Config, algo: str, beta: float, prompt_len: int, new_tokens: int, group: int,
                 backward_batch: int = 1) -> dict[str, int]:
    """The bytes a `--train full` run holds on its device, by part (fp32, 4 bytes a number): the weights, the
    reference copy (an algorithm with a KL term), the gradients, AdamW's two moments, the activations of one
    backward (per-completion: one sequence of prompt_len + new_tokens, or --backward-batch of them) and sampling's KV
    cache (G rows of prompt_len + new_tokens positions)."""
    with torch.device("meta"):  # the shape alone: no memory, no weight read
        n = M.num_parameters(M.Qwen2ForCausalLM(mc))
    parts = {"weights": 4 * n}
    if has_kl(algo, beta):
        parts["reference"] = 4 * n
    parts.update({"gradients": 4 * n, "AdamW moments": 8 * n,
                  "activations": activation_bytes(mc, prompt_len + new_tokens, new_tokens, backward_batch),
                  "KV cache": M.cache_bytes(mc, group, prompt_len + new_tokens, torch.float32)})
    return parts


def memory_line(parts: dict[str, int]) -> str:
    """One line: every part and the sum, in GB."""
    listed = ", ".join(f"{k} {v / GB:.3g}" for k, v in parts.items())
    return f"--train full: {listed}; {sum(parts.values()) / GB:.3g} GB in all"


def available_memory(device: str) -> tuple[int, str]:
    """(bytes, name) of what the run may still take: a GPU's free memory, or the RAM the kernel says is available."""
    d = torch.device(device)
    if d.type == "cuda":
        free, _ = torch.cuda.mem_get_info(d)
        return free, f"free on {d}"
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kb * 1024, "available of this machine's RAM (--device cpu)"
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "free of this machine's RAM (--device cpu)"


def memory_problem(parts: dict[str, int], device: str, model: str) -> str | None:
    """Why the parts cannot fit the device (None: they do), in one line with the numbers."""
    have, where = available_memory(device)
    need = sum(parts.values())
    if need <= have:
        return None
    return (f"--model {model} --train full: {memory_line(parts)[len('--train full: '):]}, more than the "
            f"{have / GB:.2f} GB {where}; allowed: what fits: a smaller model, --train lora, a shorter "
            "--max-new-tokens or -G")


# ----------------------------------------------------------------------------------------------------------------------
# Disk: checkpoints and the final model


def disk_parts(mc: M.Qwen2Config) -> dict[str, int]:
    """The bytes on disk, by part, at a run's peak: checkpoints.KEEP checkpoints and the one being written (each the
    weights 4n and AdamW's moments 8n, its step counters and generators besides: a few kilobytes, not counted), then
    the final model directory (the weights 4n)."""
    with torch.device("meta"):
        n = M.num_parameters(M.Qwen2ForCausalLM(mc))
    return {"checkpoints": (checkpoints.KEEP + 1) * 12 * n, "final model": 4 * n}


def disk_problem(mc: M.Qwen2Config, run: Path) -> str | None:
    """Why the disk that holds `run` (or, before it exists, its nearest existing parent) cannot take what the run
    writes (None: it can), in one line with the numbers."""
    there = next(p for p in [run, *run.absolute().parents] if p.exists())
    free = shutil.disk_usage(there).free
    parts = disk_parts(mc)
    if sum(parts.values()) <= free:
        return None
    listed = ", ".join(f"{k} {v / GB:.3g}" for k, v in parts.items())
    return (f"--train full: the run writes {sum(parts.values()) / GB:.3g} GB ({listed}: {checkpoints.KEEP} kept "
            f"checkpoints and the one being written, each weights and AdamW's moments), more than the "
            f"{free / GB:.2f} GB free on the disk of {there}; allowed: a run directory (--out) on a disk with room")


# ----------------------------------------------------------------------------------------------------------------------
# The trained model on disk


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def write_model_dir(net: M.Qwen2ForCausalLM, out: Path, tok: M.Tokenizer, eos, source: Path | None) -> None:
    """A Hugging Face model directory: config.json, model.safetensors (fp32; a tied embedding stored once, as the
    checkpoint had it), the tokenizer files and generation_config.json of `source` (the model the run started from;
    without one, the tokenizer as loaded and the EOS ids), each file written atomically."""
    checkpoints.write_weights(net, out)
    files = {"config.json": json.dumps({**net.config.to_dict(), "torch_dtype": "float32"}, indent=2) + "\n"}
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if source is not None and (source / name).is_file():
            files[name] = (source / name).read_text()
    files.setdefault("tokenizer.json", tok.tk.to_str())
    files.setdefault("generation_config.json", json.dumps({"eos_token_id": list(eos)}, indent=2) + "\n")
    for name, text in files.items():
        checkpoints.write_atomic(out / name, text.encode())


def load_weights(net: M.Qwen2ForCausalLM, model_dir: Path) -> None:
    """A checkpoint's weights (model_dir/model.safetensors) copied into the model in place, every tensor matched by
    name and shape (the parameters keep their identity: AdamW's state and the guards hold them)."""
    path = model_dir / "model.safetensors"
    tensors = lora.read_adapter_tensors(path)  # names, floating dtypes, finite values
    state = dict(tensors)
    M.check_state_dict(net, state, path)
    with torch.no_grad():
        for name, p in net.named_parameters():  # a tied head is the embedding's parameter: named once
            p.copy_(state[name])
