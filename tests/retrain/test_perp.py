"""PERP: exactly the documented parameters become trainable; MaskLoRA/ScaleLoRA oracles; merge keeps sparsity."""

from __future__ import annotations

import pytest
import torch

import adapterlab
from adapterlab.models import tiny_llama, tiny_opt
from adapterlab.pruning import check_nm, prune_
from adapterlab.retrain import HeadLoRA, MaskLoRALinear, ScaleLoRALinear, merge_perp_, perp_
from tests.tolerances import assert_close

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _x(vocab=128):
    return torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(1))


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(_x()).logits.float()


def _pruned(factory=tiny_llama, pattern=None, **kw):
    m = factory(**kw)
    prune_(m, "magnitude", None if pattern else 0.5, pattern=pattern)
    return m


def _randomize_(model, std=0.05):
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if "perp_B" in n:
            p.data = torch.randn(p.shape, generator=g) * std


def test_bias_norm_marks_exactly_biases_and_norms_opt():
    model = _pruned(tiny_opt)
    names = {n for n, _ in model.named_parameters()}
    # documented: every bias outside norms + every LayerNorm parameter (OPT: "*layer_norm*")
    norms = {n for n in names if "layer_norm" in n}
    biases = {n for n in names if n.endswith(".bias") and n not in norms}
    assert norms and biases
    report = perp_(model, "bias_norm")
    assert set(report.names) == norms | biases
    assert {n for n, p in model.named_parameters() if p.requires_grad} == norms | biases
    assert report.by_subset == {
        "norm": sum(p.numel() for n, p in model.named_parameters() if n in norms),
        "bias": sum(p.numel() for n, p in model.named_parameters() if n in biases),
    }
    assert report.trainable == report.by_subset["norm"] + report.by_subset["bias"]


def test_default_scope_llama_norms_masklora_head():
    model = _pruned()
    cfg = model.config
    report = perp_(model, r=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n in trainable if n.endswith("layernorm.weight") or n == "model.norm.weight"}
    assert len(norms) == 2 * cfg.num_hidden_layers + 1  # input/post-attention per block + final
    lora = trainable - norms
    expected_lora = {
        f"model.layers.{i}.{'self_attn' if p.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{p}.perp_{f}"
        for i in range(cfg.num_hidden_layers)
        for p in LLAMA_LINEARS
        for f in "AB"
    } | {"lm_head.perp_A", "lm_head.perp_B"}
    assert lora == expected_lora  # no bias in Llama; every pruned linear wrapped; plain LoRA on the head
    d, ff, kv, V = cfg.hidden_size, cfg.intermediate_size, 2 * 16, cfg.vocab_size
    per_block = 4 * ((d + d) + (d + kv) + (d + kv) + (d + d)) + 4 * ((d + ff) * 2 + (ff + d))
    assert report.by_subset["mask_lora"] == cfg.num_hidden_layers * per_block
    assert report.by_subset["head"] == 4 * (d + V)
    assert report.trainable == sum(report.by_subset.values())
    assert 0 < report.fraction < 1 and not report.needs_mask_keeper
    assert sum(isinstance(m, MaskLoRALinear) for m in model.modules()) == 14
    assert isinstance(model.lm_head, HeadLoRA)


def test_full_scope_and_bad_input():
    model = _pruned()
    report = perp_(model, "full")
    assert report.trainable == report.total and report.needs_mask_keeper
    with pytest.raises(ValueError, match="scope='lora'.*default"):
        perp_(tiny_llama(), "lora")
    with pytest.raises(ValueError, match="choose one of them"):
        perp_(tiny_llama(), ["mask_lora", "scale_lora"])
    with pytest.raises(ValueError, match="r must be a positive integer"):
        perp_(tiny_llama(), r=0)
    m = tiny_llama()
    perp_(m, "mask_lora")
    with pytest.raises(ValueError, match="already prepared"):
        perp_(m)
    with pytest.raises(ValueError, match="target_modules"):
        perp_(tiny_llama(), "mask_lora", target_modules=["c_attn"])


def test_perp_refuses_quantized_and_peft():
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    from adapterlab.quant import quantize_model

    with pytest.raises(ValueError, match="full-precision base.*bnb-4bit"):
        perp_(quantize_model(tiny_llama(), 4))
    with pytest.raises(ValueError, match="peft model"):
        perp_(get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])))


def test_masklora_forward_and_gradient_oracle():
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.05] = 0
    layer = MaskLoRALinear(lin, r=4, alpha=8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=0)  # B = 0: output equals base
    with torch.no_grad():
        layer.perp_B.normal_(0, 0.1)
    w, a, b = (
        lin.weight.detach().double(),
        layer.perp_A.detach().double().requires_grad_(),
        layer.perp_B.detach().double().requires_grad_(),
    )
    m = (w != 0).double()
    ref = x.double() @ (w + 2.0 * (b @ a) * m).T + lin.bias.detach().double()  # brute force, s = 8/4
    out = layer(x)
    assert_close(out, ref.float())
    out.sum().backward()
    ref.sum().backward()  # autograd through an explicit mask
    assert_close(layer.perp_A.grad, a.grad.float())
    assert_close(layer.perp_B.grad, b.grad.float())


def test_scalelora_forward_oracle():
    lin = torch.nn.Linear(64, 32, bias=False)
    layer = ScaleLoRALinear(lin, r=4)
    x = torch.randn(3, 64)
    assert_close(layer(x), lin(x))  # BA = all ones at init
    with torch.no_grad():
        layer.perp_A.normal_(0, 0.5)
        layer.perp_B.normal_(0, 0.5)
    w = lin.weight.detach().double()
    ref = x.double() @ (w * (layer.perp_B.detach().double() @ layer.perp_A.detach().double())).T
    assert_close(layer(x), ref.float())


@pytest.mark.parametrize("scope,pattern", [("default", None), ("scale_lora", None), ("mask_lora", "2:4")])
def test_merge_equals_unmerged_and_keeps_sparsity(scope, pattern):
    model = _pruned(pattern=pattern)
    zeros = {
        n: (m.weight == 0).clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n
    }
    perp_(model, scope, r=4, alpha=8)
    _randomize_(model)
    if scope == "scale_lora":
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, ScaleLoRALinear):
                    m.perp_A.mul_(1.1)
    unmerged = _logits(model)
    report = adapterlab.merge(model, return_report=True)[1]
    assert not any(isinstance(m, (MaskLoRALinear, ScaleLoRALinear, HeadLoRA)) for m in model.modules())
    assert_close(_logits(model), unmerged)
    for n, z in zeros.items():
        w = model.get_submodule(n).weight
        assert bool((w[z] == 0).all())
        if pattern:
            assert check_nm(w, 2, 4)
    assert report.layers == 14 and report.sparsity_after >= report.sparsity_before
    assert report.nm_valid is (True if pattern else None)
    assert report.head_merged is (scope == "default")


def test_tied_head_is_untied_at_merge():
    model = _pruned(tie_word_embeddings=True)
    emb = model.get_input_embeddings().weight.detach().clone()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    perp_(model, ["head"], r=4)
    _randomize_(model)
    unmerged = _logits(model)
    report = merge_perp_(model)
    assert report.head_untied and model.config.tie_word_embeddings is False
    torch.testing.assert_close(model.get_input_embeddings().weight, emb, rtol=0, atol=0)  # embedding untouched
    assert_close(_logits(model), unmerged)


def test_retrain_full_keeps_mask_and_perp_improves_loss():
    from adapterlab.retrain import retrain_

    model = _pruned()
    zeros = {
        n: (m.weight == 0).clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n
    }
    ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    perp_(model, "full")
    res = retrain_(model, ids, steps=3, lr=1e-2, batch_size=2, weight_decay=0.1)
    assert res.mask_keeper and res.steps == 3
    for n, z in zeros.items():
        assert bool((model.get_submodule(n).weight[z] == 0).all())

    model = _pruned()
    perp_(model, "mask_lora", r=4, alpha=8)
    res = retrain_(model, ids[:2].repeat(4, 1), steps=8, lr=2e-2, batch_size=2, warmup_ratio=0.0)
    assert not res.mask_keeper and res.losses[-1] < res.losses[0]


def test_run_perp_pipeline_tiny(tmp_path):
    from adapterlab.models import tiny_tokenizer
    from adapterlab.retrain import run_perp_pipeline

    out = run_perp_pipeline(
        tiny_llama(),
        tiny_tokenizer(),
        method="magnitude",
        sparsity=0.5,
        scope="mask_lora",
        r=2,
        alpha=4,
        steps=2,
        batch_size=2,
        seqlen=32,
        calib_seqlen=32,
        calib_samples=2,
        eval_seqlen=64,
        eval_windows=2,
        corpus="lee",
        output_dir=tmp_path / "merged",
    )
    assert out.ppl_dense and out.ppl_pruned and out.ppl_retrained and out.gap_closed is not None
    assert out.sparsity_after_merge >= 0.5 - 1e-6 and 0 < out.trainable_fraction < 1
    assert (tmp_path / "merged" / "perp_result.json").is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="scope"):
        run_perp_pipeline(tiny_llama(), tiny_tokenizer(), scope="nope")
