"""Bad input, tried as a new user would: every bad setting is one `error: --flag VALUE: ...` line with exit status 2,
found before the model is loaded and before a run directory exists; a bad model directory or data file is named
before any weight is read; a resume keeps the settings it recorded."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_checkpoint, refused, tiny_config, write_byte_tokenizer
import checkpoints
import checks
import lora
import pretrained
import tokenizer
import settings
import tasks
import train
from test_train import SMALL, write_svamp


pytestmark = pytest.mark.usefixtures("no_fsync")  # conftest.py: fsync off, the faults here are kills


# (flags, the exact error line). The values below are every one a user tried that reached a traceback, a crash after
# step 1, or silent acceptance.
BAD_SETTINGS = [
    (["-G", "0"], "--group-size 0: a group needs completions; allowed: an integer >= 1 (the paper: 8, 50)"),
    (["-G", "-3"], "--group-size -3: a group needs completions; allowed: an integer >= 1 (the paper: 8, 50)"),
    (["--accum", "0"], "--accum 0: an optimizer step needs a prompt; allowed: an integer >= 1"),
    (["--top-p", "0"], "--top-p 0.0: nucleus sampling keeps a probability mass in (0, 1]; allowed: 0 < top-p <= 1 "
                       "(1: off)"),
    (["--lora-rank", "0"], "--lora-rank 0: allowed: an integer >= 1 (the paper: 8 or 16)"),
    (["--lora-rank", "-8"], "--lora-rank -8: allowed: an integer >= 1 (the paper: 8 or 16)"),
    (["--save-every", "0"], "--save-every 0: allowed: an integer >= 1 (default 10)"),
    (["--eval-batch", "0"], "--eval-batch 0: allowed: an integer >= 1 (default: on CUDA what the device's memory "
                            "holds, on the CPU 32)"),
    (["--backward-batch", "0"], "--backward-batch 0: allowed: an integer >= 1 (default 1: one completion per "
                                "backward)"),
    (["--algo", "tspmo", "--backward-batch", "4"], "--backward-batch 4: T-SPMO runs one forward per trie prefix; "
                                                   "allowed: --backward-batch 1 with --algo tspmo"),
    (["--sample-precision", "tf32", "--device", "cpu"], "--sample-precision tf32: TF32 is a CUDA matrix-product "
                                                        "mode; allowed on the CPU: fp32 or bf16"),
    (["--replay-success", "-1"], "--replay-success -1: a count of replays; allowed: an integer >= 0"),
    (["--replay-failure", "-1"], "--replay-failure -1: a count of replays; allowed: an integer >= 0"),
    (["--temperature", "-1"], "--temperature -1.0: allowed: a finite number >= 0 (0: greedy; the paper: 0.3)"),
    (["--temperature", "nan"], "--temperature nan: allowed: a finite number >= 0 (0: greedy; the paper: 0.3)"),
    (["--steps", "-1"], "--steps -1: a run needs at least one step; allowed: an integer >= 1"),
    (["--steps", "0"], "--steps 0: a run needs at least one step; allowed: an integer >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: a completion needs a token; allowed: an integer >= 1 "
                                "(the paper: 300)"),
    (["--eval-limit", "-1"], "--eval-limit -1: an accuracy needs an example to measure; allowed: an integer >= 1 "
                             "(default: the whole test set)"),
    (["--eval-limit", "0"], "--eval-limit 0: an accuracy needs an example to measure; allowed: an integer >= 1 "
                            "(default: the whole test set)"),
    # l/T in float32: 1e-300 is 0 there, 1e-39 a subnormal (the logits divided by it overflow beyond 0.34)
    (["--temperature", "1e-300"], "--temperature 1e-300: the sampler divides float32 logits by it, and below "
                                  "float32's smallest normal number (1.175e-38) the quotient overflows; allowed: 0 "
                                  "(greedy) or a temperature >= 1.175e-38 (the paper: 0.3)"),
    (["--temperature", "1e-39"], "--temperature 1e-39: the sampler divides float32 logits by it, and below "
                                 "float32's smallest normal number (1.175e-38) the quotient overflows; allowed: 0 "
                                 "(greedy) or a temperature >= 1.175e-38 (the paper: 0.3)"),
    # α/r = 1e308/8 is inf in the adapter's float32 product, and inf·B·A·x = inf·0 = NaN at step 0
    (["--lora-alpha", "1e308"], "--lora-alpha 1e+308: LoRA's scale alpha/r = 1e+308/8 = 1.25e+307 overflows the "
                                "adapter's float32 arithmetic (largest 3.403e+38); allowed: --lora-alpha <= r × "
                                "3.403e+38 = 2.722e+39"),
    (["--eval-every", "-1"], "--eval-every -1: allowed: an integer >= 0 (0: at the start and the end only)"),
    (["--p", "2"], "--p 2.0: a probability; allowed: 0 <= P <= 1 (default 0.5)"),
    (["--k", "-1"], "--k -1: S-GRPO's cap on tokens in the loss; allowed: an integer >= 1"),
    (["--alpha", "-1"], "--alpha -1: S-GRPO's always-included prefix; allowed: an integer >= 0"),
    (["--lora-alpha", "0"], "--lora-alpha 0.0: LoRA's scale is alpha/r; allowed: a finite number > 0 (default r)"),
    (["--lora-fraction", "0"], "--lora-fraction 0.0: a fraction of the layers; allowed: 0 < fraction <= 1"),
    (["--lora-fraction", "1.5"], "--lora-fraction 1.5: a fraction of the layers; allowed: 0 < fraction <= 1"),
    (["--lr", "inf"], "--lr inf: AdamW would not move (<= 0) or diverge at once (> 1); allowed: 0 < lr <= 1 "
                      "(the paper: 1e-4)"),
    (["--lr", "1e30"], "--lr 1e+30: AdamW would not move (<= 0) or diverge at once (> 1); allowed: 0 < lr <= 1 "
                       "(the paper: 1e-4)"),
    (["--lr", "0"], "--lr 0.0: AdamW would not move (<= 0) or diverge at once (> 1); allowed: 0 < lr <= 1 "
                    "(the paper: 1e-4)"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1: allowed: 0 <= weight decay <= 1 (default 0.01)"),
    (["--beta", "-1"], "--beta -1.0: a KL weight; allowed: a finite number >= 0 (the paper: 0.01)"),
    (["--lam", "inf"], "--lam inf: an L2 weight in the loss; allowed: a finite number >= 0 (default 0: the paper's λ "
                       "as weight decay; 0.01: its λ read literally)"),
    (["--replay-threshold", "nan"], "--replay-threshold nan: allowed: a finite reward (default 1.0)"),
    (["--seed", "-1"], "--seed -1: allowed: an integer in [0, 2^62)"),
    (["--device", "banana"], "--device banana: not a device; allowed: cpu, cuda, cuda:N"),
    (["--device", "meta"], "--device meta: tokrl runs on the CPU or a CUDA GPU; allowed: cpu, cuda, cuda:N"),
    (["--task", "mult", "--data", "x"], "--data x: the mult task generates its problems and reads no data; allowed: "
                                        "--data with --task svamp or gsm8k"),
    (["--adapter", "somewhere"], "--adapter somewhere: only with --eval-only (training starts a new adapter)"),
    (["--eval-only", "--adapter", "nowhere"], "--adapter nowhere: not an adapter directory; allowed: a directory with "
                                              "adapter_config.json and adapter_model.safetensors (PEFT format, "
                                              "e.g. RUN_DIR/adapter)"),
]


@pytest.mark.parametrize("flags,message", BAD_SETTINGS, ids=[" ".join(f) for f, _ in BAD_SETTINGS])
def test_bad_setting_is_one_line_exit_2_before_anything(tmp_path, tiny, capsys, no_loading, flags, message):
    run = tmp_path / "run"
    code, err = refused(["--model", str(tiny), "--out", str(run), *flags], capsys)
    assert code == 2 and err == f"error: {message}\n"
    assert not run.exists()  # no run directory left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tmp_path, tiny, capsys, no_loading):
    code, err = refused(["--model", str(tiny), "--out", str(tmp_path / "r"), "--device", "cuda"], capsys)
    assert code == 2 and err.startswith("error: --device cuda: CUDA is not available here (torch ")
    assert err.endswith("; allowed: cpu\n") and not (tmp_path / "r").exists()


def test_the_command_line_prints_one_line_and_no_traceback(tmp_path, tiny):
    """The real program, in its own process: exit status 2, one line on stderr, nothing on disk."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(tiny), "--out", str(tmp_path / "r"),
                        "-G", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == "error: --group-size 0: a group needs completions; allowed: an integer >= 1 (the paper: 8, 50)\n"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags,warning", [
    (["-G", "1"], "warning: --group-size 1: one completion a group: every group has zero variance (Â = 0), so no "
                  "update learns from the reward\n"),
    (["--temperature", "0"], "warning: --temperature 0.0: greedy sampling draws G identical completions: every group "
                             "has zero variance (Â = 0), so no update learns from the reward\n")])
def test_legal_but_useless_settings_start_with_a_warning(tmp_path, tiny, capsys, flags, warning):
    train.main(["--task", "mult", "--algo", "grpo", "--model", str(tiny), *SMALL, "--steps", "1", "--eval-limit", "1",
                "--out", str(tmp_path / "r"), *flags])
    assert capsys.readouterr().err.startswith(warning)


# --- lengths the model cannot hold, and a KV cache no device here can hold --------------------------------------------

# The multiplication prompt in the byte tokenizer: 151 bytes of text, one token each, and 5 special tokens (3
# <|im_start|>, 2 <|im_end|>): 156 tokens. The tiny model has max_position_embeddings 1024, so at most 868 new ones.
MULT_PROMPT = 156


def test_the_multiplication_prompt_is_156_byte_tokens(tiny):
    prompt = tasks.make_task("mult", tokenizer.Tokenizer(tiny / "tokenizer.json")).prompt((123, 456))
    text = prompt.replace(tokenizer.IM_START, "").replace(tokenizer.IM_END, "")
    assert (len(text.encode()), prompt.count(tokenizer.IM_START), prompt.count(tokenizer.IM_END)) == (151, 3, 2)
    assert len(tokenizer.Tokenizer(tiny / "tokenizer.json").encode(prompt)) == MULT_PROMPT == 151 + 5


@pytest.mark.parametrize("flags,message", [
    (["--max-new-tokens", "1000000000"], "--max-new-tokens 1000000000: the longest training prompt (156 tokens, mult) "
                                         "plus 1000000000 is 1000000156"),
    (["--max-new-tokens", "869"], "--max-new-tokens 869: the longest training prompt (156 tokens, mult) plus 869 is "
                                  "1025"),
    (["--eval-max-new-tokens", "5000"], "--eval-max-new-tokens 5000: the longest test prompt (156 tokens, mult) plus "
                                        "5000 is 5156"),
    (["--eval-only", "--max-new-tokens", "2000"], "--max-new-tokens 2000: the longest test prompt (156 tokens, mult) "
                                                  "plus 2000 is 2156")])
def test_a_length_the_model_cannot_hold_is_refused_before_loading(tmp_path, tiny, capsys, no_loading, flags,
                                                                   message):
    """The fault: --max-new-tokens 1000000000 died in the KV cache's allocation, with a stack trace, after the
    weights had loaded. The limit is config.json's max_position_embeddings, read before any weight."""
    run = tmp_path / "run"
    code, err = refused(["--model", str(tiny), "--out", str(run), *flags], capsys)
    flag = flags[-2]
    assert code == 2 and err == (f"error: {message}, beyond the model's max_position_embeddings 1024 "
                                 f"({tiny / 'config.json'}); allowed: {flag} <= {1024 - MULT_PROMPT}\n")
    assert not run.exists()


def test_868_new_tokens_fit_the_tiny_model(tmp_path, tiny, no_loading):
    """The limit is exact: with 868 the checks pass and the run goes on to load the weights (refused here)."""
    with pytest.raises(AssertionError, match="the weights were loaded"):
        train.main(["--model", str(tiny), "--out", str(tmp_path / "r"), "--max-new-tokens", str(1024 - MULT_PROMPT)])


def test_the_bound_on_prompt_lengths_is_above_the_exact_length(tiny):
    """check_inputs tokenizes the prompts only when a cheap bound (3 tokens per UTF-8 byte) says a limit may be
    reached; the bound must never be below the real length (shipped data, the byte tokenizer and Qwen2's)."""
    from conftest import assets
    import os
    tokenizers = [tiny / "tokenizer.json"] + ([assets() / "qwen2" / "tokenizer.json"]
                                               if os.environ.get("TOKRL_ASSETS") else [])
    for path in tokenizers:
        tok = tokenizer.Tokenizer(path)
        for name in ("mult", "svamp", "gsm8k"):
            task = tasks.make_task(name, tok)
            for examples in (task.train_set(), task.test_set()):
                exact = checks.longest_prompt(task, tok, examples)
                assert 0 < exact <= checks.longest_prompt(task, tok, examples, exact=False)


def test_a_kv_cache_beyond_the_device_s_memory_is_refused_before_loading(tmp_path, tiny, capsys, no_loading,
                                                                          monkeypatch):
    """A length the model holds, but a cache no device here holds: 4 rows × (156 + 500) positions × 1025 bytes
    (keys and values: 2 × 4 layers × 2 KV heads × 16 head dims × 4 bytes; 1 byte of mask) = 2,689,600 bytes, on a
    device of 1 MiB. 1,048,576 // (4 × 1025) = 255 positions fit: 99 new tokens after the prompt."""
    monkeypatch.setattr(checks, "device_memory", lambda device: (2**20, "a 1 MiB test device"))
    run = tmp_path / "run"
    code, err = refused(["--model", str(tiny), "--out", str(run), "-G", "4", "--max-new-tokens", "500"], capsys)
    assert code == 2 and err == ("error: -G 4, --max-new-tokens 500: the KV cache alone (4 rows × 656 positions, "
                                 "float32) needs 2,689,600 bytes (0.00 GiB), more than all 0.00 GiB of a 1 MiB test "
                                 "device; allowed: --max-new-tokens <= 99 with -G 4, or a smaller -G\n")
    assert not run.exists()


@pytest.mark.parametrize("flags", [["--temperature", repr(settings.MIN_TEMPERATURE)],
                                   ["--lora-alpha", repr(8 * lora.MAX_SCALE)]], ids=["temperature", "lora-alpha"])
def test_the_bounds_on_the_temperature_and_alpha_are_exact(tmp_path, tiny, capsys, no_loading, flags):
    """float32's smallest normal number is an allowed temperature, and α = r × float32's largest (r = 8) an allowed
    α: the checks pass and the run goes on to load the weights (refused here); the next float below (above) is not."""
    with pytest.raises(AssertionError, match="the weights were loaded"):
        train.main(["--model", str(tiny), "--out", str(tmp_path / "r"), *flags])
    beyond = math.nextafter(float(flags[1]), 0 if flags[0] == "--temperature" else math.inf)
    code, err = refused(["--model", str(tiny), "--out", str(tmp_path / "r"), flags[0], repr(beyond)], capsys)
    assert code == 2 and err.startswith(f"error: {flags[0]} {beyond}: ")


# --- settings and files that fit another model, or another machine ----------------------------------------------------

# The tiny model's projections (hidden 64, 4 query heads and 2 key/value heads of 16): q_proj and o_proj 64 × 64,
# k_proj and v_proj 64 in, 32 out. A LoRA update B·A of a projection has rank at most min(in, out).
@pytest.mark.parametrize("targets,name,c_out", [("q_proj,v_proj", "v_proj", 32), ("q_proj,o_proj", "q_proj", 64)])
def test_a_lora_rank_above_what_the_projections_hold_is_refused_before_loading(tmp_path, tiny, capsys, no_loading,
                                                                               targets, name, c_out):
    """The fault: --lora-rank 1000000000 passed the checks, wrote config.json, loaded the weights and died allocating
    256 GB. The bound is min(in, out) over the adapted projections, read off config.json; it is exact."""
    run = tmp_path / "run"
    for rank in (1_000_000_000, c_out + 1):
        code, err = refused(["--model", str(tiny), "--out", str(run), "--lora-targets", targets, "--lora-rank",
                             str(rank)], capsys)
        assert code == 2 and err == (f"error: --lora-rank {rank}: above the rank a LoRA update of {name} can have, "
                                     f"min(in, out) = min(64, {c_out}) = {c_out} ({tiny / 'config.json'}); allowed: "
                                     f"--lora-rank <= {c_out}\n")
        assert not run.exists()  # no config.json, no run directory
    with pytest.raises(AssertionError, match="the weights were loaded"):
        train.main(["--model", str(tiny), "--out", str(run), "--lora-targets", targets, "--lora-rank", str(c_out)])


def test_a_run_larger_than_the_device_s_memory_is_refused_before_loading(tmp_path, tiny, capsys, no_loading,
                                                                          monkeypatch):
    """The weights, LoRA's training state and the largest KV cache against the device's memory, counted by hand for
    the tiny model and SMALL's settings (-G 4, 12 new tokens, 3 test prompts, half of the 4 layers, r = 8 on q and
    v). Weights, fp32: the embedding 272 × 64 = 17,408 (tied: the head is the same tensor), per layer q 64·64 + 64,
    k and v 64·32 + 32 each, o 64·64, the MLP 3 · 64·128, two norms of 64: 37,120, four of them 148,480, the final
    norm 64: 165,952 parameters, 663,808 bytes. LoRA on 2 layers: q 8 · (64 + 64) + v 8 · (64 + 32) = 1,792 a layer,
    3,584 parameters, each with its gradient and AdamW's two moments in fp32: 57,344 bytes. The KV cache of sampling
    (the larger): 4 rows × (156 + 12) positions × 1,025 bytes (test_a_kv_cache_beyond_...) = 688,800. In all
    1,409,952 bytes: a device one byte smaller refuses the run, one of exactly that size lets it load."""
    run = tmp_path / "run"
    args = ["--model", str(tiny), "--out", str(run), *SMALL]
    monkeypatch.setattr(checks, "device_memory", lambda device: (1_409_951, "a test device"))
    code, err = refused(args, capsys)
    assert code == 2 and err == (f"error: --model {tiny} with --dtype float32: the run needs at least 1,409,952 bytes "
                                 "(0.00 GiB: weights 0.00 GiB, LoRA with AdamW 0.00 GiB, KV cache 0.00 GiB; the KV "
                                 "cache is -G 4, --max-new-tokens 12), more than all 0.00 GiB of a test device; "
                                 "allowed: what fits: a smaller model, --dtype bfloat16, a smaller --lora-rank or KV "
                                 "cache\n")
    assert not run.exists()
    assert checks.run_bytes(train.resolve(train.build_parser().parse_args(args)), pretrained.read_config(
        tiny / "config.json"), True) == {"weights": 663_808, "LoRA with AdamW": 57_344}
    monkeypatch.setattr(checks, "device_memory", lambda device: (1_409_952, "a test device"))
    with pytest.raises(AssertionError, match="the weights were loaded"):
        train.main(args)

def test_a_lora_fraction_that_adapts_no_layer_is_refused_before_loading(tmp_path, tiny, capsys, no_loading):
    """Legal for the flag (0 < fraction <= 1), impossible for a 4-layer model: round(0.1 × 4) = 0 layers. Before,
    the run directory was written and the weights loaded before lora.apply_lora refused."""
    run = tmp_path / "run"
    code, err = refused(["--model", str(tiny), "--out", str(run), "--lora-fraction", "0.1"], capsys)
    assert code == 2 and err == (f"error: --lora-fraction 0.1: adapts round(0.1 × 4) = 0 of the model's 4 layers "
                                 f"({tiny / 'config.json'}); allowed: --lora-fraction >= 0.125\n")
    assert not run.exists()


@pytest.mark.parametrize("other,why", [
    (dict(num_hidden_layers=2), "adapter_config.json: layers_to_transform [0, 1, 2, 3] names layers this model does "
                                "not have (it has 2: 0..1); the adapter was trained for another model"),
    (dict(hidden_size=32, intermediate_size=64), "adapter_model.safetensors: base_model.model.model.layers.0.self_attn."
                                                 "q_proj.lora_A.weight has shape (8, 64), expected (8, 32) (r in "
                                                 "{adapter}/adapter_config.json and the model's layer sizes)")],
    ids=["fewer layers", "another hidden size"])
def test_an_adapter_of_another_model_is_refused_before_the_weights_load(tmp_path, adapter_of_tiny, capsys, no_loading,
                                                                        other, why):
    """`--eval-only --adapter` with an adapter trained on another model: before, a stack trace (IndexError) or an
    error after the base's weights had loaded. Now it is loaded onto a weightless (meta) copy of the model first, and
    refused as a bad file handed in: exit status 2."""
    model = make_checkpoint(tmp_path / "other", tiny_config(**other))
    code, err = refused(["--model", str(model), "--eval-only", "--adapter", str(adapter_of_tiny), "--device", "cpu"],
                        capsys)
    assert code == 2 and err == (f"error: --adapter {adapter_of_tiny} cannot be applied to the model {model}: "
                                 f"{adapter_of_tiny}/{why.format(adapter=adapter_of_tiny)}\n")


def test_the_adapter_check_accepts_its_own_model(tiny, adapter_of_tiny, tmp_path):
    assert train.main(["--model", str(tiny), "--eval-only", "--adapter", str(adapter_of_tiny), "--device", "cpu",
                       "--eval-limit", "1", "--max-new-tokens", "2"]) == 0


def test_more_threads_than_cores_start_with_a_warning(tmp_path, tiny, capsys, no_loading):
    """Legal, but slower, not faster. The warning comes with the settings' check, before the model's: here a length
    the model cannot hold stops the run there (a run would start its 10,000 threads)."""
    code, err = refused(["--model", str(tiny), "--out", str(tmp_path / "r"), "--threads", "10000",
                         "--max-new-tokens", "1000"], capsys)
    assert code == 2 and err.startswith(f"warning: --threads 10000: more threads than this machine's "
                                        f"{os.cpu_count()} cores: the extra ones can only wait for a core\n"
                                        "error: --max-new-tokens 1000: ")


# --- the model directory and the data, before any weight is loaded ----------------------------------------------------

def broken_model(tmp_path: Path, tiny: Path, how: str) -> Path:
    import shutil
    d = tmp_path / how
    shutil.copytree(tiny, d)
    if how == "config-list":
        (d / "config.json").write_text("[1, 2]")
    elif how == "config-bad-json":
        (d / "config.json").write_text('{"model_type": "qwen2",')
    elif how == "tokenizer-too-big":  # the byte tokenizer has 259 ids; a 200-token model cannot embed them
        make_checkpoint(d, tiny_config(vocab_size=200, bos_token_id=0, eos_token_id=0))
    elif how == "no-tokenizer":
        (d / "tokenizer.json").unlink()
    elif how == "weights-truncated":
        f = d / "model.safetensors"
        os.truncate(f, f.stat().st_size - 1000)
    elif how == "weights-missing":
        (d / "model.safetensors").unlink()
    elif how == "weights-other-shape":
        make_checkpoint(d, tiny_config(hidden_size=32))
        write_byte_tokenizer(d / "tokenizer.json")
        (d / "config.json").write_text((tiny / "config.json").read_text())
    return d


MODEL_FAULTS = [
    ("config-list", "config.json: config.json holds a JSON list, expected an object of settings"),
    ("config-bad-json", "config.json: cannot read config.json (Expecting property name"),
    ("tokenizer-too-big", "tokenizer.json: the tokenizer has 259 ids, more than the model's vocab_size 200"),
    ("no-tokenizer", "tokenizer.json: tokenizer.json not found"),
    ("weights-truncated", "model.safetensors: 1000 bytes short: the file is truncated"),
    ("weights-missing", "no model.safetensors or model.safetensors.index.json"),
    ("weights-other-shape", "checkpoint does not match config.json: mis-shaped tensors"),
]


@pytest.mark.parametrize("how,message", MODEL_FAULTS, ids=[h for h, _ in MODEL_FAULTS])
def test_bad_model_directory_is_named_before_loading(tmp_path, tiny, capsys, no_loading, how, message):
    d = broken_model(tmp_path, tiny, how)
    if how == "weights-truncated":
        n = (tiny / "model.safetensors").stat().st_size
        message = f"model.safetensors: {n - 1000} bytes, but its header announces {n}: the file is truncated"
    code, err = refused(["--model", str(d), "--out", str(tmp_path / "r"), *SMALL, "--steps", "1"], capsys)
    assert code == 2 and err.startswith(f"error: {d}") and message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_bad_data_is_named_before_loading(tmp_path, tiny, capsys, no_loading):
    d = write_svamp(tmp_path / "s")
    (d / "test.json").write_text("[]")
    code, err = refused(["--task", "svamp", "--model", str(tiny), "--data", str(d), "--out", str(tmp_path / "r"),
                         *SMALL], capsys)
    assert code == 2 and err == f"error: {d / 'test.json'}: expected a non-empty JSON list of SVAMP records\n"
    assert not (tmp_path / "r").exists()


# --- resume keeps the run's record ------------------------------------------------------------------------------------

def files(run: Path) -> dict:
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_steps_once(tiny, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("two") / "r"
    train.main(["--task", "mult", "--algo", "sgrpo", "--model", str(tiny), *SMALL, "--steps", "2", "--out", str(run)])
    return run


@pytest.fixture
def two_steps(two_steps_once, tmp_path) -> Path:
    """A finished 2-step run, a fresh copy for each test."""
    import shutil
    return Path(shutil.copytree(two_steps_once, tmp_path / "r"))


@pytest.mark.parametrize("flags,name,recorded", [
    (["--algo", "grpo"], "algo", "'sgrpo'"), (["--task", "svamp"], "task", "'mult'"),
    (["--model", "/elsewhere"], "model", None), (["--lora-rank", "16"], "lora_rank", "8"),
    (["--lr", "0.001"], "lr", "0.0001"), (["-G", "8"], "group_size", "4"), (["--seed", "1"], "seed", "0"),
    (["--edge-advantage", "treerl"], "edge_advantage", "'local'")])
def test_resume_refuses_a_conflicting_flag_and_writes_nothing(two_steps, capsys, no_loading, flags, name, recorded):
    before = files(two_steps)
    code, err = refused(["--resume", str(two_steps), *flags], capsys)
    recorded = recorded or repr(json.loads((two_steps / "config.json").read_text())[name])
    assert code == 2 and err == (f"error: {flags[0].replace('-G', '--group-size')} {flags[1]}: {two_steps} was "
                                 f"recorded with {name} = {recorded} ({two_steps / 'config.json'}); a resumed run "
                                 "keeps its settings, only --steps and --device may change\n")
    assert files(two_steps) == before


def test_resume_with_the_recorded_value_is_not_a_conflict(two_steps):
    train.main(["--resume", str(two_steps), "--algo", "sgrpo", "--steps", "3"])
    assert [m["step"] for m in checkpoints.read_jsonl(two_steps / "metrics.jsonl")] == [1, 2, 3]


def test_resume_records_a_new_steps_without_rewriting_the_settings(two_steps):
    config = (two_steps / "config.json").read_bytes()
    train.main(["--resume", str(two_steps), "--steps", "3"])
    assert (two_steps / "config.json").read_bytes() == config  # the original settings, as written at the start
    assert [(r["step"], r["steps"]) for r in checkpoints.read_jsonl(two_steps / "resumes.jsonl")] == [(2, 3)]
    train.main(["--resume", str(two_steps)])  # the latest --steps holds: nothing left to do, nothing run again
    assert [(r["step"], r["steps"]) for r in checkpoints.read_jsonl(two_steps / "resumes.jsonl")] == [(2, 3), (3, 3)]
    assert [m["step"] for m in checkpoints.read_jsonl(two_steps / "metrics.jsonl")] == [1, 2, 3]


def test_a_run_recorded_without_the_marker_still_resumes_from_its_checkpoints(two_steps):
    """A config.json without tokrl's marker (a run recorded before it existed) is read as a run's settings by a
    resume, whose checkpoint proves the run: it continues. (It is never started again: test_files.py.)"""
    config = json.loads((two_steps / "config.json").read_text())
    assert config.pop("tokrl") == "run settings"
    (two_steps / "config.json").write_text(json.dumps(config))
    assert train.main(["--resume", str(two_steps), "--steps", "3"]) == 0
    assert [m["step"] for m in checkpoints.read_jsonl(two_steps / "metrics.jsonl")] == [1, 2, 3]


def test_a_resume_runs_to_the_steps_of_the_latest_resume(two_steps):
    """resumes.jsonl holds one line per resume (here written by hand: to 3 steps, then to 5): the run's settings read
    back with --steps 5, the latest. The bug it is written for: the first resume's --steps read instead."""
    (two_steps / "resumes.jsonl").write_text('{"step": 2, "steps": 3}\n{"step": 3, "steps": 5}\n')
    assert checks.read_run_settings(two_steps).steps == 5
    (two_steps / "resumes.jsonl").write_text('{"step": 2, "steps": 3}\n')
    assert checks.read_run_settings(two_steps).steps == 3


def test_resume_refuses_steps_below_the_checkpoint(two_steps, capsys, monkeypatch):
    before = files(two_steps)
    with monkeypatch.context() as m:
        m.setattr(pretrained, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
        code, err = refused(["--resume", str(two_steps), "--steps", "1"], capsys)
    assert code == 2 and err == (f"error: --steps 1: {two_steps} is already at step 2 (step-000002); allowed: "
                                 "--steps >= 2\n")
    assert files(two_steps) == before
    assert train.main(["--resume", str(two_steps), "--steps", "2"]) == 0  # the advice's least value


def test_resume_of_a_run_whose_model_is_not_here_says_where_to_put_it(two_steps, capsys, no_loading):
    """A run directory copied from another machine records a --model path that does not exist here (and a resume may
    not change it): one line naming the path and what to do, exit status 2 (a file handed in), nothing written."""
    config = json.loads((two_steps / "config.json").read_text())
    (two_steps / "config.json").write_text(json.dumps({**config, "model": "/elsewhere/models/tiny"}))
    before = files(two_steps)
    code, err = refused(["--resume", str(two_steps)], capsys)
    assert code == 2 and err == (f"error: {two_steps} was recorded with --model /elsewhere/models/tiny "
                                 f"({two_steps / 'config.json'}), which is not a directory here (a run from another "
                                 "machine, or started from another directory?); a resumed run keeps its settings: put "
                                 "the same model at /elsewhere/models/tiny, or a symbolic link to it\n")
    assert files(two_steps) == before


def test_resume_refuses_eval_only_and_its_advice_runs(two_steps, tiny, capsys, monkeypatch):
    """The refusal prints the command that evaluates the run's adapter with the run's model and task. Before: it
    named `--eval-only --adapter RUN/adapter` alone, which evaluates the default model (Qwen/Qwen2-1.5B, from the
    Hub) on the default task: not this run's."""
    with monkeypatch.context() as m:
        m.setattr(pretrained, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
        code, err = refused(["--resume", str(two_steps), "--eval-only"], capsys)
    assert code == 2 and err == (f"error: --eval-only: not with --resume; evaluate a run's adapter with python "
                                 f"train.py --eval-only --adapter {two_steps / 'adapter'} --model {tiny} --task mult\n")
    advice = err.split("with python train.py ")[1].split()
    assert train.main([*advice, "--device", "cpu", "--eval-limit", "2", "--max-new-tokens", "4"]) == 0
    assert f" on 2 mult test examples (adapter {two_steps / 'adapter'})" in capsys.readouterr().out


def test_resume_of_a_run_whose_model_moved_runs_once_the_link_the_advice_names_is_there(two_steps, tiny, tmp_path,
                                                                                        capsys):
    gone = tmp_path / "elsewhere" / "tiny"
    config = json.loads((two_steps / "config.json").read_text())
    (two_steps / "config.json").write_text(json.dumps({**config, "model": str(gone)}))
    code, err = refused(["--resume", str(two_steps), "--steps", "3"], capsys)
    assert code == 2 and err.endswith(f"put the same model at {gone}, or a symbolic link to it\n")
    gone.parent.mkdir()
    gone.symlink_to(tiny)
    assert train.main(["--resume", str(two_steps), "--steps", "3"]) == 0


def test_a_run_recorded_on_cuda_resumes_on_another_device(two_steps, capsys, monkeypatch):
    """A run recorded with --device cuda:99 (no machine has that device; on a CPU machine, as a GPU run copied here):
    the refusal names the recorded device and the resume that runs elsewhere; that resume runs. Its checkpoint's
    sampling generator is CUDA's (Philox: a 16-byte state, seed and offset), which the CPU's cannot take: the
    resume warns that its samples come from a new stream; AdamW's moments were saved on cuda:0, and load here.
    Before: the refusal offered `--device cpu`, which the resume then refused (only --steps could change)."""
    config = json.loads((two_steps / "config.json").read_text())
    (two_steps / "config.json").write_text(json.dumps({**config, "device": "cuda:99"}))
    ck = two_steps / "checkpoints" / "step-000002" / "state.pt"
    state = torch.load(ck, weights_only=True)
    state["rng"]["sample"] = torch.tensor(list(range(16)), dtype=torch.uint8)  # as a CUDA generator writes it
    with monkeypatch.context() as m:  # and AdamW's moments as a CUDA run saves them: storages on cuda:0
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, ck)
    before = files(two_steps)
    with monkeypatch.context() as m:
        m.setattr(pretrained, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
        code, err = refused(["--resume", str(two_steps), "--steps", "3"], capsys)
    here = settings.DEVICE
    assert code == 2 and err.startswith(f"error: {two_steps} was recorded with --device cuda:99 "
                                        f"({two_steps / 'config.json'}): ")
    assert err.endswith(f"; a resume may run on another device: python train.py --resume {two_steps} --device {here}"
                        "\n")
    assert files(two_steps) == before
    assert train.main([*err.split("device: python train.py ")[1].split(), "--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert ("the checkpoint's sampling generator is another device's" in err) == (here == "cpu")
    assert [m["step"] for m in checkpoints.read_jsonl(two_steps / "metrics.jsonl")] == [1, 2, 3]
    assert checkpoints.read_jsonl(two_steps / "resumes.jsonl")[-1]["device"] == here
    assert json.loads((two_steps / "config.json").read_text())["device"] == "cuda:99"  # the record stays


@pytest.mark.parametrize("program,argv,message", [
    ("train.py", ["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    ("train.py", ["--bogus"], "unrecognized arguments: --bogus"),
    ("train.py", ["--algo", "sft"], "argument --algo: invalid choice: 'sft' (choose from 'grpo', 'sgrpo', 'tspmo', "
                               "'ppo', 'dpo')"),
    ("mini.py", ["--seeds", "0"], "argument --seeds: expected a positive integer, got '0'"),
    ("mini.py", ["--bogus"], "unrecognized arguments: --bogus")])
def test_a_flag_argparse_cannot_read_is_one_line_and_a_hint(program, argv, message, capsys):
    """Before: 27 lines of usage, then the line that matters."""
    import mini
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        (train if program == "train.py" else mini).main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: {message} (python {program} --help lists the flags)\n"


def test_a_run_recorded_without_replay_cut_resumes_with_the_uniform_cut(two_steps, capsys, no_loading):
    """A config.json written before --replay-cut existed holds no replay_cut: that run cut uniformly (the paper's),
    and a resume reads it so. A resume may not switch to --replay-cut entropy (its pool holds no entropies); a
    hand-edited value that is no cut is one line naming the file, exit status 2, nothing written."""
    config = json.loads((two_steps / "config.json").read_text())
    assert config["replay_cut"] == "uniform"  # recorded by every new run
    (two_steps / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "replay_cut"}))
    assert checks.read_run_settings(two_steps).replay_cut == "uniform"
    before = files(two_steps)
    code, err = refused(["--resume", str(two_steps), "--replay-cut", "entropy"], capsys)
    assert code == 2 and err == (f"error: --replay-cut entropy: {two_steps} was recorded with replay_cut = 'uniform' "
                                 f"({two_steps / 'config.json'}); a resumed run keeps its settings, only --steps and "
                                 "--device may change\n")
    assert files(two_steps) == before
    (two_steps / "config.json").write_text(json.dumps({**config, "replay_cut": "middle"}))
    before = files(two_steps)
    code, err = refused(["--resume", str(two_steps)], capsys)
    assert code == 2 and err == (f"error: {two_steps / 'config.json'}: replay_cut is 'middle'; allowed: uniform (the "
                                 "paper's) or entropy (B1, P(j) ∝ H_j)\n")
    assert files(two_steps) == before


@pytest.mark.parametrize("content,why", [("[1]", "not a JSON object"), ('{"algo": "tspmo", "colour": "red"}',
                                                                        "unknown settings ['colour']"),
                                         ("{", "cannot read the run's settings")])
def test_resume_of_a_broken_config(two_steps, capsys, no_loading, content, why):
    (two_steps / "config.json").write_text(content)
    code, err = refused(["--resume", str(two_steps)], capsys)
    assert code == 2 and err.startswith(f"error: {two_steps / 'config.json'}") and why in err


def test_a_run_recorded_without_edge_advantage_resumes_with_E7_and_a_bad_one_is_named(two_steps, capsys,
                                                                                       no_loading):
    """A config.json written before --edge-advantage existed holds no edge_advantage: that run computed E7, and a
    resume reads it as local. A hand-edited value that is no estimator is one line naming the file, exit status 2."""
    config = json.loads((two_steps / "config.json").read_text())
    assert config["edge_advantage"] == "local"  # recorded by every new run
    (two_steps / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "edge_advantage"}))
    assert checks.read_run_settings(two_steps).edge_advantage == "local"
    (two_steps / "config.json").write_text(json.dumps({**config, "edge_advantage": "global"}))
    code, err = refused(["--resume", str(two_steps)], capsys)
    assert code == 2 and err == (f"error: {two_steps / 'config.json'}: edge_advantage is 'global'; allowed: local "
                                 "(E7, the paper's) or treerl (B2, TreeRL's)\n")


@pytest.mark.parametrize("above", [True, False])
def test_a_large_model_on_the_cpu_starts_with_a_warning(tmp_path, tiny, capsys, no_loading, monkeypatch, above):
    """Training a model of more than checks.CPU_WARN_PARAMETERS parameters on the CPU (the main command on a machine
    without CUDA, whose --device defaults to cpu) warns, with the model's size, before the weights load; the tiny
    model stands in for the large one by lowering the limit to one below its parameter count (counted here from the
    tensors its safetensors file holds), and at exactly its count there is no warning."""
    import checks
    from safetensors import safe_open
    with safe_open(str(tiny / "model.safetensors"), "pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    monkeypatch.setattr(checks, "CPU_WARN_PARAMETERS", n - 1 if above else n)
    code, err = refused(["--model", str(tiny), "--out", str(tmp_path / "r"), "--device", "cpu",
                         "--max-new-tokens", "100000"], capsys)  # refused after the check: nothing loads or runs
    assert code == 2 and ("warning: --device cpu: training a " in err) == above
    if above:
        assert err.startswith(f"warning: --device cpu: training a {n / 1e9:.2f} B-parameter model on the CPU")
        assert "python mini.py" in err and "\nerror: --max-new-tokens 100000: " in err
