"""adapterlab callbacks under transformers' Trainer AND trl's SFTTrainer on a tiny model.

DyLoRA samples the documented ranks (reproducible from the seed), LoRI switches at the configured
step, gradient accumulation shares one rank per optimizer step, resuming from a checkpoint
continues the same schedule (callback state saved / restored), and SparsityRankLogger writes
hand-checkable values into the Trainer's logs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapterlab.callbacks import DyLoraCallback, LoriCallback, SparsityRankLogger
from adapterlab.models import tiny_llama, tiny_tokenizer
from adapterlab.tuners import DyLoraConfig, LoriConfig
from adapterlab.tuners.dylora import sample_rank
from adapterlab.tuners.dylora.layer import DyLoraLayer
from adapterlab.tuners.lori.layer import LoriLayer

TARGETS = ["q_proj", "v_proj"]
BACKENDS = ["trainer", "sft"]


def _dataset(n: int = 16):
    import datasets

    ids = torch.randint(4, 100, (n, 10), generator=torch.Generator().manual_seed(1))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(
    backend: str,
    out: Path,
    *,
    max_steps: int,
    accum: int = 2,
    save_steps: int | None = None,
    lr: float = 1e-2,
    wd: float = 0.0,
):
    kwargs = dict(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accum,
        learning_rate=lr,
        weight_decay=wd,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        restore_callback_states_from_checkpoint=True,
    )
    if backend == "sft":
        from trl import SFTConfig

        return SFTConfig(bf16=False, gradient_checkpointing=False, max_length=32, **kwargs)
    from transformers import TrainingArguments

    return TrainingArguments(**kwargs)


def _trainer(backend: str, config, out: Path, callbacks, **kw):
    """A Trainer over get_peft_model(...), or an SFTTrainer given the base and peft_config=."""
    from transformers import DataCollatorForSeq2Seq

    tok = tiny_tokenizer()
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    args = _args(backend, out, **kw)
    if backend == "sft":
        from trl import SFTTrainer

        return SFTTrainer(
            model=tiny_llama(),
            args=args,
            train_dataset=_dataset(),
            processing_class=tok,
            peft_config=config,
            callbacks=callbacks,
            data_collator=collator,
        )
    from peft import get_peft_model
    from transformers import Trainer

    return Trainer(
        model=get_peft_model(tiny_llama(), config),
        args=args,
        train_dataset=_dataset(),
        data_collator=collator,
        callbacks=callbacks,
    )


def _callback(trainer, cls):
    """The live instance (Trainer replaces restored callbacks by new objects)."""
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, cls))


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "dylora_" in k or "lori_" in k}


# ---------------------------------------------------------------------------------------------
# DyLoRA


@pytest.mark.parametrize("backend", BACKENDS)
def test_dylora_documented_ranks_reproducible_and_shared_by_accumulated_microbatches(backend, tmp_path):
    cb = DyLoraCallback()
    trainer = _trainer(
        backend,
        DyLoraConfig(r=4, r_min=2, seed=7, target_modules=TARGETS),
        tmp_path / "run",
        [cb],
        max_steps=6,
        accum=2,
    )
    layer = next(m for m in trainer.model.modules() if isinstance(m, DyLoraLayer))
    seen: list[int] = []
    layer.register_forward_pre_hook(
        lambda mod, args: seen.append(mod.current_rank("default")) if mod.training else None
    )
    trainer.train()
    ranks = [r for _, r in cb.history]
    # the documented draw: uniform on {r_min..r} from a generator seeded by (seed, optimizer step),
    # so the schedule is reproducible from the seed alone (and differs for another seed)
    assert ranks == [sample_rank(7, s, 2, 4) for s in range(6)]
    assert ranks != [sample_rank(8, s, 2, 4) for s in range(6)]
    assert [s for s, _ in cb.history] == list(range(6))
    assert set(ranks) <= {2, 3, 4}
    assert seen == [b for b in ranks for _ in range(2)]  # both micro-batches of a step share b
    logged = [h["dylora_rank"] for h in trainer.state.log_history if "loss" in h]
    assert logged == ranks  # written into the Trainer's log history too


@pytest.mark.parametrize("backend", BACKENDS)
def test_dylora_resume_from_checkpoint_continues_the_same_schedule(backend, tmp_path):
    cfg = DyLoraConfig(r=4, seed=5, target_modules=TARGETS, init_weights=False)
    full = _trainer(backend, cfg, tmp_path / "full", [DyLoraCallback()], max_steps=6, save_steps=3)
    full.train()
    want = _adapter_state(full.model)
    want_hist = _callback(full, DyLoraCallback).history
    state = json.loads((tmp_path / "full" / "checkpoint-3" / "trainer_state.json").read_text())
    assert "DyLoraCallback" in state["stateful_callbacks"]  # the callback's state is in the checkpoint

    cfg2 = DyLoraConfig(r=4, seed=5, target_modules=TARGETS, init_weights=False)
    resumed = _trainer(backend, cfg2, tmp_path / "resumed", [DyLoraCallback()], max_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    cb = _callback(resumed, DyLoraCallback)
    assert cb.history == want_hist[3:]  # steps 3, 4, 5 draw the same ranks
    got = _adapter_state(resumed.model)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# LoRI


def _lori_config() -> LoriConfig:
    return LoriConfig(r=4, task="cb", sparsity=0.75, target_modules=TARGETS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lori_switches_phase_at_the_configured_step(backend, tmp_path):
    variants: list[tuple[int, bool]] = []

    class Probe(LoriCallback.__mro__[1]):  # a plain TrainerCallback, runs after LoriCallback
        def on_step_end(self, args, state, control, model=None, **kwargs):
            layer = next(m for m in model.modules() if isinstance(m, LoriLayer))
            variants.append((state.global_step, layer.lori_B["default"].is_sparse))

    cb = LoriCallback(switch_step=3, lr_s=3e-2)
    trainer = _trainer(backend, _lori_config(), tmp_path / "out", [cb, Probe()], max_steps=5, accum=2, wd=0.1)
    trainer.train()
    assert cb.switched_at == 3
    # on_step_end reports the step just finished (global_step already incremented)
    assert variants == [(1, False), (2, False), (3, False), (4, True), (5, True)]
    assert trainer.model.peft_config["default"].variant == "S"
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for m in trainer.model.modules():
        if isinstance(m, LoriLayer):
            assert id(m.lori_B["default"].values) in opt_ids  # LoRI-S values are what the optimizer trains


@pytest.mark.parametrize("backend", BACKENDS)
def test_lori_resume_from_checkpoint_matches_an_uninterrupted_run(backend, tmp_path):
    full = _trainer(
        backend,
        _lori_config(),
        tmp_path / "full",
        [LoriCallback(switch_step=3, lr_s=3e-2)],
        max_steps=5,
        save_steps=2,
        wd=0.1,
    )
    full.train()
    want = _adapter_state(full.model)
    for resume_at in (2, 4):  # before and after the switch at step 3
        ckpt = tmp_path / "full" / f"checkpoint-{resume_at}"
        stored = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["LoriCallback"]
        assert stored["args"]["switch_step"] == 3
        assert stored["attributes"]["switched_at"] == (3 if resume_at > 3 else None)

        resumed = _trainer(
            backend,
            _lori_config(),
            tmp_path / f"resumed{resume_at}",
            [LoriCallback(switch_step=3, lr_s=3e-2)],
            max_steps=5,
            wd=0.1,
        )
        resumed.train(resume_from_checkpoint=str(ckpt))
        cb = _callback(resumed, LoriCallback)
        assert cb.switched_at == 3  # restored from the checkpoint, or switched at step 3 in the resumed run
        got = _adapter_state(resumed.model)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=f"resumed at {resume_at}: {k}")


# ---------------------------------------------------------------------------------------------
# mask keeping (full training of a pruned base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_keeping_holds_through_gradient_accumulation(backend, tmp_path):
    pytest.importorskip("adapterlab.callbacks.mask_keeper")
    from transformers import DataCollatorForSeq2Seq

    from adapterlab.callbacks import MaskKeeperCallback
    from adapterlab.pruning import get_masks, prune_

    def run(callbacks):
        model = tiny_llama()
        prune_(model, "magnitude", 0.5)
        masks = get_masks(model)
        for p in model.parameters():
            p.requires_grad_(True)
        tok = tiny_tokenizer()
        args = _args(backend, tmp_path / f"m{len(callbacks)}", max_steps=3, accum=2, wd=0.1)
        collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
        if backend == "sft":
            from trl import SFTTrainer

            trainer = SFTTrainer(
                model=model,
                args=args,
                train_dataset=_dataset(),
                processing_class=tok,
                callbacks=callbacks,
                data_collator=collator,
            )
        else:
            from transformers import Trainer

            trainer = Trainer(
                model=model, args=args, train_dataset=_dataset(), data_collator=collator, callbacks=callbacks
            )
        trainer.train()
        return model, masks

    model, masks = run([MaskKeeperCallback(), SparsityRankLogger()])
    for name, keep in masks.items():
        w = model.get_submodule(name).weight.detach()
        assert torch.equal(w[~keep], torch.zeros_like(w[~keep])), name  # pruned entries exactly zero
    model, masks = run([])  # without the callback, AdamW (weight decay, moments) moves pruned entries
    assert any(bool((model.get_submodule(n).weight.detach()[~k] != 0).any()) for n, k in masks.items())


# ---------------------------------------------------------------------------------------------
# SparsityRankLogger


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparsity_rank_logger_values_oracle(backend, tmp_path):
    from peft import LoraConfig

    cb = SparsityRankLogger()
    trainer = _trainer(
        backend, LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS), tmp_path / "o", [cb], max_steps=2, accum=1
    )
    base = trainer.model.get_base_model()
    # zero a known set of decoder-linear entries: q_proj of block 0 fully, 10 entries of down_proj in block 1
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.base_layer.weight.zero_()
        base.model.layers[1].mlp.down_proj.weight.view(-1)[:10] = 0.0
    trainer.train()
    # hand count: 2 blocks x (q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128)
    per_block = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 2 * 128 * 64 + 64 * 128
    total = 2 * per_block
    zeros = 64 * 64 + 10
    # LoRA r=3 on q (64x64) and v (32 out, 64 in) of 2 blocks: A r x d_in + B d_out x r
    trainable = 2 * (3 * 64 + 64 * 3 + 3 * 64 + 32 * 3)
    entry = next(h for h in trainer.state.log_history if "loss" in h)
    assert entry["base_sparsity"] == pytest.approx(zeros / total, abs=1e-12)
    assert entry["adapter_rank"] == 3 and entry["trainable_params"] == trainable
    nonzero = sum(int(torch.count_nonzero(p)) for p in trainer.model.parameters() if p.requires_grad)
    assert trainer.state.log_history[-1]["adapter_density"] == pytest.approx(nonzero / trainable)


def test_sparsity_rank_logger_bad_input():
    with pytest.raises(ValueError, match=r"sparsity_every must be an integer >= 1"):
        SparsityRankLogger(sparsity_every=0)
