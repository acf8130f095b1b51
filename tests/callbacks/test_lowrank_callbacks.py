"""DyLoraCallback and LoriCallback under transformers' Trainer on a tiny model (with gradient accumulation)."""

from __future__ import annotations

import pytest
import torch

from adapterlab.callbacks import DyLoraCallback, LoriCallback
from adapterlab.models import tiny_llama
from adapterlab.tuners import DyLoraConfig, LoriConfig
from adapterlab.tuners.dylora import sample_rank
from adapterlab.tuners.dylora.layer import DyLoraLayer
from adapterlab.tuners.lori import kept_count
from adapterlab.tuners.lori.layer import LoriLayer

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _dataset(n: int = 16):
    import datasets

    ids = torch.randint(3, 128, (n, 12), generator=torch.Generator().manual_seed(1))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _trainer(pm, tmp_path, callbacks, *, max_steps=4, accum=2, weight_decay=0.0, lr=1e-2):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accum,
        learning_rate=lr,
        weight_decay=weight_decay,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return Trainer(model=pm, args=args, train_dataset=_dataset(), callbacks=callbacks)


def test_dylora_callback_one_rank_per_optimizer_step_with_grad_accumulation(tmp_path):
    from peft import get_peft_model

    pm = get_peft_model(tiny_llama(), DyLoraConfig(r=4, seed=3, target_modules=TARGETS))
    layer = next(m for m in pm.modules() if isinstance(m, DyLoraLayer))
    seen: list[int] = []
    layer.register_forward_pre_hook(
        lambda mod, args: seen.append(mod.current_rank("default")) if mod.training else None
    )
    cb = DyLoraCallback()
    trainer = _trainer(pm, tmp_path, [cb], max_steps=4, accum=2)
    trainer.train()
    expected = [sample_rank(3, s, 1, 4) for s in range(4)]
    assert [r for _, r in cb.history] == expected and [s for s, _ in cb.history] == [0, 1, 2, 3]
    assert seen == [b for b in expected for _ in range(2)]  # both micro-batches of a step share b
    assert layer.train_rank["default"] is None  # cleared at train end: eval uses the inference rank
    pm.eval()
    assert layer.current_rank("default") == 4


def test_lori_callback_switches_d_to_s_and_masked_entries_stay_zero(tmp_path):
    from peft import get_peft_model

    pm = get_peft_model(tiny_llama(), LoriConfig(r=4, task="cb", sparsity=0.75, target_modules=TARGETS))
    layers = [m for m in pm.modules() if isinstance(m, LoriLayer)]
    snap: dict[str, torch.Tensor] = {}

    class Snapshot(LoriCallback.__mro__[1]):  # a plain TrainerCallback that runs after LoriCallback
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                for i, layer in enumerate(layers):
                    snap[str(i)] = layer.lori_B["default"].dense().detach().clone()

    cb = LoriCallback(switch_step=2, lr_s=5e-2)
    trainer = _trainer(pm, tmp_path, [cb, Snapshot()], max_steps=4, accum=2, weight_decay=0.1)
    trainer.train()
    assert cb.switched_at == 2 and pm.peft_config["default"].variant == "S"
    total = sum(layer.lori_B["default"].shape[0] * layer.lori_B["default"].shape[1] for layer in layers)
    assert pm.trainable_b_count() == kept_count(total, 0.75) == cb.report.kept
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for layer in layers:
        lb = layer.lori_B["default"]
        assert lb.is_sparse and id(lb.values) in opt_params
    assert all(
        g["lr"] == pytest.approx(5e-2)
        for g in trainer.optimizer.param_groups
        if any(id(p) == id(layers[0].lori_B["default"].values) for p in g["params"])
    )
    changed = 0
    for i, layer in enumerate(layers):
        dense = layer.lori_B["default"].dense().detach()
        mask = layer.lori_B["default"].mask()
        assert torch.equal(dense[~mask], torch.zeros_like(dense[~mask]))  # masked: exactly 0 despite weight decay
        assert torch.equal(snap[str(i)][~mask], dense[~mask])
        changed += int((dense[mask] != snap[str(i)][mask]).sum())
    assert changed > 0  # the kept entries trained after the switch


def test_callback_bad_input():
    with pytest.raises(ValueError, match=r"switch_step must be an integer >= 0"):
        LoriCallback(switch_step=-1)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        LoriCallback(switch_step=1, sparsity=1.0)
    cb = DyLoraCallback()
    with pytest.raises(ValueError, match="no DyLoraModel"):
        cb.on_step_begin(None, type("S", (), {"global_step": 0})(), None, model=tiny_llama())
