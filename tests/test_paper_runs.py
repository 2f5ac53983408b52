"""The paper's runs as a user starts them: the shipped SVAMP split (and GSM8K's: no task needs the network),
--reward per task, T-SPMO's logs of fresh and replay groups, --accum with replay, and E1 read off Trainer.train_step.
CPU, tiny models."""
from __future__ import annotations

import errno
import hashlib
import json
import socket
from pathlib import Path

import pytest
import torch

from conftest import assets, make_checkpoint, tiny_config
import checkpoints
import lora
import pretrained
import sampling
import tokenizer
import tasks
import runlog
import settings
import train
import training

SMALL = ["--device", "cpu", "-G", "4", "--max-new-tokens", "12", "--eval-limit", "2", "--eval-every", "0",
         "--save-every", "100", "--lora-fraction", "0.5"]


def byte_tok(tiny: Path) -> tokenizer.Tokenizer:
    return tokenizer.Tokenizer(tiny / "tokenizer.json")


# --- the paper's SVAMP split ships with the project -------------------------------------------------------------------

def test_default_svamp_data_is_the_shipped_700_300_split():
    train_set, test_set, note = tasks.Svamp.load(None)
    assert (len(train_set), len(test_set)) == (700, 300) and "data/svamp" in note
    assert not {r["ID"] for r in train_set} & {r["ID"] for r in test_set}
    assert [r["ID"] for r in test_set[:3]] == ["chal-736", "chal-162", "chal-349"]  # ChilleD/SVAMP's test order
    digest = hashlib.sha256((tasks.Svamp.SHIPPED / "test.json").read_bytes()).hexdigest()
    assert digest == "da1467a8ac0d40fba41c334ad25228a13097153f8d5065160e8d13b97329ac1c"
    assert (tasks.Svamp.SHIPPED / "LICENSE").read_text().startswith("MIT License")


def test_shipped_svamp_files_are_the_shared_ones():
    shared = assets() / "data" / "svamp"
    for f in ("train.json", "test.json", "LICENSE"):
        assert (tasks.Svamp.SHIPPED / f).read_bytes() == (shared / f).read_bytes()


def test_svamp_eval_only_scores_the_paper_s_300_problems_for_every_seed(tmp_path, tiny, capsys):
    """A newcomer's `python train.py --task svamp --eval-only --model DIR`: no --data, no network; the same 300
    problems whatever --seed (before: a download, then a seeded 70/30 split that changed with the seed)."""
    seen = []
    real = tasks.Svamp.reward  # each evaluated problem is scored once (check_inputs builds the prompts too)
    for seed in ("0", "5"):
        seen.append([])
        tasks.Svamp.reward = lambda self, text, ex, box=seen[-1]: box.append(ex["ID"]) or real(self, text, ex)
        try:
            assert train.main(["--task", "svamp", "--eval-only", "--model", str(tiny), "--device", "cpu", "--seed",
                               seed, "--max-new-tokens", "1", "--eval-batch", "100",
                               "--out", str(tmp_path / seed)]) == 0
        finally:
            tasks.Svamp.reward = real
        assert json.loads((tmp_path / seed / "eval.json").read_text())["n"] == 300
    assert seen[0] == seen[1] == [r["ID"] for r in json.loads((tasks.Svamp.SHIPPED / "test.json").read_text())]
    assert "on 300 svamp test examples" in capsys.readouterr().out


# The split of the first 20 shipped training records by the documented rule, written out so that the expectation
# comes from the rule and not from the code under test: random.Random(0).shuffle of the indices 0..19 gives
# [10, 18, 16, 14, 0, 17, 11, 2, 3, 9, 5, 7, 4, 19, 6, 15, 8, 1, 13, 12]; the first round(0.7 × 20) = 14 train, in
# that order, and the last 6 are the test set.
LONE_TEST_IDS = ["chal-86", "chal-502", "chal-355", "chal-508", "chal-616", "chal-419"]


def test_a_lone_svamp_json_is_split_the_same_way_for_every_run(tmp_path, tiny):
    records = json.loads((tasks.Svamp.SHIPPED / "train.json").read_text())[:20]
    (tmp_path / "SVAMP.json").write_text(json.dumps(records))
    train_set, test_set, note = tasks.Svamp.load(str(tmp_path / "SVAMP.json"))
    assert [r["ID"] for r in test_set] == LONE_TEST_IDS and "not the paper's split" in note
    assert sorted(r["ID"] for r in train_set + test_set) == sorted(r["ID"] for r in records)  # a partition
    for seed in ("0", "1"):  # what a run evaluates, whatever its --seed
        train.main(["--task", "svamp", "--model", str(tiny), "--data", str(tmp_path / "SVAMP.json"), "--eval-only",
                    "--seed", seed, "--device", "cpu", "--max-new-tokens", "1", "--out", str(tmp_path / seed)])
        examples = json.loads((tmp_path / seed / "eval.json").read_text())["examples"]
        assert [e["example"]["ID"] for e in examples] == LONE_TEST_IDS[:3]


# --- GSM8K ships the same way, and no task touches the network --------------------------------------------------------

GSM8K_SHA256 = {"test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
                "train.jsonl": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"}


def test_default_gsm8k_data_is_the_shipped_7473_1319_files():
    g = tasks.Gsm8k(None, None)
    assert (len(g.train), len(g.test)) == (7473, 1319) and g.test[0]["answer"] == "18"
    for name, digest in GSM8K_SHA256.items():  # openai/grade-school-math's files, byte for byte
        assert hashlib.sha256((tasks.Gsm8k.SHIPPED / name).read_bytes()).hexdigest() == digest
    licence = (tasks.Gsm8k.SHIPPED / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "Copyright (c) 2021 OpenAI" in licence


def test_shipped_gsm8k_files_are_the_shared_ones():
    shared = assets() / "data" / "gsm8k"
    for f in ("train.jsonl", "test.jsonl", "LICENSE"):
        assert (tasks.Gsm8k.SHIPPED / f).read_bytes() == (shared / f).read_bytes()


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """A machine without network and with nothing cached: every socket connection fails, HF_HUB_OFFLINE is set, and
    HOME and TOKRL_CACHE (where a download used to go) are empty. Returns that home."""
    def unreachable(*a, **k):
        raise OSError(errno.ENETUNREACH, "Network is unreachable (cut by the test)")
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    home = tmp_path / "home"
    home.mkdir()
    for var, value in (("HOME", home), ("TOKRL_CACHE", home / "cache"), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(var, str(value))
    return home


def test_gsm8k_eval_only_scores_the_shipped_1319_problems_offline(tmp_path, offline, monkeypatch):
    """`python train.py --task gsm8k --eval-only` with no network and no --data: the 1,319 shipped test problems,
    each scored once, in the file's order (before: a download into ~/.cache/tokrl, which fails here). A one-layer
    model on the byte tokenizer keeps it to seconds."""
    model = make_checkpoint(tmp_path / "m", tiny_config(num_hidden_layers=1, num_attention_heads=1,
                                                        num_key_value_heads=1, hidden_size=32, intermediate_size=32))
    scored, real = [], tasks.Gsm8k.reward
    monkeypatch.setattr(tasks.Gsm8k, "reward", lambda self, text, ex: scored.append(ex["question"]) or
                        real(self, text, ex))
    assert train.main(["--task", "gsm8k", "--eval-only", "--model", str(model), "--device", "cpu", "--threads", "1",
                       "--max-new-tokens", "1", "--eval-batch", "16", "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["n"] == 1319
    shipped = (tasks.Gsm8k.SHIPPED / "test.jsonl").read_text().splitlines()
    assert scored == [json.loads(line)["question"] for line in shipped]
    assert list(offline.rglob("*")) == []  # nothing downloaded, nothing cached


# --- --reward per task ------------------------------------------------------------------------------------------------

def fixed_text_sampler(tok, text):
    ids = tok.encode(text)
    return lambda net, prompt, G, *a, **k: [list(ids) for _ in range(G)]


@pytest.mark.parametrize("reward,train_reward", [(None, 0.0), ("exact", 0.0), ("partial", 0.5)])
def test_mult_reward_partial_trains_on_S2_and_evaluates_on_exact_match(tmp_path, tiny, monkeypatch, reward,
                                                                       train_reward):
    """123 × 456: the completion "738 then 6150, so 999" holds 2 of the 4 long-multiplication steps (S2 = 0.5) and
    ends with the wrong integer (P1 = 0). Training logs the chosen reward; the test accuracy stays exact match."""
    tok = byte_tok(tiny)
    text = "738 then 6150, so 999"
    monkeypatch.setattr(tasks.Mult, "train_stream", lambda self, rng: iter(lambda: (123, 456), None))
    monkeypatch.setattr(tasks.Mult, "test_set", lambda self: [(123, 456)])
    monkeypatch.setattr(sampling, "sample", fixed_text_sampler(tok, text))
    monkeypatch.setattr(sampling, "greedy", lambda net, prompts, *a, **k: [tok.encode(text) for _ in prompts])
    run = tmp_path / "r"
    argv = ["--task", "mult", "--algo", "grpo", "--model", str(tiny), *SMALL, "--steps", "1", "--out", str(run)]
    assert train.main(argv + ([] if reward is None else ["--reward", reward])) == 0
    assert json.loads((run / "config.json").read_text())["reward"] == (reward or "exact")  # recorded
    assert checkpoints.read_jsonl(run / "metrics.jsonl")[0]["reward_mean"] == train_reward
    evals = checkpoints.read_jsonl(run / "eval.jsonl")
    assert [e["accuracy"] for e in evals] == [0.0, 0.0]
    assert [e["partial_credit"] for e in evals] == [0.5, 0.5]  # S2 logged beside the accuracy, whatever --reward


@pytest.mark.parametrize("task,reward,choices", [("svamp", "partial", "exact"), ("svamp", "sympy", "exact"),
                                                 ("gsm8k", "exact", "sympy"), ("mult", "sympy", "exact or partial")])
def test_a_reward_that_does_not_fit_the_task_is_refused_before_loading(tmp_path, task, reward, choices, capsys):
    with pytest.raises(SystemExit) as e:  # the model does not exist: the reward is checked first
        train.main(["--task", task, "--reward", reward, "--model", str(tmp_path / "no-model")])
    assert e.value.code == 2  # a bad setting: argparse's convention
    assert capsys.readouterr().err == (f"error: --reward {reward}: a training reward this task has; allowed: mult "
                                       "exact or partial (S2), svamp exact, gsm8k sympy (S1)\n")
    with pytest.raises(ValueError, match=f"--reward {reward} does not fit --task {task}: choose {choices}"):
        tasks.check_reward(task, reward)  # the library's own check says the same


def test_gsm8k_defaults_to_the_sympy_reward():
    cfg = train.resolve(train.build_parser().parse_args(["--task", "gsm8k"]))
    assert cfg.reward == "sympy" and tasks.check_reward("gsm8k", None) == "sympy"


# --- E1: what one step logs, fresh and replay groups alike ------------------------------------------------------------

FRESH = ([[5, 6, 7], [5, 9], [8], [5, 6]], [1.0, 0.0, 0.0, 1.0])
REPLAY = ([[1, 2], [1, 3], [4]], [1.0, 0.0, 0.0])


def trainer(tiny, tmp_path, **kw) -> training.Trainer:
    cfg = settings.Settings(**{**settings.paper_defaults(kw.get("algo", "tspmo"), "mult"), "device": "cpu",
                            "group_size": 4, "max_new_tokens": 12, "lora_fraction": 0.5, "model": str(tiny), **kw})
    net, tok, eos = training.load_everything(cfg)
    lora.apply_lora(net, cfg.lora_rank, cfg.lora_fraction, generator=torch.Generator().manual_seed(0))
    return training.Trainer(cfg, tmp_path, net, tok, tasks.make_task("mult", tok), eos)


def test_train_step_logs_the_E1_estimate(tiny, tmp_path, monkeypatch):
    """E1: J(θ) = E_{Y~π_θ}[r(Y)] is estimated by the group's mean reward: [1, 0, 0, 1] -> 0.5, σ 0.5."""
    monkeypatch.setattr(training.Trainer, "sample_group", lambda self, prompt, ex, prefix=(): FRESH)
    tr = trainer(tiny, tmp_path, algo="grpo")
    m = tr.train_step(tasks.TrainStream(tr.task, 2))
    assert (m["reward_mean"], m["reward_std"], m["len_mean"], m["forwards"]) == (0.5, 0.5, 2.0, 4)
    assert m["loss_token_fraction"] == 1.0 and "nonzero_adv_token_fraction" not in m


def test_tspmo_step_logs_replay_groups_and_both_loss_terms(tiny, tmp_path, monkeypatch):
    """Fresh group (by hand): 5 edges; tokens with A ≠ 0: [5, 6, 7] 2, [5, 9] 2, [8] 1, [5, 6] 2 = 7 of 8. Replay
    group (rewards [1, 0, 0]): 4 edges, every one of its 5 tokens has A ≠ 0. Both count in forwards, edges, loss
    and the token fraction; each has its own policy and λ terms and gradient norms."""
    calls = []

    def fake(self, prompt, ex, prefix=()):
        calls.append(prefix)
        return FRESH if len(calls) == 1 else REPLAY  # the fresh group, then the replay's continuations

    monkeypatch.setattr(training.Trainer, "sample_group", fake)
    tr = trainer(tiny, tmp_path, replay_success=1, lam=0.01)  # E10's λ·Σ‖W‖² in the loss: logged per group
    m = tr.train_step(tasks.TrainStream(tr.task, 2))
    fresh, replay = m["groups"]
    assert (fresh["kind"], replay["kind"]) == ("fresh", "replay") and len(m["replays"]) == len(calls) - 1 == 1
    assert (fresh["edges"], replay["edges"], m["edges"]) == (5, 4, 9)
    assert (fresh["nonzero_adv_tokens"], replay["nonzero_adv_tokens"]) == (7, 5)
    assert m["nonzero_adv_token_fraction"] == 12 / 13 and "loss_token_fraction" not in m
    assert m["forwards"] == fresh["forwards"] + replay["forwards"] and replay["forwards"] >= 1
    for g in (fresh, replay):
        assert g["l2_loss"] > 0 and g["l2_grad_norm"] > 0 and g["policy_grad_norm"] > 0
    assert m["loss"] == pytest.approx(sum(g["policy_loss"] + g["l2_loss"] for g in m["groups"]), rel=1e-12)
    assert m["l2_loss"] == pytest.approx(fresh["l2_loss"] + replay["l2_loss"], rel=1e-12)
    mean_A, mean_B = lora.mean_abs(tr.net)
    assert (m["lora_A_mean_abs"], m["lora_B_mean_abs"]) == (mean_A, mean_B) and mean_B > 0
    line = runlog.progress_line(m, 10, 0.0, 0)
    assert "policy" in line and "λ" in line and "A≠0 92.3%" in line


@pytest.mark.parametrize("lam", [None, 0.01])
def test_tspmo_default_has_no_lambda_term_and_lam_adds_the_literal_one(tiny, tmp_path, monkeypatch, lam):
    """E10's λ, as SPEC.md decides: `train.py --algo tspmo` records lam 0 and logs an l2_loss of 0 (λ is AdamW's weight
    decay 0.01); `--lam 0.01` logs λ·Σ‖W‖² of the adapter at the step. The adapter is made known: every A entry 0.5,
    every B entry 0.25; LoRA rank 8 on q_proj (64 → 64) and v_proj (64 → 32, 2 KV heads of 16) of the last 2 of 4
    layers: per layer ‖A_q‖² + ‖A_v‖² = 2·(8·64)·0.25 = 256, ‖B_q‖² + ‖B_v‖² = (64·8 + 32·8)·0.0625 = 48, so
    Σ‖W‖² = 2·304 = 608 and λ·Σ‖W‖² = 6.08."""
    real_apply = lora.apply_lora

    def known_adapter(net, *a, **k):
        layers = real_apply(net, *a, **k)
        with torch.no_grad():
            for _, mod in lora.lora_modules(net):
                mod.lora_A.fill_(0.5), mod.lora_B.fill_(0.25)
        return layers

    monkeypatch.setattr(lora, "apply_lora", known_adapter)
    monkeypatch.setattr(training.Trainer, "sample_group", lambda self, prompt, ex, prefix=(): FRESH)  # rewards vary
    run = tmp_path / "r"
    extra = [] if lam is None else ["--lam", str(lam)]
    assert train.main(["--task", "mult", "--algo", "tspmo", "--model", str(tiny), *SMALL, "--steps", "1",
                       "--replay-success", "0", "--out", str(run), *extra]) == 0  # one group: one λ term
    cfg = json.loads((run / "config.json").read_text())
    (m,) = checkpoints.read_jsonl(run / "metrics.jsonl")
    assert cfg["weight_decay"] == 0.01 and m["policy_loss"] != 0
    if lam is None:
        assert cfg["lam"] == 0 and m["l2_loss"] == 0 and m["loss"] == m["policy_loss"]
    else:
        assert cfg["lam"] == 0.01 and m["l2_loss"] == pytest.approx(0.01 * 608, rel=1e-6)
        assert m["loss"] == pytest.approx(m["policy_loss"] + m["l2_loss"], rel=1e-12)


# --- B2, --edge-advantage treerl: what its update costs, fresh and replay groups alike --------------------------------

# i  completion  R      root (3, mean 1/3): E7 is non-zero only at the root's two edges; every deeper edge continues a
# 0  [1, 2, 3]   1      single path, so its mean is its parent's (A = 0). B2 adds E[R|p∘v] − 1/3, non-zero on all six
# 1  [4, 5]      0      (tests/test_trie.py's CHAIN, with B2's values by hand)
# 2  [4, 6]      0
CHAIN = ([[1, 2, 3], [4, 5], [4, 6]], [1.0, 0.0, 0.0])


@pytest.mark.parametrize("estimator", ["local", "treerl"])
def test_edge_advantage_treerl_logs_its_forwards_edges_and_nonzero_tokens_B2(tmp_path, tiny, monkeypatch, estimator):
    """One step through the CLI: the fresh group is CHAIN, the replay's continuations are FRESH (counted by hand).

        group           edges   local (E7): forwards, tokens A ≠ 0     treerl (B2): forwards, tokens A ≠ 0
        fresh  CHAIN      6       1 (the root), 3 of 7                   2 ([1,2] on 0, [4] on 1), 7 of 7
        replay FRESH      5       1 ([5] on 0), 7 of 8                   1 ([5,6] on 0), 8 of 8: ([5,6], 7) is
                                                                         (1 − 1/2) + (1 − 1) ≠ 0
        step             11       2, 10 of 15                            3, 15 of 15

    The replay's group takes the run's estimator too; config.json records it."""
    calls = []

    def fake(self, prompt, ex, prefix=()):
        calls.append(prefix)
        return CHAIN if len(calls) == 1 else FRESH  # the fresh group; then the replay of [1, 2, 3], the one success

    monkeypatch.setattr(training.Trainer, "sample_group", fake)
    run = tmp_path / "r"
    assert train.main(["--task", "mult", "--algo", "tspmo", "--model", str(tiny), *SMALL, "--steps", "1",
                       "--replay-success", "1", "--edge-advantage", estimator, "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["edge_advantage"] == estimator
    (m,) = checkpoints.read_jsonl(run / "metrics.jsonl")
    fresh, replay = m["groups"]
    assert len(calls) == 2 and (fresh["kind"], replay["kind"]) == ("fresh", "replay")
    assert (fresh["edges"], replay["edges"], m["edges"]) == (6, 5, 11)
    want = {"local": ((1, 3), (1, 7), 2, 10 / 15), "treerl": ((2, 7), (1, 8), 3, 1.0)}[estimator]
    assert ((fresh["forwards"], fresh["nonzero_adv_tokens"]), (replay["forwards"], replay["nonzero_adv_tokens"]),
            m["forwards"], m["nonzero_adv_token_fraction"]) == want


# --- --accum with T-SPMO: one round of replays per prompt of the step -------------------------------------------------

@pytest.mark.parametrize("pool", ["history", "group"])
def test_accum_with_tspmo_replays_one_round_per_prompt(tiny, tmp_path, monkeypatch, pool):
    """--accum 3: three fresh groups, one update; then three replays (C_success = 1 each round). With the group pool
    each prompt is replayed, in order, with its own example; with the history pool each draw comes from all 12
    completions, and each is scored against its own example (tests/test_replay.py proves which one)."""
    calls = []

    def fake(self, prompt, ex, prefix=()):
        calls.append(ex)  # the example the sampled completions are scored against
        return FRESH

    monkeypatch.setattr(training.Trainer, "sample_group", fake)
    tr = trainer(tiny, tmp_path, accum=3, replay_success=1, replay_pool=pool)
    m = tr.train_step(tasks.TrainStream(tr.task, 2))
    examples = calls[:3]
    assert len(set(examples)) == 3  # three prompts accumulated into one update
    assert [g["kind"] for g in m["groups"]] == ["fresh"] * 3 + ["replay"] * 3 and len(m["replays"]) == 3
    if pool == "group":
        assert calls[3:] == examples  # each replayed, in order, with its own example
    else:
        assert set(calls[3:]) <= set(examples) and tr.pool.problems == examples and len(tr.pool) == 12
        assert [r["replay_source_step"] for r in m["replays"]] == [1, 1, 1]


# --- a weak test elsewhere, made to prove its point: --eval-only --adapter really applies the adapter -----------------

def test_eval_only_applies_the_adapter(tmp_path, tiny):
    """test_train.py's eval-only test passes whether or not the adapter is applied (accuracy 0 either way); here a
    strong adapter must change the greedy completions the evaluation records."""
    net = pretrained.load_model(tiny)
    lora.apply_lora(net, r=4, fraction=0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _, mod in lora.lora_modules(net):
            mod.lora_B.normal_(0, 2.0, generator=torch.Generator().manual_seed(1))
    checkpoints.write_adapter(net, tmp_path / "ad")
    out = {}
    for name, extra in (("base", []), ("adapter", ["--adapter", str(tmp_path / "ad")])):
        train.main(["--task", "mult", "--model", str(tiny), "--eval-only", "--eval-limit", "3", "--max-new-tokens",
                    "8", "--device", "cpu", "--out", str(tmp_path / name), *extra])
        out[name] = [e["completion"] for e in json.loads((tmp_path / name / "eval.json").read_text())["examples"]]
    assert len(out["base"]) == 3 and out["base"] != out["adapter"]


# --- through the CLI: a bf16 base trains fp32 adapters ----------------------------------------------------------------

@pytest.mark.parametrize("algo", ["sgrpo", "tspmo"])
def test_bfloat16_run_keeps_fp32_adapter_and_optimizer_state(tmp_path, tiny, algo, monkeypatch):
    monkeypatch.setattr(training.Trainer, "sample_group", lambda self, prompt, ex, prefix=(): FRESH)  # rewards vary
    run = tmp_path / "r"
    assert train.main(["--task", "mult", "--algo", algo, "--model", str(tiny), *SMALL, "--steps", "2",
                       "--save-every", "1", "--dtype", "bfloat16", "--out", str(run)]) == 0
    from safetensors.torch import load_file
    ad = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in ad.values())
    assert any(float(v.abs().sum()) > 0 for k, v in ad.items() if "lora_B" in k)  # the updates were not rounded away
    state = torch.load(run / "checkpoints" / "step-000002" / "state.pt", weights_only=True)["optimizer"]["state"]
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
