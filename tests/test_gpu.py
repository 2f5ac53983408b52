"""The GPU path: wherever CUDA is available these run; elsewhere they skip cleanly.

Each (algo, task) through the CLI for two steps on CUDA; one seed gives the same LoRA A on the CPU and on CUDA;
greedy decoding, scoring and the per-completion gradients on CUDA equal the CPU's within fp32 tolerance; the
peak memory is read with torch.cuda.max_memory_allocated. Sampling itself cannot be compared draw by draw: CUDA's
random stream differs from the CPU's for the same seed (train.py says so); it is checked for reproducibility."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_checkpoint, tiny_config
import checkpoints
import lora
import model as M
import pretrained
import sampling
import tokrl
import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "tiny", tiny_config(), std=0.1)


def write_gsm8k(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        lines = [json.dumps({"question": f"What is {i} plus 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
                 for i in range(5)]
        (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.mark.parametrize("task", ["mult", "svamp", "gsm8k"])
@pytest.mark.parametrize("algo", ["grpo", "sgrpo", "tspmo"])
def test_each_algo_and_task_runs_two_steps_on_cuda(tmp_path, tiny, algo, task):
    data = ["--data", str(write_gsm8k(tmp_path / "g"))] if task == "gsm8k" else []  # svamp: the shipped split
    run = tmp_path / "run"
    assert train.main(["--algo", algo, "--task", task, "--model", str(tiny), "--device", "cuda", "--steps", "2",
                       "-G", "4", "--max-new-tokens", "12", "--eval-limit", "3", "--lora-fraction", "0.5",
                       "--out", str(run), *data]) == 0
    metrics = checkpoints.read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    weights = sum(p.numel() * p.element_size() for p in pretrained.load_model(tiny).parameters()) / 2**30
    assert all(m["peak_mem_gb"] >= weights for m in metrics)  # torch.cuda.max_memory_allocated: at least the model
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_same_seed_same_lora_init_on_cpu_and_cuda(tiny):
    cpu, gpu = pretrained.load_model(tiny), pretrained.load_model(tiny, device=CUDA)
    for net in (cpu, gpu):
        lora.apply_lora(net, r=4, fraction=0.5, generator=torch.Generator().manual_seed(7))
    for (n, a), (_, b) in zip(lora.lora_modules(cpu), lora.lora_modules(gpu)):
        assert b.lora_A.device.type == "cuda" and b.lora_A.dtype == torch.float32
        assert torch.equal(a.lora_A, b.lora_A.cpu()) and torch.equal(a.lora_B, b.lora_B.cpu()), n


def adapted_pair(tiny):
    nets = [pretrained.load_model(tiny), pretrained.load_model(tiny, device=CUDA)]
    for net in nets:
        lora.apply_lora(net, r=4, fraction=0.5, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for p in lora.lora_parameters(net):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    return nets


def test_greedy_sampling_and_scoring_agree_with_the_cpu(tiny):
    cpu, gpu = adapted_pair(tiny)
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    assert sampling.greedy(cpu, prompts, 16) == sampling.greedy(gpu, prompts, 16)
    a = sampling.sample(gpu, prompts[0], 6, 16, temperature=0.7, generator=torch.Generator(CUDA).manual_seed(3))
    b = sampling.sample(gpu, prompts[0], 6, 16, temperature=0.7, generator=torch.Generator(CUDA).manual_seed(3))
    assert a == b and all(0 <= t < cpu.config.vocab_size for y in a for t in y)
    ids = prompts[0] + a[0]
    pos = torch.arange(len(prompts[0]), len(ids))
    with torch.no_grad():
        (lc,), (rc,) = (c := lora.logprobs(cpu, [ids], [pos], with_ref=True)).logp, c.ref
        (lg,), (rg,) = (g := lora.logprobs(gpu, [ids], [pos.to(CUDA)], with_ref=True)).logp, g.ref
    assert (lc - lg.cpu()).abs().max() < 1e-4 and (rc - rg.cpu()).abs().max() < 1e-4


@pytest.mark.parametrize("algo", ["grpo", "sgrpo", "tspmo"])
def test_per_completion_gradients_agree_with_the_cpu(tiny, algo):
    prompt, comps, rewards = [10, 11, 12], [[5, 6, 7, 8, 256], [5, 6, 9], [5, 7, 7], [6, 6]], [1.0, 0.0, 0.0, 1.0]
    selection = [[0, 2], [1], [0, 1, 2], [0]] if algo == "sgrpo" else None
    grads = []
    for net in adapted_pair(tiny):
        if algo == "tspmo":
            st = tokrl.tspmo_backward(net, prompt, comps, rewards, lam=0.01)
        else:
            st = tokrl.grpo_backward(net, prompt, comps, rewards, beta=0.01, selection=selection)
        grads.append((torch.cat([p.grad.flatten().cpu() for p in lora.lora_parameters(net)]), st.loss))
    (gc, lc), (gg, lg) = grads
    assert gc.norm() > 0 and float((gc - gg).norm() / gc.norm()) < 1e-4 and lc == pytest.approx(lg, abs=1e-5)


def test_bf16_base_on_cuda_keeps_fp32_adapters(tiny):
    net = pretrained.load_model(tiny, device=CUDA, dtype=torch.bfloat16)
    lora.apply_lora(net, r=4, fraction=0.5, generator=torch.Generator().manual_seed(0))
    assert all(p.dtype == torch.float32 and p.is_cuda for p in lora.lora_parameters(net))
    torch.cuda.reset_peak_memory_stats(CUDA)
    net.logits(torch.tensor([[1, 2, 3]], device=CUDA)).float().pow(2).mean().backward()
    assert torch.cuda.max_memory_allocated(CUDA) > 0
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora.lora_parameters(net))


# --- the fixed-shape decode as a CUDA graph -----------------------------------------------------------------------

def test_graphed_decode_equals_the_eager_decode_token_for_token_and_draw_for_draw(tiny):
    """Greedy: the same tokens. Sampled: the same generator state gives the same draws (EOS ends rows at different
    steps, so finished rows decode on inside the graph, unread). And the graph is captured once per shape, not once
    per step or per call."""
    gpu = adapted_pair(tiny)[1]
    prompts = [[1, 2, 3, 4], [9, 8, 7], [5] * 9]
    eos = list(range(0, 272, 5))
    assert sampling.greedy(gpu, prompts, 24, mode="graph") == sampling.greedy(gpu, prompts, 24, mode="eager")
    assert sampling.greedy(gpu, prompts, 24, eos=eos, mode="graph") == sampling.greedy(gpu, prompts, 24, eos=eos, mode="eager")
    sampler = sampling.Sampler(gpu)
    runs = [sampler.sample([3, 1, 4, 1, 5], 8, 30, temperature=t, eos=eos, mode=d,
                           generator=torch.Generator(CUDA).manual_seed(9)) for t in (0.7, 2.0) for d in ("graph", "eager")]
    assert runs[0] == runs[1] and runs[2] == runs[3]
    assert len({len(y) for y in runs[2]}) > 1  # rows finished at different steps
    assert sampler.captures == 1 and sampler.refused == 0  # one shape: captured once for 2 calls of up to 29 steps each


def test_graphed_decode_records_the_eager_decode_s_entropies_B1(tiny):
    """sample(entropy=True) on the CUDA graph: the entropy is computed outside the graph, from the logits it wrote,
    so the graphed decode draws what the eager decode draws, with and without recording, and records the same
    entropies within fp32 rounding of the two decodes' logits."""
    gpu = adapted_pair(tiny)[1]
    eos, kw = list(range(0, 272, 5)), dict(temperature=0.7)
    runs = {d: sampling.sample(gpu, [3, 1, 4, 1, 5], 8, 30, eos=eos, mode=d, entropy=True, **kw,
                        generator=torch.Generator(CUDA).manual_seed(9)) for d in ("graph", "eager")}
    plain = sampling.sample(gpu, [3, 1, 4, 1, 5], 8, 30, eos=eos, mode="graph", **kw,
                     generator=torch.Generator(CUDA).manual_seed(9))
    (ys, hs), (ys_eager, hs_eager) = runs["graph"], runs["eager"]
    assert ys == ys_eager == plain and len({len(y) for y in ys}) > 1
    assert [len(h) for h in hs] == [len(y) for y in ys]
    assert max(abs(a - b) for h, g in zip(hs, hs_eager) for a, b in zip(h, g)) < 1e-4


def test_lower_precision_sampling_runs_and_stays_close(tiny):
    """tf32 and bf16 sampling give completions of valid tokens; bf16's logits stay within bf16 rounding of fp32's."""
    gpu = adapted_pair(tiny)[1]
    for precision in ("tf32", "bf16"):
        ys = sampling.sample(gpu, [1, 2, 3], 6, 16, temperature=0.7, precision=precision,
                      generator=torch.Generator(CUDA).manual_seed(3))
        assert all(1 <= len(y) <= 16 and all(0 <= t < 272 for t in y) for y in ys)
    x = torch.tensor([[1, 2, 3, 4]], device=CUDA)
    with torch.no_grad():
        assert (sampling.Sampler(gpu).bf16().logits(x).float() - gpu.logits(x)).abs().max() < 0.05


def test_eval_batch_on_cuda_is_what_half_the_free_memory_holds(tiny):
    import evaluation
    from settings import Settings
    cfg = pretrained.read_config(tiny / "config.json")
    s = Settings(device="cuda", max_new_tokens=300)
    assert evaluation.eval_batch(s, cfg, 60, 3000) == 3000  # a tiny model's rows are kilobytes: the whole test set
    big = M.PRESETS["qwen2-1.5b"]
    rows = evaluation.eval_batch(s, big, 60, 10**6)
    free = torch.cuda.mem_get_info()[0]
    assert 1 <= rows and rows * M.cache_bytes(big, 1, 60 + 300, torch.float32) < free / 2
    assert evaluation.eval_batch(Settings(device="cpu"), big, 60, 3000) == 32
