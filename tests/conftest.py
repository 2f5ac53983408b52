"""Shared fixtures: tiny Qwen2 checkpoints and a tiny byte-level tokenizer, built by the tests themselves.

Nothing here touches the network. `TOKRL_ASSETS` (set by .ci/run) points at the shared folder with the real Qwen2
tokenizer and configs; tests that need it skip without it."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model as M  # noqa: E402
import pretrained  # noqa: E402
import tokenizer  # noqa: E402

SPECIALS = [tokenizer.ENDOFTEXT, tokenizer.IM_START, tokenizer.IM_END]


def assets() -> Path:
    """The shared assets folder, or skip the test."""
    p = os.environ.get("TOKRL_ASSETS")
    if not p or not Path(p).is_dir():
        pytest.skip("TOKRL_ASSETS is not set (the shared folder with the real Qwen2 tokenizer, configs and data)")
    return Path(p)


def write_byte_tokenizer(path: Path) -> int:
    """A byte-level BPE with no merges: ids 0..255 are the 256 bytes, then the three Qwen special tokens.

    Every text encodes (one token per byte), so the tiny models can run the real prompts. Returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: ord(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken
    tk.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    tk.save(str(path))
    return len(vocab) + len(SPECIALS)


TINY_VOCAB = 272  # 256 bytes + 3 specials, padded (like Qwen2's 151,936) beyond the tokenizer's 259 ids


def tiny_config(**kw) -> M.Qwen2Config:
    base = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
                tie_word_embeddings=True, bos_token_id=256, eos_token_id=256)
    base.update(kw)
    return M.Qwen2Config(**base)


def make_checkpoint(path: Path, cfg: M.Qwen2Config | None = None, seed: int = 0, std: float = 0.02,
                    dtype: torch.dtype | None = None) -> Path:
    """A random-weight tokrl model written as a Hugging Face directory with the byte tokenizer (no transformers)."""
    cfg = cfg or tiny_config()
    m = M.Qwen2ForCausalLM(cfg)
    m.init_weights(torch.Generator().manual_seed(seed), std=std)
    pretrained.save_model(m, path, dtype)
    write_byte_tokenizer(path / "tokenizer.json")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [256, 258]}))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """One random tiny checkpoint per test module."""
    return make_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def adapter_of_tiny(tiny, tmp_path_factory) -> Path:
    """A PEFT adapter for `tiny`: rank 8 on q_proj and v_proj of all 4 layers (hidden 64)."""
    import checkpoints
    import lora
    net = pretrained.load_model(tiny)
    lora.apply_lora(net, 8, 1.0, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    checkpoints.write_adapter(net, out)
    return out


@pytest.fixture
def no_fsync(monkeypatch):
    """checkpoints.py flushes each file to disk before its rename (a power loss); the tests that write hundreds of
    checkpoints kill processes instead, which the page cache survives, so they turn it off (~7 ms a file here)."""
    import checkpoints
    monkeypatch.setattr(checkpoints, "DURABLE", False)


@pytest.fixture
def no_loading(monkeypatch):
    """Loading weights is an error here: every check must come before it."""
    def refuse(*a, **k):
        raise AssertionError("the weights were loaded before the input was checked")
    monkeypatch.setattr(pretrained, "load_model", refuse)


def refused(args: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of train.main(args), which must stop with SystemExit."""
    import train
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(args)
    code, err = e.value.code, capsys.readouterr().err
    if isinstance(code, str):  # SystemExit("error: ...") prints its message and exits with status 1
        code, err = 1, err + code + "\n"
    return code, err


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "tiny")


def hf_checkpoint(path: Path, *, tie: bool, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                  seed: int = 0, layers: int = 3):
    """A tiny random Qwen2 built and saved by transformers (the oracle). Returns (path, transformers model)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
                                   tie_word_embeddings=tie, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    torch.manual_seed(seed)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers initialises biases to zero; make them random so they are tested too
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    hf.to(dtype).save_pretrained(path, **kw)
    write_byte_tokenizer(path / "tokenizer.json")
    return path, hf.float()


HOLDER = """import sys, time
from pathlib import Path
import checkpoints
checkpoints.hold_run_dir(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def hold_in_another_process(run: Path):
    """A second process that holds `run` as train.py does (checkpoints.hold_run_dir) and sleeps; returned once it
    holds it. The caller ends it (kill -9: the hold must go with it)."""
    import subprocess
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert p.stdout.readline() == "held\n", "the holder did not start"
    return p
