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
import model as M
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
    (["--eval-limit", "-1"], "--eval-limit -1: allowed: an integer >= 0 (default: the whole test set)"),
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
    train.main(["--task", "mult", "--algo", "grpo", "--model", str(tiny), *SMALL, "--steps", "1", "--eval-limit", "0",
                "--out", str(tmp_path / "r"), *flags])
    assert capsys.readouterr().err.startswith(warning)


# --- lengths the model cannot hold, and a KV cache no device here can hold --------------------------------------------

# The multiplication prompt in the byte tokenizer: 151 bytes of text, one token each, and 5 special tokens (3
# <|im_start|>, 2 <|im_end|>): 156 tokens. The tiny model has max_position_embeddings 1024, so at most 868 new ones.
MULT_PROMPT = 156


def test_the_multiplication_prompt_is_156_byte_tokens(tiny):
    prompt = tasks.make_task("mult", M.Tokenizer(tiny / "tokenizer.json")).prompt((123, 456))
    text = prompt.replace(M.IM_START, "").replace(M.IM_END, "")
    assert (len(text.encode()), prompt.count(M.IM_START), prompt.count(M.IM_END)) == (151, 3, 2)
    assert len(M.Tokenizer(tiny / "tokenizer.json").encode(prompt)) == MULT_PROMPT == 151 + 5


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
        tok = M.Tokenizer(path)
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


# --- settings and files that fit another model, or another machine ----------------------------------------------------

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
    (["--lr", "0.001"], "lr", "0.0001"), (["-G", "8"], "group_size", "4"), (["--seed", "1"], "seed", "0")])
def test_resume_refuses_a_conflicting_flag_and_writes_nothing(two_steps, capsys, no_loading, flags, name, recorded):
    before = files(two_steps)
    code, err = refused(["--resume", str(two_steps), *flags], capsys)
    recorded = recorded or repr(json.loads((two_steps / "config.json").read_text())[name])
    assert code == 2 and err == (f"error: {flags[0].replace('-G', '--group-size')} {flags[1]}: {two_steps} was "
                                 f"recorded with {name} = {recorded} ({two_steps / 'config.json'}); a resumed run "
                                 "keeps its settings, only --steps may change\n")
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


def test_a_resume_runs_to_the_steps_of_the_latest_resume(two_steps):
    """resumes.jsonl holds one line per resume (here written by hand: to 3 steps, then to 5): the run's settings read
    back with --steps 5, the latest. The bug it is written for: the first resume's --steps read instead."""
    (two_steps / "resumes.jsonl").write_text('{"step": 2, "steps": 3}\n{"step": 3, "steps": 5}\n')
    assert checks.read_run_settings(two_steps).steps == 5
    (two_steps / "resumes.jsonl").write_text('{"step": 2, "steps": 3}\n')
    assert checks.read_run_settings(two_steps).steps == 3


def test_resume_refuses_steps_below_the_checkpoint(two_steps, capsys, no_loading):
    before = files(two_steps)
    code, err = refused(["--resume", str(two_steps), "--steps", "1"], capsys)
    assert code == 2 and err == (f"error: --steps 1: {two_steps} is already at step 2 (step-000002); allowed: "
                                 "--steps >= 2\n")
    assert files(two_steps) == before


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


def test_resume_refuses_eval_only(two_steps, capsys, no_loading):
    code, err = refused(["--resume", str(two_steps), "--eval-only"], capsys)
    assert code == 2 and "--eval-only: not with --resume" in err


@pytest.mark.parametrize("content,why", [("[1]", "not a JSON object"), ('{"algo": "tspmo", "colour": "red"}',
                                                                        "unknown settings ['colour']"),
                                         ("{", "cannot read the run's settings")])
def test_resume_of_a_broken_config(two_steps, capsys, no_loading, content, why):
    (two_steps / "config.json").write_text(content)
    code, err = refused(["--resume", str(two_steps)], capsys)
    assert code == 2 and err.startswith(f"error: {two_steps / 'config.json'}") and why in err


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
