"""rsLoRA: ``use_rslora`` on every adapterlab low-rank config, scale alpha/sqrt(r), saved and restored."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from adapterlab.tuners import DyLoraConfig, LoriConfig, lowrank_scale
from adapterlab.tuners.lori.layer import LoriLayer
from tests.tuners.matrix import REPO_ROOT, TARGETS


@pytest.mark.parametrize("cls", [DyLoraConfig, LoriConfig])
def test_use_rslora_saved_and_restored(cls, tmp_path):
    from peft import PeftConfig

    cls(r=16, lora_alpha=8.0, use_rslora=True, target_modules=TARGETS).save_pretrained(str(tmp_path))
    cfg = PeftConfig.from_pretrained(str(tmp_path))
    assert type(cfg) is cls and cfg.use_rslora is True and cfg.r == 16


def test_lori_layer_uses_rslora_scale():
    from peft import LoraConfig, get_peft_model

    from adapterlab.models import tiny_llama

    pm = get_peft_model(
        tiny_llama(), LoriConfig(r=16, lora_alpha=8.0, use_rslora=True, task="rs", target_modules=TARGETS)
    )
    layer = next(m for m in pm.modules() if isinstance(m, LoriLayer))
    assert layer.factors("default")[2] == pytest.approx(8.0 / math.sqrt(16)) == lowrank_scale(8.0, 16, True) == 2.0
    peft_lora = get_peft_model(tiny_llama(), LoraConfig(r=16, lora_alpha=8.0, use_rslora=True, target_modules=TARGETS))
    scaling = next(
        m.scaling["default"]
        for m in peft_lora.modules()
        if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling
    )
    assert scaling == pytest.approx(2.0)  # peft's LoraConfig(use_rslora=True) uses the same formula
    with pytest.raises(ValueError, match="use_rslora must be True or False"):
        LoriConfig(use_rslora="yes")


def test_import_adapterlab_registers_tuners():
    code = "import adapterlab\nfrom peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as M\nprint('ADAPTERLAB_DYLORA' in M and 'ADAPTERLAB_LORI' in M)"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("True"), proc.stderr[-2000:]


@pytest.mark.parametrize("use_rslora,scale", [(True, 8.0 / math.sqrt(16)), (False, 8.0 / 16)])
def test_spp_uses_rslora_scale_in_forward_and_merge(use_rslora, scale, tmp_path):
    """SPP's delta ``s * beta ⊙ alpha_rows ⊙ W0`` with ``s = alpha / sqrt(r)`` under rsLoRA (brute force)."""
    import torch
    from peft import PeftConfig, get_peft_model

    from adapterlab.models import tiny_llama
    from adapterlab.tuners import SppConfig
    from adapterlab.tuners.spp.layer import SppLayer

    cfg = SppConfig(
        r=16,
        lora_alpha=8.0,
        use_rslora=use_rslora,
        groups=4,
        lora_dropout=0.0,
        init_weights=False,
        target_modules=TARGETS,
    )
    cfg.save_pretrained(str(tmp_path))
    assert PeftConfig.from_pretrained(str(tmp_path)).use_rslora is use_rslora
    pm = get_peft_model(tiny_llama(), cfg)
    layer = next(m for m in pm.modules() if isinstance(m, SppLayer))
    w0 = layer.get_base_layer().weight.detach().double()  # (d_out, d_in)
    alpha = layer.spp_alpha["default"].detach().double()  # (g, d_in)
    beta = layer.spp_beta["default"].detach().double()  # (d_out, 1)
    g = alpha.shape[0]
    d = torch.empty_like(w0)
    for i in range(w0.shape[0]):  # the paper's definition, row by row
        d[i] = scale * beta[i, 0] * alpha[i // (w0.shape[0] // g)] * w0[i]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = layer(x) - layer.get_base_layer()(x)
    torch.testing.assert_close(got.double(), x.double() @ d.T, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight("default").double(), d, rtol=1e-5, atol=1e-7)
