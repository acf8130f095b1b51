"""rsLoRA: ``use_rslora`` on every adapterlab low-rank config, scale alpha/sqrt(r), saved and restored."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

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

    pm = get_peft_model(tiny_llama(), LoriConfig(r=16, lora_alpha=8.0, use_rslora=True, task="rs", target_modules=TARGETS))
    layer = next(m for m in pm.modules() if isinstance(m, LoriLayer))
    assert layer.factors("default")[2] == pytest.approx(8.0 / math.sqrt(16)) == lowrank_scale(8.0, 16, True) == 2.0
    peft_lora = get_peft_model(tiny_llama(), LoraConfig(r=16, lora_alpha=8.0, use_rslora=True, target_modules=TARGETS))
    scaling = next(m.scaling["default"] for m in peft_lora.modules() if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling)
    assert scaling == pytest.approx(2.0)  # peft's LoraConfig(use_rslora=True) uses the same formula
    with pytest.raises(ValueError, match="use_rslora must be True or False"):
        LoriConfig(use_rslora="yes")


def test_import_adapterlab_registers_tuners():
    code = "import adapterlab\nfrom peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as M\nprint('ADAPTERLAB_DYLORA' in M and 'ADAPTERLAB_LORI' in M)"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("True"), proc.stderr[-2000:]
