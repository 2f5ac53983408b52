"""The files a user hands in, checked before any weight loads and before anything is written (checks.py): a damaged
adapter, base weights that are not floating point or not finite, a data record the reward cannot read, a data file
that is not UTF-8, an evaluation of nothing, an --out that leads nowhere. Each is one `error:` line naming the file
(and the record), exit status 2. And what no check can see before the weights load: a next-token distribution that is
not finite, one line naming its likely cause at run time (exit status 1), before that evaluation or step is logged.
docs/running.md's "When things go wrong" table gives every fault its exit status, and
`test_every_row_of_the_table_has_its_exit_status` holds the code to it."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_checkpoint, refused
import checkpoints
import lora
import model as M
import train
import training
from distributed import World
from test_train import SMALL, write_gsm8k, write_svamp

pytestmark = pytest.mark.usefixtures("no_fsync")


# --- the faults a new user found ------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["random bytes", "100 bytes short"])
def test_a_damaged_adapter_file_is_one_line_exit_2(tmp_path, tiny, adapter_of_tiny, capsys, no_loading, damage):
    """Before: exit 1 and a 22-line traceback ending in safetensors' `SafetensorError`."""
    bad = Path(shutil.copytree(adapter_of_tiny, tmp_path / "bad"))
    weights = bad / "adapter_model.safetensors"
    if damage == "random bytes":
        weights.write_bytes(os.urandom(weights.stat().st_size))
    else:
        os.truncate(weights, weights.stat().st_size - 100)
    code, err = refused(["--model", str(tiny), "--eval-only", "--adapter", str(bad), "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    if damage == "random bytes":
        assert err.startswith(f"error: --adapter {bad}: {weights}: not a safetensors file"), err
    else:
        n = (adapter_of_tiny / "adapter_model.safetensors").stat().st_size
        assert err == (f"error: --adapter {bad}: {weights}: {n - 100} bytes, but its header announces {n}: the file is "
                       "truncated (an interrupted download or copy)\n")


def test_a_non_finite_adapter_weight_is_named_before_the_weights_load(tmp_path, tiny, adapter_of_tiny, capsys,
                                                                       no_loading):
    from safetensors.torch import load_file, save_file
    bad = Path(shutil.copytree(adapter_of_tiny, tmp_path / "bad"))
    weights = load_file(str(bad / "adapter_model.safetensors"))
    name = sorted(weights)[1]
    weights[name][0, 0] = float("inf")
    save_file(weights, str(bad / "adapter_model.safetensors"))
    code, err = refused(["--model", str(tiny), "--eval-only", "--adapter", str(bad), "--device", "cpu"], capsys)
    assert code == 2 and err == (f"error: --adapter {bad}: {bad / 'adapter_model.safetensors'}: {name} holds "
                                 "non-finite values (NaN or inf)\n")


@pytest.mark.parametrize("answer,why", [(float("nan"), "Answer nan is not a finite number"),
                                        (float("inf"), "Answer inf is not a finite number"),
                                        (2.5, "Answer 2.5 is not an integer, and exact match (P1) reads a "
                                              "completion's last integer: no completion can score it"),
                                        ("12", "needs string Body and Question and a numeric Answer")])
def test_a_svamp_answer_the_reward_cannot_read_is_named_before_anything(tmp_path, tiny, capsys, no_loading, answer,
                                                                        why):
    """Before: the data check passed NaN; the run wrote config.json and .lock, loaded the weights and died with
    `error: Invalid literal for Fraction: 'nan'`, naming neither the file nor the record."""
    d = write_svamp(tmp_path / "s")
    records = json.loads((d / "train.json").read_text())
    records[2]["Answer"] = answer
    (d / "train.json").write_text(json.dumps(records))  # json writes NaN and Infinity, and reads them back
    run = tmp_path / "run"
    code, err = refused(["--task", "svamp", "--model", str(tiny), "--data", str(d), "--out", str(run), *SMALL],
                        capsys)
    assert code == 2 and err == f"error: {d / 'train.json'}: record 2 (chal-3): {why}\n"
    assert not run.exists()


def test_a_gsm8k_file_that_is_not_utf8_is_named_with_its_line(tmp_path, tiny, capsys, no_loading):
    """Before: `error: 'utf-8' codec can't decode byte 0xe9 in position ...`, with no file name."""
    d = write_gsm8k(tmp_path / "g")
    lines = (d / "train.jsonl").read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"plus", b"pl\xe9s")  # Latin-1's é
    (d / "train.jsonl").write_bytes(b"\n".join(lines))
    run = tmp_path / "run"
    code, err = refused(["--task", "gsm8k", "--model", str(tiny), "--data", str(d), "--out", str(run), *SMALL],
                        capsys)
    # line 4 is {"question": "What is 3 pl\xe9s 1?", ...}: 26 characters before the byte 0xe9
    assert code == 2 and err == (f"error: {d / 'train.jsonl'}: line 4 is not UTF-8 text (byte 0xe9 at column 27); "
                                 "save the file as UTF-8\n")
    assert not run.exists()


@pytest.mark.parametrize("how", [["--eval-only"], []], ids=["--eval-only", "a new run"])
def test_an_evaluation_of_no_example_is_refused(tmp_path, tiny, capsys, no_loading, how):
    """Before: exit 0 with "accuracy 0.0000 on 0 mult test examples", an accuracy of nothing, and a training run
    logged one at every evaluation."""
    code, err = refused(["--model", str(tiny), "--eval-limit", "0", "--device", "cpu", "--out", str(tmp_path / "r"),
                         *how], capsys)
    assert code == 2 and err == ("error: --eval-limit 0: an accuracy needs an example to measure; allowed: an "
                                 "integer >= 1 (default: the whole test set)\n")
    assert not (tmp_path / "r").exists()


def test_evaluate_itself_refuses_an_empty_test_set(tiny):
    """The checks refuse every way the command line has to an evaluation of nothing; training.evaluate, which mini.py
    and tests call with their own tasks and settings, refuses one too, rather than report an accuracy of 0."""
    import tasks
    tok = M.Tokenizer(tiny / "tokenizer.json")
    task = tasks.make_task("mult", tok)
    task.test_set = lambda: []
    cfg = train.resolve(train.build_parser().parse_args(["--model", str(tiny), *SMALL]))
    with pytest.raises(ValueError, match="^mult: an evaluation of no test example$"):
        training.evaluate(M.load_model(tiny), tok, task, cfg, (256,))


@pytest.mark.parametrize("how", [["--eval-only"], []], ids=["--eval-only", "a new run"])
def test_a_svamp_file_whose_split_leaves_no_test_example_is_refused(tmp_path, tiny, capsys, no_loading, how):
    """A lone SVAMP.json is split 70/30: one record gives round(0.7) = 1 to train and none to test. Before: "accuracy
    0.0000 on 0" and exit 0. Two records split 1/1, and the checks pass (the run goes on to load, refused here)."""
    records = json.loads((write_svamp(tmp_path / "s") / "train.json").read_text())
    (tmp_path / "SVAMP.json").write_text(json.dumps(records[:1]))
    args = ["--task", "svamp", "--model", str(tiny), "--data", str(tmp_path / "SVAMP.json"), "--out",
            str(tmp_path / "r"), *SMALL, *how]
    code, err = refused(args, capsys)
    assert code == 2 and err == (f"error: {tmp_path / 'SVAMP.json'}: 1 record, which the 70/30 split leaves with no "
                                 "test example; allowed: at least 2 records (or train.json and test.json in a "
                                 "directory)\n")
    assert not (tmp_path / "r").exists()
    (tmp_path / "SVAMP.json").write_text(json.dumps(records[:2]))
    with pytest.raises(AssertionError, match="the weights were loaded"):
        train.main(args)


# --- the base model's weights, every value read before the load ---------------------------------------------------

def with_weights(tmp_path: Path, tiny: Path, change) -> Path:
    """A copy of the tiny model whose model.safetensors holds change(tensors)."""
    from safetensors.torch import load_file, save_file
    d = Path(shutil.copytree(tiny, tmp_path / "model"))
    tensors = load_file(str(d / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


EMBED = "model.embed_tokens.weight"
WEIGHT_FAULTS = {  # tensors -> (the change, the error after "FILE: tensor NAME ")
    "an int8 embedding": (lambda ts: ts.update({EMBED: (ts[EMBED] * 100).to(torch.int8)}),
                          "is I8; allowed: F32, F16, BF16 (floating point: an integer, boolean or quantized tensor is "
                          "not a weight this model computes with)"),
    "a boolean norm": (lambda ts: ts.update({"model.norm.weight": ts["model.norm.weight"] > 0}),
                       "is BOOL; allowed: F32, F16, BF16 (floating point: an integer, boolean or quantized tensor is "
                       "not a weight this model computes with)"),
    "one NaN": (lambda ts: ts["model.layers.2.mlp.up_proj.weight"].view(-1)[77].fill_(float("nan")),
                "holds non-finite values (NaN or inf); the file is damaged, or was saved from a model that diverged"),
    "one -inf": (lambda ts: ts["model.layers.0.self_attn.k_proj.bias"].view(-1)[-1].fill_(-float("inf")),
                 "holds non-finite values (NaN or inf); the file is damaged, or was saved from a model that diverged"),
}
NAMES = {"an int8 embedding": EMBED, "a boolean norm": "model.norm.weight",
         "one NaN": "model.layers.2.mlp.up_proj.weight", "one -inf": "model.layers.0.self_attn.k_proj.bias"}


@pytest.mark.parametrize("fault", WEIGHT_FAULTS)
def test_base_weights_that_are_not_finite_floats_are_named_before_the_load(tmp_path, tiny, capsys, no_loading, fault):
    """Before: an int8 embed_tokens was cast and trained on (all its values 0 once cast: 0.02 × 100 truncates), and a
    NaN weight ended the step-0 evaluation in accuracy 0 with "!!!!" completions, then a traceback. Now each is one
    line naming the file and the tensor, exit status 2, nothing written, no weight loaded."""
    change, why = WEIGHT_FAULTS[fault]
    d = with_weights(tmp_path, tiny, change)
    for how in ([], ["--eval-only"]):
        code, err = refused(["--model", str(d), "--out", str(tmp_path / "r"), *SMALL, *how], capsys)
        assert code == 2 and err == f"error: {d / 'model.safetensors'}: tensor {NAMES[fault]} {why}\n"
        assert not (tmp_path / "r").exists()


def test_a_weight_beyond_the_range_of_dtype_is_named_before_the_load(tmp_path, tiny, capsys, no_loading):
    """An fp32 weight of 70,000 is finite, and infinite once cast to float16 (largest 65,504): refused with
    --dtype float16, named with its value; with --dtype bfloat16 (float32's range) the checks pass."""
    d = with_weights(tmp_path, tiny, lambda ts: ts["model.layers.1.mlp.down_proj.weight"].view(-1)[5].fill_(7e4))
    args = ["--model", str(d), "--out", str(tmp_path / "r"), *SMALL]
    code, err = refused([*args, "--dtype", "float16"], capsys)
    assert code == 2 and err == (f"error: {d / 'model.safetensors'}: tensor model.layers.1.mlp.down_proj.weight holds "
                                 "values up to 7e+04, beyond the largest float16 (6.55e+04) the weights are loaded "
                                 "in; allowed: a --dtype that holds them (float32 or bfloat16)\n")
    with pytest.raises(AssertionError, match="the weights were loaded"):
        train.main([*args, "--dtype", "bfloat16"])


def test_the_loader_refuses_a_weight_that_is_not_floating_point(tmp_path, tiny):
    """model.load_model is also called without the checks (tests, mini.py): it refuses an integer tensor itself."""
    d = with_weights(tmp_path, tiny, WEIGHT_FAULTS["an int8 embedding"][0])
    with pytest.raises(ValueError, match=f"tensor {EMBED} is torch.int8; allowed: F32, F16, BF16"):
        M.load_model(d)


# --- a next-token distribution that is not finite, at run time ------------------------------------------------------

def test_a_temperature_too_small_for_the_logits_stops_before_the_step_is_logged(tmp_path, capsys):
    """--temperature 1.1754943508222875e-38 (float32's smallest normal, allowed) on a model whose logits reach 22
    (weights of std 1): l/T overflows float32 when the first group is sampled. Before: torch.multinomial's traceback
    (on CUDA, a device-side assert). Now one line naming --temperature and the smallest one that fits, exit 1; the
    step-0 evaluation (greedy: T plays no part) is logged, step 1 is not, no checkpoint is written."""
    model = make_checkpoint(tmp_path / "big", std=1.0)
    run = tmp_path / "r"
    code, err = refused(["--model", str(model), "--out", str(run), *SMALL, "--temperature", "1.1754943508222875e-38"],
                        capsys)
    line = err.splitlines()[-1]
    largest = float(re.search(r"largest \|logit\| ([0-9.]+)\)", line).group(1))
    assert code == 1 and line == (
        f"error: sampling for step 1: the logits (largest |logit| {largest:.4g}) divided by the temperature "
        "1.17549e-38 overflow float32 at new token 1; --temperature 1.17549e-38 is too small for this model's logits; "
        f"allowed in a new run: 0 (greedy) or a temperature above {largest / torch.finfo(torch.float32).max:.4g}. "
        "Stopped before it was logged: no checkpoint was written yet")
    assert 4 < largest < 100  # the overflow needs |l| > 4 at this T
    assert [e["step"] for e in checkpoints.read_jsonl(run / "eval.jsonl")] == [0]
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def huge_head(tmp_path: Path, value: float) -> Path:
    """A tiny model with its own LM head (untied), every entry `value`: finite weights whose logits are not."""
    from conftest import tiny_config
    d = make_checkpoint(tmp_path / f"head-{value:g}", tiny_config(tie_word_embeddings=False))
    return with_weights(tmp_path / f"w-{value:g}", d, lambda ts: ts["lm_head.weight"].fill_(value))


@pytest.mark.parametrize("dtype,value,cause", [
    ("float32", 3e38, "before any update: the weights of {model} are finite (checked before loading), their "
                      "arithmetic in float32 is not"),
    ("float16", 3e4, "the model's activations overflow float16 (largest 65504); --dtype bfloat16 or float32 in a new "
                     "run holds them")])
def test_logits_that_are_not_finite_stop_the_step_0_evaluation_before_it_is_logged(tmp_path, capsys, dtype, value,
                                                                                    cause):
    """Finite weights (the checks pass them) whose logits are not: an LM head of 3e38 overflows float32's products,
    one of 3e4 float16's. Before: the step-0 evaluation logged accuracy 0 with "!!!!" completions (argmax lands on a
    NaN: token 0, "!"), then sampling died in a traceback. Now the evaluation stops at its first token: one line naming
    the likely cause, exit 1, nothing logged; --eval-only says the same."""
    model = huge_head(tmp_path, value)
    run = tmp_path / "r"
    base = ["--model", str(model), "--dtype", dtype, *SMALL]
    code, err = refused([*base, "--out", str(run)], capsys)
    why = f"the model's logits are not finite (NaN or inf) at new token 1; {cause.format(model=model)}"
    assert code == 1 and err.splitlines()[-1] == (f"error: the step-0 evaluation: {why}. Stopped before it was logged: "
                                                  "no checkpoint was written yet")
    assert not (run / "eval.jsonl").exists() and not (run / "metrics.jsonl").exists()
    code, err = refused([*base, "--eval-only"], capsys)
    assert code == 1 and err.splitlines()[-1] == f"error: the evaluation: {why}"


def test_an_adapter_whose_scale_overflows_is_refused_before_the_weights_load(tmp_path, tiny, adapter_of_tiny, capsys,
                                                                             no_loading):
    """lora_alpha 1e308 in adapter_config.json: α/r = 1.25e307 is inf in the adapter's float32 arithmetic, and its
    product with B·A·x NaN; refused as --lora-alpha is, naming the file and the first module."""
    bad = Path(shutil.copytree(adapter_of_tiny, tmp_path / "bad"))
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e308}))
    code, err = refused(["--model", str(tiny), "--eval-only", "--adapter", str(bad), "--device", "cpu"], capsys)
    assert code == 2 and err == (f"error: --adapter {bad}: {bad / 'adapter_config.json'}: model.layers.0.self_attn."
                                 "q_proj: LoRA's scale alpha/r = 1e+308/8 = 1.25e+307 overflows the adapter's float32 "
                                 "arithmetic (largest 3.403e+38)\n")


def test_the_likely_cause_after_updates_and_with_an_adapter(tmp_path, tiny, capsys, monkeypatch):
    """The cause a not-finite distribution is given depends on what came before it: an adapter that training moved
    (B ≠ 0; here a resumed checkpoint's, one B entry set to 0.5) names the training; --eval-only with an --adapter
    names the base's and the adapter's weights together (both checked finite: their arithmetic is not)."""
    from safetensors.torch import load_file, save_file
    run = tmp_path / "r"
    train.main(["--model", str(tiny), "--out", str(run), *SMALL, "--steps", "1", "--eval-limit", "1"])
    weights = run / "checkpoints" / "step-000001" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors[next(k for k in sorted(tensors) if "lora_B" in k)][0, 0] = 0.5
    save_file(tensors, str(weights), metadata={"format": "pt"})

    def refuse(*a, **k):
        raise M.NonFiniteLogits(3, 0.3, False, float("nan"))
    monkeypatch.setattr(M, "sample", refuse)
    code, err = refused(["--resume", str(run), "--steps", "2"], capsys)
    assert code == 1 and err.splitlines()[-1] == (
        "error: sampling for step 2: the model's logits are not finite (NaN or inf) at new token 3; the adapter's "
        "training made it so: a lower --lr or --lora-alpha in a new run avoids it. Stopped before it was logged: the "
        f"last checkpoint, {run / 'checkpoints' / 'step-000001'}, is whole and untouched")
    assert [m["step"] for m in checkpoints.read_jsonl(run / "metrics.jsonl")] == [1]
    model = huge_head(tmp_path, 3e38)
    net = M.load_model(model)
    lora.apply_lora(net, 8, 0.5, generator=torch.Generator().manual_seed(0))
    checkpoints.write_adapter(net, tmp_path / "adapter")
    code, err = refused(["--model", str(model), "--eval-only", "--adapter", str(tmp_path / "adapter"), *SMALL],
                        capsys)
    assert code == 1 and err.splitlines()[-1] == (
        "error: the evaluation: the model's logits are not finite (NaN or inf) at new token 1; before any update: the "
        f"weights of {model} and of the adapter {tmp_path / 'adapter'} are finite (checked before loading), their "
        "arithmetic in float32 is not")


@pytest.mark.parametrize("how", [[], ["--eval-only"]], ids=["a new run", "--eval-only"])
def test_an_out_that_is_a_dangling_symbolic_link_is_named(tmp_path, tiny, capsys, no_loading, how):
    """Before: `cannot write …/.lock: File exists`, which misleads: nothing is there."""
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone" / "run")
    code, err = refused(["--model", str(tiny), "--out", str(link), *SMALL, *how], capsys)
    assert code == 2 and err == (f"error: --out {link}: a symbolic link to {tmp_path / 'gone' / 'run'}, which does "
                                 "not exist; allowed: a new or empty directory, or a link to one\n")
    assert link.is_symlink() and not (tmp_path / "gone").exists()


class OtherRankFailed(World):
    """Rank 0 of two, the other a stand-in: its share of every gather is one NonFiniteLogits, its sums 0."""

    def gather(self, items: list) -> list:
        return list(items) + [M.NonFiniteLogits(2, 0.3, False, float("nan"))]

    def sum(self, values):
        return [float(v) for v in values]


def test_another_process_s_distribution_that_is_not_finite_stops_this_one_too(tiny):
    """With N processes each samples (and evaluates) its share; one whose distribution is not finite sends the error
    in place of its share, so that every process raises it after the same collective instead of waiting on the
    failed one. Here this process's own logits are finite: it raises the other's error, for sampling and for the
    evaluation."""
    import tasks
    from types import SimpleNamespace
    net, tok = M.load_model(tiny), M.Tokenizer(tiny / "tokenizer.json")
    task = tasks.make_task("mult", tok)
    cfg = train.resolve(train.build_parser().parse_args(["--model", str(tiny), *SMALL]))
    world = OtherRankFailed(rank=0, size=2)
    with pytest.raises(M.NonFiniteLogits) as e:
        training.evaluate(net, tok, task, cfg, (256,), world=world)
    assert e.value.new_token == 2
    trainer = SimpleNamespace(cfg=cfg, world=world, net=net, gens={"sample": torch.Generator()}, eos=(256,),
                              task=task, tok=tok, step=0)
    with pytest.raises(M.NonFiniteLogits) as e:
        training.Trainer.sample_group(trainer, tok.encode(task.prompt((123, 456))), (123, 456))
    assert e.value.new_token == 2


# --- docs/running.md's table: every row's exit status, produced -------------------------------------------------------

def table_rows() -> dict[str, list[int]]:
    """docs/running.md's "What survives what": each fault with the exit statuses its last cell names, in order."""
    text = (ROOT / "docs" / "running.md").read_text().split("**What survives what.**", 1)[1]
    table = [line for line in text.split("\n\n", 2)[1].splitlines() if line.startswith("| ")][1:]
    rows = {}
    for line in table:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = [int(n) for n in re.findall(r"\b\d+\b", cells[-1])]
    return rows


def status(args: list[str], capsys) -> int:
    """train.main(args)'s exit status, as the shell would see it."""
    capsys.readouterr()
    try:
        code = train.main(args)
    except SystemExit as e:
        code = e.code
    capsys.readouterr()
    return 1 if isinstance(code, str) else code  # SystemExit("error: ...") prints its message and exits 1


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory) -> Path:
    """A finished 2-step run (checkpoints 1 and 2)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train.main(["--model", str(tiny), *SMALL, "--steps", "2", "--save-every", "1", "--eval-limit", "1", "--out",
                str(run)])
    return run


class Row:
    """What one row's scenario needs: a fresh copy of the finished run, the tiny model, its adapter, the fixtures."""

    def __init__(self, finished, tiny, adapter, tmp_path, capsys, monkeypatch):
        self.finished, self.tiny, self.adapter, self.tmp = finished, tiny, adapter, tmp_path
        self.capsys, self.monkeypatch, self.copies = capsys, monkeypatch, 0

    def run(self) -> Path:
        self.copies += 1
        return Path(shutil.copytree(self.finished, self.tmp / f"run{self.copies}"))

    def new_run(self, *flags: str) -> int:
        return status(["--model", str(self.tiny), *SMALL, "--out", str(self.tmp / "new"), *flags], self.capsys)

    def resume(self, run: Path, *flags: str) -> int:
        return status(["--resume", str(run), *flags], self.capsys)


def after_a_killed_checkpoint_write(t: Row) -> list[int]:
    run = t.run()
    tmp = run / "checkpoints" / ".tmp-step-000003"
    (tmp / "adapter").mkdir(parents=True)
    (tmp / "state.pt").write_bytes(b"PK\x03\x04 half")
    return [t.resume(run, "--steps", "3")]


def after_a_killed_log_append(t: Row) -> list[int]:
    run = t.run()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')
    return [t.resume(run, "--steps", "3")]


def broken_checkpoints(t: Row) -> list[int]:
    run = t.run()
    os.truncate(run / "checkpoints" / "step-000002" / "state.pt", 100)
    fell_back = t.resume(run)
    run = t.run()
    for ck in (run / "checkpoints").glob("step-*"):
        (ck / "state.pt").write_bytes(b"")
    return [fell_back, t.resume(run)]


def stale_temporary_files(t: Row) -> list[int]:
    run = t.run()
    (run / ".curves.svg.tmp").write_text("<svg")
    return [t.resume(run)]


def disk_full(t: Row) -> list[int]:
    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")
    with t.monkeypatch.context() as m:
        m.setattr(checkpoints.os, "replace", full)
        return [t.resume(t.run(), "--steps", "3")]


def non_finite(t: Row) -> list[int]:
    real = training.update

    def poisoned(*a, **k):
        st = real(*a, **k)
        st.loss = float("nan")
        return st
    with t.monkeypatch.context() as m:
        m.setattr(training, "update", poisoned)
        return [t.resume(t.run(), "--steps", "3")]


def ctrl_c(t: Row) -> list[int]:
    real, codes = training.Trainer.train_step, []
    for presses in (1, 2):
        def train_step(self, stream, presses=presses):
            m = real(self, stream)
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)  # StopRequest's handler: the first asks, the second stops at once
            return m
        with t.monkeypatch.context() as m:
            m.setattr(training.Trainer, "train_step", train_step)
            codes.append(t.resume(t.run(), "--steps", "5"))
    return codes


def held_by_another(t: Row) -> list[int]:
    run = t.run()
    hold = checkpoints.hold_run_dir(run)  # another open file: the flock refuses this process's second taker too
    try:
        return [t.resume(run)]
    finally:
        hold.release()


def cache_refused_at_run_time(t: Row) -> list[int]:
    def refuse(*a, **k):
        raise M.CacheTooLarge(4, 168, 10**9, "cpu", RuntimeError("can't allocate memory"))
    with t.monkeypatch.context() as m:
        m.setattr(M, "sample", refuse)
        return [t.resume(t.run(), "--steps", "3")]


def not_finite_at_run_time(t: Row) -> list[int]:
    def refuse(*a, **k):
        raise M.NonFiniteLogits(1, 0.3, False, float("nan"))
    with t.monkeypatch.context() as m:
        m.setattr(M, "sample", refuse)
        return [t.resume(t.run(), "--steps", "3")]


def adapter_of_another_model(t: Row) -> list[int]:
    from conftest import tiny_config
    other = make_checkpoint(t.tmp / "other", tiny_config(num_hidden_layers=2))
    return [status(["--model", str(other), "--eval-only", "--adapter", str(t.adapter), "--device", "cpu"], t.capsys)]


def model_gone(t: Row) -> list[int]:
    run = t.run()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": str(t.tmp / "gone")}))
    return [t.resume(run)]


def another_number_of_processes(t: Row) -> list[int]:
    run = t.run()
    for ck in (run / "checkpoints").glob("step-*"):
        state = torch.load(ck / "state.pt", weights_only=True)
        torch.save({**state, "rng_ranks": [state["rng"]] * 2}, ck / "state.pt")  # as a 2-process run writes it
    return [t.resume(run)]


def damaged_file(t: Row) -> list[int]:
    bad = Path(shutil.copytree(t.adapter, t.tmp / "bad"))
    (bad / "adapter_model.safetensors").write_bytes(os.urandom(1000))
    return [status(["--model", str(t.tiny), "--eval-only", "--adapter", str(bad), "--device", "cpu"], t.capsys)]


def dangling_out(t: Row) -> list[int]:
    (t.tmp / "new").symlink_to(t.tmp / "nowhere")
    return [t.new_run()]


def model_not_found(t: Row) -> list[int]:
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("the network is unreachable")
    with t.monkeypatch.context() as m:
        m.setattr(huggingface_hub, "snapshot_download", offline)
        return [status(["--model", "tokrl-tests/not-here", "--eval-only", "--device", "cpu"], t.capsys)]


# the table's rows by the start of their first cell: a scenario that meets the fault, or (a row that needs torchrun)
# the test that pins it
ROWS = {
    "kill -9 (or a power loss) anywhere in a checkpoint write": after_a_killed_checkpoint_write,
    "kill -9 during a log append": after_a_killed_log_append,
    "the newest checkpoint truncated or corrupt": broken_checkpoints,
    "temporary files of an interrupted write": stale_temporary_files,
    "disk full": disk_full,
    "NaN or inf in the adapter": non_finite,
    "Ctrl-C": ctrl_c,
    "a second `train.py --resume RUN`": held_by_another,
    "the KV cache cannot be allocated at run time": cache_refused_at_run_time,
    "`--max-new-tokens 1000000000`": lambda t: [t.new_run("--max-new-tokens", "1000000000")],
    "a KV cache larger than the device's whole memory": lambda t: [t.new_run("-G", "100000000",
                                                                             "--max-new-tokens", "800")],
    "an `--adapter` trained for another model": adapter_of_another_model,
    "a `--lora-fraction` that adapts none": lambda t: [t.new_run("--lora-fraction", "0.1")],
    "`--resume` of a run copied from another machine": model_gone,
    "`--resume` with another number of processes": another_number_of_processes,
    "an abort in a `torchrun` process's interpreter teardown":
        "test_distributed.py::test_an_abort_in_the_interpreter_teardown_cannot_fail_a_finished_torchrun_run",
    "a damaged file handed in": damaged_file,
    "`--eval-limit 0`": lambda t: [t.new_run("--eval-limit", "0")],
    "`--lora-rank` above what the adapted projections hold": lambda t: [t.new_run("--lora-rank", "1000000000")],
    "a next-token distribution that is not finite at run time": not_finite_at_run_time,
    "`--out` a symbolic link to a directory that does not exist": dangling_out,
    "a `--model` repo id that can be neither found": model_not_found,
}


def row_key(fault: str) -> str:
    [key] = [k for k in ROWS if fault.startswith(k)]
    return key


def test_the_table_follows_the_one_rule_and_every_row_has_a_scenario():
    rows = table_rows()
    assert sorted(map(row_key, rows)) == sorted(ROWS)
    for fault, statuses in rows.items():
        assert statuses and set(statuses) <= {0, 1, 2, 130}, fault
        if isinstance(ROWS[row_key(fault)], str):  # the test that pins it exists
            file, name = ROWS[row_key(fault)].split("::")
            assert f"def {name}(" in (ROOT / "tests" / file).read_text()


@pytest.mark.parametrize("key", [k for k, v in ROWS.items() if not isinstance(v, str)])
def test_every_row_of_the_table_has_its_exit_status(key, finished, tiny, adapter_of_tiny, tmp_path, capsys,
                                                    monkeypatch):
    [statuses] = [s for fault, s in table_rows().items() if row_key(fault) == key]
    assert ROWS[key](Row(finished, tiny, adapter_of_tiny, tmp_path, capsys, monkeypatch)) == statuses
