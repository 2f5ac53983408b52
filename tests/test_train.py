"""train.py end to end on the CPU with tiny models: every (algo, task) through the real CLI entry point, exact
resume, a seeded learning test on a toy task, the fixed multiplication test set, and bad input."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
import model as M
import pretrained
import tokenizer
import checkpoints
import checks
import tasks
import settings
import train
import training

SMALL = ["--device", "cpu", "-G", "4", "--max-new-tokens", "12", "--eval-limit", "3", "--eval-every", "2",
         "--save-every", "2", "--lora-fraction", "0.5", "--alpha", "3", "--k", "6"]


def write_svamp(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rec = lambda i: {"ID": f"chal-{i}", "Body": f"Tom has {i} apples.", "Question": "How many apples does he have?",
                     "Equation": f"( {i}.0 )", "Answer": float(i), "Type": "Addition"}
    (d / "train.json").write_text(json.dumps([rec(i) for i in range(1, 8)]))
    (d / "test.json").write_text(json.dumps([rec(i) for i in range(8, 11)]))
    return d


def write_gsm8k(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 6), ("test", 3)):
        lines = [json.dumps({"question": f"What is {i} plus 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
                 for i in range(n)]
        (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.mark.parametrize("task", ["mult", "svamp", "gsm8k"])
@pytest.mark.parametrize("algo", ["grpo", "sgrpo", "tspmo"])
def test_each_algo_and_task_runs_end_to_end(tmp_path, tiny, algo, task):
    data = {"mult": [], "svamp": ["--data", str(write_svamp(tmp_path / "svamp"))],
            "gsm8k": ["--data", str(write_gsm8k(tmp_path / "gsm8k"))]}[task]
    run = tmp_path / "run"
    assert train.main(["--algo", algo, "--task", task, "--model", str(tiny), "--steps", "3", "--out", str(run),
                       *SMALL, *data]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["algo"] == algo and cfg["task"] == task and cfg["steps"] == 3 and cfg["group_size"] == 4
    metrics = checkpoints.read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert 0 <= m["reward_mean"] <= 1 and 1 <= m["len_mean"] <= 12 and m["peak_mem_gb"] > 0
        assert 0 <= m["nonzero_adv_token_fraction" if algo == "tspmo" else "loss_token_fraction"] <= 1
    if algo == "grpo":
        assert all(m["loss_token_fraction"] == 1.0 for m in metrics)  # every generated token is in the loss
    evals = checkpoints.read_jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 3] and all(e["n"] == 3 for e in evals)
    assert (run / "curves.svg").read_text().startswith("<svg")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert (run / "checkpoints" / "step-000003" / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def adapter_tensors(run: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


TIMING = ("seconds", "tokens_per_s", "peak_mem_gb")


@pytest.mark.parametrize("algo,extra", [("grpo", []), ("sgrpo", []), ("tspmo", []),
                                        ("tspmo", ["--lr", "3e-3", "--edge-advantage", "treerl"])],
                         ids=["grpo", "sgrpo", "tspmo", "tspmo-treerl"])
def test_resume_gives_the_same_run(tmp_path, algo, extra, monkeypatch):
    """4 steps straight, or 2 steps, stop, resume for 2 more: the same adapter weights and the same metrics.
    On the toy task (rewards vary, so the weights move and every step's samples differ), through the real CLI.
    T-SPMO with B2 (--edge-advantage treerl) resumes with B2, and its run is not E7's; at a tenth of the rate, so that
    its groups still vary after the resume (at 3e-2 the policy says 7 from step 2 on, and no later group updates)."""
    d = digit_model(tmp_path / "digits")
    for where in (training, checks):  # checks.check_inputs reads the task main trains on
        monkeypatch.setattr(where, "make_task", lambda name, tok, *a: SevenTask(tok))
    common = ["--algo", algo, "--model", str(d), "--device", "cpu", "-G", "6", "--max-new-tokens", "1",
              "--temperature", "1.0", "--lr", "3e-2", "--lora-fraction", "1", "--eval-every", "0", "--save-every", "2",
              "--alpha", "0", "--k", "1", *extra]
    train.main([*common, "--steps", "4", "--out", str(tmp_path / "a")])
    train.main([*common, "--steps", "2", "--out", str(tmp_path / "b")])
    train.main(["--resume", str(tmp_path / "b"), "--steps", "4"])
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if "lora_B" in k)  # the policy did move
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    ma, mb = checkpoints.read_jsonl(tmp_path / "a" / "metrics.jsonl"), checkpoints.read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert strip(ma) == strip(mb) and len(ma) == 4
    assert len({m["reward_mean"] for m in ma}) > 1 or len({m["loss"] for m in ma}) > 1
    if extra:  # the option reached the update, before and after the resume
        assert json.loads((tmp_path / "b" / "config.json").read_text())["edge_advantage"] == "treerl"
        train.main([*common[:-2], "--steps", "4", "--out", str(tmp_path / "local")])
        local = adapter_tensors(tmp_path / "local")
        assert any(not torch.equal(a[k], local[k]) for k in a)


def test_resume_continues_the_mult_data_stream(tmp_path, tiny, monkeypatch):
    """The training pairs after a resume are the ones an uninterrupted run would draw next."""
    seen = []
    real = training.Trainer.sample_group  # the example each step samples for (check_inputs builds other prompts too)
    monkeypatch.setattr(training.Trainer, "sample_group", lambda self, prompt, ex, *a: seen.append(ex) or
                        real(self, prompt, ex, *a))
    common = ["--algo", "sgrpo", "--task", "mult", "--model", str(tiny), *SMALL, "--eval-every", "0"]
    train.main([*common, "--steps", "4", "--eval-limit", "1", "--out", str(tmp_path / "a")])
    straight, seen[:] = list(seen), []
    train.main([*common, "--steps", "2", "--eval-limit", "1", "--out", str(tmp_path / "b")])
    train.main(["--resume", str(tmp_path / "b"), "--steps", "4"])
    assert seen == straight and len(straight) == 4 and len(set(straight)) == 4
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_drops_steps_logged_after_the_checkpoint(tmp_path, tiny):
    run = tmp_path / "r"
    train.main(["--task", "mult", "--algo", "grpo", "--model", str(tiny), *SMALL, "--steps", "2", "--out", str(run)])
    with open(run / "metrics.jsonl", "a") as f:  # a crash after step 3 was logged but before it was saved
        f.write(json.dumps({"step": 3, "reward_mean": 0.0}) + "\n")
    train.main(["--resume", str(run), "--steps", "3"])
    assert [m["step"] for m in checkpoints.read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert "len_mean" in checkpoints.read_jsonl(run / "metrics.jsonl")[-1]


# --- learning ------------------------------------------------------------------------------------------------------

def digit_model(path: Path) -> Path:
    """A 10-token model (tokens are the digits 0-9) with a word-level tokenizer. Weight std 0.2 makes the logits wide
    enough (|h|·|e| ≈ 8·1.6) for LoRA on q/v to move the answer distribution; with this seed π(7) ≈ 0.09 at start,
    about chance (0.1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    cfg = tiny_config(vocab_size=10, bos_token_id=None, eos_token_id=None)
    m = M.Qwen2ForCausalLM(cfg)
    m.init_weights(torch.Generator().manual_seed(4), std=0.2)
    pretrained.save_model(m, path)
    tk = Tokenizer(models.WordLevel({str(i): i for i in range(10)}, unk_token="0"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    tk.save(str(path / "tokenizer.json"))
    return path


class SevenTask(tasks.Task):
    """One answer token out of ten: reward 1 when the model's one-token answer is 7 (chance: 10% under a uniform
    policy)."""
    name = "seven"

    def prompt(self, ex):
        return "3 1 4 1 5 9 2 6"

    def reward(self, text, ex):
        return float(text.strip() == "7")

    def train_stream(self, rng):
        while True:
            yield None

    def test_set(self):
        return [None]


def learn_toy_task(tmp_path, cfg: settings.Settings) -> tuple[float, list[float], dict]:
    """Train on the toy task: π(7) at the start, each step's metrics, the final evaluation."""
    run = tmp_path / "run"
    run.mkdir()
    net, tok, _ = training.load_everything(cfg)
    with torch.no_grad():
        p7 = torch.softmax(net.logits(torch.tensor([tok.encode(SevenTask(tok).prompt(None))]))[0, -1], -1)[7]
    final = training.train(cfg, run, task=SevenTask(tok))
    return float(p7), checkpoints.read_jsonl(run / "metrics.jsonl"), final


@pytest.mark.parametrize("algo,G,steps", [("grpo", 8, 40), ("sgrpo", 8, 40), ("tspmo", 16, 40)])
def test_each_algorithm_learns_the_toy_task(tmp_path, algo, G, steps):
    d = digit_model(tmp_path / "digits")
    cfg = dataclasses.replace(settings.Settings(), algo=algo, task="seven", model=str(d), device="cpu", steps=steps,
                              group_size=G, max_new_tokens=1, temperature=1.0, lr=3e-2, lora_fraction=1.0,
                              lora_rank=4, alpha=1, k=1, eval_every=0, save_every=100, replay_success=1, seed=1)
    p7, metrics, final = learn_toy_task(tmp_path, cfg)
    rewards = [m["reward_mean"] for m in metrics]
    early, late = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"\n{algo}: π(7) at start {float(p7):.3f}; mean reward first 5 steps {early:.2f}, last 5 {late:.2f}")
    assert float(p7) < 0.25  # the base model rarely says 7
    assert late > 0.8 and final["accuracy"] == 1.0  # greedy answer is 7 at the end


# --- the multiplication data ---------------------------------------------------------------------------------------

def test_mult_test_set_is_fixed_and_disjoint_from_training():
    t1, t2 = tasks.Mult(None), tasks.Mult(None)
    assert t1.test_set() == t2.test_set() and len(t1.test_set()) == 3000 and len(set(t1.test_set())) == 3000
    assert all(101 <= a <= 999 and 101 <= b <= 999 for a, b in t1.test_set())
    test = set(t1.test_set())
    stream = t1.train_stream(random.Random(0))
    draws = [next(stream) for _ in range(20000)]
    assert not test & set(draws)
    # 3000 of 899² = 808,201 pairs: about 74 of 20,000 uniform draws would hit the test set without the exclusion
    assert len(set(draws)) > 19000


def test_svamp_split_files_and_seeded_split(tmp_path):
    tr, te, note = tasks.Svamp.load(str(write_svamp(tmp_path / "s")), seed=0)
    assert (len(tr), len(te)) == (7, 3) and "train/test files" in note
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "SVAMP.json").write_text((tmp_path / "s" / "train.json").read_text())
    tr, te, note = tasks.Svamp.load(str(tmp_path / "one" / "SVAMP.json"), seed=0)
    assert (len(tr), len(te)) == (5, 2) and "seeded split (seed 0)" in note


def test_real_svamp_and_gsm8k_files_load():
    from conftest import assets
    root = assets() / "data"
    tr, te, _ = tasks.Svamp.load(str(root / "svamp"), seed=0)
    assert (len(tr), len(te)) == (700, 300) and te[0]["ID"] == "chal-736"
    g = tasks.Gsm8k(None, str(root / "gsm8k"))
    assert (len(g.train), len(g.test)) == (7473, 1319) and g.test[0]["answer"] == "18"


# --- bad input ------------------------------------------------------------------------------------------------------

def run_main(args, capsys=None):
    with pytest.raises(SystemExit) as e:
        train.main(args)
    return str(e.value)


def refused(args, capsys) -> str:
    """stderr of train.main(args), which must refuse them with exit status 2 (a bad flag or a bad file handed in)."""
    capsys.readouterr()
    assert run_main(args) == "2"
    return capsys.readouterr().err


def test_unknown_task_or_algo(capsys):
    for args, word in ((["--task", "chess"], "chess"), (["--algo", "a2c"], "a2c")):
        with pytest.raises(SystemExit) as e:
            train.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "invalid choice" in err and f"'{word}'" in err


def test_missing_model_and_data(tmp_path, tiny, capsys):
    msg = refused(["--model", str(tmp_path / "nope" / "x"), "--out", str(tmp_path / "r1"), "--device", "cpu"], capsys)
    assert "error:" in msg and "nope" in msg
    msg = refused(["--task", "svamp", "--model", str(tiny), "--data", str(tmp_path / "none.json"),
                   "--out", str(tmp_path / "r2"), "--device", "cpu"], capsys)
    assert "none.json" in msg and "no SVAMP data" in msg


def test_malformed_records_are_named(tmp_path, tiny, capsys):
    d = write_svamp(tmp_path / "s")
    recs = json.loads((d / "train.json").read_text())
    del recs[4]["Answer"]
    (d / "train.json").write_text(json.dumps(recs))
    msg = refused(["--task", "svamp", "--model", str(tiny), "--data", str(d), "--out", str(tmp_path / "r"),
                   "--device", "cpu"], capsys)
    assert "train.json: record 4 (chal-5)" in msg
    g = write_gsm8k(tmp_path / "g")
    (g / "test.jsonl").write_text('{"question": "q", "answer": "no marker"}\n')
    msg = refused(["--task", "gsm8k", "--model", str(tiny), "--data", str(g), "--out", str(tmp_path / "r3"),
                   "--device", "cpu"], capsys)
    assert "test.jsonl: line 1 is not a GSM8K record" in msg


def test_resume_of_a_non_run_and_existing_run_kept(tmp_path, tiny, capsys):
    msg = refused(["--resume", str(tmp_path)], capsys)
    assert "not a tokrl run directory" in msg
    run = tmp_path / "r"
    train.main(["--task", "mult", "--algo", "grpo", "--model", str(tiny), *SMALL, "--steps", "1", "--out", str(run)])
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert run_main(["--task", "mult", "--model", str(tiny), *SMALL, "--steps", "1", "--out", str(run)]) == "2"
    assert "already holds a run" in capsys.readouterr().err and (run / "metrics.jsonl").read_text() == before
    import shutil
    shutil.rmtree(run / "checkpoints")
    msg = refused(["--resume", str(run)], capsys)  # nothing to resume, and a finished run is never started again
    assert "holds a finished run" in msg and "its checkpoints are gone" in msg


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, tiny, monkeypatch):
    run = tmp_path / "r"
    args = ["--task", "mult", "--algo", "grpo", "--model", str(tiny), *SMALL, "--out", str(run)]
    train.main([*args, "--steps", "2"])
    good = adapter_tensors(run / "checkpoints" / "step-000002")
    real = training.update

    def poisoned(*a, **k):
        st = real(*a, **k)
        st.loss = float("nan")
        return st

    monkeypatch.setattr(training, "update", poisoned)
    msg = run_main(["--resume", str(run), "--steps", "4"])
    assert "not finite" in msg and "step-000002" in msg
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000002"
    after = adapter_tensors(run / "checkpoints" / "step-000002")
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_eval_only_of_base_and_adapter(tmp_path, tiny, capsys):
    run = tmp_path / "r"
    train.main(["--task", "mult", "--algo", "grpo", "--model", str(tiny), *SMALL, "--steps", "1", "--out", str(run)])
    capsys.readouterr()
    train.main(["--task", "mult", "--model", str(tiny), "--eval-only", "--eval-limit", "2", "--max-new-tokens", "4",
                "--device", "cpu", "--adapter", str(run / "adapter"), "--out", str(tmp_path / "e")])
    assert "accuracy 0.0000 on 2 mult test examples (adapter" in capsys.readouterr().out
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["n"] == 2


def test_help_shows_the_paper_settings(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    assert "mult   tspmo  350" in out and "svamp  sgrpo  325" in out and "temperature 0.3" in out


def test_paper_defaults_resolve_per_algo_and_task():
    ns = train.build_parser().parse_args(["--algo", "sgrpo", "--task", "svamp"])
    cfg = train.resolve(ns)
    assert (cfg.steps, cfg.group_size, cfg.lora_fraction, cfg.lora_rank, cfg.alpha, cfg.k) == \
        (325, 8, 1 / 3, 16, 100, 100)
    cfg = train.resolve(train.build_parser().parse_args(["--algo", "tspmo", "--task", "mult", "--steps", "7"]))
    assert (cfg.steps, cfg.group_size, cfg.replay_success, cfg.replay_failure, cfg.lora_rank) == (7, 50, 1, 0, 8)


def test_logged_reward_is_the_E1_estimate(tmp_path, tiny, monkeypatch):
    """E1: J(θ) = E_{Y~π_θ}[r(Y)] is logged as the group's mean reward. A group with rewards [1, 0, 0, 1] logs
    mean 0.5 and (population) std 0.5; GRPO puts all 3 + 2 + 1 + 2 = 8 generated tokens in the loss."""
    fixed = ([[5, 6, 7], [5, 9], [8], [5, 6]], [1.0, 0.0, 0.0, 1.0])
    monkeypatch.setattr(training.Trainer, "sample_group", lambda self, prompt, ex, prefix=(): fixed)
    run = tmp_path / "r"
    train.main(["--task", "mult", "--algo", "grpo", "--model", str(tiny), *SMALL, "--steps", "1", "--out", str(run),
                "--eval-limit", "1"])
    m = checkpoints.read_jsonl(run / "metrics.jsonl")[0]
    assert (m["reward_mean"], m["reward_std"], m["zero_variance"]) == (0.5, 0.5, False)
    assert (m["len_mean"], m["len_max"], m["loss_token_fraction"], m["forwards"]) == (2.0, 3, 1.0, 4)


def test_svamp_stop_rule_reads_the_replay_prefix(tmp_path):
    """[decided] SVAMP stops at the first newline after the answer has begun; a replay's prefix counts as begun."""
    from conftest import write_byte_tokenizer
    write_byte_tokenizer(tmp_path / "tok.json")
    tok = tokenizer.Tokenizer(tmp_path / "tok.json")
    task = tasks.Svamp(tok, str(write_svamp(tmp_path / "s")), 0)
    enc = tok.encode
    assert not task.stop()(enc("\n"))  # a newline before any answer: keep going
    assert not task.stop()(enc(" 14"))  # no newline yet
    assert task.stop()(enc(" 145\n"))  # answer, then newline: stop
    assert task.stop(prefix=enc(" 14"))(enc("\n"))  # the answer began in the replayed prefix


def test_the_reward_curve_is_a_moving_mean_of_ten_steps():
    """curves.svg's and the miniature's training-reward curve (plot.moving_mean), by hand: the mean of each step's
    reward with the 9 before it, fewer at the start."""
    from plot import moving_mean
    assert moving_mean([1.0, 2.0, 3.0, 4.0], n=2) == [1.0, 1.5, 2.5, 3.5]
    rewards = [0.0] * 3 + [1.0] * 10  # 13 steps: step 10 averages 3 zeros and 7 ones, step 13 ten ones
    assert moving_mean(rewards)[9] == 0.7 and moving_mean(rewards)[12] == 1.0 and moving_mean(rewards)[0] == 0.0


def test_the_trainer_samples_and_evaluates_through_one_sampler_whose_runners_last_the_run(tmp_path, tiny,
                                                                                           monkeypatch):
    """With the fixed-shape decode chosen (as CUDA chooses its graph), the Trainer's Sampler makes the group's
    StepRunner at the first step and every later step reuses it (on CUDA: one capture a run, not one a step); the
    evaluation decodes through the same Sampler and frees its runners when it ends (its batch holds gigabytes)."""
    import evaluation
    import lora
    import sampling
    monkeypatch.setattr(sampling, "default_mode", lambda device: "static")
    cfg = settings.Settings(**{**settings.paper_defaults("grpo", "mult"), "device": "cpu", "group_size": 4,
                               "max_new_tokens": 6, "lora_fraction": 0.5, "model": str(tiny), "eval_limit": 2})
    net, tok, eos = training.load_everything(cfg)
    lora.apply_lora(net, cfg.lora_rank, cfg.lora_fraction, generator=torch.Generator().manual_seed(0))
    tr = training.Trainer(cfg, tmp_path, net, tok, tasks.make_task("mult", tok), eos)
    stream, seen = tasks.TrainStream(tr.task, 0), []
    for _ in range(2):
        tr.step = tr.train_step(stream)["step"]
        seen.append(list(tr.sampler.runners.values()))
    assert len(seen[0]) == 1 and seen[1] == seen[0]  # the same StepRunner object at both steps
    assert seen[0][0].cache.rows == cfg.group_size
    released, release = [], tr.sampler.release
    monkeypatch.setattr(tr.sampler, "release", lambda: released.append(dict(tr.sampler.runners)) or release())
    evaluation.evaluate(tr.net, tr.tok, tr.task, cfg, tr.eos, sampler=tr.sampler)
    assert len(released) == 1 and tr.sampler.runners == {}  # released once, at the evaluation's end
    rows = {r.cache.rows for r in released[0].values()}
    assert rows == {cfg.group_size, 2}  # the group's runner, and the evaluation's batch of eval_limit = 2 prompts
