"""The common tuner matrix of DESIGN.md §6, reusable by every adapterlab tuner.

A tuner's test file subclasses :class:`TunerMatrix` and lists :class:`TunerCase` s::

    class TestMyTunerMatrix(TunerMatrix):
        cases = [TunerCase("mytuner", lambda: MyConfig(target_modules=TARGETS), fresh_process=True)]

Each case runs: output equals the base at init, differs after one AdamW step, merged equals
unmerged (and unmerge restores the base), ``disable_adapter`` gives the base, save/load round trip
(safetensors only, ``PeftModel.from_pretrained``), and, where ``fresh_process`` is set, a load in a
fresh Python process after ``import adapterlab``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import adapterlab.tuners  # noqa: F401  (registers the tuners)
from adapterlab.io import load_tensors
from adapterlab.models import tiny_llama
from tests.tolerances import TOL

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Targets with three shapes on tiny_llama: q (64->64), v (64->32), down (128->64).
TARGETS = ["q_proj", "v_proj", "down_proj"]


@dataclass
class TunerCase:
    """One configuration of a tuner run through the matrix.

    Attributes:
        id: test id.
        make_config: builds a fresh peft config.
        identity_at_init: the method promises output == base at init.
        after_step: optional hook run on the PeftModel after the training step (e.g. LoRI sparsify_).
        fresh_process: also run the fresh-process load check (a few seconds; one case per tuner).
        lr: AdamW learning rate of the training step.
    """

    id: str
    make_config: Callable[[], Any]
    identity_at_init: bool = True
    after_step: Callable[[Any], None] | None = None
    fresh_process: bool = False
    lr: float = 1e-2


def batch() -> torch.Tensor:
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))  # (2, 12)


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x).logits


def train_step(
    pm: torch.nn.Module, x: torch.Tensor, lr: float = 1e-2, steps: int = 1, weight_decay: float = 0.0
) -> None:
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    pm.train()
    for _ in range(steps):
        pm(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    pm.eval()


_TRAINED: dict[str, tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def trained(case: TunerCase) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(peft model after one step, base logits, init logits, trained logits)``, cached per case."""
    if case.id not in _TRAINED:
        from peft import get_peft_model

        x = batch()
        base = logits(tiny_llama(), x)
        torch.manual_seed(0)
        pm = get_peft_model(tiny_llama(), case.make_config())
        init = logits(pm, x)
        train_step(pm, x, lr=case.lr)
        if case.after_step is not None:
            case.after_step(pm)
            train_step(pm, x, lr=case.lr)
        _TRAINED[case.id] = (pm, base, init, logits(pm, x))
    return _TRAINED[case.id]


def fresh_process_logits(adapter_dir: Path, out_file: Path) -> torch.Tensor:
    """Load ``adapter_dir`` onto ``tiny_llama()`` in a new interpreter after ``import adapterlab``."""
    script = textwrap.dedent(
        f"""
        import torch
        torch.set_num_threads(1)
        import adapterlab
        from peft import PeftModel
        from adapterlab.io import save_tensors
        from adapterlab.models import tiny_llama
        x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        model = PeftModel.from_pretrained(tiny_llama(), {str(adapter_dir)!r})
        model.eval()
        with torch.no_grad():
            out = model(x).logits
        save_tensors({str(out_file)!r}, {{"logits": out}})
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_tensors(out_file)["logits"]


class TunerMatrix:
    """Subclass with ``cases = [TunerCase(...), ...]``; tests/tuners/conftest.py parametrizes ``case``."""

    cases: list[TunerCase] = []

    def test_identity_at_init(self, case: TunerCase) -> None:
        _, base, init, _ = trained(case)
        if case.identity_at_init:
            torch.testing.assert_close(init, base, rtol=0, atol=0)

    def test_step_changes_output(self, case: TunerCase) -> None:
        _, base, _, after = trained(case)
        assert (after - base).abs().max() > 1e-4

    def test_disable_adapter_gives_base(self, case: TunerCase) -> None:
        pm, base, _, after = trained(case)
        x = batch()
        with pm.disable_adapter():
            torch.testing.assert_close(logits(pm, x), base, **TOL[torch.float32])
        torch.testing.assert_close(logits(pm, x), after, rtol=0, atol=0)

    def test_merged_equals_unmerged(self, case: TunerCase) -> None:
        pm, base, _, after = trained(case)
        x = batch()
        weights = {n: p.detach().clone() for n, p in pm.get_base_model().named_parameters() if "base_layer" in n}
        pm.base_model.merge_adapter()
        try:
            torch.testing.assert_close(logits(pm, x), after, **TOL[torch.float32])
        finally:
            pm.base_model.unmerge_adapter()
        for n, p in pm.get_base_model().named_parameters():
            if n in weights:
                torch.testing.assert_close(p.detach(), weights[n], **TOL[torch.float32])
        torch.testing.assert_close(logits(pm, x), after, **TOL[torch.float32])

    def test_save_load_roundtrip(self, case: TunerCase, tmp_path: Path) -> None:
        from peft import PeftConfig, PeftModel

        pm, _, _, after = trained(case)
        pm.save_pretrained(tmp_path / "adapter")
        files = {p.name for p in (tmp_path / "adapter").iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
        assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
        cfg = PeftConfig.from_pretrained(str(tmp_path / "adapter"))
        assert type(cfg) is type(pm.peft_config["default"])
        loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
        torch.testing.assert_close(logits(loaded, batch()), after, rtol=0, atol=0)
        merged = loaded.merge_and_unload()
        assert type(merged).__name__ == "LlamaForCausalLM"
        torch.testing.assert_close(logits(merged, batch()), after, **TOL[torch.float32])

    def test_fresh_process_load(self, case: TunerCase, tmp_path: Path) -> None:
        if not case.fresh_process:
            return
        pm, _, _, after = trained(case)
        pm.save_pretrained(tmp_path / "adapter")
        got = fresh_process_logits(tmp_path / "adapter", tmp_path / "fresh.safetensors")
        torch.testing.assert_close(got, after, rtol=1e-5, atol=1e-6)
