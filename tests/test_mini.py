"""The paper in miniature (mini_base.py, mini.py, mini_report.py): the character tokenizer round-trips every trace,
the splits are disjoint, the SFT'd bases are deterministic and land in their stated bands, the base's numbers are
counted by hand, --tune chooses by validation accuracy and never evaluates the test set, the λ rule reads as written,
--quick runs both settings through training.train; and the library settings the miniature needed (a loaded model, the
evaluation length, LoRA targets, threads, T-SPMO's log π ablation)."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import evaluation
import lora
import mini
import mini_base
import mini_report
import mini_runs
import model as M
import pretrained
import sampling
import tokenizer
import tokrl
import settings
import train
import training
from conftest import ROOT, refused
from mini_base import MiniMult


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tokenizer.Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    mini_base.build_tokenizer(path)
    return tokenizer.Tokenizer(path)


def test_tokenizer_round_trips_every_trace_and_answer(tok):
    """All 8100 pairs: prompt + trace (both settings, slipped or not) and prompt + bare answer encode one token per
    character and decode back."""
    eos = tok.token_id(tokenizer.ENDOFTEXT)
    assert eos == mini_base.EOS_ID and pretrained.eos_ids(None, mini_base.mini_config(), tok) == (mini_base.EOS_ID,)
    for a in range(10, 100):
        for b in range(10, 100):
            for text in (f"{a}*{b}=" + mini_base.trace(a, b), f"{a}*{b}=" + mini_base.bare(a, b),
                         f"{a}*{b}= " + mini_base.steps_trace(a, b, (True, True, True))):
                ids = tok.encode(text)
                assert len(ids) == len(text) and max(ids) < len(mini_base.CHARS)
                assert tok.decode(ids) == text and tok.decode(ids + [eos]) == text  # EOS is skipped
    assert mini_base.trace(47, 86) == " 47*6=282 47*80=3760 282+3760=4042"
    longest = max((mini_base.steps_trace(a, b, (True, True, True)) for a in range(10, 100) for b in range(10, 100)),
                  key=len)
    assert len(longest) + 1 <= mini_base.MAX_NEW_TOKENS  # the longest (slipped) trace and its EOS fit


def test_slips_and_step_checks_by_hand():
    """The leading digit one too high, later steps computed from what was written: 47 × 86 with step 1 slipped
    writes 382 and adds it (382 + 3760 = 4142); steps 2 and 3 are then right, wrong as written."""
    assert [mini_base.slip(v) for v in (282, 9, 960, 0, 3760)] == [382, 10, 1060, 1, 4760]
    assert mini_base.steps_trace(47, 86, (True, False, False)) == "47*6=382 47*80=3760 382+3760=4142"
    assert mini_base.steps_trace(47, 86, (False, False, True)) == "47*6=282 47*80=3760 282+3760=5042"
    assert mini_base.steps_right("47*6=282 47*80=3760 282+3760=4042", 47, 86) == [True, True, True]
    assert mini_base.steps_right("47*6=382 47*80=3760 382+3760=4142", 47, 86) == [False, True, False]
    assert mini_base.steps_right("47*6=282 47*8", 47, 86) == [True, False, False]  # a missing step is wrong


def test_tasks_reward_the_last_integer_and_prefill_the_opener_in_the_steps_setting(tok):
    first, steps = MiniMult(tok, "first-token"), MiniMult(tok, "steps")
    assert first.prompt((47, 86)) == "47*86=" and steps.prompt((47, 86)) == "47*86= "
    assert first.reward(mini_base.trace(47, 86), (47, 86)) == 1.0 and first.reward("4042", (47, 86)) == 1.0
    assert steps.reward("47*6=382 47*80=3760 382+3760=4142", (47, 86)) == 0.0
    assert steps.eval_details("47*6=382 47*80=3760 382+3760=4142", (47, 86)) == \
        {"right_a*ones": 0.0, "right_a*tens": 1.0, "right_sum": 0.0}
    assert first.eval_details(" 47*6", (47, 86)) == {"trace_rate": 1.0}
    with pytest.raises(ValueError, match="setting"):
        MiniMult(tok, "words")


def test_validation_test_and_training_problems_are_disjoint(tok):
    """The two fixed splits (300 distinct pairs each) share nothing; RL's training stream and the steps base's SFT
    draw neither; the first-token base's SFT (the shipped base's, which sees the validation pairs) excludes the test
    set."""
    test, validation = set(mini_base.split("test")), set(mini_base.split("validation"))
    assert len(test) == len(validation) == 300 and not test & validation
    assert list(mini_base.split("test")) == MiniMult(tok).test_set()  # what the runs are scored on
    for setting in mini_base.SETTINGS:
        stream = MiniMult(tok, setting).train_stream(random.Random(0))
        drawn = {next(stream) for _ in range(100_000)}  # 7,500 pairs: each missed with probability e^-13
        assert len(drawn) == 8100 - 600 and not drawn & (test | validation)  # every other pair, none held out
    steps_sft = {p for p, _ in zip(mini_base.sft_pairs("steps", 0), range(100_000))}
    assert len(steps_sft) == 8100 - 600 and not steps_sft & (test | validation)
    first_sft = {p for p, _ in zip(mini_base.sft_pairs("first-token", 0), range(100_000))}
    assert len(first_sft) == 8100 - 300 and not first_sft & test  # it drew the validation pairs too (docs/mini.md)


def test_sft_batch_masks_the_prompt_and_padding(tok):
    """Row 1: "12*10=" then the bare "120" + EOS; the loss reads the 4 completion tokens, predicted at positions
    5..8 (the token at t + 1 is predicted at t); row 0 (a trace) is longer, so row 1 is padded."""
    ids, mask = mini_base.sft_batch(tok, mini_base.EOS_ID, [("12*10=", mini_base.trace(12, 10)), ("12*10=", "120")])
    assert tok.decode(ids[1].tolist()) == "12*10=120"
    assert mask[1].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1] + [0] * (ids.shape[1] - 10)


@pytest.mark.parametrize("setting,small", [("first-token", mini_base.SftSettings(cot_steps=3, mix_steps=2, batch=8)),
                                           ("steps", mini_base.StepsSftSettings(steps=4, batch=8))])
def test_sft_is_deterministic_from_its_seed(tok, setting, small):
    """Two SFTs with the same seed give identical weights; another seed does not."""
    nets = []
    for seed in (0, 0, 1):
        net = mini_base.build_model(seed)
        mini_base.sft(net, tok, setting, dataclasses.replace(small, seed=seed), log=lambda m: None)
        nets.append(net.state_dict())
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])
    assert not all(torch.equal(nets[0][k], nets[2][k]) for k in nets[0])


def test_the_steps_sft_slips_each_step_at_its_rate():
    """What the steps base is taught: each step slipped independently with probability `slip` (0.56)."""
    (stage,) = mini_base.stages("steps", mini_base.StepsSftSettings())
    pairs = mini_base.sft_pairs("steps", 0)
    right = [mini_base.steps_right(stage.write(*ab)[1], *ab) for ab in (next(pairs) for _ in range(20000))]
    for k in range(3):  # P(step k written right) = 0.44 for step 1 and 2; the sum is right only if all three are
        rate = sum(r[k] for r in right) / len(right)
        assert abs(rate - (0.44 if k < 2 else 0.44 ** 3)) < 0.015, (k, rate)


def test_run_settings_differ_only_where_the_paper_varies_them(tmp_path):
    cfgs = {m: mini_runs.run_settings(m, "steps", 0, tmp_path, 1e-3) for m in mini_runs.METHODS}
    differ = lambda a, b: {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}
    assert differ(cfgs["grpo"], cfgs["sgrpo"]) == {"algo"}  # α, k are set for both; only S-GRPO reads them
    assert differ(cfgs["grpo"], cfgs["tspmo-literal"]) >= {"algo", "group_size", "steps"}
    assert differ(cfgs["tspmo-literal"], cfgs["tspmo-decay"]) == {"lam"}
    assert (cfgs["tspmo-literal"].lam, cfgs["tspmo-decay"].lam) == (0.01, 0.0)  # whatever the CLI's default is
    assert cfgs["tspmo-decay"].lam == settings.Settings().lam == settings.paper_defaults("tspmo", "mult")["lam"]  # (b)
    assert differ(cfgs["tspmo-decay"], cfgs["tspmo-decay-noreplay"]) == {"replay_success"}  # C_failure is 0 in both
    assert (cfgs["tspmo-decay-noreplay"].replay_success, cfgs["tspmo-decay-noreplay"].replay_failure) == (0, 0)
    assert cfgs["tspmo-literal"].weight_decay == cfgs["tspmo-decay"].weight_decay == 0.01  # AdamW's, in both
    assert differ(cfgs["tspmo-literal"], cfgs["tspmo-literal-logpi"]) == {"tspmo_objective"}
    assert differ(cfgs["tspmo-decay"], cfgs["tspmo-decay-logpi"]) == {"tspmo_objective"}
    # PPO and DPO: GRPO's G, steps, lr and LoRA; everything else the CLI's defaults (SPEC-baselines.md)
    assert differ(cfgs["grpo"], cfgs["ppo"]) == differ(cfgs["grpo"], cfgs["dpo"]) == {"algo"}
    assert (cfgs["grpo"].steps, cfgs["tspmo-decay"].steps, cfgs["dpo"].steps) == (450, 350, 450)  # the paper's
    assert differ(cfgs["ppo"], cfgs["ppo-separate"]) == {"critic"}
    assert (cfgs["ppo"].critic, cfgs["ppo"].ppo_passes, cfgs["dpo"].dpo_beta) == ("shared", 4, 0.1)
    assert (cfgs["grpo"].group_size, cfgs["tspmo-literal"].group_size, cfgs["tspmo-literal"].replay_success) == \
        (8, 50, 1)
    assert cfgs["tspmo-literal"].replay_pool == "history"
    assert (cfgs["sgrpo"].alpha, cfgs["sgrpo"].k) == (7, 13)  # (50, 100) at 300 tokens, scaled to 40
    assert cfgs["grpo"].beta == 0.01 and cfgs["grpo"].temperature == 0.3
    assert {c.task for c in cfgs.values()} == {"mini-steps"} and {c.lr for c in cfgs.values()} == {1e-3}


# --- tuning ------------------------------------------------------------------------------------------------------

def test_choose_takes_the_best_validation_accuracy_and_the_smaller_rate_on_a_tie():
    assert mini_runs.choose({3e-4: 0.10, 1e-3: 0.30, 3e-3: 0.20}) == 1e-3
    assert mini_runs.choose({3e-4: 0.30, 1e-3: 0.30, 3e-3: 0.20}) == 3e-4
    assert mini_runs.choose({3e-3: 0.5, 1e-3: 0.5, 3e-4: 0.5}) == 3e-4


# The validation accuracy each tuning run reports, by (algo, lr): GRPO is best at the middle rate and T-SPMO at the
# largest, so that a tune that took the smallest (or any fixed) rate would choose wrongly for one of them.
TUNED_ACCURACY = {("grpo", 3e-4): 0.25, ("grpo", 1e-3): 0.75, ("grpo", 3e-3): 0.5,
                  ("tspmo", 3e-4): 0.0, ("tspmo", 1e-3): 0.25, ("tspmo", 3e-3): 0.5}


def test_tune_scores_the_validation_set_only_and_picks_by_it(tmp_path, monkeypatch, capsys):
    """--tune in this process with a few steps: every run is evaluated on the validation split (a test-split
    evaluation fails the test), and the chosen rate is the one with the best validation accuracy, as recorded. The
    tiny runs all score 0: each evaluation's accuracy is replaced by TUNED_ACCURACY's for its run, after the real
    evaluation of the validation split."""
    real, real_evaluate = MiniMult.test_set, evaluation.evaluate
    scored = []

    def no_test(self):
        if self.split_name == "test":
            pytest.fail("the test set was evaluated during --tune")
        scored.append(self.split_name)
        return real(self)

    def evaluate(net, tok, task, cfg, *a, **k):
        return {**real_evaluate(net, tok, task, cfg, *a, **k), "accuracy": TUNED_ACCURACY[cfg.algo, cfg.lr]}

    monkeypatch.setattr(MiniMult, "test_set", no_test)
    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    out = tmp_path / "m"
    assert mini.main(["--tune", "--out", str(out), "--steps", "2", "--methods", "grpo,tspmo-literal", "--eval-limit",
                      "4", "--parallel", "1"]) == 0
    table = json.loads((out / "tune" / "tuning.json").read_text())["table"]
    assert set(scored) == {"validation"} and len(scored) == 2 * 2 * 3 * 2  # settings × methods × rates × (start, end)
    for setting in mini_base.SETTINGS:
        for method in ("grpo", "tspmo-literal"):
            e = table[setting][method]
            accs = {float(k): v for k, v in e["validation"].items()}
            assert accs == {lr: TUNED_ACCURACY[method[:5], lr] for lr in mini_runs.LRS}
            assert e["lr"] == {"grpo": 1e-3, "tspmo-literal": 3e-3}[method]  # the best validation accuracy
            run = out / "tune" / "runs" / f"{setting}-{method}-lr{e['lr']:g}"
            assert json.loads((run / "eval.jsonl").read_text().splitlines()[-1])["accuracy"] == accs[e["lr"]]
    assert "| chosen |" in capsys.readouterr().out
    rates = mini.read_tuning(out / "tune" / "tuning.json")  # what python mini.py --tuning reads back
    assert rates["steps"]["grpo"]["lr"] == table["steps"]["grpo"]["lr"]


def test_the_shipped_tuning_table_covers_every_method_of_both_settings():
    """Every tuned method has its three rates and the choice the rule makes; every other method (the ablations)
    borrows the rate of the method it varies, and says so."""
    raw = mini.read_tuning(mini.TUNING)
    rates = mini.with_borrowed(raw)
    for setting in mini_base.SETTINGS:
        assert set(raw[setting]) == set(mini.TUNED_METHODS)
        for method in mini_runs.METHODS:
            e = rates[setting][method]
            if method in mini.TUNED_METHODS:
                assert set(e["validation"]) == set(mini_runs.LRS) and e["lr"] == mini_runs.choose(e["validation"])
                assert "as" not in e
            else:
                assert e["as"] == mini.TUNED_AS[method] and e["lr"] == raw[setting][e["as"]]["lr"]


def test_the_documented_tuning_table_is_the_shipped_one():
    """docs/mini.md's tuning table is what mini_report prints from data/mini-tuning.json (what --tune wrote), row for
    row; the shipped file records the command that wrote it."""
    shipped = json.loads(mini.TUNING.read_text())
    assert shipped["command"] == "python mini.py --tune"
    printed = mini_report.tuning_table(mini.read_tuning(mini.TUNING)).splitlines()
    assert len(printed) == 2 + len(mini_base.SETTINGS) * len(mini.TUNED_METHODS)
    doc = (ROOT / "docs" / "mini.md").read_text().splitlines()
    start = doc.index(printed[0])
    assert doc[start: start + len(printed)] == printed



RESULTS = mini_base.DATA / "mini-results.json"  # runs/mini/results.json of the `python mini.py` docs/mini.md reports


def test_docs_and_readme_results_are_what_the_shipped_results_give():
    """docs/mini.md's two results tables are what mini_report prints from data/mini-results.json (the runs' records
    that `python mini.py` wrote), the shipped bases and the shipped tuning, row for row; the README's headline table
    has the same mean ± std per method and setting, and the same base accuracies."""
    results = json.loads(RESULTS.read_text())
    rates = mini.with_borrowed(mini.read_tuning(mini.TUNING))
    doc = (ROOT / "docs" / "mini.md").read_text().splitlines()
    readme = [line.split("|")[1:-1] for line in (ROOT / "README.md").read_text().split(
        "## The paper in miniature", 1)[1].split("\n## ", 1)[0].splitlines() if line.startswith("| ")][1:]
    column = {"steps": 1, "first-token": 2}
    for setting, base in mini_base.SHIPPED.items():
        info = json.loads((base / "base.json").read_text())
        printed = mini_report.results_table(setting, info, results, rates).splitlines()
        start = doc.index(printed[2]) - 2  # the base row differs between the settings; the header does not
        assert doc[start: start + len(printed)] == printed, setting
        means = [row.split("|")[3].strip() for row in printed[2:]]  # base, then each method run, in LABELS' order
        assert [r[column[setting]].strip() for r in readme] == means, setting
        assert len({r["seed"] for r in results if r["setting"] == setting}) == 3

# --- the λ rule ------------------------------------------------------------------------------------------------------

def seeds(A_end: list[float], acc: list[float], A0=0.04, base=0.05) -> list[dict]:
    """Rows as the report makes them from each seed's first and last evaluation (eval.jsonl's fields)."""
    first = {"lora_A_mean_abs": A0, "lora_B_mean_abs": 0.0, "lora_BA_norm": 0.0, "accuracy": base}
    return [mini_report.reading_row(i, first, {**first, "lora_A_mean_abs": a, "accuracy": c})
            for i, (a, c) in enumerate(zip(A_end, acc))]


def test_a_seed_is_inert_below_a_tenth_of_its_a_within_two_points_and_kept_above_half():
    """The rule's thresholds on one seed each (start: mean |A| 0.04, base accuracy 15/300). Two points up, 21/300,
    is within two points, though 21/300 − 15/300 is 0.020000000000000004 in floats."""
    rows = seeds([0.0039, 0.0041, 0.0039, 0.0039, 0.0201, 0.0199], [15 / 300, 15 / 300, 21 / 300, 22 / 300, 0.5, 0.5],
                 base=15 / 300)
    assert [r["inert"] for r in rows] == [True, False, True, False, False, False]  # |A| < 0.004 and |Δacc| ≤ 0.02
    assert [r["kept"] for r in rows] == [False, False, False, False, True, False]  # |A| > 0.02


def test_the_lambda_rule_as_written():
    """(a) inert on ≥ 2 of 3 seeds in every setting, (b) keeps |A| above half on every seed: switch; else keep."""
    inert_a = seeds([0.001, 0.002, 0.03], [0.05, 0.06, 0.20])  # inert, inert, not (|A| at 75%)
    kept_b = seeds([0.04, 0.03, 0.05], [0.3, 0.2, 0.4])
    both = {"first-token": {"tspmo-literal": inert_a, "tspmo-decay": kept_b},
            "steps": {"tspmo-literal": inert_a, "tspmo-decay": kept_b}}
    assert mini_report.lam_rule(both, mini_base.SETTINGS)[0] == "decay"
    learns = seeds([0.001, 0.002, 0.001], [0.05, 0.20, 0.30])  # |A| collapsed, but accuracy moved on 2 seeds
    assert mini_report.lam_rule({**both, "steps": {"tspmo-literal": learns, "tspmo-decay": kept_b}},
                                mini_base.SETTINGS)[0] == "literal"
    shrunk_b = seeds([0.04, 0.019, 0.05], [0.3, 0.2, 0.4])  # (b) below half on one seed
    assert mini_report.lam_rule({**both, "first-token": {"tspmo-literal": inert_a, "tspmo-decay": shrunk_b}},
                                mini_base.SETTINGS)[0] == "literal"
    assert mini_report.lam_rule({"steps": both["steps"]}, mini_base.SETTINGS)[0] == "undecided"  # a setting missing


# --- the bases -------------------------------------------------------------------------------------------------------

def test_evaluate_first_token_counts_by_hand(tok, monkeypatch):
    """From four made-up greedy outputs: a right trace, a wrong bare answer, a right bare answer, a wrong bare answer
    (accuracy 2/4, a trace in 1/4, right in 1/1 of those, bare answers right in 1/3); made to start a trace (the
    prompt ends in a space), right on the first three (3/4)."""
    task = MiniMult(tok)
    data = task.test_set()[:4]
    plain = [mini_base.trace(*data[0]), "1", mini_base.bare(*data[2]), "2"]
    forced = [mini_base.trace(*data[0])[1:], mini_base.trace(*data[1])[1:], mini_base.trace(*data[2])[1:], "3"]

    def fake_greedy(net, prompts, n, eos):
        assert n == mini_base.MAX_NEW_TOKENS and eos == [mini_base.EOS_ID]
        texts = forced if tok.decode(prompts[0]).endswith(" ") else plain
        return [tok.encode(t) + [mini_base.EOS_ID] for t in texts]

    monkeypatch.setattr(sampling, "greedy", fake_greedy)
    ev = mini_base.evaluate_base(None, tok, "first-token", limit=4)
    assert ev == {"accuracy": 0.5, "trace_rate": 0.25, "trace_accuracy": 1.0, "bare_accuracy": 1 / 3,
                  "forced_trace_accuracy": 0.75, "n": 4}


def test_evaluate_steps_counts_by_hand(tok, monkeypatch):
    """Two problems, greedy: one right, one slipped at step 2. Samples (G = 4) for problem 1 (47 × 86): right, slipped
    at step 1, slipped at step 3, right; for problem 2: four step-1 slips (no success). Success 2/8; step 1 right
    3/8 (problem 1's three without a step-1 slip), step 2 right 8/8 (no sample slips there), step 3 right 2/8 (a
    step-1 slip carries into the sum); given the earlier steps right: 3/8, 3/3, 2/3; branch points: problem 1's two failures leave the successes at character 5 (step 1's
    leading digit) and 28 (the sum's leading digit, step 3); problem 2 has no success, so no branch point."""
    task = MiniMult(tok, "steps")
    (a1, b1), (a2, b2) = data = task.test_set()[:2]
    t = mini_base.steps_trace
    greedy = [t(a1, b1, (False,) * 3), t(a2, b2, (False, True, False))]
    groups = {data[0]: [t(a1, b1, (False,) * 3), t(a1, b1, (True, False, False)), t(a1, b1, (False, False, True)),
                        t(a1, b1, (False,) * 3)], data[1]: [t(a2, b2, (True, False, False))] * 4}
    monkeypatch.setattr(sampling, "greedy", lambda net, prompts, n, eos: [tok.encode(x) for x in greedy])

    def fake_sample(net, prompt, G, n, **kw):
        a, b = map(int, tok.decode(prompt).strip(" =").split("*"))
        return [tok.encode(x) for x in groups[a, b]]

    monkeypatch.setattr(sampling, "sample", fake_sample)
    ev = mini_base.evaluate_steps(None, tok, task, limit=2, group=4)
    assert ev["accuracy"] == 0.5 and ev["greedy_steps_right"] == [1.0, 0.5, 0.5]
    assert ev["sampled_success"] == 2 / 8 and ev["groups_with_a_success"] == 0.5
    assert ev["steps_right"] == [3 / 8, 8 / 8, 2 / 8]
    assert ev["steps_right_given_earlier"] == [3 / 8, 3 / 3, 2 / 3]
    first_slip_at = len(f"{a1}*{b1 % 10}=")  # the leading digit of step 1's result
    sum_at = len(t(a1, b1, (False,) * 3).rsplit("=", 1)[0]) + 1
    assert ev["branch_positions"] == [first_slip_at, sum_at] and ev["branch_steps"] == [0.5, 0.0, 0.5]


def test_the_shipped_bases_land_in_their_stated_bands_and_are_what_a_fresh_clone_uses(tmp_path):
    """data/mini-base/ and data/mini-base-steps/ (each built by build_base from seed 0), as their base.json records:
    the first-token base's greedy accuracy in its 3-15% band with the skill latent (made to start a trace, right at
    least half the time), measured again here on the 300 test problems; the steps base's greedy accuracy ≤ 10%
    (measured again on the 300), success sampled at 0.3 (G = 50) in 2-10%, each step's right digit sampled at least
    a fifth of the time given a right prefix, failures leaving the successes in every step (the sampled numbers are
    measured again on the first 20 problems: all 300 take minutes). A fresh output folder gets them by copy."""
    for setting, shipped in mini_base.SHIPPED.items():
        tok = tokenizer.Tokenizer(shipped / "tokenizer.json")
        net = pretrained.load_model(shipped)
        recorded = json.loads((shipped / "base.json").read_text())
        task = MiniMult(tok, setting)
        if setting == "first-token":
            ev, keys = mini_base.evaluate_base(net, tok, setting), ("accuracy", "trace_rate", "forced_trace_accuracy")
        else:
            ev = mini_base.quick_check(net, tok, setting)[f"check_{mini_base.CHECK_PROBLEMS}"]
            recorded_check = recorded[f"check_{mini_base.CHECK_PROBLEMS}"]
            for k in ("accuracy", "sampled_success", "steps_right", "steps_right_given_earlier", "branch_steps"):
                assert torch.allclose(torch.tensor(ev[k]), torch.tensor(recorded_check[k]), rtol=0, atol=0.01), k
            outs = sampling.greedy(net, [tok.encode(task.prompt(ex)) for ex in task.test_set()], mini_base.MAX_NEW_TOKENS,
                            eos=[mini_base.EOS_ID])
            ev = {"accuracy": sum(task.reward(tok.decode(o), ex) for o, ex in zip(outs, task.test_set())) / 300}
            keys = ("accuracy",)
        for k in keys:  # within 1 point: another CPU's float sums may flip a near-tie (a problem, a few samples)
            assert torch.allclose(torch.tensor(ev[k]), torch.tensor(recorded[k]), rtol=0, atol=0.01), k
        assert recorded["n"] == 300
        if setting == "first-token":
            assert 0.03 <= recorded["accuracy"] <= 0.15 and recorded["forced_trace_accuracy"] >= 0.5
        else:
            assert recorded["accuracy"] <= 0.10 and 0.02 <= recorded["sampled_success"] <= 0.10
            assert min(recorded["steps_right_given_earlier"]) >= 0.2 and min(recorded["branch_steps"]) > 0.05
        base = mini_base.build_base(tmp_path, setting, log=lambda m: None)
        assert (base / "model.safetensors").read_bytes() == (shipped / "model.safetensors").read_bytes()
    other = mini_base.build_base(tmp_path / "other", "first-token", mini_base.SftSettings(cot_steps=2, mix_steps=1,
                                                                                          batch=4),
                                 log=lambda m: None)  # other SFT settings: built here, not copied
    assert json.loads((other / "base.json").read_text())["sft"]["cot_steps"] == 2


@pytest.mark.skipif(os.environ.get("TOKRL_SLOW") != "1", reason="builds the full SFT bases: minutes on one thread; "
                    "run with TOKRL_SLOW=1")
@pytest.mark.parametrize("setting", mini_base.SETTINGS)
def test_the_full_base_lands_in_the_stated_band(tmp_path, setting):
    """The SFT'd base from seed 0, the default settings and one thread lands in its band (as above). Opt-in: too
    slow for the suite (see docs/mini.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = mini_base.build_base(tmp_path, setting, log=lambda m: None, shipped=False)
    finally:
        torch.set_num_threads(threads)
    info = json.loads((base / "base.json").read_text())
    assert info["n"] == 300
    if setting == "first-token":
        assert 0.03 <= info["accuracy"] <= 0.15 and info["forced_trace_accuracy"] >= 0.5
    else:
        assert info["accuracy"] <= 0.10 and 0.02 <= info["sampled_success"] <= 0.10


# --- the runs ---------------------------------------------------------------------------------------------------------

def test_quick_runs_both_settings_through_train_train_and_writes_the_report(tmp_path, monkeypatch, capsys):
    """--quick with a handful of steps, in this process: every run of both settings goes through training.train and
    the CLI's Trainer.train_step (counted), on the test split, at the shipped rates; results.md and the figures are
    written, and the steps setting's evaluations log each step's right rate."""
    calls = {"train": 0, "step": 0}
    real_train, real_step = training.train, training.Trainer.train_step

    def counting_train(*a, **k):
        calls["train"] += 1
        return real_train(*a, **k)

    def counting_step(self, stream):
        calls["step"] += 1
        return real_step(self, stream)

    monkeypatch.setattr(training, "train", counting_train)
    monkeypatch.setattr(training.Trainer, "train_step", counting_step)
    out = tmp_path / "mini"
    args = ["--quick", "--out", str(out), "--steps", "2", "--eval-limit", "4", "--parallel", "1"]
    assert mini.main(args) == 0
    n = 2 * len(mini.DEFAULT_METHODS)
    assert calls == {"train": n, "step": 2 * n}
    results = (out / "quick" / "results.md").read_text()
    assert "## The first-token setting" in results and "## The steps setting" in results and "| GRPO |" in results
    assert "| 4.4 |" in results and "T-SPMO, λ as weight decay (b)" in results and "the rule" in results
    for name in ("figure1-first-token.svg", "figure1-steps.svg", "steps-right.svg", "adapter-steps.svg"):
        assert (out / "quick" / name).read_text().startswith("<svg")
    rates = mini.read_tuning(mini.TUNING)
    run = out / "quick" / "runs" / "steps-tspmo-decay-seed0"
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["lam"], cfg["threads"], cfg["steps"], cfg["lr"]) == (0.0, 1, 2, rates["steps"]["tspmo-decay"]["lr"])
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    last = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert {"right_a*ones", "right_a*tens", "right_sum", "lora_A_mean_abs", "lora_BA_norm"} <= set(last)
    # the base directories are normal model directories: train.py --model reads them whole and refuses only the
    # paper's ChatML multiplication prompts (207 of its tokens) as longer than their 128 positions; they load
    code, err = refused(["--model", str(out / "base-steps"), "--eval-only", "--max-new-tokens", "4", "--device",
                         "cpu"], capsys)
    assert code == 2 and err.startswith("error: --max-new-tokens 4: the longest test prompt (207 tokens, mult) plus "
                                        "4 is 211, beyond the model's max_position_embeddings 128")
    assert pretrained.load_model(out / "base-steps").config.max_position_embeddings == 128
    mini.main([*args, "--methods", "grpo", "--settings", "steps"])  # a rerun reuses the cached base
    assert "base (steps): reusing" in capsys.readouterr().out


def test_a_parallel_run_lets_its_workers_exit_and_ends_with_its_results(tmp_path):
    """python mini.py with two worker processes: when the pool is torn down every worker has already exited on its
    own (exit code 0, not None: still running), and nothing follows the run's last line. A worker terminated instead
    (SIGTERM) skips its exit handlers, so the named semaphore tqdm's lock makes in it (spawn) stays registered, and
    multiprocessing's resource tracker prints "leaked semaphore" warnings after the results (whether a worker is
    still running at terminate() is certain; whether its semaphore is then reported depends on timing)."""
    script = textwrap.dedent(f"""
        import multiprocessing.pool, sys
        sys.path.insert(0, {str(ROOT)!r})
        import mini
        real = multiprocessing.pool.Pool.terminate
        def terminate(self):
            print("workers at teardown:", [p.exitcode for p in self._pool], file=sys.stderr, flush=True)
            real(self)
        multiprocessing.pool.Pool.terminate = terminate
        sys.exit(mini.main(sys.argv[1:]))
        """)
    args = ["--out", str(tmp_path / "m"), "--steps", "1", "--eval-limit", "2", "--settings", "steps", "--methods",
            "grpo", "--seeds", "2", "--parallel", "2"]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "workers at teardown: [0, 0]\n"  # no warning, no worker left to terminate
    assert proc.stdout.splitlines()[-1].startswith(f"wrote {tmp_path / 'm' / 'results.md'} and its figures in")


def mini_refused(argv: list[str], capsys) -> str:
    """mini.main(argv)'s one stderr line; it must exit with status 2 (a bad flag or file) before any work."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        mini.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, (e.value.code, err)
    return err.rstrip("\n")


def tuning_file(path: Path, change) -> Path:
    """A copy of the shipped tuning table, changed."""
    raw = json.loads(mini.TUNING.read_text())
    change(raw)
    path.write_text(json.dumps(raw))
    return path


def set_lr(value):
    return lambda raw: raw["table"]["steps"]["grpo"].update(lr=value)


@pytest.fixture
def no_work(monkeypatch):
    """Building or copying a base is an error here: every argument must be checked before it."""
    def refuse(*a, **k):
        raise AssertionError("the work started before the arguments were checked")
    monkeypatch.setattr(mini_base, "build_base", refuse)


def test_bad_mini_arguments_are_one_line_exit_2_before_any_work(tmp_path, capsys, no_work):
    """Before: an unknown method exited 1; `--methods ""` ran every method and a repeated one counted as more seeds; a
    malformed --tuning table was a traceback (KeyError, TypeError) and a rate of 1e9 was reported as used. Each is now
    one line naming the flag or the file's entry, exit status 2, and --out is not created."""
    out = tmp_path / "m"
    choose = f"choose from {','.join(mini_runs.METHODS)}"
    cases = [
        (["--methods", "grpo,reinforce"], f"--methods grpo,reinforce: unknown method 'reinforce'; {choose}"),
        (["--methods", ""], f"--methods '': an empty name; {choose}, separated by commas"),
        (["--methods", "grpo,,dpo"], f"--methods 'grpo,,dpo': an empty name; {choose}, separated by commas"),
        (["--methods", "grpo,dpo,grpo"], f"--methods grpo,dpo,grpo: 'grpo' named twice (more seeds: --seeds); "
                                         f"{choose}, each once"),
        (["--settings", "words"], "--settings words: unknown setting 'words'; choose from first-token,steps"),
        (["--settings", "steps,steps"], "--settings steps,steps: 'steps' named twice (more seeds: --seeds); choose "
                                        "from first-token,steps, each once"),
        (["--tuning", str(tmp_path / "none.json")], f"--tuning {tmp_path / 'none.json'}: cannot read the tuning table "
                                                    f"([Errno 2] No such file or directory: "
                                                    f"'{tmp_path / 'none.json'}')"),
    ]
    for i, (change, why) in enumerate([
            (lambda raw: raw.pop("table"), 'not a tuning table: expected {"table": {setting: {method: {"lr": rate, '
                                           '"validation": {rate: accuracy}}}}}, as python mini.py --tune writes it'),
            (lambda raw: raw["table"].update(steps=[1]), "table.steps is not an object of methods"),
            (lambda raw: raw["table"]["steps"]["grpo"].pop("lr"),
             'table.steps.grpo is not {"lr": rate, "validation": {rate: accuracy}}'),
            (set_lr(1e9), "table.steps.grpo.lr is 1000000000.0; AdamW would not move (<= 0) or diverge at once (> 1); "
                          "allowed: 0 < lr <= 1 (the paper: 1e-4)"),
            (set_lr("0.001"), "table.steps.grpo.lr is '0.001'; allowed: a number"),
            (set_lr(0), "table.steps.grpo.lr is 0; AdamW would not move (<= 0) or diverge at once (> 1); allowed: 0 < "
                        "lr <= 1 (the paper: 1e-4)"),
            (lambda raw: raw["table"]["steps"]["grpo"]["validation"].update({"-1": 0.5}),
             "table.steps.grpo.validation.-1 is -1.0; AdamW would not move (<= 0) or diverge at once (> 1); allowed: "
             "0 < lr <= 1 (the paper: 1e-4)"),
            (lambda raw: raw["table"]["steps"]["grpo"]["validation"].update({"fast": 0.5}),
             "table.steps.grpo.validation holds 'fast', which is not a learning rate"),
            (lambda raw: raw["table"]["steps"]["grpo"]["validation"].update({"0.001": 7}),
             "table.steps.grpo.validation.0.001 is 7; allowed: an accuracy in [0, 1]")]):
        t = tuning_file(tmp_path / f"t{i}.json", change)
        cases.append((["--tuning", str(t)], f"--tuning {t}: {why}"))
    (tmp_path / "partial.json").write_text(json.dumps({"table": {"steps": {}}}))
    cases.append((["--tuning", str(tmp_path / "partial.json"), "--settings", "steps"],
                  f"--tuning {tmp_path / 'partial.json'}: no learning rate for steps/grpo; run python mini.py --tune"))
    for argv, message in cases:
        assert mini_refused([*argv, "--out", str(out)], capsys) == f"error: {message}", argv
        assert not out.exists()
    with pytest.raises(SystemExit) as e:  # argparse's own
        mini.main(["--seeds", "0"])
    assert e.value.code == 2 and "--seeds" in capsys.readouterr().err


def test_an_out_that_cannot_be_written_is_one_line_exit_2(tmp_path, capsys, no_work):
    """Before: a traceback (FileExistsError, NotADirectoryError, PermissionError) after the argument checks. Now a
    file, a path through a file, or a directory this user cannot write (read-only by its mode; for root, which
    ignores modes, by the file system's immutable flag) is one line naming --out, exit status 2, before any work."""
    (tmp_path / "file").write_text("x")
    assert mini_refused(["--out", str(tmp_path / "file")], capsys) == (
        f"error: --out {tmp_path / 'file'}: is a file; allowed: a directory, new or one this user can write")
    assert mini_refused(["--out", str(tmp_path / "file" / "sub")], capsys) == (
        f"error: --out {tmp_path / 'file' / 'sub'}: cannot write there (Not a directory); allowed: a directory this "
        "user can write")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    immutable = os.access(ro, os.W_OK) and subprocess.run(["chattr", "+i", str(ro)]).returncode == 0
    try:
        assert not os.access(ro, os.W_OK), "the test could not make a directory read-only"
        err = mini_refused(["--out", str(ro)], capsys)
        assert err in (f"error: --out {ro}: cannot write there ({why}); allowed: a directory this user can write"
                       for why in ("Permission denied", "Operation not permitted"))
        assert list(ro.iterdir()) == []
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(ro)], check=True)
        ro.chmod(0o755)


def test_parallel_is_capped_at_the_runs_and_the_cores_with_a_note(tmp_path, capsys, monkeypatch):
    """Before: --parallel 64 for one run started 64 workers (16.8 GB, 40 times slower). The workers are at most the
    runs and the cores; a cap is said in a note on stderr; within both, no note."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    seen = []

    def run_all(jobs, parallel, log=None):
        seen.append((len(jobs), parallel))
        raise KeyboardInterrupt  # enough: what run_all was asked for

    monkeypatch.setattr(mini, "run_all", run_all)
    with pytest.raises(KeyboardInterrupt):
        mini.main(["--out", str(tmp_path / "m"), "--settings", "steps", "--methods", "grpo", "--seeds", "1",
                   "--parallel", "64"])
    assert seen == [(1, 1)]
    assert "note: --parallel 64: 1 run(s) on 4 core(s), so 1 at a time\n" in capsys.readouterr().err
    assert mini_runs.workers(64, 1) == 1 and mini_runs.workers(64, 10) == 4 and mini_runs.workers(3, 10) == 3
    assert capsys.readouterr().err == ("note: --parallel 64: 1 run(s) on 4 core(s), so 1 at a time\n"
                                       "note: --parallel 64: 10 run(s) on 4 core(s), so 4 at a time\n")


# --- the library settings the miniature needed ------------------------------------------------------------------------



def tiny_settings(tiny: Path, **kw) -> settings.Settings:
    return dataclasses.replace(settings.Settings(), **{
        "algo": "grpo", "task": "mult", "model": str(tiny), "device": "cpu", "steps": 1, "group_size": 2,
        "max_new_tokens": 6, "eval_limit": 2, "eval_every": 0, "save_every": 100, "lora_fraction": 0.5, **kw})


def test_the_new_flags_resolve_into_settings():
    ns = train.build_parser().parse_args(["--tspmo-objective", "logpi", "--lora-targets", "q_proj,o_proj",
                                          "--eval-max-new-tokens", "9", "--threads", "1"])
    cfg = train.resolve(ns)
    assert (cfg.tspmo_objective, cfg.lora_targets, cfg.eval_max_new_tokens, cfg.threads) == \
        ("logpi", "q_proj,o_proj", 9, 1)
    d = settings.Settings()
    assert (d.tspmo_objective, d.lora_targets, d.eval_max_new_tokens, d.threads) == ("pi", "q_proj,v_proj", None, None)


@pytest.mark.parametrize("args,word", [(["--lora-targets", "q_proj,mlp"], "error: --lora-targets q_proj,mlp: allowed"),
                                       (["--threads", "0"], "error: --threads 0: allowed"),
                                       (["--eval-max-new-tokens", "-3"], "error: --eval-max-new-tokens -3: allowed"),
                                       (["--tspmo-objective", "pi2"], "invalid choice: 'pi2'")])
def test_bad_new_flags_are_named(capsys, args, word):
    with pytest.raises(SystemExit) as e:
        train.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and args[0] in err and word in err


def test_train_uses_a_loaded_model_and_the_settings(tmp_path, tiny, monkeypatch):
    """training.train(..., loaded=) trains the given model without reading the disk; LoRA goes on cfg.lora_targets;
    the evaluation stops at eval_max_new_tokens, sampling at max_new_tokens; cfg.threads sets torch's threads."""
    cfg = tiny_settings(tiny, lora_targets="q_proj,o_proj", eval_max_new_tokens=2, threads=1)
    loaded = training.load_everything(cfg)
    monkeypatch.setattr(training, "load_everything", lambda cfg: pytest.fail("training.train read the model from disk"))
    seen = {}
    real_greedy, real_sample = sampling.greedy, sampling.sample
    monkeypatch.setattr(sampling, "greedy", lambda net, p, n, **k: seen.setdefault("greedy", n) and
                        real_greedy(net, p, n, **k))
    monkeypatch.setattr(sampling, "sample", lambda net, p, g, n, **k: seen.setdefault("sample", n) and
                        real_sample(net, p, g, n, **k))
    threads = torch.get_num_threads()
    try:
        training.train(cfg, tmp_path, loaded=loaded)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert seen == {"greedy": 2, "sample": 6}
    assert sorted({n.rsplit(".", 1)[1] for n, _ in lora.lora_modules(loaded[0])}) == ["o_proj", "q_proj"]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["o_proj", "q_proj"]
    # unset, evaluation uses max_new_tokens
    seen.clear()
    (tmp_path / "b").mkdir()
    training.train(tiny_settings(tiny), tmp_path / "b", loaded=_fresh(tiny))
    assert seen == {"greedy": 6, "sample": 6}


def _fresh(tiny: Path):
    net = pretrained.load_model(tiny)
    tok = tokenizer.Tokenizer(tiny / "tokenizer.json")
    return net, tok, pretrained.eos_ids(tiny, net.config, tok)


def test_tspmo_logpi_objective_against_brute_force(tiny):
    """objective="logpi": the gradient of −(1/|U|)·Σ log π(v|p)·A(v|p) from tspmo_backward equals the one from the
    brute-force E10 sum over raw token lists with log π in place of π, each log π from a full forward; and it is
    not the π objective's gradient."""
    torch.manual_seed(0)
    net = pretrained.load_model(tiny)
    lora.apply_lora(net, 4, 1.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in lora.lora_parameters(net):
            p.normal_(0, 0.1)
    prompt = [5, 6, 7]
    completions = [[1, 2, 3], [1, 2, 4], [1, 9], [8, 2]]
    rewards = [1.0, 0.0, 1.0, 0.0]

    def grads():
        return [p.grad.clone() for p in lora.lora_parameters(net)]

    net.zero_grad()
    tokrl.tspmo_backward(net, prompt, completions, rewards, lam=0.0, objective="logpi")
    fast = grads()
    net.zero_grad()
    logp = {}
    for y in completions:
        lp = M.token_logprobs(net, prompt + y, range(len(prompt), len(prompt) + len(y)))
        for t in range(len(y)):
            logp[(tuple(y[:t]), y[t])] = lp[t]
    (-tokrl.tspmo_objective_bruteforce(logp, completions, rewards)).backward()
    slow = grads()
    assert all(torch.allclose(f, s, atol=1e-6, rtol=1e-4) for f, s in zip(fast, slow))
    net.zero_grad()
    tokrl.tspmo_backward(net, prompt, completions, rewards, lam=0.0)  # π (E10)
    assert not all(torch.allclose(f, p, atol=1e-6, rtol=1e-4) for f, p in zip(fast, grads()))
    with pytest.raises(ValueError, match="objective"):
        tokrl.tspmo_backward(net, prompt, completions, rewards, lam=0.0, objective="log")




# --- beyond the paper (mini_beyond.py, python mini.py --beyond) -------------------------------------------------------

import mini_beyond  # noqa: E402


def test_the_edge_rule_adds_the_rate_beyond_the_edge_the_best_sits_at():
    """One half-decade of the 1, 3, 10 grid beyond the edge, by hand; inside the grid, none; the best is the grid's
    own (a rate outside it does not move the edge)."""
    nxt = mini_beyond.next_rate
    assert [nxt(3e-3, +1), nxt(3e-4, -1), nxt(3e-4, +1), nxt(3e-5, -1), nxt(1e-3, +1), nxt(1e-4, -1)] == \
        [1e-2, 1e-4, 1e-3, 1e-5, 3e-3, 3e-5]
    lora, full = mini_runs.LRS, mini_beyond.FULL_LRS
    assert full == (3e-5, 1e-4, 3e-4) and lora == (3e-4, 1e-3, 3e-3)
    edge = mini_beyond.edge_rate
    assert edge(lora, {3e-4: 0.1, 1e-3: 0.2, 3e-3: 0.3}) == 1e-2
    assert edge(lora, {3e-4: 0.3, 1e-3: 0.2, 3e-3: 0.1}) == 1e-4
    assert edge(lora, {3e-4: 0.1, 1e-3: 0.3, 3e-3: 0.2}) is None
    assert edge(lora, {3e-4: 0.2, 1e-3: 0.2, 3e-3: 0.2}) == 1e-4  # a tie goes to the smaller rate: an edge
    assert edge(full, {3e-5: 0.1, 1e-4: 0.2, 3e-4: 0.3}) == 1e-3
    assert edge(full, {3e-5: 0.3, 1e-4: 0.2, 3e-4: 0.1}) == 1e-5
    assert edge(lora, {3e-4: 0.1, 1e-3: 0.2, 3e-3: 0.3, 1e-4: 0.9}) == 1e-2  # the grid's best decides


def test_the_difference_rule_as_written():
    """Differ: means 10 points apart or more and the seeds separate; a lean: as far apart, seeds overlapping; closer
    (by any margin below 10 points, even with separate seeds): no difference found."""
    v = mini_beyond.verdict
    assert v([0.50, 0.52, 0.54], [0.40, 0.42, 0.44]) == "differ"  # exactly 10 points, k/300-style floats
    assert v([0.40, 0.42, 0.44], [0.50, 0.52, 0.54]) == "differ"  # either way round
    assert v([0.30, 0.60, 0.63], [0.35, 0.36, 0.37]) == "a lean"  # 15 points apart, 0.30 below 0.35
    assert v([0.50, 0.51, 0.52], [0.41, 0.42, 0.43]) == "no difference found"  # 9 points, seeds separate
    assert v([151 / 300, 156 / 300, 161 / 300], [121 / 300, 126 / 300, 131 / 300]) == "differ"  # 30/300 apart


def fake_tuning() -> dict:
    """The counterparts' shipped validation accuracies (data/mini-tuning.json's shape): GRPO inside its grid in both
    settings; T-SPMO (b) at its upper edge in the first-token setting, inside in the steps setting."""
    mid, top = {3e-4: 0.1, 1e-3: 0.3, 3e-3: 0.2}, {3e-4: 0.1, 1e-3: 0.2, 3e-3: 0.3}
    return {"first-token": {"grpo": {"validation": mid, "lr": 1e-3}, "tspmo-decay": {"validation": top, "lr": 3e-3}},
            "steps": {"grpo": {"validation": mid, "lr": 1e-3}, "tspmo-decay": {"validation": mid, "lr": 1e-3}}}


def result_of(job, accuracy: float) -> dict:
    return {"setting": job.setting, "method": job.method, "seed": job.seed, "split": job.split, "lr": job.cfg.lr,
            "accuracy": accuracy}


def test_the_beyond_plan_tunes_each_row_on_its_grid_with_the_edge_rule_then_runs_its_seeds(tmp_path):
    """The jobs --beyond makes: each new row's grid on the validation set (seed 0), the edge rule's one more rate
    where the best sits at an edge, then 3 test seeds at the best of all; a counterpart tuned from the shipped table
    (no run at its grid), its edge run where due, its test seeds again only when named, and at a re-tuned rate
    always. Each row's settings are its counterpart's with the one change."""
    bases = {s: tmp_path / s for s in mini_base.SETTINGS}
    plan = mini_beyond.Plan(tmp_path / "b", bases, ["tspmo-decay-entropy"], fake_tuning(), 3, 1.0, None, None)
    assert set(plan.rows) == {(s, r) for s in mini_base.SETTINGS for r in ("tspmo-decay-entropy", "tspmo-decay")}
    first = plan.start()
    key = lambda j: (j.setting, j.method, j.split, j.cfg.lr, j.seed)  # noqa: E731
    assert sorted(map(key, first)) == sorted(
        [(s, "tspmo-decay-entropy", "validation", lr, 0) for s in mini_base.SETTINGS for lr in mini_runs.LRS]
        + [("first-token", "tspmo-decay", "validation", 1e-2, 0)])  # the counterpart's edge run; steps: none due
    for j in first:
        counterpart = mini_runs.run_settings("tspmo-decay", j.setting, 0, bases[j.setting], j.cfg.lr)
        differ = {f.name for f in dataclasses.fields(j.cfg) if getattr(j.cfg, f.name) != getattr(counterpart, f.name)}
        assert differ == ({"out", "replay_cut"} if j.method == "tspmo-decay-entropy" else {"out"}), j
        assert j.cfg.replay_cut == ("entropy" if j.method == "tspmo-decay-entropy" else "uniform")
    # the first-token entropy row is best at 3e-3, an edge: one more run at 1e-2, and nothing else until it is in
    jobs = {key(j): j for j in first}
    after = [plan.after(result_of(jobs["first-token", "tspmo-decay-entropy", "validation", lr, 0], a))
             for lr, a in zip(mini_runs.LRS, (0.1, 0.2, 0.3))]
    assert after[:2] == [[], []] and [key(j) for j in after[2]] == [
        ("first-token", "tspmo-decay-entropy", "validation", 1e-2, 0)]
    tests = plan.after(result_of(after[2][0], 0.25))  # 1e-2 is worse: the best of four is 3e-3
    assert sorted(map(key, tests)) == [("first-token", "tspmo-decay-entropy", "test", 3e-3, s) for s in range(3)]
    assert {j.cfg.eval_every for j in tests} == {25} and {j.cfg.steps for j in tests} == {350}
    # the steps entropy row is best in the middle: no edge run, its seeds at once
    for lr, a in zip(mini_runs.LRS, (0.1, 0.3, 0.2)):
        tests = plan.after(result_of(jobs["steps", "tspmo-decay-entropy", "validation", lr, 0], a))
    assert sorted(map(key, tests)) == [("steps", "tspmo-decay-entropy", "test", 1e-3, s) for s in range(3)]
    # the counterpart's edge run wins: three seeds at the re-tuned rate; the shipped rate's stand (not named)
    tests = plan.after(result_of(jobs["first-token", "tspmo-decay", "validation", 1e-2, 0], 0.5))
    assert sorted(map(key, tests)) == [("first-token", "tspmo-decay", "test", 1e-2, s) for s in range(3)]
    table = plan.table()
    assert table["first-token"]["tspmo-decay"] == {"validation": {3e-4: 0.1, 1e-3: 0.2, 3e-3: 0.3, 1e-2: 0.5},
                                                   "lr": 1e-2, "grid": list(mini_runs.LRS), "edge": 1e-2, "shipped": 3e-3}
    assert table["steps"]["tspmo-decay"]["lr"] == 1e-3 and table["steps"]["tspmo-decay"]["edge"] is None
    # named, a counterpart's test seeds run again at its shipped rate (and at the re-tuned one)
    named = mini_beyond.Plan(tmp_path / "c", bases, ["tspmo-decay", "grpo"], fake_tuning(), 2, 1.0, None, None)
    ready = named.start()
    assert sorted(map(key, ready)) == sorted(
        [("first-token", "tspmo-decay", "validation", 1e-2, 0)]
        + [(s, m, "test", 1e-3, seed) for s in mini_base.SETTINGS for m in ("grpo", "tspmo-decay")
           for seed in range(2) if (s, m) != ("first-token", "tspmo-decay")])
    tests = named.after(result_of(ready[0] if ready[0].split == "validation" else
                                  next(j for j in ready if j.split == "validation"), 0.5))
    assert sorted(map(key, tests)) == [("first-token", "tspmo-decay", "test", lr, s) for lr in (3e-3, 1e-2)
                                       for s in range(2)]


BEYOND_RESULTS = mini_base.DATA / "mini-beyond-results.json"  # OUT/beyond/results.json of the run docs/mini.md reports
BEYOND_TUNING = mini_base.DATA / "mini-beyond-tuning.json"  # its OUT/beyond/tuning.json


def test_docs_beyond_tables_are_what_the_shipped_beyond_results_give():
    """docs/mini.md's beyond tables (per setting the rows and the rule's verdicts; the learning rates) are what
    mini_beyond prints from data/mini-beyond-results.json and data/mini-beyond-tuning.json (what python mini.py
    --beyond wrote) beside the shipped counterparts, row for row; every row there has 3 test seeds."""
    results = json.loads(BEYOND_RESULTS.read_text())
    raw = json.loads(BEYOND_TUNING.read_text())
    assert raw["command"].startswith("python mini.py --beyond")
    table = mini_beyond.read_table(raw)
    shown = mini_beyond.with_shipped(results, table, json.loads(RESULTS.read_text()))
    doc = (ROOT / "docs" / "mini.md").read_text().split("## Beyond the paper", 1)[1].splitlines()
    printed = [mini_beyond.tuning_table(table)]
    for setting in table:
        printed += [mini_beyond.results_table(setting, shown, table), mini_beyond.comparison_table(setting, shown,
                                                                                                    table)]
        for (row, lr, _), rs in mini_beyond.groups(shown, setting).items():
            assert sorted(r["seed"] for r in rs) == [0, 1, 2], (setting, row, lr)
    for text in printed:
        lines = text.splitlines()
        starts = [i for i in range(len(doc)) if doc[i: i + len(lines)] == lines]
        assert starts, lines[2] if len(lines) > 2 else lines


def test_beyond_quick_runs_its_plan_through_train_and_keeps_finished_runs(tmp_path, monkeypatch, capsys):
    """--beyond --quick with one step, one setting, one row, in this process: the row's grid on the validation set
    (all score 0 at one step: a tie, so the smallest rate, an edge, and 1e-4 added), one test seed at the best of
    the four, each through training.train with the row's one change; its files written; the counterpart tuned from
    the shipped table (inside its grid in this setting: no run). Run again, every run is kept, none trained; with a
    changed setting (--eval-limit) every run is trained again."""
    calls = []
    real_train = training.train
    monkeypatch.setattr(training, "train", lambda cfg, *a, **k: calls.append(cfg) or real_train(cfg, *a, **k))
    out = tmp_path / "m"
    args = ["--beyond", "--quick", "--out", str(out), "--steps", "1", "--eval-limit", "2", "--settings", "steps",
            "--methods", "tspmo-decay-treerl", "--parallel", "1"]
    assert mini.main(args) == 0
    assert [(c.lr, c.edge_advantage, c.replay_cut, c.algo, c.steps) for c in calls] == \
        [(lr, "treerl", "uniform", "tspmo", 1) for lr in (*mini_runs.LRS, 1e-4, 1e-4)]
    dest = out / "beyond" / "quick"
    results = json.loads((dest / "results.json").read_text())
    assert [(r["split"], r["lr"]) for r in results] == [("validation", lr) for lr in (*mini_runs.LRS, 1e-4)] + \
        [("test", 1e-4)]
    assert all(r["forwards"] == sum(m["forwards"] for m in checkpoints_rows(Path(r["run"]))) for r in results)
    table = mini_beyond.read_table(json.loads((dest / "tuning.json").read_text()))
    assert table["steps"]["tspmo-decay-treerl"]["edge"] == 1e-4 and table["steps"]["tspmo-decay-treerl"]["lr"] == 1e-4
    assert table["steps"]["tspmo-decay"]["lr"] == 1e-3 and table["steps"]["tspmo-decay"]["edge"] is None
    text = (dest / "results.md").read_text()
    assert "| T-SPMO (b), TreeRL's advantage | 0.0001 |" in text and "shipped" not in text.split("## Learning")[0]
    calls.clear()
    assert mini.main(args) == 0 and calls == []
    assert capsys.readouterr().out.count("(kept)") == 5
    assert mini.main([*args[:-2], "--eval-limit", "3", "--parallel", "1"]) == 0 and len(calls) == 5


def checkpoints_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_bad_beyond_arguments_are_one_line_exit_2_before_any_work(tmp_path, capsys, no_work):
    out = tmp_path / "m"
    rows = ",".join(mini_beyond.ROWS)
    for argv, message in [
            (["--beyond", "--tune"], "--tune --beyond: --beyond tunes its own rows; choose one"),
            (["--beyond", "--methods", "sgrpo"], f"--methods sgrpo: unknown method 'sgrpo'; choose from {rows}"),
            (["--beyond", "--tuning", str(tuning_file(tmp_path / "t.json",
                                                      lambda raw: raw["table"]["steps"].pop("tspmo-decay")))],
             f"--tuning {tmp_path / 't.json'}: no learning rate for steps/tspmo-decay; run python mini.py --tune")]:
        assert mini_refused([*argv, "--out", str(out)], capsys) == f"error: {message}", argv
        assert not out.exists()


def test_the_full_fine_tuning_rows_ask_for_train_full_on_a_tenth_of_the_grid():
    """Each full-fine-tuning row is its counterpart with train = "full" and nothing else, tuned on 3e-5, 1e-4,
    3e-4 (a tenth of LoRA's grid); the other rows on LoRA's grid."""
    assert {r: mini_beyond.BEYOND[r] for r in ("grpo-full", "tspmo-decay-full")} == {
        "grpo-full": ("grpo", {"train": "full"}), "tspmo-decay-full": ("tspmo-decay", {"train": "full"})}
    assert [mini_beyond.grid(r) for r in mini_beyond.ROWS] == [
        {"grpo-full": (3e-5, 1e-4, 3e-4), "tspmo-decay-full": (3e-5, 1e-4, 3e-4)}.get(r, (3e-4, 1e-3, 3e-3))
        for r in mini_beyond.ROWS]
    assert [mini_beyond.counterpart(r) for r in mini_beyond.ROWS] == [
        "tspmo-decay", "tspmo-decay", "tspmo-decay", "grpo", "tspmo-decay", "grpo"]


def test_a_full_fine_tuning_row_runs_its_counterpart_with_train_full_and_trains_every_weight(tmp_path):
    """The plan's jobs for GRPO full: its three full rates, each the counterpart's settings with train = "full" and
    nothing else; one step of one of them through mini_runs.run_job changes every weight matrix of the model (not an
    adapter) and writes the trained model."""
    bases = {"steps": mini_base.SHIPPED["steps"]}
    plan = mini_beyond.Plan(tmp_path / "b", bases, ["grpo-full"], fake_tuning(), 3, 1.0, None, None)
    jobs = [j for j in plan.start() if j.method == "grpo-full"]
    assert sorted(j.cfg.lr for j in jobs) == [3e-5, 1e-4, 3e-4] and {j.split for j in jobs} == {"validation"}
    for j in jobs:
        counterpart = mini_runs.run_settings("grpo", "steps", 0, bases["steps"], j.cfg.lr)
        differ = {f.name for f in dataclasses.fields(j.cfg) if getattr(j.cfg, f.name) != getattr(counterpart, f.name)}
        assert differ == {"out", "train"} and j.cfg.train == "full"
    job = dataclasses.replace(jobs[-1], cfg=dataclasses.replace(jobs[-1].cfg, steps=1, eval_limit=2))
    before = pretrained.load_model(bases["steps"]).state_dict()
    result = mini_runs.run_job(job)
    assert result["method"] == "grpo-full" and result["lr"] == 3e-4
    after = pretrained.load_model(Path(job.cfg.out) / "model").state_dict()
    matrices = [k for k, v in before.items() if v.dim() == 2]
    assert matrices and all(not torch.equal(before[k], after[k]) for k in matrices)
