"""The Trainer callbacks on bf16 / fp16 bases (``TrainingArguments(bf16=...)``): the same DyLoRA rank
schedule as in fp32 and LoRI's switch leaves exactly the configured share of B; adapter parameters
stay fp32 and the base weights never move (issue 14)."""

from __future__ import annotations

import pytest
import torch

from adapterlab.callbacks import DyLoraCallback, LoriCallback
from adapterlab.models import tiny_llama, tiny_tokenizer
from adapterlab.tuners import DyLoraConfig, LoriConfig
from adapterlab.tuners.dylora import sample_rank
from adapterlab.tuners.lori.layer import LoriLayer
from tests.callbacks.test_trainer_integration import TARGETS, _dataset

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _train(dtype, config, callbacks, tmp_path, steps=4):
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        bf16=dtype == torch.bfloat16,
    )
    pm = get_peft_model(tiny_llama(dtype=dtype), config)
    base = {n: p.detach().clone() for n, p in pm.named_parameters() if "base_layer" in n}
    collator = DataCollatorForSeq2Seq(tiny_tokenizer(), padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=pm, args=args, train_dataset=_dataset(), data_collator=collator, callbacks=callbacks)
    trainer.train()
    for n, p in pm.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n  # the base is frozen in its own dtype
        elif p.requires_grad:
            assert p.dtype == torch.float32, n
    return trainer


@pytest.mark.parametrize("dname", list(DTYPES))
def test_dylora_schedule_is_dtype_independent(dname, tmp_path):
    cb = DyLoraCallback()
    _train(DTYPES[dname], DyLoraConfig(r=4, r_min=1, seed=3, target_modules=TARGETS), [cb], tmp_path)
    assert [r for _, r in cb.history] == [sample_rank(3, s, 1, 4) for s in range(4)]


@pytest.mark.parametrize("dname", list(DTYPES))
def test_lori_switch_keeps_the_configured_share(dname, tmp_path):
    trainer = _train(
        DTYPES[dname],
        LoriConfig(r=4, task="x", sparsity=0.75, mask_scope="matrix", target_modules=TARGETS),
        [LoriCallback(switch_step=2)],
        tmp_path,
    )
    layers = [m for m in trainer.model.modules() if isinstance(m, LoriLayer)]
    assert layers
    for layer in layers:
        b = layer.lori_B["default"]
        assert b.is_sparse and b.values.dtype == torch.float32
        assert b.values.numel() == round(0.25 * b.shape[0] * b.shape[1])  # per matrix: exactly 1 - sparsity kept
