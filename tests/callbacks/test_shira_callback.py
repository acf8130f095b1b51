"""ShiraMaskCallback: grad/snip masks calibrated at train begin, under Trainer and SFTTrainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from adapterlab.callbacks import ShiraMaskCallback
from adapterlab.callbacks.shira import pending_adapters
from adapterlab.models import tiny_llama, tiny_tokenizer
from adapterlab.tuners.shira import ShiraConfig, calibrate_masks_, shira_layers

TARGETS = ["q_proj", "v_proj"]


def _dataset(n: int = 8):
    import datasets

    ids = torch.randint(4, 100, (n, 10), generator=torch.Generator().manual_seed(1))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _calib() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(4, 100, (2, 10), generator=g)} for _ in range(3)]


def _trainer(out: Path, config: ShiraConfig, callbacks: list, backend: str = "trainer"):
    from transformers import DataCollatorForSeq2Seq

    tok = tiny_tokenizer()
    kwargs = dict(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    if backend == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(
            model=tiny_llama(),
            args=SFTConfig(bf16=False, max_length=32, **kwargs),
            train_dataset=_dataset(),
            processing_class=tok,
            peft_config=config,
            callbacks=callbacks,
            data_collator=collator,
        )
    from transformers import Trainer, TrainingArguments

    return Trainer(
        model=get_peft_model(tiny_llama(), config),
        args=TrainingArguments(**kwargs),
        train_dataset=_dataset(),
        data_collator=collator,
        callbacks=callbacks,
    )


def test_callback_masks_equal_direct_calibration_and_training_stays_on_mask(tmp_path) -> None:
    cfg = lambda: ShiraConfig(r=2, mask_type="snip", target_modules=TARGETS)  # noqa: E731
    direct = get_peft_model(tiny_llama(), cfg())
    calibrate_masks_(direct, _calib())
    cb = ShiraMaskCallback(_calib())
    trainer = _trainer(tmp_path, cfg(), [cb])
    assert pending_adapters(trainer.model) == ["default"]
    trainer.train()
    assert len(cb.reports) == 1 and cb.reports[0].batches == 3 and cb.reports[0].mask_type == "snip"
    assert pending_adapters(trainer.model) == []
    for key, idx in direct.masks().items():
        assert torch.equal(trainer.model.masks()[key], idx), key
    moved = [layer.adapterlab_shira_values["default"].detach().abs().sum() for _, layer in shira_layers(trainer.model)]
    assert all(m > 0 for m in moved)  # trained on the calibrated positions


@pytest.mark.parametrize("backend", ["trainer", "sft"])
def test_callback_defaults_to_train_dataloader(tmp_path, backend: str) -> None:
    cb = ShiraMaskCallback(num_batches=2)
    trainer = _trainer(tmp_path, ShiraConfig(r=1, mask_type="grad", target_modules=TARGETS), [cb], backend)
    trainer.train()
    assert [r.batches for r in cb.reports] == [2]
    assert pending_adapters(trainer.model) == []


def test_callback_skips_fixed_masks(tmp_path) -> None:
    cb = ShiraMaskCallback(_calib())
    trainer = _trainer(tmp_path, ShiraConfig(r=1, mask_type="wm", target_modules=TARGETS), [cb])
    before = trainer.model.masks()
    trainer.train()
    assert cb.reports == []
    for key, idx in trainer.model.masks().items():
        assert torch.equal(idx, before[key])


def test_callback_bad_input() -> None:
    with pytest.raises(ValueError, match="num_batches must be an integer >= 1"):
        ShiraMaskCallback(num_batches=0)
