"""The files a user hands in, checked before any weight loads and before anything is written (checks.py): a damaged
adapter, base weights that are not floating point or not finite, a data record the reward cannot read, a data file
that is not UTF-8, an evaluation of nothing, an --out that leads nowhere. Each is one `error:` line naming the file
(and the record), exit status 2. And what no check can see before the weights load: a next-token distribution that is
not finite, one line naming its likely cause at run time (exit status 1), before that evaluation or step is logged.
docs/running.md's "When things go wrong" table gives every fault its exit status, and
`test_every_row_of_the_table_has_its_exit_status` holds the code to it."""
from __future__ import annotations

import datetime
import errno
import json
import os
import re
import shutil
import signal
import types
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_checkpoint, refused
import checkpoints
import evaluation
import lora
import model as M
import pretrained
import sampling
import tokenizer
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


@pytest.mark.parametrize("task,fields,longer", [
    ("svamp", {"Body": "b", "Question": "q", "Answer": 3}, "Question"),
    ("gsm8k", {"question": "q", "answer": "a #### 5"}, "answer"),
])
def test_a_record_s_text_limit_counts_every_text_field(task, fields, longer):
    """tasks.MAX_TEXT_CHARS bounds a record's whole text, SVAMP's Body and Question together, GSM8K's question and
    answer: a record of exactly the limit is accepted, one character more in either field is refused by its count.
    The bug it is written for: a field left out of the sum (a 2 MB answer would then pass the check)."""
    import tasks
    check = tasks.Svamp.record_problem if task == "svamp" else tasks.Gsm8k.record_problem
    pad = tasks.MAX_TEXT_CHARS - sum(len(v) for v in fields.values() if isinstance(v, str))
    first = next(k for k, v in fields.items() if isinstance(v, str))
    exact = {**fields, first: fields[first] + "x" * pad}
    assert check(exact) is None
    for field in (first, longer):
        over = {**exact, field: "y" + exact[field]}
        assert f"{tasks.MAX_TEXT_CHARS + 1:,} characters" in check(over), field


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
    """The checks refuse every way the command line has to an evaluation of nothing; evaluation.evaluate, which mini.py
    and tests call with their own tasks and settings, refuses one too, rather than report an accuracy of 0."""
    import tasks
    tok = tokenizer.Tokenizer(tiny / "tokenizer.json")
    task = tasks.make_task("mult", tok)
    task.test_set = lambda: []
    cfg = train.resolve(train.build_parser().parse_args(["--model", str(tiny), *SMALL]))
    with pytest.raises(ValueError, match="^mult: an evaluation of no test example$"):
        evaluation.evaluate(pretrained.load_model(tiny), tok, task, cfg, (256,))


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
    """pretrained.load_model is also called without the checks (tests, mini.py): it refuses an integer tensor itself."""
    d = with_weights(tmp_path, tiny, WEIGHT_FAULTS["an int8 embedding"][0])
    with pytest.raises(ValueError, match=f"tensor {EMBED} is torch.int8; allowed: F32, F16, BF16"):
        pretrained.load_model(d)


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
        raise sampling.NonFiniteLogits(3, 0.3, False, float("nan"))
    monkeypatch.setattr(sampling, "sample", refuse)
    code, err = refused(["--resume", str(run), "--steps", "2"], capsys)
    assert code == 1 and err.splitlines()[-1] == (
        "error: sampling for step 2: the model's logits are not finite (NaN or inf) at new token 3; the adapter's "
        "training made it so: a lower --lr or --lora-alpha in a new run avoids it. Stopped before it was logged: the "
        f"last checkpoint, {run / 'checkpoints' / 'step-000001'}, is whole and untouched")
    assert [m["step"] for m in checkpoints.read_jsonl(run / "metrics.jsonl")] == [1]
    model = huge_head(tmp_path, 3e38)
    net = pretrained.load_model(model)
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
        return list(items) + [sampling.NonFiniteLogits(2, 0.3, False, float("nan"))]

    def sum(self, values):
        return [float(v) for v in values]


def test_another_process_s_distribution_that_is_not_finite_stops_this_one_too(tiny):
    """With N processes each samples (and evaluates) its share; one whose distribution is not finite sends the error
    in place of its share, so that every process raises it after the same collective instead of waiting on the
    failed one. Here this process's own logits are finite: it raises the other's error, for sampling and for the
    evaluation."""
    import tasks
    from types import SimpleNamespace
    net, tok = pretrained.load_model(tiny), tokenizer.Tokenizer(tiny / "tokenizer.json")
    task = tasks.make_task("mult", tok)
    cfg = train.resolve(train.build_parser().parse_args(["--model", str(tiny), *SMALL]))
    world = OtherRankFailed(rank=0, size=2)
    with pytest.raises(sampling.NonFiniteLogits) as e:
        evaluation.evaluate(net, tok, task, cfg, (256,), world=world)
    assert e.value.new_token == 2
    trainer = SimpleNamespace(cfg=cfg, world=world, net=net, gens={"sample": torch.Generator()}, eos=(256,),
                              task=task, tok=tok, step=0, sampler=sampling.Sampler(net))
    with pytest.raises(sampling.NonFiniteLogits) as e:
        training.Trainer.sample_group(trainer, tok.encode(task.prompt((123, 456))), (123, 456))
    assert e.value.new_token == 2


# --- a run directory never takes what it did not write ------------------------------------------------------------

def snapshot(d: Path) -> dict:
    """Every entry under `d`: a file's bytes, a link's target, a directory's name."""
    return {str(p.relative_to(d)): os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
            for p in sorted(d.rglob("*"))}


def refused_before_loading(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """refused(args), with loading the weights an error (every refusal here comes before it)."""
    with monkeypatch.context() as m:
        m.setattr(pretrained, "load_model", lambda *a, **k: pytest.fail("the weights were loaded before the refusal"))
        return refused(args, capsys)


def finished_args(tiny: Path, out: Path) -> list[str]:
    """The command of the `finished` run (below), with another --out."""
    return ["--model", str(tiny), *SMALL, "--steps", "2", "--save-every", "1", "--eval-limit", "1", "--out", str(out)]


def test_out_at_a_model_directory_leaves_it_byte_identical(tmp_path, tiny, capsys, monkeypatch):
    """`cp -r MODEL M2; train.py --model M2 --out M2`: M2's config.json (a Qwen2 config, not tokrl's run settings) is
    what a model directory holds. Before: M2 was taken for a run to restart, its config.json overwritten with run
    settings (the model no longer loaded), with a warning only."""
    m2 = Path(shutil.copytree(tiny, tmp_path / "M2"))
    before = snapshot(m2)
    code, err = refused_before_loading(["--model", str(m2), "--out", str(m2), *SMALL], capsys, monkeypatch)
    assert code == 2 and err == (f"error: --out {m2}: not empty, and not a run of tokrl's ({m2 / 'config.json'} is "
                                 "not tokrl's run settings: it lacks their marker, \"tokrl\": \"run settings\"); it "
                                 "holds config.json, generation_config.json, model.safetensors, tokenizer.json; "
                                 "allowed: a new or empty directory\n")
    assert snapshot(m2) == before
    pretrained.load_model(m2)


@pytest.mark.parametrize("removed,what", [
    (["checkpoints"], "holds a finished run ({run}/adapter is its final adapter; its checkpoints are gone)"),
    (["checkpoints", "adapter"], "holds the logs of a run whose checkpoints are gone ({run}/metrics.jsonl reaches "
                                 "step 2, past its first checkpoint, step 1)"),
    (["checkpoints/step-000001", "checkpoints/step-000002", "adapter"],
     "holds a run whose checkpoints are gone ({run}/checkpoints/latest names step-000002)")])
def test_a_run_whose_checkpoints_were_deleted_keeps_its_logs_and_adapter(finished, tmp_path, tiny, capsys,
                                                                         monkeypatch, removed, what):
    """A run's checkpoints deleted to save disk: its logs (and the final adapter) stay. Before: the directory was
    taken for a run that stopped before its first checkpoint; its config.json was overwritten and metrics.jsonl,
    eval.jsonl, resumes.jsonl and curves.svg deleted. The advice, another --out, runs."""
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    for name in removed:
        shutil.rmtree(run / name)
    before = snapshot(run)
    code, err = refused_before_loading(finished_args(tiny, run), capsys, monkeypatch)
    assert code == 2 and err == f"error: --out {run}: {what.format(run=run)}; a new run needs another --out\n"
    assert snapshot(run) == before
    assert train.main(finished_args(tiny, tmp_path / "another")) == 0


def test_out_at_a_run_with_checkpoints_advises_its_resume_which_runs(finished, tmp_path, tiny, capsys, monkeypatch):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    before = snapshot(run)
    code, err = refused_before_loading(finished_args(tiny, run), capsys, monkeypatch)
    assert code == 2 and err == (f"error: --out {run}: already holds a run; continue it with --resume {run}, or "
                                 "choose another --out\n")
    assert snapshot(run) == before
    assert train.main(["--resume", str(run), "--steps", "3"]) == 0


def stopped_before_its_first_checkpoint(finished: Path, run: Path) -> Path:
    """The finished run's directory as it stood when it was killed in its first checkpoint's write: its settings,
    the step-0 evaluation and step 1's metrics, a half-built checkpoint."""
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints"), shutil.rmtree(run / "adapter")
    (run / "resumes.jsonl").unlink(missing_ok=True)
    for log in ("metrics.jsonl", "eval.jsonl"):
        checkpoints.write_jsonl(run / log, [r for r in checkpoints.read_jsonl(run / log) if r["step"] <= 1])
    (run / "checkpoints" / ".tmp-step-000001" / "adapter").mkdir(parents=True)
    return run


@pytest.mark.parametrize("extra", ["notes.txt", "checkpoints/mine", "unmarked"])
def test_a_run_stopped_before_its_first_checkpoint_beside_what_tokrl_did_not_write_is_refused(
        finished, tmp_path, tiny, capsys, monkeypatch, extra):
    """A run that stopped before its first checkpoint starts again in its directory only when nothing there is
    another's: a file no run writes, or a config.json without tokrl's marker (a run recorded before the marker, or a
    hand-made copy: tokrl cannot tell that it wrote the logs beside it), is refused, naming it."""
    run = stopped_before_its_first_checkpoint(finished, tmp_path / "run")
    if extra == "unmarked":
        config = json.loads((run / "config.json").read_text())
        del config["tokrl"]
        (run / "config.json").write_text(json.dumps(config))
    else:
        (run / extra).write_text("mine")
    before = snapshot(run)
    code, err = refused_before_loading(finished_args(tiny, run), capsys, monkeypatch)
    why = {"notes.txt": "holds what no run of tokrl's writes (notes.txt)",
           "checkpoints/mine": "holds what no run of tokrl's writes (checkpoints/mine)",
           "unmarked": (f"not empty, and not a run of tokrl's ({run / 'config.json'} is not tokrl's run settings: it "
                        "lacks their marker, \"tokrl\": \"run settings\"); it holds checkpoints, config.json, "
                        "curves.svg, eval.jsonl, metrics.jsonl")}[extra]
    assert code == 2 and err == f"error: --out {run}: {why}; allowed: a new or empty directory\n"
    assert snapshot(run) == before
    if extra != "unmarked":  # what is tokrl's alone: the same command starts it again there
        (run / extra).unlink()
        capsys.readouterr()
        assert train.main(finished_args(tiny, run)) == 0
        assert f"warning: {run} holds a run that stopped before its first checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["--out", "--resume"])
def test_the_hold_file_is_never_followed_through_a_symbolic_link(finished, tmp_path, tiny, capsys, monkeypatch, how):
    """RUN/.lock a symbolic link to a file of the user's: refused (exit 2, one line naming the link and its target),
    the target untouched. Before: the hold opened the link and wrote its pid, host and start time over the target.
    The advice, remove the link, runs."""
    target = tmp_path / "precious.txt"
    target.write_text("the user's own\n")
    run = Path(shutil.copytree(finished, tmp_path / "run")) if how == "--resume" else tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / checkpoints.HOLD_FILE).unlink(missing_ok=True)
    (run / checkpoints.HOLD_FILE).symlink_to(target)
    args = ["--resume", str(run), "--steps", "3"] if how == "--resume" else finished_args(tiny, run)
    before = snapshot(run)
    code, err = refused_before_loading(args, capsys, monkeypatch)
    assert code == 2 and err == (f"error: {how} {run}: {run / '.lock'} is a symbolic link (to {target}); a run "
                                 "directory's hold is a plain file, never followed through a link: remove the link\n")
    assert target.read_text() == "the user's own\n" and snapshot(run) == before
    (run / checkpoints.HOLD_FILE).unlink()
    assert train.main(args) == 0 and target.read_text() == "the user's own\n"


@pytest.mark.parametrize("how", [[], ["--eval-only"]], ids=["a new run", "--eval-only"])
def test_an_out_inside_a_file_is_one_line_exit_2(tmp_path, tiny, capsys, monkeypatch, how):
    """Before: `error: .../notes.txt/sub/.lock: Not a directory`, exit status 1 (a failure at run time)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    code, err = refused_before_loading(["--model", str(tiny), "--out", str(notes / "sub"), *SMALL, *how], capsys,
                                       monkeypatch)
    assert code == 2 and err == (f"error: --out {notes / 'sub'}: {notes} is a file, not a directory; allowed: a new "
                                 "or empty directory\n")
    assert notes.read_text() == "x"


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, tiny, capsys, monkeypatch):
    """Two runs without --out, started in the same second. Before: the second was refused, naming an --out its user
    never gave (`--out runs/mult-tspmo-...: already holds a run`)."""
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 22, 10, 15, 0)

    monkeypatch.setattr(train, "datetime", types.SimpleNamespace(datetime=Frozen))
    monkeypatch.chdir(tmp_path)
    args = ["--model", str(tiny), *SMALL, "--steps", "1", "--eval-limit", "1"]
    capsys.readouterr()
    assert train.main(args) == 0 and train.main(args) == 0
    assert "--out" not in capsys.readouterr().err
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["mult-tspmo-20261122-101500", "mult-tspmo-20261122-101500-2"]
    assert all((r / "adapter" / "adapter_model.safetensors").is_file() for r in runs)
    assert [json.loads((r / "config.json").read_text())["out"] for r in runs] == [f"runs/{r.name}" for r in runs]


def test_a_default_directory_another_run_takes_first_is_not_shared(tmp_path, monkeypatch):
    """The default directory is created with one mkdir that fails if the name exists (no check, then create): here
    another run takes the name between whatever a check would see and the mkdir, and this run gets the next one."""
    base, real, taken = tmp_path / "runs" / "mult-tspmo-20261122-101500", Path.mkdir, []

    def mkdir(self, *a, **k):
        if self.parent == base.parent and not taken:  # another process's mkdir of the same name, a moment earlier
            taken.append(self)
            real(self)
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert train.make_run_dir(base) == base.with_name(base.name + "-2") and taken == [base]
    assert train.make_run_dir(base) == base.with_name(base.name + "-3")


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
    first = stopped_before_its_first_checkpoint(t.finished, t.tmp / "first")  # killed in its first checkpoint
    return [t.resume(run, "--steps", "3"), t.resume(first)]


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


def sigterm(t: Row) -> list[int]:
    """In a process of its own (a SIGTERM to this one would end the tests if its handler were missing): once, and
    twice, while step 3 of a resume runs."""
    from test_faults import signalled
    codes = []
    for times in (1, 2):
        p = signalled(["--resume", str(t.run()), "--steps", "5"], at=f"step:3:{times}")
        p.communicate(timeout=180)
        codes.append(p.returncode)
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
        m.setattr(sampling, "sample", refuse)
        return [t.resume(t.run(), "--steps", "3")]


def not_finite_at_run_time(t: Row) -> list[int]:
    def refuse(*a, **k):
        raise sampling.NonFiniteLogits(1, 0.3, False, float("nan"))
    with t.monkeypatch.context() as m:
        m.setattr(sampling, "sample", refuse)
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
    "SIGTERM": sigterm,
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
        assert statuses and set(statuses) <= {0, 1, 2, 130, 143}, fault
        if isinstance(ROWS[row_key(fault)], str):  # the test that pins it exists
            file, name = ROWS[row_key(fault)].split("::")
            assert f"def {name}(" in (ROOT / "tests" / file).read_text()


@pytest.mark.parametrize("key", [k for k, v in ROWS.items() if not isinstance(v, str)])
def test_every_row_of_the_table_has_its_exit_status(key, finished, tiny, adapter_of_tiny, tmp_path, capsys,
                                                    monkeypatch):
    [statuses] = [s for fault, s in table_rows().items() if row_key(fault) == key]
    assert ROWS[key](Row(finished, tiny, adapter_of_tiny, tmp_path, capsys, monkeypatch)) == statuses


# --- every message that says what to do next: a test does what it says ------------------------------------------------

# each phrase of advice in the run's messages, and the test that runs the command it prints (or makes the change it
# names) and sees the run go on
ADVICE = {
    "continue it with --resume": "test_files.py::test_out_at_a_run_with_checkpoints_advises_its_resume_which_runs",
    "a new run needs another --out":
        "test_files.py::test_a_run_whose_checkpoints_were_deleted_keeps_its_logs_and_adapter",
    "remove the link": "test_files.py::test_the_hold_file_is_never_followed_through_a_symbolic_link",
    "evaluate a run's": "test_cli.py::test_resume_refuses_eval_only_and_its_advice_runs",
    "put the same model at":
        "test_cli.py::test_resume_of_a_run_whose_model_moved_runs_once_the_link_the_advice_names_is_there",
    "a resume may run on another": "test_cli.py::test_a_run_recorded_on_cuda_resumes_on_another_device",
    "--resume {run} --device": "test_cli.py::test_a_run_recorded_on_cuda_resumes_on_another_device",
    "start it again from step 0), with":
        "test_faults.py::test_killed_before_the_first_checkpoint_the_resume_starts_it_again",
    "start it again from step 0 with": "test_faults.py::test_a_second_ctrl_c_stops_at_once_and_its_advice_runs",
    "holds its settings alone; start it again":
        "test_faults.py::test_a_second_sigterm_or_one_before_training_stops_at_once_and_its_advice_runs",
    "interrupted before training resumed":
        "test_faults.py::test_a_second_sigterm_or_one_before_training_stops_at_once_and_its_advice_runs",
    "Ctrl-C again to quit now": "test_faults.py::test_a_second_ctrl_c_stops_at_once_and_its_advice_runs",
    "a second signal stops at once":
        "test_faults.py::test_a_second_sigterm_or_one_before_training_stops_at_once_and_its_advice_runs",
    "continue with": "test_faults.py::test_ctrl_c_during_a_step_finishes_it_checkpoints_and_resumes_exactly",
    "stopped at step {tr.step}; {tr.resume_verb()}":
        "test_faults.py::test_ctrl_c_during_a_step_finishes_it_checkpoints_and_resumes_exactly",
    "python train.py --resume {run}":
        "test_faults.py::test_ctrl_c_during_a_step_finishes_it_checkpoints_and_resumes_exactly",
    "stopped at once: {tr.what_is_safe()}; {tr.resume_verb()}":
        "test_faults.py::test_a_second_ctrl_c_stops_at_once_and_its_advice_runs",
    "{tr.resume_verb()} {resume_command(tr.run)}": "test_faults.py::test_disk_full_names_the_path_and_what_is_safe",
    "once the disk has room": "test_faults.py::test_disk_full_names_the_path_and_what_is_safe",
    "writes the rest": "test_faults.py::test_the_final_adapter_on_a_full_disk_and_the_resume_that_writes_it",
    "with memory freed on": "test_faults.py::test_a_kv_cache_the_device_cannot_allocate_stops_the_run_with_its_size",
    "wait for that process to end, or stop it":
        "test_faults.py::test_a_second_resume_stops_before_touching_a_running_run_and_kill_9_frees_it",
    "fix or remove that line": "test_faults.py::test_a_bad_line_inside_a_log_is_named_before_anything_is_written",
    "resume with the same number": "test_distributed.py::test_resume_of_a_two_process_run_is_bit_exact",
    "was written by {saved} process(es)": "test_distributed.py::test_resume_of_a_two_process_run_is_bit_exact",
    "torchrun{nodes} --nproc-per-node":
        "test_distributed.py::test_sigterm_to_torchrun_checkpoints_one_step_and_the_resume_is_bit_exact",
}
# advice no test here can run, and why
NOT_RUN_HERE = {
    "may avoid": "a suggestion, not a command: what drove a loss to NaN cannot be told from the run",
    "pass --device cuda": "a torchrun job on two GPUs (test_distributed.py's NCCL test, with CUDA only)",
}
ADVICE_WORDS = re.compile(r"continue (it )?with|start it again|remove the|choose another|wait for|put the same|needs "
                          r"another|fix or remove|evaluate a run's|resume with|may avoid|again to quit|stops at once|"
                          r"pass --|writes the rest|a resume may|once the disk|memory freed|resume_command\(|"
                          r"resume_verb\(\)|--resume \{")


def test_every_advice_a_message_gives_has_a_test_that_runs_it():
    """The run's files: every line of a message (a string, not a comment or a docstring's first line) with words
    that tell the user what to do names a phrase of ADVICE or NOT_RUN_HERE, and every test ADVICE names exists."""
    lines = [line.strip() for f in ("train.py", "training.py", "stopping.py", "evaluation.py", "checkpoints.py",
                                              "checks.py", "distributed.py")
             for line in (ROOT / f).read_text().splitlines()
             if '"' in line and not line.strip().startswith(("#", '"""')) and ADVICE_WORDS.search(line)]
    assert len(lines) >= len(ADVICE)
    for line in lines:
        assert any(phrase in line for phrase in [*ADVICE, *NOT_RUN_HERE]), f"advice no test runs: {line}"
    for phrase, test in ADVICE.items():
        file, name = test.split("::")
        assert any(phrase in line for line in lines), f"{phrase!r}: no message says it any more"
        assert f"def {name}(" in (ROOT / "tests" / file).read_text(), test
