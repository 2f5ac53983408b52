"""Where a model comes from: a Hugging Face model directory (config.json, the safetensors weights, the tokenizer) read,
checked and saved, and the Hub that fills one.

    config.json      config_from_dict, read_config, config_to_dict: the file's keys to and from Qwen2Config, refusing
                     what the decoder does not implement (naming the key)
    safetensors      load_safetensors, read_state_dict, check_state_dict, safetensors_header, check_model_dir
                     (headers only, in seconds), check_weights (every value finite), load_model, save_model
    the Hub          resolve_model_dir: a local directory as it is, else a repo id through huggingface_hub
    end of text      eos_ids: config.json's, generation_config.json's and the tokenizer's end tokens
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import reprlib
from pathlib import Path

import torch

from model import Qwen2Config, Qwen2ForCausalLM
from tokenizer import ENDOFTEXT, IM_END, Tokenizer
from values import first_line, is_finite_number, is_integer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype's names

# ----------------------------------------------------------------------------------------------------------------------
# config.json


def config_from_dict(d: dict, source: str = "config") -> Qwen2Config:
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
    kw = {f.name: d[f.name] for f in dataclasses.fields(Qwen2Config) if d.get(f.name) is not None}
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
        if value is not None and (why := config_value_problem(key, value)) is not None:
            raise ValueError(f"{source}: {key} is {reprlib.repr(value)}; {why}")
    cfg = Qwen2Config(**kw)
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"{source}: num_attention_heads ({cfg.num_attention_heads}) is not a multiple of "
                         f"num_key_value_heads ({cfg.num_key_value_heads})")
    return cfg


def read_config(path: str | os.PathLike) -> Qwen2Config:
    """config.json as a Qwen2Config, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config.json not found (a model directory needs config.json, "
                                "tokenizer.json and model.safetensors)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return config_from_dict(d, source=str(path))


def config_to_dict(cfg: Qwen2Config) -> dict:
    """The config as config.json writes it (the keys transformers reads for a Qwen2)."""
    d = dataclasses.asdict(cfg)
    d["eos_token_id"] = list(cfg.eos_ids) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
            "use_sliding_window": False, **{k: v for k, v in d.items() if v is not None}}



MAX_SIZE = 2**31  # a config's sizes and token ids are below this (PyTorch's shapes and the tokenizers' u32 ids)


def config_value_problem(key: str, value) -> str | None:
    """What is wrong with one value of config.json (None: nothing): sizes are integers >= 1, token ids integers >= 0,
    RoPE's theta and the norm's epsilon finite numbers > 0, tie_word_embeddings true or false."""
    def integer(v, least: int) -> bool:
        return is_integer(v) and least <= v < MAX_SIZE

    if key in ("rope_theta", "rms_norm_eps"):
        ok = is_finite_number(value) and value > 0
        return None if ok else "expected a finite number > 0"
    if key == "tie_word_embeddings":
        return None if isinstance(value, bool) else "expected true or false"
    if key in ("bos_token_id", "eos_token_id"):
        ids = value if isinstance(value, tuple) else (value,)
        return None if all(integer(i, 0) for i in ids) else "expected a token id (an integer >= 0) or a list of them"
    return None if integer(value, 1) else "expected an integer >= 1 and below 2^31"


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


def load_safetensors(f: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, on the CPU: the model's weights here, an adapter's (lora.py) and a
    checkpoint's. A file the library cannot read is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(f))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{f}: cannot read safetensors file, it may be truncated or corrupt "
                         f"({first_line(e)})") from None


def read_state_dict(model_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, up-cast (or cast) to `dtype`, with errors that name the file."""
    state = {}
    for f in weight_files(model_dir):
        for name, t in load_safetensors(f).items():
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
    cfg = read_config(model_dir / "config.json")
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
        raise ValueError(f"{path}: cannot read config.json ({first_line(e)})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: config.json holds a JSON {type(d).__name__}, expected an object of settings")
    cfg = config_from_dict(d, source=str(path))
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
        raise ValueError(f"{f}: not a safetensors file ({first_line(e)}); it may be truncated or corrupt") from None


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
    (model_dir / "config.json").write_text(json.dumps(config_to_dict(model.config), indent=2) + "\n")



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
               f"{first_line(e)}")
    except RevisionNotFoundError as e:
        why = f"no revision {revision!r}: {first_line(e)}"
    except Exception as e:  # unreachable Hub, HF_HUB_OFFLINE, a connection cut after the library's retries, ...
        how = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"cannot be fetched from {constants.ENDPOINT}"
        why = f"not (whole) in the cache {constants.HF_HUB_CACHE} and {how} ({type(e).__name__}: {first_line(e)})"
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


def eos_ids(model_dir: str | os.PathLike | None, cfg: Qwen2Config, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """Token ids that end a completion: config.json's and generation_config.json's eos_token_id, plus
    <|endoftext|> and <|im_end|> when the tokenizer has them (SPEC.md: both end a completion)."""
    ids = set(cfg.eos_ids)
    gen = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if gen is not None and gen.is_file():
        try:
            d = json.loads(gen.read_text())
        except (OSError, ValueError, RecursionError) as err:
            raise ValueError(f"{gen}: not valid JSON ({first_line(err)})") from None
        e = d.get("eos_token_id") if isinstance(d, dict) else None
        e = [e] if isinstance(e, int) else e or []
        if not isinstance(d, dict) or not isinstance(e, list) or config_value_problem("eos_token_id", tuple(e)):
            raise ValueError(f"{gen}: expected a JSON object whose eos_token_id is a token id or a list of them")
        ids.update(e)
    for tok in (ENDOFTEXT, IM_END):
        if tokenizer is not None and (i := tokenizer.token_id(tok)) is not None:
            ids.add(i)
    return tuple(sorted(ids))
