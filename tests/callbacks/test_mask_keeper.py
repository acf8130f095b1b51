"""MaskKeeperCallback under transformers.Trainer: pruned weights stay exactly zero."""

from __future__ import annotations

import pytest
import torch

from adapterlab.callbacks import MaskKeeperCallback
from adapterlab.models import tiny_llama
from adapterlab.pruning import get_masks, prune_


class _Windows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(model, tmp_path, callbacks, steps=3, accum=2):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accum,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        logging_steps=1,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Windows(), callbacks=callbacks)
    model.train()
    trainer.train()
    return trainer


def _pruned():
    model = tiny_llama()
    prune_(model, "magnitude", 0.5)
    model.requires_grad_(True)
    return model


def _pruned_entries(model, masks):
    return {n: model.get_submodule(n).weight.detach()[~m] for n, m in masks.items()}


def test_keeps_zeros_through_adamw_clipping_and_accumulation(tmp_path):
    model = _pruned()
    masks = get_masks(model)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in masks}
    keeper = MaskKeeperCallback()
    seen = []

    class Count(MaskKeeperCallback):  # counts optimizer steps: one per accumulation cycle
        def __init__(self):
            super().__init__(masks={})

        def on_train_begin(self, *a, **k):
            pass

        def on_optimizer_step(self, *a, **k):
            seen.append(1)

        def on_train_end(self, *a, **k):
            pass

    trainer = _train(model, tmp_path, [keeper, Count()], steps=3, accum=2)
    assert trainer.state.global_step == 3 and len(seen) == 3
    assert len(keeper._kept) == 14 and keeper.violations() == 0
    for n, vals in _pruned_entries(model, masks).items():
        assert bool((vals == 0).all()), n
        kept = model.get_submodule(n).weight.detach()[masks[n]]
        assert not torch.equal(kept, before[n][masks[n]])  # the kept weights did train


def test_without_callback_adamw_moves_pruned_weights(tmp_path):
    """Control: the test above is meaningful (weight decay + momentum refill pruned entries)."""
    model = _pruned()
    masks = get_masks(model)
    _train(model, tmp_path, [], steps=2, accum=1)
    assert any(bool((v != 0).any()) for v in _pruned_entries(model, masks).values())


def test_gradient_hooks_mask_gradients_before_clipping():
    model = _pruned()
    masks = get_masks(model)
    cb = MaskKeeperCallback(masks)
    cb.on_train_begin(None, None, None, model=model)
    x = torch.randint(3, 128, (2, 8))
    model(x, labels=x).loss.backward()
    for n, m in masks.items():
        g = model.get_submodule(n).weight.grad
        assert bool((g[~m] == 0).all()) and bool((g[m] != 0).any())
    cb.on_train_end(None, None, None)
    assert not cb._hooks


def test_bad_masks_name_the_key():
    model = _pruned()
    with pytest.raises(ValueError, match="mask 'model.layers.9.mlp.up_proj' names no linear"):
        MaskKeeperCallback({"model.layers.9.mlp.up_proj": torch.ones(2, 2, dtype=torch.bool)}).on_train_begin(
            None, None, None, model=model
        )
    with pytest.raises(ValueError, match=r"has shape \(2, 2\), the weight has \(128, 64\)"):
        MaskKeeperCallback({"model.layers.0.mlp.up_proj": torch.ones(2, 2, dtype=torch.bool)}).on_train_begin(
            None, None, None, model=model
        )


def test_strict_end_check_raises_on_violation():
    model = _pruned()
    cb = MaskKeeperCallback()
    cb.on_train_begin(None, None, None, model=model)
    with torch.no_grad():
        name, w, pruned = cb._kept[0]
        w[pruned] = 1.0
    with pytest.raises(RuntimeError, match="non-zero at the end"):
        cb.on_train_end(None, None, None)


def test_adapter_factors_are_never_taken_for_pruned_weights():
    """LoRA B starts at zero: it must not be 'kept' at zero (base layers only)."""
    from peft import LoraConfig, get_peft_model

    from adapterlab.retrain.pipeline import _needs_mask_keeper

    pm = get_peft_model(_pruned(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    cb = MaskKeeperCallback()
    cb.on_train_begin(None, None, None, model=pm)
    assert cb._kept == [] and not _needs_mask_keeper(pm)  # peft froze the base
    for n, p in pm.named_parameters():
        if "base_layer" in n and n.endswith("weight"):
            p.requires_grad_(True)
    cb.on_train_begin(None, None, None, model=pm)
    names = [n for n, _, _ in cb._kept]
    assert len(names) == 4 and not any("lora" in n for n in names) and _needs_mask_keeper(pm)
    cb.on_train_end(None, None, None)
