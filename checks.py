"""Every file a run reads, and the settings against the model and this machine, checked before any weight is loaded
and before anything is written: seconds, where loading the weights takes minutes. settings.py checks each setting
alone; check_inputs reads each file a run will read, whole, then calls check_against_model:

    the model directory  config.json (each value's type), tokenizer.json,                    check_inputs (model.py)
                         generation_config.json, the safetensors headers (names, shapes
                         against the config, floating dtypes; each file whole), then every
                         weight's values (finite, within --dtype's range)
    the data             every SVAMP record and GSM8K line: fields, types, finite numbers,      check_inputs (tasks.py)
                         an answer the reward reads, at most tasks.MAX_TEXT_CHARS of text;
                         the file UTF-8; a split with a test example
    an --adapter         adapter_config.json's fields; the safetensors header (names, shapes,   check_adapter (lora.py)
                         dtypes), then the tensors (finite), against a weightless (meta) copy
                         of the model
    --lora-fraction      adapts at least one of the model's layers                              check_against_model
    --lora-rank          at most min(in, out) of every adapted projection                       rank_problem
    lengths              the longest prompt plus the new tokens within config.json's            position_problem
                         max_position_embeddings
    memory               the KV cache alone, then the weights + LoRA with AdamW's state + the   memory_problem
                         largest KV cache, within the device's whole memory; --train full:
                         weights, reference, gradients, moments, activations, KV cache
                         within what the device has free (full_finetune.py)
    disk (--train full)  the checkpoints and the final model within the run directory's disk    disk_problem
    a resumed run        config.json (every setting, its type and its rule), resumes.jsonl      read_run_settings
                         the newest intact checkpoint (state.pt, adapter), the logs up to it    check_resume

A bad flag or a bad file handed in is one line, `error: --flag VALUE: why; allowed: ...` or `error: FILE: what is
wrong` (the record or line named), and exit status 2; a failure at run time (a full disk, a non-finite loss, memory
the device refuses, a model that can be neither found nor downloaded) exits with status 1.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch

import checkpoints
import distributed
import evaluation
import full_finetune
import lora
import model as M
import pretrained
import tokenizer
from settings import DEVICE, Settings, device_problem, refuse_setting, type_problem, usage_error, validate
from tasks import Task, make_task
from values import first_line, is_integer

CPU_WARN_PARAMETERS = 200_000_000  # training a larger model on the CPU starts with a warning: hours a step


def check_inputs(cfg: Settings, training: bool = True, adapter: str | None = None) -> Task:
    """The model directory (config, tokenizer, generation config, weight headers), the data (every record), an
    --adapter (every file), and the settings against the model and this machine, all read before any weight is
    loaded. Returns the task, its data read."""
    try:
        model_dir = pretrained.resolve_model_dir(cfg.model, revision=cfg.revision)
        model_cfg, tok = pretrained.check_model_dir(model_dir)
        pretrained.check_weights(model_dir, pretrained.DTYPES[cfg.dtype])  # every value: about a second a billion, before the load
        task = make_task(cfg.task, tok, cfg.data, cfg.reward)
    except (FileNotFoundError, ValueError) as e:  # tasks.DataError is a ValueError
        usage_error(str(e))
    check_against_model(cfg, model_cfg, tok, task, model_dir, training, adapter)
    return task


def check_against_model(cfg: Settings, model_cfg: M.Qwen2Config, tok: tokenizer.Tokenizer, task: Task,
                        model_dir: Path, training: bool = True, adapter: str | None = None) -> None:
    """An --adapter, and what the settings ask of this model and this machine (LoRA layers, positions, KV cache
    memory). `model_cfg` and `tok` come from pretrained.check_model_dir: nothing here reads a weight."""
    if adapter:
        check_adapter(adapter, model_cfg, model_dir)
    if training and torch.device(cfg.device).type == "cpu":
        with torch.device("meta"):  # the shape alone: no memory, no weight read
            n = M.num_parameters(M.Qwen2ForCausalLM(model_cfg))
        if n > CPU_WARN_PARAMETERS:
            print(f"warning: --device {cfg.device}: training a {n / 1e9:.2f} B-parameter model on the CPU "
                  f"({'no CUDA device here' if not torch.cuda.is_available() else 'CUDA is available: --device cuda'});"
                  f" the paper's T-SPMO run takes about 960 s a step on a 2-core CPU (docs/performance.md); "
                  f"python mini.py is the paper in miniature, sized for a CPU", file=sys.stderr)
    if training and cfg.train == "full" and (problem := full_finetune.disk_problem(model_cfg, Path(cfg.out or "runs"))):
        usage_error(problem)  # the checkpoints' weights and AdamW moments, against the run directory's disk
    if training and cfg.train == "lora" and lora.num_lora_layers(model_cfg.num_hidden_layers, cfg.lora_fraction) < 1:
        L = model_cfg.num_hidden_layers
        usage_error(f"--lora-fraction {cfg.lora_fraction}: adapts round({cfg.lora_fraction} × {L}) = 0 of the "
                    f"model's {L} layers ({model_dir / 'config.json'}); allowed: --lora-fraction >= {0.5 / L:.4g}")
    if training and cfg.train == "lora" and (problem := rank_problem(cfg, model_cfg, model_dir / "config.json")):
        usage_error(problem)
    for exact in (False, True):  # an upper bound on the prompts' lengths first: tokenizing them all takes seconds
        uses = cache_uses(cfg, task, tok, training, exact)
        problem = (position_problem(cfg, model_cfg, uses, model_dir / "config.json") or
                   memory_problem(cfg, model_cfg, uses, training))
        if problem is None:
            return
    usage_error(problem)


def check_adapter(adapter: str, model_cfg: M.Qwen2Config, model_dir: Path) -> None:
    """The adapter's files are whole and fit this model (its layers, projections, ranks and tensor shapes): loaded, as
    --eval-only will load it, onto a copy of the model on the meta device, which holds no weights."""
    with torch.device("meta"):
        net = M.Qwen2ForCausalLM(model_cfg)
    try:
        lora.load_adapter(net, adapter)
    except lora.AdapterMismatch as e:
        usage_error(f"--adapter {adapter} cannot be applied to the model {model_dir}: {e}")
    except (FileNotFoundError, ValueError) as e:
        usage_error(f"--adapter {adapter}: {e}")


class CacheUse(NamedTuple):
    """A KV cache the run builds: for sampling (G rows) or for the greedy evaluation (--eval-batch rows)."""
    prompts: str  # "training" or "test": whose longest prompt starts each row
    prompt_len: int  # that prompt, in tokens
    length_flag: str  # the flag that sets the new tokens
    new_tokens: int
    rows_flag: str  # the flag that sets the rows
    rows_setting: int
    rows: int  # rows in one process's cache (with N processes each holds its share)


def cache_uses(cfg: Settings, task: Task, tok: tokenizer.Tokenizer, training: bool, exact: bool) -> list[CacheUse]:
    """The caches a run builds: sampling's (training only) and the evaluation's; with N processes, each one's share."""
    n = distributed.env_world_size()
    tested = task.test_set()[: cfg.eval_limit]
    eval_flag = "--eval-max-new-tokens" if cfg.eval_max_new_tokens else "--max-new-tokens"
    eval_new_tokens = cfg.eval_max_new_tokens or cfg.max_new_tokens
    # the evaluation's rows (evaluation.eval_batch): on CUDA sized to the free memory, so one here
    rows = cfg.eval_batch or (evaluation.CPU_EVAL_BATCH if torch.device(cfg.device).type == "cpu" else 1)
    uses = [CacheUse("test", longest_prompt(task, tok, tested, exact), eval_flag, eval_new_tokens, "--eval-batch",
                     rows, min(rows, -(-len(tested) // n)))]
    if training:
        uses.insert(0, CacheUse("training", longest_prompt(task, tok, task.train_set(), exact), "--max-new-tokens",
                                cfg.max_new_tokens, "-G", cfg.group_size, -(-cfg.group_size // n)))
    return uses


def longest_prompt(task: Task, tok: tokenizer.Tokenizer, examples: list, exact: bool = True) -> int:
    """Tokens in the longest prompt of `examples` (0 for none). exact=False: an upper bound, 3 per UTF-8 byte, with
    no tokenizing: a Qwen2 tokenizer (byte-level BPE) gives at most one token per byte of the NFC-normalised text,
    and NFC at most triples a text's UTF-8 bytes (Unicode's stated maximum expansion)."""
    prompts = [task.prompt(ex) for ex in examples]
    if not exact:
        return 3 * max((len(p.encode()) for p in prompts), default=0)
    return max((len(e.ids) for e in tok.tk.encode_batch(prompts, add_special_tokens=False)), default=0)


def position_problem(cfg: Settings, model_cfg: M.Qwen2Config, uses: list[CacheUse], where: Path) -> str | None:
    """The longest prompt plus the new tokens must fit the positions the model was built for."""
    limit = model_cfg.max_position_embeddings
    for u in uses:
        if u.prompt_len + u.new_tokens > limit:
            allowed = (f"{u.length_flag} <= {limit - u.prompt_len}" if limit > u.prompt_len else
                       "none: the prompt alone fills the model's positions (a model with more, or shorter prompts)")
            return (f"{u.length_flag} {u.new_tokens}: the longest {u.prompts} prompt ({u.prompt_len} tokens, "
                    f"{cfg.task}) plus {u.new_tokens} is {u.prompt_len + u.new_tokens}, beyond the model's "
                    f"max_position_embeddings {limit} ({where}); allowed: {allowed}")
    return None


def projections(model_cfg: M.Qwen2Config, targets: list[str]) -> dict[str, tuple[int, int]]:
    """Each adapted projection's (in, out) features, read off a weightless (meta) layer of the model."""
    with torch.device("meta"):
        attn = M.DecoderLayer(model_cfg).self_attn
    return {t: (getattr(attn, t).in_features, getattr(attn, t).out_features) for t in targets}


def rank_problem(cfg: Settings, model_cfg: M.Qwen2Config, where: Path) -> str | None:
    """B·A (out × r · r × in) has rank at most min(in, out): a larger r adds parameters, memory and nothing else."""
    sizes = projections(model_cfg, cfg.lora_targets.split(","))
    name, (c_in, c_out) = min(sizes.items(), key=lambda kv: min(kv[1]))
    if cfg.lora_rank <= min(c_in, c_out):
        return None
    return (f"--lora-rank {cfg.lora_rank}: above the rank a LoRA update of {name} can have, min(in, out) = "
            f"min({c_in}, {c_out}) = {min(c_in, c_out)} ({where}); allowed: --lora-rank <= {min(c_in, c_out)}")


def run_bytes(cfg: Settings, model_cfg: M.Qwen2Config, training: bool) -> dict[str, int]:
    """A lower bound on the bytes a run holds on its device, by part: the weights at --dtype (twice with PPO's
    separate critic; a bf16 copy besides for --sample-precision bf16), and in training the LoRA parameters in fp32
    with their gradients and AdamW's two moments (4 × 4 bytes each). Activations and the KV cache come on top."""
    with torch.device("meta"):
        n = M.num_parameters(M.Qwen2ForCausalLM(model_cfg))
    copies = 2 if training and cfg.algo == "ppo" and cfg.critic == "separate" else 1
    parts = {"weights": copies * n * pretrained.DTYPES[cfg.dtype].itemsize}
    if training and cfg.sample_precision == "bf16" and cfg.dtype != "bfloat16":
        parts["bf16 copy"] = n * 2
    if training:
        per_layer = sum(cfg.lora_rank * (c_in + c_out)
                        for c_in, c_out in projections(model_cfg, cfg.lora_targets.split(",")).values())
        layers = lora.num_lora_layers(model_cfg.num_hidden_layers, cfg.lora_fraction)
        parts["LoRA with AdamW"] = copies * layers * per_layer * 16
    return parts


def memory_problem(cfg: Settings, model_cfg: M.Qwen2Config, uses: list[CacheUse], training: bool = True) -> str | None:
    """The KV cache alone must fit the device's memory, then the KV cache with the weights and LoRA's training
    state (run_bytes): a lower bound on what the run holds, so this refuses only the impossible; what is merely too
    much shows when the cache is allocated, as M.CacheTooLarge."""
    total, device = device_memory(cfg.device)
    for u in uses:
        need = M.cache_bytes(model_cfg, u.rows, u.prompt_len + u.new_tokens, pretrained.DTYPES[cfg.dtype])
        if need > total:
            fits = total // M.cache_bytes(model_cfg, u.rows, 1, pretrained.DTYPES[cfg.dtype]) - u.prompt_len
            return (f"{u.rows_flag} {u.rows_setting}, {u.length_flag} {u.new_tokens}: the KV cache alone "
                    f"({u.rows} rows × {u.prompt_len + u.new_tokens} positions, {cfg.dtype}) needs {need:,} bytes "
                    f"({need / 2**30:.2f} GiB), more than all {total / 2**30:.2f} GiB of {device}; allowed: "
                    + (f"{u.length_flag} <= {fits} with {u.rows_flag} {u.rows_setting}, or a smaller "
                       f"{u.rows_flag}" if fits >= 1 else f"a smaller {u.rows_flag}"))
    if training and cfg.train == "full":  # every weight trains: full_finetune.py's arithmetic, against what is free
        u = next(u for u in uses if u.prompts == "training")
        parts = full_finetune.memory_parts(model_cfg, cfg.algo, cfg.beta, u.prompt_len, u.new_tokens, u.rows,
                                           cfg.backward_batch)
        return full_finetune.memory_problem(parts, cfg.device, cfg.model)
    dtype = pretrained.DTYPES[cfg.dtype]
    u = max(uses, key=lambda u: M.cache_bytes(model_cfg, u.rows, u.prompt_len + u.new_tokens, dtype))
    parts = {**run_bytes(cfg, model_cfg, training),
             "KV cache": M.cache_bytes(model_cfg, u.rows, u.prompt_len + u.new_tokens, dtype)}
    need = sum(parts.values())
    if need <= total:
        return None
    listed = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in parts.items())
    return (f"--model {cfg.model} with --dtype {cfg.dtype}: the run needs at least {need:,} bytes ({need / 2**30:.2f} "
            f"GiB: {listed}; the KV cache is {u.rows_flag} {u.rows_setting}, {u.length_flag} {u.new_tokens}), more "
            f"than all {total / 2**30:.2f} GiB of {device}; allowed: what fits: a smaller model, --dtype bfloat16, "
            "a smaller --lora-rank or KV cache")


def device_memory(device: str) -> tuple[int, str]:
    """(bytes, name): a GPU's total memory (under torchrun: cuda:LOCAL_RANK's), or the machine's RAM for the CPU."""
    d = torch.device(device)
    if d.type == "cuda":
        index = d.index if d.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        return torch.cuda.get_device_properties(index).total_memory, f"cuda:{index}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM (--device cpu)"


# ----------------------------------------------------------------------------------------------------------------------
# A resumed run's files

# Settings a run's config.json may lack: a run recorded without one ran as its default says, except replay_pool (a run
# recorded without it replayed from its own group). Every other setting must be in the run's config.json.
MAY_BE_ABSENT = {"revision", "reward", "eval_max_new_tokens", "tspmo_objective", "lora_targets", "replay_pool",
                 "threads", "critic", "gamma", "gae_lambda", "clip_eps", "ppo_passes", "w1", "w3", "dpo_beta",
                 "edge_advantage", "replay_cut", "train"}
# config.json's first key, written by train.py: the file is tokrl's own record of a run's settings. ours: a run
# directory is started again (its logs deleted) only under a config.json that carries it; a run recorded without it
# still resumes from its checkpoints (its state.pt proves the run), but is never started again.
RUN_MARKER = ("tokrl", "run settings")


def settings_fields_problem(saved) -> str | None:
    """What keeps a parsed config.json from holding a run's settings (None: nothing): a JSON object with every
    setting but those of MAY_BE_ABSENT and no unknown one; the marker, if there, as train.py writes it."""
    if not isinstance(saved, dict):
        return "not a JSON object"
    fields = set(Settings.__dataclass_fields__)
    if unknown := set(saved) - fields - {RUN_MARKER[0]}:
        return f"unknown settings {sorted(unknown)}"
    if missing := fields - MAY_BE_ABSENT - set(saved):
        return f"settings missing: {sorted(missing)}"
    if saved.get(RUN_MARKER[0], RUN_MARKER[1]) != RUN_MARKER[1]:
        return f"its \"{RUN_MARKER[0]}\" is {saved[RUN_MARKER[0]]!r:.60}, not \"{RUN_MARKER[1]}\""
    return None


def marked_settings_problem(path: Path) -> str | None:
    """Why `path` is not tokrl's own record of a run's settings (None: it is): a JSON object carrying RUN_MARKER,
    with every setting, each of its type."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        return f"it cannot be read as JSON ({first_line(e)[:80]})"
    if not isinstance(saved, dict) or saved.get(RUN_MARKER[0]) != RUN_MARKER[1]:
        return f"it lacks their marker, \"{RUN_MARKER[0]}\": \"{RUN_MARKER[1]}\""
    if why := settings_fields_problem(saved):
        return why
    wrong = [name for name, value in saved.items() if name != RUN_MARKER[0] and type_problem(name, value)]
    return f"{wrong[0]} is {saved[wrong[0]]!r:.60}" if wrong else None


def read_run_settings(run: Path, device: str | None = None) -> Settings:
    """A run's settings: its config.json, every setting of its type and within its rule (settings.validate, naming
    the file), with the --steps of its latest resume (resumes.jsonl). `device`: the --device a resume typed, which
    replaces the recorded one (ours: the device is this machine's, not the run's: a run recorded on cuda:1
    resumes on a machine with one GPU, or on the CPU)."""
    path = run / "config.json"
    if not path.is_file():
        usage_error(f"{run} is not a tokrl run directory (no config.json)")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, not UTF-8, a 5,000-digit integer
        usage_error(f"{path}: cannot read the run's settings ({first_line(e)})")
    if why := settings_fields_problem(saved):
        usage_error(f"{path}: not the settings of a run of this tokrl ({why})")
    cfg = Settings(**{"replay_pool": "group", **{k: v for k, v in saved.items() if k != RUN_MARKER[0]}})
    if device is not None:
        if (problem := device_problem(device)) is not None:
            refuse_setting("device", device, problem)
        cfg = dataclasses.replace(cfg, device=device)
    elif isinstance(cfg.device, str) and (problem := device_problem(cfg.device)) is not None:
        usage_error(f"{run} was recorded with --device {cfg.device} ({path}): {problem}; a resume may run on another "
                    f"device: python train.py --resume {run} --device {DEVICE}")
    validate(cfg, training=False, source=path)
    try:
        resumes = checkpoints.read_jsonl(run / "resumes.jsonl")
    except ValueError as e:
        usage_error(str(e))
    if resumes:
        steps = resumes[-1].get("steps")
        if not (is_integer(steps) and 1 <= steps < 2**62):
            usage_error(f"{run / 'resumes.jsonl'}: its last line's steps is {steps!r:.60}; allowed: an integer >= 1")
        cfg = dataclasses.replace(cfg, steps=steps)
    return cfg


def check_resume(run: Path, cfg: Settings) -> tuple[Path, dict]:
    """The newest intact checkpoint of a resumed run, and the logs up to it, read once the run is held (no writer can
    be pruning it) and before anything there is written."""
    try:
        ck, state = checkpoints.find_checkpoint(run, cfg.accum)
        for log in ("metrics.jsonl", "eval.jsonl"):
            checkpoints.read_jsonl(run / log, state["step"], warn=False)
    except (checkpoints.CheckpointError, ValueError) as e:
        usage_error(str(e))
    if cfg.steps < state["step"]:
        usage_error(f"--steps {cfg.steps}: {run} is already at step {state['step']} ({ck.name}); allowed: "
                    f"--steps >= {state['step']}")
    saved, here = len(state.get("rng_ranks", [None])), distributed.env_world_size()
    if saved != here:  # its N sampling streams cannot continue as another number
        usage_error(f"--resume {run}: {ck / 'state.pt'} was written by {saved} process(es) and this run has {here}: "
                    f"resume with the same number (torchrun --nproc-per-node {saved}, or plain python for 1)")
    return ck, state
