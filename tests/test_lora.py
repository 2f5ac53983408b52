"""lora.py — L1: step 0 equals the base model, only A and B learn, the paper's layer and parameter counts,
merge/unmerge, adapters off = π_ref, and the PEFT on-disk format both ways (peft is the oracle)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import hf_checkpoint, make_checkpoint, refused, tiny_config
import checkpoints
import lora
import model as M
import pretrained


def tiny_model(tmp_path, **kw):
    return pretrained.load_model(make_checkpoint(tmp_path / "m", tiny_config(**kw)))


IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]])


def train_a_little(m, steps=3):
    opt = torch.optim.AdamW(lora.lora_parameters(m), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        m.logits(IDS).pow(2).mean().backward()
        opt.step()


def test_fresh_adapter_gives_exactly_the_base_logits(tmp_path):
    m = tiny_model(tmp_path)
    with torch.no_grad():
        base = m.logits(IDS)
    lora.apply_lora(m, r=4, fraction=0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m.logits(IDS), base)  # B = 0: the update is exactly zero
    assert all(mod.lora_A.abs().sum() > 0 for _, mod in lora.lora_modules(m))  # A is not zero (Kaiming)


def test_only_A_and_B_receive_gradients(tmp_path):
    m = tiny_model(tmp_path)
    lora.apply_lora(m, r=4, fraction=0.5)
    m.logits(IDS).pow(2).mean().backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert trainable == with_grad
    assert trainable == {f"model.layers.{i}.self_attn.{t}.lora_{ab}" for i in (2, 3) for t in ("q_proj", "v_proj")
                         for ab in "AB"}
    # B gets a gradient at step 0 (A does not, since B = 0 multiplies it): the first update moves B only
    mods = dict(lora.lora_modules(m))
    assert mods["model.layers.3.self_attn.q_proj"].lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("fraction,r,layers,params", [(1 / 3, 16, 9, 700_416), (1 / 4, 8, 7, 272_384)])
def test_paper_layer_and_parameter_counts_for_qwen2_1_5b(fraction, r, layers, params):
    """q_proj: A (r, 1536) + B (1536, r); v_proj: A (r, 1536) + B (256, r) -> r·(1536+1536+1536+256) = r·4,864 a layer.
    SVAMP: 9 layers × 4,864·16 = 700,416. Multiplication: 7 × 4,864·8 = 272,384."""
    with torch.device("meta"):
        m = M.Qwen2ForCausalLM(M.PRESETS["qwen2-1.5b"])
        chosen = lora.apply_lora(m, r=r, fraction=fraction)
    assert chosen == list(range(28 - layers, 28))
    assert sum(p.numel() for p in lora.lora_parameters(m)) == params
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == params


def test_round_half_up():
    assert [lora.num_lora_layers(28, f) for f in (1 / 3, 1 / 4, 0.5)] == [9, 7, 14]
    assert lora.num_lora_layers(10, 0.25) == 3  # 2.5 rounds up (Python's round() would give 2)
    with pytest.raises(ValueError, match="selects 0 layers"):
        lora.apply_lora(M.Qwen2ForCausalLM(tiny_config()), r=2, fraction=0.01)


def test_merged_equals_unmerged_and_adapters_off_equals_base(tmp_path):
    m = tiny_model(tmp_path)
    with torch.no_grad():
        base = m.logits(IDS)
    lora.apply_lora(m, r=4, fraction=0.5)
    train_a_little(m)
    with torch.no_grad():
        adapted = m.logits(IDS)
        assert (adapted - base).abs().max() > 1e-4  # training moved the policy
        with lora.adapters_off(m):
            assert torch.equal(m.logits(IDS), base)  # π_ref: exactly the base model, after training
        assert torch.equal(m.logits(IDS), adapted)  # and back on afterwards
        lora.merge(m)
        assert (m.logits(IDS) - adapted).abs().max() < 1e-5
        with pytest.raises(RuntimeError, match="unmerge"):
            with lora.adapters_off(m):
                pass
        lora.unmerge(m)
        assert (m.logits(IDS) - adapted).abs().max() < 1e-5
        with lora.adapters_off(m):
            assert (m.logits(IDS) - base).abs().max() < 1e-5


def test_l2_penalty_by_hand(tmp_path):
    m = tiny_model(tmp_path)
    lora.apply_lora(m, r=2, fraction=0.25)  # one layer, q and v
    with torch.no_grad():
        for _, mod in lora.lora_modules(m):
            mod.lora_A.fill_(0.5)
            mod.lora_B.fill_(1.0)
    # q: A 2×64 of 0.25 -> 32, B 64×2 of 1 -> 128; v: A 2×64 -> 32, B 32×2 -> 64: total 256
    assert float(lora.l2_penalty(m).detach()) == pytest.approx(256.0)


def test_adapter_norms_by_hand(tmp_path):
    """Every A = 0.5 and every B = 0.1 (rank 4): mean |A| 0.5, mean |B| 0.1, and each B·A has every entry
    4·0.5·0.1 = 0.2, so ‖ΔW‖² = Σ_modules d_out·d_in·0.04. Random A, B: equal to the norm of the explicit products."""
    m = tiny_model(tmp_path)
    lora.apply_lora(m, r=4, fraction=0.5, generator=torch.Generator().manual_seed(0))
    mods = [mod for _, mod in lora.lora_modules(m)]
    assert lora.adapter_norms(m)["lora_BA_norm"] == 0.0  # B = 0 at the start: the adapter adds nothing
    with torch.no_grad():
        for mod in mods:
            mod.lora_A.fill_(0.5), mod.lora_B.fill_(0.1)
    n = lora.adapter_norms(m)
    by_hand = sum(mod.lora_B.shape[0] * mod.lora_A.shape[1] * 0.2 ** 2 for mod in mods) ** 0.5
    assert n["lora_A_mean_abs"] == 0.5 and n["lora_B_mean_abs"] == pytest.approx(0.1)
    assert n["lora_BA_norm"] == pytest.approx(by_hand, rel=1e-6)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in mods:
            mod.lora_A.copy_(torch.randn(mod.lora_A.shape, generator=g)), mod.lora_B.copy_(torch.randn(
                mod.lora_B.shape, generator=g))
        explicit = sum(float((mod.lora_B @ mod.lora_A).pow(2).sum()) for mod in mods) ** 0.5
    assert lora.adapter_norms(m)["lora_BA_norm"] == pytest.approx(explicit, rel=1e-5)


def test_save_and_load_round_trip(tmp_path):
    m = tiny_model(tmp_path)
    lora.apply_lora(m, r=4, fraction=0.5)
    train_a_little(m)
    checkpoints.write_adapter(m, tmp_path / "adapter", base_model="tiny")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4 and cfg["layers_to_transform"] == [2, 3]
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    m2 = tiny_model(tmp_path)
    assert lora.load_adapter(m2, tmp_path / "adapter") == [2, 3]
    with torch.no_grad():
        assert torch.equal(m2.logits(IDS), m.logits(IDS))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(tiny_model(tmp_path), tmp_path / "nowhere")


def test_peft_loads_what_tokrl_saved_and_tokrl_loads_what_peft_saved(tmp_path):
    peft = pytest.importorskip("peft")
    path, hf = hf_checkpoint(tmp_path / "hf", tie=True, layers=4)
    ours = pretrained.load_model(path)
    lora.apply_lora(ours, r=4, fraction=0.5, generator=torch.Generator().manual_seed(1))
    train_a_little(ours)
    checkpoints.write_adapter(ours, tmp_path / "ad", base_model=str(path))
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    with torch.no_grad():
        err = (pm(IDS).logits - ours.logits(IDS)).abs().max()
        with lora.adapters_off(ours):
            moved = (pm(IDS).logits - ours.logits(IDS)).abs().max()
    print(f"\npeft vs tokrl adapter logits: max abs err {err:.3e} (adapter moved logits by {moved:.3e})")
    assert err < 1e-5 and moved > 1e-4

    # the other way: an adapter made and trained in peft, loaded by tokrl
    _, hf2 = hf_checkpoint(tmp_path / "hf2", tie=True, layers=4)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 3])
    pm2 = peft.get_peft_model(hf2, cfg)
    with torch.no_grad():
        for n, p in pm2.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm2.save_pretrained(tmp_path / "peft_ad")
    ours2 = pretrained.load_model(tmp_path / "hf2")
    assert lora.load_adapter(ours2, tmp_path / "peft_ad") == [1, 3]
    with torch.no_grad():
        err2 = (pm2(IDS).logits - ours2.logits(IDS)).abs().max()
    assert err2 < 1e-5


# --- the same A on every device and dtype, fp32 adapters under a bf16 base --------------------------------------------

def test_A_is_drawn_in_fp32_on_the_cpu_whatever_the_base(tmp_path):
    """One seed, one A: drawn on the CPU in fp32 from the seeded CPU generator, then moved. A bf16 base (or a CUDA
    one, tests/test_gpu.py) gets exactly the fp32 A of an fp32 base; B is fp32 zeros."""
    r, seed = 4, 11
    want = lora.init_lora_A(r, 64, torch.Generator().manual_seed(seed))
    for dtype in (torch.float32, torch.bfloat16):
        m = tiny_model(tmp_path).to(dtype)
        lora.apply_lora(m, r=r, fraction=0.25, generator=torch.Generator().manual_seed(seed))
        first = lora.lora_modules(m)[0][1]
        assert first.lora_A.dtype == first.lora_B.dtype == torch.float32
        assert torch.equal(first.lora_A, want)  # the first adapter takes the generator's first draw


def bf16_model_with_adapter(tmp_path, fp32_copy=False):
    m = tiny_model(tmp_path)
    if not fp32_copy:
        m = m.to(torch.bfloat16)
    lora.apply_lora(m, r=4, fraction=0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in lora.lora_parameters(m):
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    return m


def test_bf16_base_keeps_fp32_adapters_and_a_tiny_adamw_step_moves_them(tmp_path):
    m = bf16_model_with_adapter(tmp_path)
    params = lora.lora_parameters(m)
    assert all(p.dtype == torch.float32 for p in params)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    m.logits(IDS).float().pow(2).mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in params)
    opt.step()
    assert all(s.dtype == torch.float32 for st in opt.state.values() for s in st.values() if s.dim())
    moved = sum(int((p.detach() != b).sum()) for p, b in zip(params, before)) / sum(b.numel() for b in before)
    # the same update on bf16 copies: more than half rounds away (bf16 spacing at |w| ≥ 0.016 exceeds 1e-4)
    bf16_moved = sum(int((p.detach().bfloat16() != b.bfloat16()).sum()) for p, b in zip(params, before)) / \
        sum(b.numel() for b in before)
    print(f"\nAdamW lr 1e-4 on a bf16 base: fp32 adapter entries changed {moved:.1%}; as bf16 they would {bf16_moved:.1%}")
    assert moved > 0.99 and bf16_moved < 0.5


def test_bf16_forward_mixes_like_peft_and_stays_close_to_fp32(tmp_path):
    """h = (W0·x + b0 in bf16) + (α/r)·B·A·x in fp32 from x cast up, summed in fp32, cast back to bf16."""
    m = bf16_model_with_adapter(tmp_path)
    ref = bf16_model_with_adapter(tmp_path, fp32_copy=True)
    mod = dict(lora.lora_modules(m))["model.layers.3.self_attn.q_proj"]
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    y = mod(x)
    base = torch.nn.functional.linear(x, mod.weight, mod.bias)
    by_hand = (base.float() + mod.scaling * (x.float() @ mod.lora_A.T @ mod.lora_B.T)).bfloat16()
    assert y.dtype == torch.bfloat16 and torch.equal(y, by_hand)
    with torch.no_grad():
        lo, hi = m.logits(IDS).float(), ref.logits(IDS)
        with lora.adapters_off(ref):
            moved = (ref.logits(IDS) - hi).abs().max()
    err = (lo - hi).abs().max()
    print(f"\nbf16 base + fp32 adapter vs all-fp32: max abs logit error {err:.2e} (the adapter moves logits {moved:.2e})")
    assert err < 0.05 * moved


# --- PEFT config fields are honoured or refused by name ---------------------------------------------------------------

def test_peft_rank_and_alpha_patterns_give_peft_s_logits(tmp_path):
    peft = pytest.importorskip("peft")
    path, hf = hf_checkpoint(tmp_path / "hf", tie=True, layers=4)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[2, 3],
                          rank_pattern={"layers.3.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 40})
    pm = peft.get_peft_model(hf, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "ad")
    ours = pretrained.load_model(path)
    lora.load_adapter(ours, tmp_path / "ad")
    mods = dict(lora.lora_modules(ours))
    assert mods["model.layers.3.self_attn.q_proj"].r == 6 and mods["model.layers.2.self_attn.q_proj"].r == 2
    assert mods["model.layers.2.self_attn.v_proj"].scaling == 40 / 2
    with torch.no_grad():
        err = (pm.eval()(IDS).logits - ours.logits(IDS)).abs().max()
    assert err < 1e-5


@pytest.mark.parametrize("field,value", [("use_dora", True), ("lora_bias", True), ("modules_to_save", ["lm_head"]),
                                         ("layer_replication", [[0, 2]]), ("init_lora_weights", "pissa"),
                                         ("fan_in_fan_out", True), ("some_future_field", 3),
                                         ("bias", "all"), ("bias", "lora_only"), ("exclude_modules", ["q_proj"]),
                                         ("init_lora_weights", "olora"), ("init_lora_weights", "loftq"),
                                         ("init_lora_weights", "corda"), ("init_lora_weights", "eva"),
                                         ("init_lora_weights", "lora_ga"), ("target_parameters", ["x.weight"]),
                                         ("trainable_token_indices", [1, 2]), ("use_qalora", True),
                                         ("alora_invocation_tokens", [5]), ("layers_pattern", "h"),
                                         ("target_modules", r".*\.mlp\.down_proj"), ("target_modules", ".*"),
                                         ("target_modules", ["q_proj", "gate_proj"]), ("target_modules", ["mlp"])])
def test_peft_fields_we_do_not_implement_are_refused_by_name(tmp_path, field, value):
    m = tiny_model(tmp_path)
    lora.apply_lora(m, r=2, fraction=0.25)
    checkpoints.write_adapter(m, tmp_path / "ad")
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{field} = .* is not supported"):
        lora.load_adapter(tiny_model(tmp_path), tmp_path / "ad")


def test_L1_by_hand():
    """h = W0·x + b0 + (α/r)·B·A·x with W0 = [[1, 2], [3, 4]], b0 = [0.5, −0.5], r = 1, α = 2, A = [[1, 1]],
    B = [[1], [2]], x = [1, 1]: W0·x + b0 = [3.5, 6.5]; A·x = 2; B·2 = [2, 4]; ×(α/r = 2) = [4, 8] -> [7.5, 14.5]."""
    base = torch.nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    mod = lora.LoRALinear(base, r=1, alpha=2.0)
    assert torch.equal(mod(torch.ones(2)), torch.tensor([3.5, 6.5]))  # B = 0: the base layer exactly
    with torch.no_grad():
        mod.lora_A.copy_(torch.tensor([[1.0, 1.0]]))
        mod.lora_B.copy_(torch.tensor([[1.0], [2.0]]))
    assert mod(torch.ones(2)).tolist() == [7.5, 14.5]
    mod.enabled = False
    assert mod(torch.ones(2)).tolist() == [3.5, 6.5]


# --- PEFT adapters with the fields PEFT writes: loaded to PEFT's logits, or refused naming the field ------------------

def peft_adapter(tmp_path, peft, **config):
    """A PEFT adapter made by peft on a tiny transformers Qwen2 (4 layers), with random B (so it moves the logits),
    saved as PEFT saves it. Returns (model directory, the PEFT model, the adapter directory)."""
    path, hf = hf_checkpoint(tmp_path / "hf", tie=True, layers=4)
    with torch.no_grad():
        base = hf(IDS).logits
    pm = peft.get_peft_model(hf, peft.LoraConfig(**config))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or n.endswith(".bias") and p.requires_grad:  # trained biases: bias = all / lora_only
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
        moved = (pm(IDS).logits - base).abs().max()
    assert moved > 1e-2, f"the adapter moves the logits by only {moved}"
    pm.save_pretrained(tmp_path / "ad")
    return path, pm.eval(), tmp_path / "ad"


QV = ["q_proj", "v_proj"]


@pytest.mark.parametrize("config,scalings", [
    # rsLoRA: scale α/√r (8/√4 = 4; 8/√2 for the rank_pattern's r = 2), not α/r
    (dict(r=4, lora_alpha=8, use_rslora=True, target_modules=QV, layers_to_transform=[1, 3],
          rank_pattern={"layers.3.self_attn.q_proj": 2}),
     {"model.layers.1.self_attn.q_proj": 8 / 4 ** 0.5, "model.layers.3.self_attn.q_proj": 8 / 2 ** 0.5}),
    (dict(r=4, lora_alpha=6, use_rslora=True, target_modules=QV, alpha_pattern={"v_proj": 12}),
     {"model.layers.0.self_attn.q_proj": 3.0, "model.layers.2.self_attn.v_proj": 6.0}),
    # a pattern key matches a whole dotted tail of the name: "q" is no q_proj's, "layers.1.self_attn.v_proj" is one's
    (dict(r=2, lora_alpha=4, target_modules=QV, alpha_pattern={"q": 40, "layers.1.self_attn.v_proj": 8}),
     {"model.layers.0.self_attn.q_proj": 2.0, "model.layers.1.self_attn.v_proj": 4.0,
      "model.layers.0.self_attn.v_proj": 2.0}),
    # lora_dropout (off at inference), layers_pattern, the random inits
    (dict(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=QV, layers_to_transform=[0, 2], layers_pattern="layers"),
     {"model.layers.2.self_attn.v_proj": 2.0}),
    (dict(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["k_proj", "o_proj"]),
     {"model.layers.3.self_attn.o_proj": 1.0}),
    (dict(r=4, lora_alpha=4, init_lora_weights="orthogonal", target_modules=QV), {}),
    (dict(r=2, lora_alpha=4, init_lora_weights=False, target_modules=QV, bias="none"), {}),
    # target_modules a regular expression: matched against each module's whole name; layers_to_transform unused
    (dict(r=2, lora_alpha=4, target_modules=r".*\.layers\.[13]\.self_attn\.(q|k)_proj"),
     {"model.layers.1.self_attn.k_proj": 2.0}),
    # names in a list: a module's whole name, or a dotted tail of it
    (dict(r=2, lora_alpha=4, target_modules=["self_attn.q_proj", "model.layers.2.self_attn.v_proj"]),
     {"model.layers.0.self_attn.q_proj": 2.0, "model.layers.2.self_attn.v_proj": 2.0}),
], ids=["rslora-rank-pattern", "rslora-alpha-pattern", "pattern-tails", "dropout-layers-pattern", "gaussian",
        "orthogonal", "init-false", "regex-targets", "name-tails"])
def test_peft_adapters_with_the_fields_peft_writes_give_peft_s_logits(tmp_path, config, scalings):
    """Each adapter peft makes and saves, loaded by tokrl onto the same base: the same modules adapted, each at
    PEFT's scale, and PEFT's logits (max abs error < 1e-5, where the adapter moves them by more than 1e-2). The
    bugs it is written for: an rsLoRA adapter loaded at α/r (or any other scale than α/√r), a field read wrong."""
    peft = pytest.importorskip("peft")
    path, pm, ad = peft_adapter(tmp_path, peft, **config)
    ours = pretrained.load_model(path)
    lora.load_adapter(ours, ad)
    adapted = {n.removeprefix("base_model.model.") for n, mod in pm.named_modules() if hasattr(mod, "lora_A")
               and isinstance(mod.lora_A, torch.nn.ModuleDict)}
    mods = dict(lora.lora_modules(ours))
    assert set(mods) == adapted
    for name, scale in scalings.items():
        assert mods[name].scaling == pytest.approx(scale, rel=1e-12)
        assert pm.get_submodule(f"base_model.model.{name}").scaling["default"] == pytest.approx(scale, rel=1e-12)
    with torch.no_grad():
        err = (pm(IDS).logits - ours.logits(IDS)).abs().max()
    print(f"\n{config}: tokrl vs peft max abs logit error {err:.1e}")
    assert err < 1e-5


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_peft_adapters_with_trained_biases_are_refused_by_name(tmp_path, bias, capsys):
    """bias = all / lora_only: PEFT saves trained biases beside A and B, which tokrl does not load. Refused, naming
    the field, from lora.load_adapter and from the command line (one line, exit status 2, before the weights load)."""
    peft = pytest.importorskip("peft")
    path, _, ad = peft_adapter(tmp_path, peft, r=2, lora_alpha=4, target_modules=QV, bias=bias)
    with pytest.raises(ValueError, match=rf"bias = '{bias}' is not supported"):
        lora.load_adapter(pretrained.load_model(path), ad)
    code, err = refused(["--eval-only", "--model", str(path), "--adapter", str(ad), "--task", "mult", "--device",
                         "cpu", "--eval-limit", "1"], capsys)
    assert code == 2 and err.count("\n") == 1 and f"bias = '{bias}' is not supported" in err


@pytest.mark.parametrize("targets,message", [
    ("q_proj", "names no module of this model"),  # a string is a regular expression for the whole name, as in PEFT
    (r".*\.layers\.9\.self_attn\.q_proj", "names no module of this model"),
    ("(q_proj", "is not a regular expression"),
    (["c_attn", "q"], "names no module of this model"),  # a name matches a whole dotted tail: "q" is no q_proj's
])
def test_a_target_that_names_no_module_or_does_not_parse_is_named(tmp_path, targets, message):
    m = tiny_model(tmp_path)
    lora.apply_lora(m, r=2, fraction=0.25)
    checkpoints.write_adapter(m, tmp_path / "ad")
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "target_modules": targets}))
    with pytest.raises(ValueError, match=rf"target_modules .*{message}"):
        lora.load_adapter(tiny_model(tmp_path), tmp_path / "ad")


def test_every_field_peft_writes_is_honoured_ignored_or_refused_when_set():
    """PEFT's own LoraConfig (the installed version's every field): a field tokrl neither honours nor ignores holds
    an empty value in PEFT's defaults (so a default adapter loads), and set to anything else it is refused by name (so
    a field PEFT adds later cannot change what the adapter computes unseen)."""
    peft = pytest.importorskip("peft")
    as_json = lambda v: sorted(v) if isinstance(v, set) else str(v)  # noqa: E731 (PEFT writes a set as a list)
    written = json.loads(json.dumps(peft.LoraConfig(r=2, target_modules=QV).to_dict(), default=as_json))
    unknown = sorted(set(written) - lora._IGNORED - lora._HONOURED)
    assert unknown, "every field is known: this test has nothing to check"
    for field in unknown:
        assert written[field] in (None, False, {}, [], ""), field
        with pytest.raises(ValueError, match=rf"{field} = 1 is not supported"):
            lora.check_peft_config({**written, "peft_type": "LORA", field: 1}, "adapter_config.json")
