"""full_finetune.py, F1 (`--train full`, beyond the paper): every weight trains; the per-completion gradients of GRPO
and T-SPMO over every parameter equal the slow batched ones with the frozen copy as π_ref; every algorithm trains every
weight through train.main and keeps its reference at the starting weights; mini.py's run_job path trains its tied
tiny model fully; the settings' refusals; the memory and disk arithmetic (Qwen2-1.5B's by hand); the trained model
as a Hugging Face directory that transformers and --model load; bit-exact resume; GRPO learns the toy task."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import full_finetune
import mini
import mini_base
import mini_runs
import pretrained
import model as M
import settings
import tasks
import tokenizer
import tokrl
import train
import training
from conftest import make_checkpoint, refused, tiny_config
from test_tokrl import COMPLETIONS, EOS, PROMPT, REWARDS, tspmo_slow
from test_train import SevenTask, digit_model, learn_toy_task


def full_model(tmp_path, algo="grpo", beta=0.5):
    """A tiny model prepared for full fine-tuning, then moved off its starting weights (so that π_θ ≠ π_ref and the
    KL term has a gradient)."""
    m = pretrained.load_model(make_checkpoint(tmp_path / "m", tiny_config(num_hidden_layers=3), std=0.1))
    full_finetune.prepare(m, algo, beta)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def all_grads(m):
    return torch.cat([p.grad.flatten() for p in m.parameters()])


def zero(m):
    for p in m.parameters():
        p.grad = None


# --- F1: the gradients over every weight ------------------------------------------------------------------------------


def test_F1_prepare_trains_every_weight_and_grpo_gradient_equals_the_batched_one(tmp_path):
    """F1 with GRPO (Alg2): the per-completion backward of a model trained fully gives, on every parameter (the tied
    embedding among them: no frozen bottom), the gradient of the slow batched E3 loss whose π_ref is the frozen copy
    of the starting weights."""
    m = full_model(tmp_path)
    ref = full_finetune.reference(m)
    assert ref is not None and ref is not m and not any(p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in m.parameters()) and m.lm_head.weight is m.model.embed_tokens.weight
    assert ref.lm_head.weight is ref.model.embed_tokens.weight  # the copy keeps the tie
    T = len(PROMPT) + max(map(len, COMPLETIONS))
    ids = torch.tensor([PROMPT + y + [EOS] * (T - len(PROMPT) - len(y)) for y in COMPLETIONS])
    mask = tokrl.loss_mask(len(PROMPT), [len(y) for y in COMPLETIONS], T)
    with torch.no_grad():
        ref_logits = ref.logits(ids)
    loss_slow = tokrl.grpo_loss_batched(m.logits(ids), ref_logits, ids, mask, REWARDS, beta=0.5)
    loss_slow.backward()
    slow = all_grads(m)
    zero(m)
    st = tokrl.grpo_backward(m, PROMPT, COMPLETIONS, REWARDS, beta=0.5)
    fast = all_grads(m)
    assert st.kl > 1e-3 and st.loss == pytest.approx(loss_slow.item(), abs=1e-6)
    rel = (fast - slow).norm() / slow.norm()
    emb = m.model.embed_tokens.weight.grad
    print(f"\nF1 GRPO: per-completion vs batched gradient over every weight, relative error {rel:.2e}")
    assert rel < 1e-5 and emb.abs().sum() > 0
    assert all(p.grad is None for p in ref.parameters())


def test_F1_tspmo_gradient_over_every_weight_equals_bruteforce_and_keeps_no_reference(tmp_path):
    """T-SPMO (E10) trained fully: no reference copy (it has no KL term), and the per-prefix backward's gradient on
    every weight equals the brute-force objective's; the logged policy gradient norm is that gradient's norm."""
    m = full_model(tmp_path, "tspmo")
    with pytest.raises(RuntimeError, match="without one"):
        full_finetune.reference(m)
    tspmo_slow(m, lam=0.0).backward()
    slow = all_grads(m)
    zero(m)
    st = tokrl.tspmo_backward(m, PROMPT, COMPLETIONS, REWARDS, lam=0.0)
    fast = all_grads(m)
    rel = (fast - slow).norm() / slow.norm()
    assert rel < 1e-5 and st.policy_grad_norm == pytest.approx(float(fast.norm()), rel=1e-5)


# --- every algorithm through train.main ------------------------------------------------------------------------------


@pytest.fixture
def varied_rewards(monkeypatch):
    """A reward that depends on the completion (its length's parity): the groups vary, every objective moves."""
    monkeypatch.setattr(tasks.Mult, "reward", lambda self, text, ex: float(len(text) % 2))


def full_args(tiny: Path, run: Path, algo: str, *extra: str) -> list[str]:
    return ["--algo", algo, "--task", "mult", "--model", str(tiny), "--device", "cpu", "--train", "full", "-G", "4",
            "--max-new-tokens", "6", "--temperature", "1.0", "--lr", "1e-2", "--weight-decay", "0", "--eval-limit",
            "1", "--eval-every", "0", "--steps", "2", "--save-every", "1", "--replay-success", "1", "--alpha", "2",
            "--k", "4", "--out", str(run), *extra]


@pytest.mark.parametrize("algo", ["grpo", "sgrpo", "tspmo", "ppo", "dpo"])
def test_every_algorithm_trains_every_weight_through_train_main(tmp_path, tiny, varied_rewards, algo):
    """--train full with each algorithm (weight decay 0: only gradients move a weight): every tensor of the written
    model moved from the starting weights, none is the LoRA adapter's, and the KL to the reference is 0 at the first
    step's first update (the copy is the policy's start)."""
    run = tmp_path / "run"
    assert train.main(full_args(tiny, run, algo)) == 0
    start, end = load_file(str(tiny / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    assert set(start) == set(end) and "lm_head.weight" not in end  # the tied head stored once, as the base had it
    still = [k for k in start if torch.equal(start[k], end[k])]
    assert not still, f"{algo}: tensors that did not move: {still}"
    assert not (run / "adapter").exists()
    assert not any((run / "checkpoints" / "step-000002").glob("adapter"))
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["train"], cfg["lr"]) == ("full", 1e-2)
    first = checkpoints.read_jsonl(run / "metrics.jsonl")[0]
    if algo in ("grpo", "sgrpo", "dpo"):  # one update in the step: its KL is the starting policy's against the copy
        assert first["kl"] == 0.0


@pytest.mark.parametrize("algo,G", [("grpo", 8), ("tspmo", 16)])
def test_full_fine_tuning_learns_the_toy_task(tmp_path, algo, G):
    """--train full learns test_train's toy task (answer 7, which the base rarely says) as LoRA does there, with no
    adapter in the model: every weight in fp32 by AdamW, at 1e-4 (LoRA learns it there at 3e-2)."""
    d = digit_model(tmp_path / "digits")
    cfg = dataclasses.replace(settings.Settings(), algo=algo, task="seven", model=str(d), device="cpu", steps=40,
                              group_size=G, max_new_tokens=1, temperature=1.0, lr=1e-4, train="full", eval_every=0,
                              save_every=100, replay_success=1, seed=1)
    p7, metrics, final = learn_toy_task(tmp_path, cfg)
    late = sum(m["reward_mean"] for m in metrics[-5:]) / 5
    assert p7 < 0.25  # the base model rarely says 7
    assert late > 0.8 and final["accuracy"] == 1.0  # the greedy answer is 7 at the end
    assert not (tmp_path / "run" / "adapter").exists() and (tmp_path / "run" / "model" / "model.safetensors").is_file()


def mini_job(base: Path, out: Path, method: str) -> mini_runs.Job:
    cfg = mini_runs.run_settings(method, "steps", 0, base, 1e-3, step_scale=0.01)
    cfg = dataclasses.replace(cfg, train="full", steps=2, out=str(out), group_size=4)
    return mini_runs.Job("steps", method, 0, "validation", cfg)


@pytest.mark.parametrize("method", ["grpo", "tspmo-decay"])
def test_minis_run_job_trains_its_tied_model_fully_and_the_reference_stays(tmp_path, monkeypatch, method):
    """mini.py's run_job path (training.train with loaded=, a tied-embedding model): every weight moves, the tie
    holds, GRPO's reference copy keeps the starting weights (T-SPMO has none), RUN/model holds the model."""
    monkeypatch.setattr(mini_base.MiniMult, "reward", lambda self, text, ex: float(len(text) % 2))
    base = tmp_path / "base"
    base.mkdir()
    mini_base.build_tokenizer(base / "tokenizer.json")
    pretrained.save_model(mini_base.build_model(0), base)
    net = pretrained.load_model(base)
    tok = tokenizer.Tokenizer(base / "tokenizer.json")
    loaded = (net, tok, pretrained.eos_ids(base, net.config, tok))
    start = {k: v.clone() for k, v in net.state_dict().items()}
    taken = []
    real = training.train
    job = mini_job(base, tmp_path / "run", method)

    def keep(cfg, run, task=None, loaded=None, **kw):
        taken.append(loaded[0])
        return real(cfg, run, task=task, loaded=loaded, **kw)

    training.train = keep
    try:
        result = mini_runs.run_job(job, loaded)
    finally:
        training.train = real
    trained = taken[0]
    assert result["steps"] == 2 and trained.lm_head.weight is trained.model.embed_tokens.weight
    moved = [k for k, v in trained.state_dict().items() if not torch.equal(v, start[k])]
    assert len(moved) == len(start)
    if method == "grpo":
        frozen = full_finetune.reference(trained).state_dict()
        assert all(torch.equal(frozen[k], start[k]) for k in start)
    else:
        with pytest.raises(RuntimeError):
            full_finetune.reference(trained)
    written = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert all(torch.equal(written[k], trained.state_dict()[k]) for k in written)
    assert "memory: --train full: weights" in (tmp_path / "run" / "log.txt").read_text()


# --- the settings: what --train full refuses, and what it changes -----------------------------------------------------


@pytest.mark.parametrize("extra,line", [
    (["--algo", "tspmo", "--lam", "0.01"], "error: --lam 0.01: the literal λ·Σ‖W‖² is defined on LoRA's matrices; "
                                           "with --train full λ is AdamW's weight decay over every parameter"),
    (["--dtype", "bfloat16"], "error: --train full: full fine-tuning trains every weight in fp32"),
    (["--lora-rank", "4"], "error: --lora-rank 4: a LoRA setting, and --train full applies no LoRA"),
    (["--lora-targets", "q_proj"], "error: --lora-targets q_proj: a LoRA setting"),
    (["--algo", "ppo", "--critic", "separate"], "error: --train full: --critic separate is a second copy"),
    (["--sample-precision", "bf16"], "error: --train full: --sample-precision bf16 copies the frozen weights"),
])
def test_what_train_full_refuses_is_one_line_exit_2_before_loading(tmp_path, tiny, capsys, no_loading, extra,
                                                                   line):
    code, err = refused(["--model", str(tiny), "--device", "cpu", "--train", "full", "--out", str(tmp_path / "r"),
                         *extra], capsys)
    assert code == 2 and err.startswith(line) and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_the_lr_default_follows_train_and_a_run_recorded_without_train_resumes_as_lora(tmp_path, tiny, capsys):
    """--lr's default: 1e-4 with LoRA, 1e-6 with --train full ([decided] F1), a typed --lr kept; --help says so. A
    run's config.json without "train" (recorded before the setting) resumes as LoRA; a resume refuses --train."""
    parse = lambda *a: train.resolve(train.build_parser().parse_args(list(a)))  # noqa: E731
    assert parse().lr == 1e-4 and parse("--train", "full").lr == settings.FULL_LR == 1e-6
    assert parse("--train", "full", "--lr", "3e-5").lr == 3e-5 and parse("--train", "full").train == "full"
    assert "with --train full 1e-06" in " ".join(train.build_parser().format_help().split())
    run = tmp_path / "run"
    args = ["--model", str(tiny), "--device", "cpu", "-G", "2", "--max-new-tokens", "2", "--steps", "1",
            "--eval-limit", "1", "--out", str(run)]
    assert train.main(args) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"] == "lora" and saved["lr"] == 1e-4
    del saved["train"]
    (run / "config.json").write_text(json.dumps(saved))
    from checks import read_run_settings
    assert read_run_settings(run).train == "lora"
    code, err = refused(["--resume", str(run), "--train", "full"], capsys)
    assert code == 2 and "--train full: " in err and "was recorded with train = 'lora'" in err


# --- memory and disk: the arithmetic, by hand ------------------------------------------------------------------------


def test_memory_arithmetic_at_the_qwen2_1_5b_shape_by_hand():
    """F1's memory at Qwen2-1.5B's shape (M.Qwen2Config()'s defaults; no weights): n by hand from the config, then
    4n weights, 4n reference, 4n gradients, 8n moments (GRPO); T-SPMO keeps no reference. Activations of one
    completion (prompt 100 + 300 new tokens) by the documented count."""
    mc = M.Qwen2Config()
    C, I, L, V, KD = 1536, 8960, 28, 151936, 2 * 128
    per_layer = (C * C + C) + 2 * (C * KD + KD) + C * C + 3 * C * I + 2 * C  # q, k, v (biases), o, MLP, two norms
    n = V * C + L * per_layer + C  # the embedding (tied: the head is the same tensor), the layers, the final norm
    assert n == 1_543_714_304
    parts = full_finetune.memory_parts(mc, "grpo", 0.01, 100, 300, 8)
    assert parts["weights"] == parts["reference"] == parts["gradients"] == 4 * n == 6_174_857_216
    assert parts["AdamW moments"] == 8 * n
    before = sum(parts[k] for k in ("weights", "reference", "gradients", "AdamW moments"))
    assert round(before / 1e9, 1) == 30.9  # "about 31 GB before activations"
    S = 400
    acts = 4 * (L * (S * (7 * C + 3 * KD + 4 * I) + 2 * 12 * S * S) + 3 * 300 * V)
    assert parts["activations"] == acts and round(acts / 1e9, 2) == 3.10
    assert parts["KV cache"] == M.cache_bytes(mc, 8, S, torch.float32)  # the existing check's count, G = 8 rows
    tspmo = full_finetune.memory_parts(mc, "tspmo", 0.01, 100, 300, 50)
    assert "reference" not in tspmo and tspmo["weights"] == 4 * n
    line = full_finetune.memory_line(parts)
    print(f"\n{line}")
    assert line.startswith("--train full: weights 6.17, reference 6.17, gradients 6.17, AdamW moments 12.3, ")
    assert full_finetune.disk_parts(mc) == {"checkpoints": (checkpoints.KEEP + 1) * 12 * n, "final model": 4 * n}


def test_a_run_that_cannot_fit_memory_or_disk_is_one_line_exit_2_before_loading(tmp_path, tiny, capsys,
                                                                                 monkeypatch, no_loading):
    args = ["--model", str(tiny), "--device", "cpu", "--train", "full", "--out", str(tmp_path / "r")]
    monkeypatch.setattr(full_finetune, "available_memory", lambda device: (1000, "available of this machine's RAM"))
    code, err = refused(args, capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: --model {tiny} --train full: weights ")
    assert "GB in all, more than the 0.00 GB available of this machine's RAM; allowed: what fits" in err
    monkeypatch.undo()
    monkeypatch.setattr(pretrained, "load_model", lambda *a, **k: pytest.fail("loaded before the disk was checked"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    code, err = refused(args, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --train full: the run writes ")
    assert "checkpoints" in err and "more than the 0.00 GB free on the disk of" in err
    assert not (tmp_path / "r").exists()


# --- the trained model: a Hugging Face directory ---------------------------------------------------------------------


def test_F1_model_dir_loads_in_transformers_with_our_logits_and_back_into_train_py(tmp_path, tiny, varied_rewards,
                                                                                   capsys):
    """RUN/model, after a --train full run: transformers' Qwen2ForCausalLM (the oracle) loads it and its logits equal
    ours from the same directory and from the trained net; `train.py --model RUN/model --eval-only` evaluates the
    trained model: the same greedy completions and accuracy as the run's final evaluation."""
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "run"
    cfg = train.resolve(train.build_parser().parse_args(full_args(tiny, run, "grpo")))
    cfg = dataclasses.replace(cfg, out=str(run))
    net, tok, eos = training.load_everything(cfg)
    run.mkdir()
    final = training.train(cfg, run, loaded=(net, tok, eos))
    model_dir = run / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "generation_config.json",
                                                           "model.safetensors", "tokenizer.json"]
    hf = transformers.Qwen2ForCausalLM.from_pretrained(model_dir).eval()
    ours = pretrained.load_model(model_dir)
    ids = torch.tensor([tok.encode("What's 123 multiplied by 456?")])
    with torch.no_grad():
        theirs, mine, trained = hf(ids).logits, ours.logits(ids), net.logits(ids)
    err = (theirs - mine).abs().max().item()
    print(f"\nF1 model directory: transformers vs tokrl logits, max abs error {err:.2e}")
    assert err < 1e-4 and torch.equal(mine, trained)
    start = pretrained.load_model(tiny)
    with torch.no_grad():
        assert (start.logits(ids) - trained).abs().max() > 1e-3  # the trained model, not the base
    out = tmp_path / "eval"
    assert train.main(["--model", str(model_dir), "--eval-only", "--task", "mult", "--device", "cpu",
                       "--eval-limit", "1", "--max-new-tokens", "6", "--out", str(out)]) == 0
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["accuracy"] == final["accuracy"] and evaluated["examples"] == final["examples"]
