"""model.py: the hand-written Qwen2 against transformers (the oracle), the KV cache against the full forward,
sampling after a shared prefill, scoring at selected positions, and every bad input's message."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TINY_VOCAB, assets, hf_checkpoint, make_checkpoint, tiny_config
import model as M
import pretrained
import sampling
import tokenizer


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def batch_of_prompts(seed=0, B=3, T=17):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 259, (B, T), generator=g)


# --- parity with transformers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie,dtype,shard", [(True, torch.float32, None), (False, torch.float32, None),
                                             (True, torch.bfloat16, None), (False, torch.float32, "60KB"),
                                             (True, torch.bfloat16, "60KB")])
def test_logits_match_transformers(tmp_path, tie, dtype, shard):
    path, hf = hf_checkpoint(tmp_path / "hf", tie=tie, dtype=dtype, max_shard_size=shard)
    if shard:
        assert (path / "model.safetensors.index.json").is_file()
    ours = pretrained.load_model(path)
    assert ours.config.tie_word_embeddings == tie
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
    ids = batch_of_prompts()
    ref = hf(ids).logits
    got = ours.logits(ids)
    err = (got - ref).abs()
    print(f"\nparity tie={tie} dtype={dtype} shard={shard}: max abs err {err.max():.3e}, mean {err.mean():.3e}")
    assert err.max() < 1e-5


def test_greedy_tokens_match_transformers_generate(tmp_path):
    path, hf = hf_checkpoint(tmp_path / "hf", tie=True, layers=2)
    ours = pretrained.load_model(path)
    prompts = [[5, 9, 200, 17, 33, 101], [7, 7, 8]]
    for prompt in prompts:
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                          eos_token_id=None, pad_token_id=256)[0, len(prompt):].tolist()
        got = sampling.greedy(ours, [prompt], 20)[0]
        assert got == ref and len(got) == 20
    # the batched (left-padded) greedy path gives each prompt's unbatched result
    batched = sampling.greedy(ours, prompts, 20)
    assert batched == [sampling.greedy(ours, [p], 20)[0] for p in prompts]


# --- KV cache -----------------------------------------------------------------------------------------------------

def test_cached_decoding_equals_full_forward(tiny_dir):
    m = pretrained.load_model(tiny_dir)
    ids = batch_of_prompts(1, B=2, T=24)
    full = m.logits(ids)  # (B, T, V)
    cache = M.KVCache(m.config, 2, 24, "cpu", torch.float32)
    steps = [m.lm_head(m(ids[:, :10], cache))]  # prefill 10 tokens, then one token at a time
    for t in range(10, 24):
        steps.append(m.lm_head(m(ids[:, t:t + 1], cache)))
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max() < 1e-5


def test_left_padded_rows_equal_unpadded(tiny_dir):
    m = pretrained.load_model(tiny_dir)
    short, long_ = [3, 4, 5], [9, 8, 7, 6, 5, 4, 3]
    both = sampling.greedy(m, [short, long_], 12)
    assert both[0] == sampling.greedy(m, [short], 12)[0]
    assert both[1] == sampling.greedy(m, [long_], 12)[0]


# --- sampling -----------------------------------------------------------------------------------------------------

def test_group_rows_draw_independent_tokens(tmp_path):
    """The bug story: after one shared prefill, the G rows must draw their own tokens. A cache shared by view, or
    one sample broadcast to all rows, makes every row identical. With near-uniform logits (tiny std weights) over
    272 tokens, 16 independent first tokens are all equal with probability 272**-15."""
    m = pretrained.load_model(make_checkpoint(tmp_path / "flat", std=1e-4))
    g = torch.Generator().manual_seed(0)
    out = sampling.sample(m, [1, 2, 3], 16, 6, temperature=1.0, generator=g)
    assert len({o[0] for o in out}) > 8, "first tokens of the G rows are not independent"
    assert len({tuple(o) for o in out}) == 16, "rows share their continuations"


def test_group_rows_decode_from_their_own_cache(tiny_dir, monkeypatch):
    """At every decode step, each live row's logits must equal a full forward over the prompt and that row's own
    tokens so far: a cache shared between rows, or a row dropped from the cache in the wrong place, breaks this.
    A quarter of the vocabulary is EOS, so rows finish at different steps and the cache is compacted several times."""
    m = pretrained.load_model(tiny_dir)
    seen = []
    real = sampling.next_token

    def spy(logits, *args):
        tok = real(logits, *args)
        seen.append(logits.clone())
        return tok

    monkeypatch.setattr(sampling, "next_token", spy)
    prompt = [10, 20, 30, 40]
    eos = list(range(0, 272, 4))
    rows = sampling.sample(m, prompt, 8, 8, temperature=5.0, generator=torch.Generator().manual_seed(3), eos=eos)
    assert len({len(r) for r in rows}) > 2  # rows ended at different steps
    for step, logits in enumerate(seen):
        live = [r for r in rows if len(r) > step]  # rows keep their order as finished ones are dropped
        assert logits.shape[0] == len(live)
        for got, r in zip(logits, live):
            want = m.logits(torch.tensor([prompt + r[:step]]))[0, -1]
            assert (got - want).abs().max() < 1e-4


def test_a_kv_cache_the_allocator_refuses_is_named_with_its_bytes(tiny_dir):
    """The real CPU allocator, asked for the prompt's one row × (3 + 2^37) positions: 1025 bytes a row and
    position (keys and values: 2 × 4 layers × 2 KV heads × 16 head dims × 4 bytes, and 1 byte of mask), 141 TB.
    Its RuntimeError becomes one CacheTooLarge naming rows, positions, bytes and device."""
    m = pretrained.load_model(tiny_dir)
    positions = 3 + 2**37
    assert M.cache_bytes(m.config, 4, positions, torch.float32) == 4 * positions * (2 * 4 * 2 * 16 * 4 + 1)
    with pytest.raises(M.CacheTooLarge) as e:
        sampling.sample(m, [1, 2, 3], 4, 2**37, temperature=1.0, generator=torch.Generator().manual_seed(0))
    nbytes = positions * 1025
    assert (e.value.rows, e.value.positions, e.value.nbytes, e.value.device) == (1, positions, nbytes, "cpu")
    assert str(e.value).startswith(f"the KV cache (rows × positions = 1 × {positions}) needs {nbytes:,} bytes "
                                   f"({nbytes / 2**30:.2f} GiB) on cpu, which could not be allocated (RuntimeError: ")
    assert "can't allocate memory" in str(e.value)


def test_sampling_is_deterministic_under_a_seed(tiny_dir):
    m = pretrained.load_model(tiny_dir)
    a = sampling.sample(m, [1, 2, 3], 5, 10, temperature=0.7, generator=torch.Generator().manual_seed(42))
    b = sampling.sample(m, [1, 2, 3], 5, 10, temperature=0.7, generator=torch.Generator().manual_seed(42))
    c = sampling.sample(m, [1, 2, 3], 5, 10, temperature=0.7, generator=torch.Generator().manual_seed(43))
    assert a == b and a != c


def test_rows_stop_at_eos_and_stop_rule(tmp_path):
    m = pretrained.load_model(make_checkpoint(tmp_path / "flat", std=1e-4))
    g = torch.Generator().manual_seed(0)
    eos = list(range(0, 272, 2))  # half the vocabulary ends a row: rows end early, at different steps
    out = sampling.sample(m, [1, 2], 12, 30, temperature=1.0, generator=g, eos=eos)
    for o in out:
        assert all(t % 2 for t in o[:-1])  # no EOS before the end
        assert o[-1] % 2 == 0 or len(o) == 30  # ended by EOS (kept) or by the length limit
    assert len({len(o) for o in out}) > 1
    out = sampling.sample(m, [1, 2], 4, 30, temperature=1.0, generator=g, stop=lambda toks: len(toks) == 3)
    assert [len(o) for o in out] == [3, 3, 3, 3]


def test_dropping_finished_rows_keeps_the_others_exact(tmp_path):
    """Rows that live on after others finished must produce exactly what they would alone: compare against the
    same seed with no EOS, where the first divergence can only come from the sampler, so check greedy instead."""
    m = pretrained.load_model(make_checkpoint(tmp_path / "m"))
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8]]
    solo = [sampling.greedy(m, [p], 15)[0] for p in prompts]
    eos = [solo[0][4]]  # row 0 ends early at this token (and any other row that emits it)
    together = sampling.greedy(m, prompts, 15, eos=eos)
    for s, t in zip(solo, together):
        cut = next((i + 1 for i, x in enumerate(s) if x in eos), len(s))
        assert t == s[:cut]


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.7, 1.0), (0.7, 0.9)])
def test_a_row_whose_distribution_is_not_finite_is_flagged_and_the_others_draw_as_before(temperature, top_p):
    """Rows 1 and 2 hold a NaN and a +inf: next_token gives them NOT_FINITE, decided on the device; row 3's -inf
    entries are tokens never drawn (suppressed), not a fault. Rows 0 and 3 draw exactly what they draw beside two
    finite rows from the same generator state: the stand-in distribution reads the generator as a real one does."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 300, generator=g) * 3
    logits[3, ::2] = -float("inf")
    bad = logits.clone()
    bad[1, 17], bad[2, 250] = float("nan"), float("inf")
    got = sampling.next_token(bad, temperature, top_p, torch.Generator().manual_seed(1))
    want = sampling.next_token(logits, temperature, top_p, torch.Generator().manual_seed(1))
    assert got[1] == got[2] == sampling.NOT_FINITE and got[[0, 3]].tolist() == want[[0, 3]].tolist()
    assert int(want[3]) % 2 == 1 and sampling.NOT_FINITE not in want.tolist()


def test_finite_logits_whose_quotient_by_t_overflows_are_flagged():
    """l/T in float32: logits up to 30 at T = 2e-38 reach 1.5e39, past float32's 3.4e38; at T = 1e-37, 3e38 fits."""
    logits = torch.linspace(-30, 30, 256)[None]
    assert int(sampling.next_token(logits, 2e-38, 1.0, torch.Generator().manual_seed(0))) == sampling.NOT_FINITE
    assert int(sampling.next_token(logits, 1e-37, 1.0, torch.Generator().manual_seed(0))) == 255  # the largest logit
    with pytest.raises(sampling.NonFiniteLogits) as e:  # the decode loop says so, with the largest |logit|: -30's
        sampling.decode_loop(None, logits - 5, 4, 2e-38, 1.0, torch.Generator(), (), None, ())
    assert (e.value.new_token, e.value.logits_finite, e.value.largest) == (1, True, 35.0)


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_sampling_and_greedy_refuse_a_distribution_that_is_not_finite(tmp_path, mode):
    """A NaN in one LM-head row (untied) makes every next-token distribution NaN: sample and greedy raise
    NonFiniteLogits at the first token, which says the logits themselves are not finite. A model of large logits
    (weights of std 1) sampled at float32's smallest normal temperature: the logits are finite, their quotient by T
    is not, and the error carries the largest |logit|, the full forward's."""
    m = pretrained.load_model(make_checkpoint(tmp_path / "untied", tiny_config(tie_word_embeddings=False)))
    m.lm_head.weight[7, 3] = float("nan")
    prompt = [10, 20, 30, 40]
    for run in (lambda: sampling.sample(m, prompt, 4, 6, temperature=0.7, generator=torch.Generator(), mode=mode),
                lambda: sampling.greedy(m, [prompt, prompt[:2]], 6, mode=mode)):
        with pytest.raises(sampling.NonFiniteLogits) as e:
            run()
        assert (e.value.new_token, e.value.logits_finite) == (1, False)
        assert str(e.value) == "the model's logits are not finite (NaN or inf) at new token 1"
    big = pretrained.load_model(make_checkpoint(tmp_path / "big", std=1.0))
    with pytest.raises(sampling.NonFiniteLogits) as e:
        sampling.sample(big, prompt, 4, 6, temperature=torch.finfo(torch.float32).tiny, generator=torch.Generator(),
                 mode=mode)
    largest = float(big.logits(torch.tensor([prompt]))[0, -1].abs().max())
    assert (e.value.new_token, e.value.logits_finite) == (1, True)
    assert e.value.largest == pytest.approx(largest, rel=1e-5) and largest > 4  # |l| > 4: l/T > 3.4e38
    assert sampling.greedy(big, [prompt], 6, mode=mode)  # greedy divides by nothing: it runs


# --- fixed-shape decode (the CUDA path's, run here without a graph) ---------------------------------------------

@pytest.mark.parametrize("G", [1, 8])
@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.7, 1.0), (5.0, 1.0), (1.0, 0.9)])
def test_fixed_shape_decode_samples_what_the_eager_decode_samples(tiny_dir, G, temperature, top_p):
    """The same seed, token for token: EOS (a quarter of the vocabulary, so rows finish at different steps), a stop
    rule, suppressed tokens. The fixed-shape decode keeps finished rows in its batch and draws only for the live
    ones, so the generator is read exactly as the eager decode reads it."""
    m = pretrained.load_model(tiny_dir)
    eos, suppress = list(range(0, 272, 4)), [5, 9, 13]
    stop = lambda toks: len(toks) >= 3 and toks[-1] == toks[-3]  # noqa: E731
    runs = {}
    for mode in ("eager", "static"):
        runs[mode] = sampling.sample(m, [10, 20, 30, 40], G, 24, temperature=temperature, top_p=top_p, eos=eos,
                                stop=stop, suppress=suppress, mode=mode,
                                generator=torch.Generator().manual_seed(11))
    assert runs["static"] == runs["eager"]
    assert not any(t in suppress for y in runs["eager"] for t in y)
    if G > 1 and temperature > 0:
        assert len({len(y) for y in runs["eager"]}) > 1  # rows finished at different steps


def test_fixed_shape_greedy_equals_eager_greedy_with_padding_and_early_ends(tiny_dir):
    m = pretrained.load_model(tiny_dir)
    prompts = [[3, 4, 5], [9, 8, 7, 6, 5, 4, 3], [1], [200, 100, 50, 25]]
    solo = sampling.greedy(m, prompts, 20, mode="eager")
    eos = [solo[0][3], solo[2][6]]  # rows 0 and 2 (at least) end early
    for e in ([], eos):
        assert sampling.greedy(m, prompts, 20, eos=e, mode="static") == sampling.greedy(m, prompts, 20, eos=e, mode="eager")
    assert len({len(y) for y in sampling.greedy(m, prompts, 20, eos=eos, mode="static")}) > 1


def test_fixed_shape_logits_equal_a_full_forward_at_every_step(tiny_dir, monkeypatch):
    """Every live row's logits at every fixed-shape step equal a full forward over its prompt and its own tokens:
    finished rows decoding on beside them, unread, change nothing."""
    m = pretrained.load_model(tiny_dir)
    seen, real = [], sampling.next_token

    def spy(logits, *args):
        seen.append(logits.clone())
        return real(logits, *args)

    monkeypatch.setattr(sampling, "next_token", spy)
    prompt, eos = [10, 20, 30, 40], list(range(0, 272, 4))
    rows = sampling.sample(m, prompt, 8, 8, temperature=5.0, generator=torch.Generator().manual_seed(3), eos=eos,
                    mode="static")
    assert len({len(r) for r in rows}) > 2
    for step, logits in enumerate(seen):
        live = [r for r in rows if len(r) > step]
        assert logits.shape[0] == len(live)
        for got, r in zip(logits, live):
            assert (got - m.logits(torch.tensor([prompt + r[:step]]))[0, -1]).abs().max() < 1e-4


def test_a_step_runner_is_made_once_per_shape_and_again_when_the_model_changes(tiny_dir):
    """Calls of one shape (prompts of different lengths within one SLOT_BLOCK) reuse the Sampler's StepRunner, as a
    CUDA run reuses its captured graph; LoRA put on the model, or switched off, makes a new one. A fresh Sampler
    (what sampling.sample makes without one) keeps nothing from another's."""
    import lora
    m = pretrained.load_model(tiny_dir)
    sampler, made = sampling.Sampler(m), []

    def run(prompt, rows):
        sampler.sample(prompt, rows, 10, temperature=1.0, generator=torch.Generator().manual_seed(0), mode="static")
        made.extend(r for r in sampler.runners.values() if r not in made)

    for prompt in ([1, 2, 3], [1, 2, 3, 4, 5, 6]):
        run(prompt, 4)
    assert [(r.cache.rows, r.cache.slots) for r in made] == [(4, sampling.SLOT_BLOCK)]  # 3 + 10, 6 + 10: one block
    run([1, 2, 3], 5)
    assert len(made) == 2  # another row count, another shape
    lora.apply_lora(m, r=2, fraction=0.5, generator=torch.Generator().manual_seed(0))
    run([1, 2, 3], 4)
    assert len(made) == 3 and len(sampler.runners) == 1  # the runners of the model without LoRA are dropped
    with lora.adapters_off(m):
        run([1, 2, 3], 4)
    assert len(made) == 4
    assert sampling.Sampler(m).runners == {}


# A capture that fails: refused (the graph cannot be made here) or out of memory (these rows do not fit). The capture
# itself needs CUDA; here it is replaced by one that raises, the decode around it is the real one.
REFUSED = RuntimeError("CUDA error: operation not permitted when stream is capturing")


def failed_capture(error: BaseException):
    def capture(self, model):
        raise error
    return capture


def out_of_memory_in_the_capture() -> list[BaseException]:
    """The shapes an out-of-memory error takes in a capture: torch's own, a driver's RuntimeError, and the graph's
    error raised while the capture ends, with the allocator's error as its context."""
    ended = RuntimeError("CUDA error: operation failed due to a previous error during capture")
    ended.__context__ = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            RuntimeError("CUDA error: out of memory"), ended]


def test_a_refused_capture_decodes_without_the_graph_under_its_warning(tiny_dir, monkeypatch, capsys):
    """A capture the driver refuses: the warning says so, once, and the decode runs without the graph, with the
    eager decode's tokens."""
    m = pretrained.load_model(tiny_dir)
    monkeypatch.setattr(sampling.StepRunner, "capture", failed_capture(REFUSED))
    sampler = sampling.Sampler(m)  # the warning is printed at a Sampler's first refusal: once a run
    want = sampling.greedy(m, [[3, 4, 5], [9, 8]], 12, mode="eager")
    assert sampler.greedy([[3, 4, 5], [9, 8]], 12, mode="graph") == want
    other = [[3, 4, 5], [9, 8, 7, 6, 5]]  # 5 + 12 positions: a second shape, a second refusal, no second warning
    assert sampler.greedy(other, 12, mode="graph") == sampling.greedy(m, other, 12, mode="eager")
    err = capsys.readouterr().err
    assert err == ("warning: the decode step could not be captured as a CUDA graph (CUDA error: operation not "
                   "permitted when stream is capturing); decoding without it, slower\n")
    assert sampler.runner(m, 2, 15, graph=True).graph is None
    assert (sampler.refused, sampler.captures, len(sampler.runners)) == (2, 0, 2)


@pytest.mark.parametrize("error", out_of_memory_in_the_capture(), ids=["OutOfMemoryError", "driver", "context"])
def test_out_of_memory_in_the_capture_is_named_with_its_batch_not_as_a_refused_capture(tiny_dir, monkeypatch,
                                                                                       capsys, error):
    """Out of memory while capturing is one CaptureOutOfMemory (a CacheTooLarge: the callers that name the flags
    behind a batch's size name them here too) with the rows and slots of the batch and the allocator's first line;
    no refusal is counted or warned about, and nothing decodes."""
    m = pretrained.load_model(tiny_dir)
    monkeypatch.setattr(sampling.StepRunner, "capture", failed_capture(error))
    sampler = sampling.Sampler(m)
    with pytest.raises(sampling.CaptureOutOfMemory) as e:
        sampler.sample([1, 2, 3], 6, 20, temperature=1.0, generator=torch.Generator().manual_seed(0), mode="graph")
    assert isinstance(e.value, M.CacheTooLarge)
    slots = 2 * sampling.SLOT_BLOCK  # 3 + 20 positions, rounded up to a block
    nbytes = 6 * slots * (2 * 4 * 2 * 16 * 4 + 1)  # tiny_config: 4 layers × 2 KV heads × 16 head dims, fp32, + mask
    assert (e.value.rows, e.value.positions, e.value.nbytes) == (6, slots, nbytes)
    reason = "OutOfMemoryError: CUDA out of memory. Tried" if "Tried" in str(sampling.out_of_memory(error)) else \
        "RuntimeError: CUDA error: out of memory"
    e.value.flags = "-G 6, --max-new-tokens 20"  # what training.py fills in for a training group
    assert str(e.value).startswith(f"the decode step for -G 6, --max-new-tokens 20 (rows × slots = 6 × {slots}) "
                                   f"ran out of memory on cpu while captured as a CUDA graph, beside its "
                                   f"{nbytes / 2**30:.2f} GiB fixed-shape cache ({reason}")
    assert str(e.value).endswith("); fewer rows lower it") and "\n" not in str(e.value)
    assert sampler.refused == 0 and capsys.readouterr().err == ""


@pytest.mark.parametrize("where", ["evaluation", "training"])
def test_out_of_memory_in_the_capture_stops_a_run_with_the_flag_that_lowers_it(tiny_dir, tmp_path, monkeypatch,
                                                                               capsys, where):
    """Through the CLI, with the graph decode chosen as on CUDA: the evaluation's batch names --eval-batch, a
    training group names -G; one error line, and no refusal warning."""
    from conftest import refused
    monkeypatch.setattr(sampling, "default_mode", lambda device: "graph")
    oom = failed_capture(torch.OutOfMemoryError("CUDA out of memory."))
    # training: the step-0 evaluation's one-row batch decodes without a graph (as a capture that did nothing); the
    # group of 4 runs out of memory
    def capture(self, model):
        return (oom if where == "evaluation" or self.cache.rows == 4 else lambda *_: None)(self, model)
    monkeypatch.setattr(sampling.StepRunner, "capture", capture)
    common = ["--model", str(tiny_dir), "--task", "mult", "--device", "cpu", "--max-new-tokens", "8",
              "--lora-fraction", "0.5"]
    if where == "evaluation":
        args = [*common, "--eval-only", "--eval-limit", "3", "--eval-batch", "3"]
        flags = "for --eval-batch 3, --eval-max-new-tokens 8 (rows × slots = 3 × "
    else:
        args = [*common, "--out", str(tmp_path / "run"), "-G", "4", "--steps", "1", "--eval-limit", "1",
                "--eval-batch", "1", "--eval-every", "0"]
        flags = "for -G 4, --max-new-tokens 8 (rows × slots = 4 × "
    code, err = refused(args, capsys)
    line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
    assert line.startswith(f"error: the decode step {flags}") and "ran out of memory on cpu" in line
    assert "warning" not in err and code != 0


def test_bf16_sampling_uses_a_bf16_base_and_the_very_adapter_tensors(tiny_dir):
    """precision="bf16" samples from a copy whose frozen weights are bf16 and whose LoRA tensors are the model's
    own: an update of the adapter in place (AdamW's) is sampled from at once, with no copy made again."""
    import lora
    m = pretrained.load_model(tiny_dir)
    lora.apply_lora(m, r=2, fraction=0.5, generator=torch.Generator().manual_seed(0))
    sampler = sampling.Sampler(m)
    copy16 = sampler.bf16()
    adapter = {id(p) for p in lora.lora_parameters(m)}
    for name, p in copy16.named_parameters():
        assert (id(p) in adapter) == ("lora_" in name)
        assert p.dtype == (torch.float32 if "lora_" in name else torch.bfloat16), name
    assert copy16.lm_head.weight is copy16.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        for p in lora.lora_parameters(m):
            p.add_(0.5)
    assert sampler.bf16() is copy16
    x = torch.tensor([[1, 2, 3, 4]])
    diff = (copy16.logits(x).float() - m.logits(x)).abs().max()
    assert 0 < diff < 0.05  # bf16's rounding, with the moved adapter in both
    ys = sampling.sample(m, [1, 2, 3], 4, 12, temperature=0.7, generator=torch.Generator().manual_seed(1),
                  precision="bf16", mode="static")
    assert all(1 <= len(y) <= 12 and all(0 <= t < m.config.vocab_size for t in y) for y in ys)


def test_unknown_mode_or_precision_is_named(tiny_dir):
    m = pretrained.load_model(tiny_dir)
    with pytest.raises(ValueError, match="mode 'fast'"):
        sampling.sample(m, [1], 2, 2, temperature=1.0, generator=None, mode="fast")
    with pytest.raises(ValueError, match="precision 'fp8'"):
        sampling.sample(m, [1], 2, 2, temperature=1.0, generator=None, precision="fp8")


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sampling.next_token(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are outside the nucleus
    draws = {int(sampling.next_token(logits, 1.0, 0.85, g)) for _ in range(300)}
    assert draws == {0, 1, 2}


# --- the entropy of each draw (B1's H_j, for --replay-cut entropy) --------------------------------------------------

def entropy_by_hand(logits: torch.Tensor, temperature: float, top_p: float, suppress=()) -> float:
    """−Σ q ln q, q = softmax(l/T) over top-p's nucleus (the most probable tokens, until their mass reaches top_p),
    renormalised; suppressed tokens out. In float64, one token at a time."""
    l = [-math.inf if v in suppress else x / temperature for v, x in enumerate(logits.double().tolist())]
    top = max(l)
    e = [math.exp(x - top) for x in l]
    p = sorted((x / sum(e) for x in e), reverse=True)
    kept, mass = [], 0.0
    for x in p:
        if mass >= top_p:  # the mass before this token already reaches top_p: outside the nucleus
            break
        kept.append(x)
        mass += x
    return -sum(x / mass * math.log(x / mass) for x in kept if x > 0)


def test_next_token_s_entropy_by_hand():
    """p = (0.5, 0.3, 0.15, 0.05): H = −Σ p ln p; top-p 0.7 keeps (0.5, 0.3), renormalised to (5/8, 3/8); T = 0.5
    squares p before normalising; greedy: 0. The token drawn is the one drawn without the entropy."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    H = lambda *p: -sum(x * math.log(x) for x in p)  # noqa: E731
    sq = [x * x / 0.365 for x in (0.5, 0.3, 0.15, 0.05)]  # 0.25 + 0.09 + 0.0225 + 0.0025 = 0.365
    for T, top_p, want in [(1.0, 1.0, H(0.5, 0.3, 0.15, 0.05)), (1.0, 0.7, H(5 / 8, 3 / 8)), (0.5, 1.0, H(*sq))]:
        g, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        tok, h = sampling.next_token(logits, T, top_p, g, True)
        assert torch.equal(tok, sampling.next_token(logits, T, top_p, g2)) and torch.equal(g.get_state(), g2.get_state())
        assert h.shape == (2,) and torch.allclose(h, torch.tensor([want, want]), atol=1e-6), (T, top_p)
    tok, h = sampling.next_token(logits, 0.0, 1.0, None, True)
    assert tok.tolist() == [0, 0] and h.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("mode", ["eager", "static"])
@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.0, 0.9), (0.0, 1.0)])
def test_sample_records_the_entropy_of_the_distribution_each_token_was_drawn_from(tmp_path, mode, temperature,
                                                                                  top_p):
    """sample(entropy=True), B1's H_j: for every row and every token r[t], entropy_by_hand of the logits of a full
    forward over prompt + r[:t] (the distribution r[t] was drawn from, not the next one), suppressed tokens out; 0
    for greedy. EOS (an eighth of the vocabulary) ends rows at different steps, so the entropies of rows that are
    dropped or kept must still land in their own row. Recording draws the same tokens and leaves the generator
    where it is left without."""
    m = pretrained.load_model(make_checkpoint(tmp_path / "m", std=0.1))  # peaked enough that neighbouring H differ (~0.05)
    prompt, eos, suppress = [10, 20, 30, 40], list(range(0, 272, 8)), [5, 9, 13]
    kw = dict(temperature=temperature, top_p=top_p, eos=eos, suppress=suppress, mode=mode)
    g, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    plain = sampling.sample(m, prompt, 6, 10, generator=g, **kw)
    rows, hs = sampling.sample(m, prompt, 6, 10, generator=g2, entropy=True, **kw)
    assert rows == plain and torch.equal(g.get_state(), g2.get_state())
    assert [len(h) for h in hs] == [len(r) for r in rows]
    if temperature > 0:
        assert len({len(r) for r in rows}) > 2  # rows finished at different steps
    for r, h in zip(rows, hs):
        for t in range(len(r)):
            want = entropy_by_hand(m.logits(torch.tensor([prompt + r[:t]]))[0, -1], temperature, top_p, suppress) \
                if temperature else 0.0
            assert abs(h[t] - want) < 1e-4, (r, t, h[t], want)


# --- scoring ------------------------------------------------------------------------------------------------------

def test_scoring_at_positions_equals_full_log_softmax(tiny_dir):
    m = pretrained.load_model(tiny_dir)
    ids = batch_of_prompts(2, B=1, T=30)[0]
    pos = torch.tensor([1, 5, 6, 17, 29])
    got = M.token_logprobs(m, ids, pos)
    full = torch.log_softmax(m.logits(ids[None])[0], -1)  # (T, V)
    want = full[pos - 1, ids[pos]]
    assert (got - want).abs().max() < 1e-5
    h = m(ids[None])[0][pos - 1]
    multi = m.logprobs_at(h, torch.stack([ids[pos], ids[pos - 1]], -1))  # (N, 2)
    assert (multi[:, 1] - full[pos - 1, ids[pos - 1]]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="position 0"):
        M.token_logprobs(m, ids, [0, 3])


# --- the real tokenizer and the Qwen2-1.5B shape ------------------------------------------------------------------

def test_real_tokenizer_chatml_round_trip():
    tok = tokenizer.Tokenizer(assets() / "qwen2" / "tokenizer.json")
    assert tok.encode("What's 123 multiplied by 456? Don't use a calculator.") == \
        [3838, 594, 220, 16, 17, 18, 54916, 553, 220, 19, 20, 21, 30, 4320, 944, 990, 264, 29952, 13]
    text = tokenizer.chatml("You are a helpful AI assistant.", "What's 123 multiplied by 456? Don't use a calculator.",
                    "Let's break this problem down step by step.")
    ids = tok.encode(text)
    assert ids[0] == 151644 and ids.count(151644) == 3 and ids.count(151645) == 2
    assert tok.decode(ids, skip_special_tokens=False) == text
    cfg = pretrained.read_config(assets() / "qwen2" / "config_Qwen2-1.5B-base.reconstructed.json")
    assert pretrained.eos_ids(None, cfg, tok) == (151643, 151645)


def test_qwen2_1_5b_config_has_1_543_714_304_parameters():
    cfg = pretrained.read_config(assets() / "qwen2" / "config_Qwen2-1.5B-base.reconstructed.json")
    assert cfg == M.PRESETS["qwen2-1.5b"]
    with torch.device("meta"):
        m = M.Qwen2ForCausalLM(cfg)
    assert M.num_parameters(m) == 1_543_714_304


# --- bad input ----------------------------------------------------------------------------------------------------

def edit_config(path, **kw):
    d = json.loads((path / "config.json").read_text())
    d.update(kw)
    (path / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("key,value,message", [
    ("model_type", "llama", "model_type is 'llama'"),
    ("use_sliding_window", True, "use_sliding_window"),
    ("rope_scaling", {"type": "yarn", "factor": 4.0}, "rope_scaling"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6}, "rope_type is 'yarn'"),
    ("hidden_act", "gelu", "hidden_act"),
    ("num_key_value_heads", 3, "not a multiple"),
])
def test_unsupported_config_is_refused_naming_the_key(tiny_dir, key, value, message):
    edit_config(tiny_dir, **{key: value})
    with pytest.raises(ValueError, match=message) as e:
        pretrained.load_model(tiny_dir)
    assert "config.json" in str(e.value)


def test_missing_files_are_named(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        pretrained.load_model(tmp_path / "nowhere")
    (tiny_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        pretrained.load_model(tiny_dir)
    d2 = make_checkpoint(tmp_path / "noweights")
    (d2 / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        pretrained.load_model(d2)
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        tokenizer.Tokenizer(tmp_path / "nowhere" / "tokenizer.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: cannot read tokenizer"):
        tokenizer.Tokenizer(tmp_path / "bad.json")


def test_missing_shard_and_bad_index_are_named(tmp_path):
    path, _ = hf_checkpoint(tmp_path / "hf", tie=True, max_shard_size="60KB")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        pretrained.load_model(path)
    (path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ValueError, match="not a valid safetensors index"):
        pretrained.load_model(path)


def test_truncated_weights_are_named(tiny_dir):
    f = tiny_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors: cannot read safetensors file"):
        pretrained.load_model(tiny_dir)
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        pretrained.load_model(tiny_dir)


def test_mismatched_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    d = make_checkpoint(tmp_path / "m")
    state = load_file(str(d / "model.safetensors"))
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    state["model.layers.2.self_attn.q_proj.bias"] = torch.zeros(7)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        pretrained.load_model(d)
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "missing" in msg
    assert "model.layers.0.extra.weight" in msg and "unexpected" in msg
    assert "model.layers.2.self_attn.q_proj.bias: file (7,) vs config (64,)" in msg


def test_untied_checkpoint_without_lm_head_is_refused(tmp_path):
    d = make_checkpoint(tmp_path / "m", tiny_config(tie_word_embeddings=False))
    from safetensors.torch import load_file, save_file
    state = load_file(str(d / "model.safetensors"))
    state.pop("lm_head.weight")
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        pretrained.load_model(d)


def test_padding_rows_are_never_fully_masked():
    """Every query row of the mask sees at least one key (itself when it is padding), and real rows never see
    padding: a fully masked row makes some attention kernels return NaN, which 0·NaN carries into real rows."""
    cfg = tiny_config(num_hidden_layers=1)
    cache = M.KVCache(cfg, 2, 8, "cpu", torch.float32)
    cache.valid[0, :3] = False  # row 0: 3 slots of left padding
    cache.padded = True
    mask = M.cache_mask(cache, 0, 5)[:, 0]  # (B, T, S)
    assert mask.any(-1).all()
    assert mask[0, 3:, :3].sum() == 0  # real queries of row 0 never see its padding
    assert mask[0, :3, :3].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # padding sees only itself
    assert mask[1].int().tolist() == torch.ones(5, 5).tril().int().tolist()  # unpadded row: plain causal


@pytest.mark.parametrize("V", [256, 300, 1000])
def test_two_level_draw_has_the_distribution_of_multinomial(V):
    """draw() picks a block of 128 by its mass, then an entry in it by its mass: P = P(block)·P(entry | block) = p.
    Chi-square of 200,000 draws against p: with V − 1 degrees of freedom it is about V − 1 (sd sqrt(2(V − 1)));
    a wrong inner or outer step (e.g. uniform within the block) gives tens of thousands."""
    g = torch.Generator().manual_seed(V)
    p = torch.rand(V, generator=g) ** 3
    p[::7] = 0.0  # zero-mass entries are never drawn
    p /= p.sum()
    counts = torch.zeros(V)
    for _ in range(10):
        idx = sampling.draw(p.expand(20_000, V).contiguous(), g)
        counts += torch.bincount(idx, minlength=V).float()
    assert counts[::7].sum() == 0
    expected = p * counts.sum()
    nz = expected > 0
    chi2 = float(((counts[nz] - expected[nz]) ** 2 / expected[nz]).sum())
    df = int(nz.sum()) - 1
    assert chi2 < df + 6 * (2 * df) ** 0.5, f"chi2 {chi2:.0f} for {df} degrees of freedom"


# --- Qwen2.5: the same architecture (model_type qwen2) ------------------------------------------------------------

def qwen25_style_config(**sizes) -> dict:
    """A config.json with every key a Qwen2.5 repo writes: a sliding window present but off (use_sliding_window
    false, sliding_window, max_window_layers), use_mrope false, rope_scaling null, bf16 torch_dtype. Tiny sizes unless
    given; max_window_layers below num_hidden_layers, so that a window wrongly turned on would change the logits."""
    return {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 256, "eos_token_id": 256,
            "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 96,
            "max_position_embeddings": 32768, "max_window_layers": 1, "model_type": "qwen2",
            "num_attention_heads": 4, "num_hidden_layers": 3, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
            "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 4, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True, "use_mrope": False,
            "use_sliding_window": False, "vocab_size": TINY_VOCAB, **sizes}


@pytest.mark.parametrize("tie", [True, False])  # Qwen2.5 0.5B-3B tie the embeddings, 7B and larger do not
def test_qwen25_style_config_builds_and_loads_like_transformers(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    d = qwen25_style_config(tie_word_embeddings=tie)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**d)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(d))  # the file as the Hub serves it, not as transformers writes
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [258, 256]}))  # -Instruct's pair
    ours = pretrained.load_model(tmp_path)
    assert ours.config.tie_word_embeddings == tie and ours.config.num_hidden_layers == 3
    ids = batch_of_prompts(T=12)  # 12 tokens > sliding_window 4: a window applied by mistake would show
    assert (ours.logits(ids) - hf(ids).logits).abs().max() < 1e-5
    assert pretrained.eos_ids(tmp_path, ours.config, None) == (256, 258)


@pytest.mark.parametrize("name,sizes,expected", [
    # Qwen2.5-1.5B's shape is Qwen2-1.5B's: tied, 1,543,714,304 parameters (test above)
    ("1.5B", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_window_layers=21, sliding_window=131072), 1_543_714_304),
    # Qwen2.5-7B's shape, untied: 28 layers × 233,057,792 + 2 × 152,064 × 3,584 (embedding, head) + 3,584 (norm)
    ("7B", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_window_layers=28, sliding_window=131072,
                tie_word_embeddings=False), 7_615_616_512),
])
def test_qwen25_sizes_build_with_transformers_parameter_count(name, sizes, expected):
    transformers = pytest.importorskip("transformers")
    d = qwen25_style_config(**sizes)
    with torch.device("meta"):
        ours = M.Qwen2ForCausalLM(pretrained.config_from_dict(d))
        ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**d))
    assert M.num_parameters(ours) == sum(p.numel() for p in ref.parameters()) == expected
