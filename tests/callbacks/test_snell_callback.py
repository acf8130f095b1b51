"""SnellCallback under transformers.Trainer on a tiny model: hand-checked budget schedule, exact
final sparsity, importance EMAs (hand oracle), allocation by score, resume from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapterlab.callbacks import SnellCallback
from adapterlab.models import tiny_llama, tiny_tokenizer
from adapterlab.tuners import SnellConfig
from adapterlab.tuners.snell import allocate_budget, budget_schedule, keep_count
from adapterlab.tuners.snell.layer import SnellLayer

TARGETS = ["q_proj", "v_proj"]
SIZES = {"q_proj": 64 * 64, "v_proj": 32 * 64}


def _dataset(n: int = 16):
    import datasets

    ids = torch.randint(4, 100, (n, 10), generator=torch.Generator().manual_seed(1))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _trainer(
    out: Path, callbacks, *, max_steps: int, accum: int = 1, save_steps: int | None = None, sparsity: float = 0.5
):
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accum,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        restore_callback_states_from_checkpoint=True,
    )
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), SnellConfig(r=4, sparsity=sparsity, target_modules=TARGETS))
    collator = DataCollatorForSeq2Seq(tiny_tokenizer(), padding=True, label_pad_token_id=-100)
    return Trainer(model=model, args=args, train_dataset=_dataset(), data_collator=collator, callbacks=callbacks)


def _live(trainer) -> SnellCallback:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, SnellCallback))


def _layers(model) -> list[SnellLayer]:
    return [m for m in model.modules() if isinstance(m, SnellLayer)]


def test_uniform_schedule_hand_checked_under_trainer(tmp_path):
    seen: list[int] = []
    cb = SnellCallback(0.5, allocation="uniform")
    trainer = _trainer(tmp_path / "o", [cb], max_steps=4, accum=2)
    layer = _layers(trainer.model)[0]
    layer.register_forward_pre_hook(lambda mod, args: seen.append(mod.keep("default")) if mod.training else None)
    trainer.train()
    n_total = 2 * (SIZES["q_proj"] + SIZES["v_proj"])  # 12288
    v_target = 2 * (keep_count(SIZES["q_proj"], 0.5) + keep_count(SIZES["v_proj"], 0.5))  # 6144
    # V(t) = 6144 + floor(6144 (1 - t/4)^3): 12288, 8736, 6912, 6240, then V_target at train end
    want = [12288, 6144 + 2592, 6144 + 768, 6144 + 96, 6144]
    assert [v for _, v in cb.budget_history] == want
    assert want[:4] == [budget_schedule(t, 4, n_total, v_target) for t in range(4)]
    # uniform: in proportion to the layer size; q_proj of block 0 holds 4096 / 12288 of the budget
    assert seen == [keep for keep in (4096, 2912, 2304, 2080) for _ in range(2)]  # both micro-batches share it
    counts = trainer.model.keep_counts()
    assert sum(counts.values()) == v_target
    for lay in _layers(trainer.model):
        assert int((lay.sparse_delta("default") != 0).sum()) == lay.keep("default")
    assert cb.overall_sparsity(trainer.model.base_model) == pytest.approx(0.5)
    logged = [h["snell_sparsity"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx([1 - v / n_total for v in want[:4]])


def test_importance_ema_hand_oracle():
    from peft import get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama(), SnellConfig(r=4, target_modules=TARGETS))
    x = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    pm(x, labels=x).loss.backward()
    cb = SnellCallback(0.5, beta1=0.8, beta2=0.6)
    cb.on_optimizer_step(None, None, None, model=pm)
    layer = _layers(pm)[0]
    p = layer.snell_P["default"]
    ipt = (p.detach() * p.grad).abs()
    ibar = 0.2 * ipt  # 0.8 * 0 + 0.2 * I
    ubar = 0.4 * (ipt - ibar).abs()  # 0.6 * 0 + 0.4 * |I - Ibar|
    torch.testing.assert_close(cb._ema[f"{layer.key}.ipt_P"], ibar)
    torch.testing.assert_close(cb._ema[f"{layer.key}.unc_P"], ubar)
    q = layer.snell_Q["default"]
    iq = (q.detach() * q.grad).abs()
    score = float((ibar * ubar).mean()) + float((0.2 * iq * 0.4 * (0.8 * iq)).mean())
    assert cb.layer_scores(pm.base_model)[layer.key] == pytest.approx(score, rel=1e-5)


def test_importance_allocation_follows_the_scores_under_trainer(tmp_path):
    cb = SnellCallback(0.75, init_sparsity=0.25, mask_interval=2)
    trainer = _trainer(tmp_path / "o", [cb], max_steps=4, sparsity=0.75)
    trainer.train()
    assert [s for s, _ in cb.budget_history] == [0, 2, 4]  # every 2nd step, then the final allocation
    tuner = trainer.model.base_model
    keys = list(tuner.keep_counts())
    caps = torch.tensor([lay.numel for lay in _layers(trainer.model)])
    scores = cb.layer_scores(tuner)
    assert all(s > 0 for s in scores.values())
    want = allocate_budget(cb.budget_history[-1][1], torch.tensor([scores[k] for k in keys], dtype=torch.float64), caps)
    assert [tuner.keep_counts()[k] for k in keys] == want.tolist()
    assert sum(tuner.keep_counts().values()) == sum(keep_count(int(c), 0.75) for c in caps)
    assert cb.layer_sparsity == pytest.approx({k: 1 - int(w) / int(c) for k, w, c in zip(keys, want, caps)})


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    full = _trainer(tmp_path / "full", [SnellCallback(0.5)], max_steps=6, save_steps=3)
    full.train()
    want = {k: v.detach().clone() for k, v in full.model.state_dict().items() if "snell_" in k}
    want_hist = _live(full).budget_history
    ckpt = tmp_path / "full" / "checkpoint-3"
    stored = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["SnellCallback"]
    assert stored["args"]["target_sparsity"] == 0.5 and stored["attributes"]["last_step"] == 3
    assert (ckpt / "snell_callback.safetensors").is_file()

    resumed = _trainer(tmp_path / "resumed", [SnellCallback(0.5)], max_steps=6)
    resumed.train(resume_from_checkpoint=str(ckpt))
    cb = _live(resumed)
    assert cb.budget_history == want_hist  # restored history + the same allocations afterwards
    got = {k: v.detach().clone() for k, v in resumed.model.state_dict().items() if "snell_" in k}
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)


def test_bad_callback_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"target_sparsity must be in \[0, 1\)"):
        SnellCallback(1.2)
    with pytest.raises(ValueError, match=r"allocation='magic' is not supported; choose one of: importance, uniform"):
        SnellCallback(0.5, allocation="magic")
    with pytest.raises(ValueError, match=r"mask_interval must be an integer >= 1"):
        SnellCallback(0.5, mask_interval=0)
    trainer = _trainer(tmp_path / "o", [SnellCallback(0.2, init_sparsity=0.4)], max_steps=1)
    with pytest.raises(ValueError, match=r"init_sparsity=0.4 is above target_sparsity=0.2"):
        trainer.train()
