"""Every tuner and callback through a few Trainer steps, on 1 process or under ``torchrun`` (DDP, gloo, CPU),
and every tuner through a plain loop under FSDP2 ``fully_shard`` (``fsdp_*`` cases) saved with ``save_adapter``.

Run by tests/distributed/test_ddp.py, once for all cases (one launch pays the imports once)::

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        -m tests.distributed._ddp_worker OUT CASE [CASE ...]

Every rank trains its own replica on its shard of each global batch (``PER_RANK`` sequences per rank and
micro-batch) and hashes the adapter tensors it would save; rank 0 gathers the hashes, saves the adapter
(``OUT/<case>/rank0``) and writes ``OUT/results.json``. Rank 1 gets its own output folder, which must stay
without an adapter (only rank 0 writes). The test runs the same cases in one process with the global batch
(:func:`run_case` with ``world=1``) and compares.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PER_RANK = 2  # sequences per rank and micro-batch (global micro-batch: PER_RANK * world)
SEQ = 10
N_SEQ = 32
TARGETS = ["q_proj", "v_proj"]


def dataset() -> Any:
    import datasets

    ids = torch.randint(4, 100, (N_SEQ, SEQ), generator=torch.Generator().manual_seed(1))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def shard(ids: torch.Tensor, rank: int, world: int, per_rank: int) -> torch.Tensor:
    """This rank's part of each global batch of ``per_rank * world`` rows (global batch j = rank 0's j ++ rank 1's j)."""
    n = ids.shape[0] // (per_rank * world) * (per_rank * world)
    blocks = ids[:n].view(-1, world, per_rank, ids.shape[1])  # (batches, world, per_rank, seq)
    return blocks[:, rank].reshape(-1, ids.shape[1])


def tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# the cases: each returns (model, callbacks, train kwargs); ``ctx`` has rank / world


def _peft(config: Any) -> Any:
    from peft import get_peft_model

    from adapterlab.models import tiny_llama

    return get_peft_model(tiny_llama(), config)


def _pruned_tiny() -> Any:
    from adapterlab.models import tiny_llama
    from adapterlab.pruning import prune_

    model = tiny_llama()
    prune_(model, "magnitude", 0.5)
    return model


def _unsynced_lori_switch(switch_step: int) -> Any:
    """The LoRI D -> S switch without the distributed fixes (the pre-fix behaviour): a negative control."""
    from adapterlab.callbacks import LoriCallback, swap_optimizer_params_
    from adapterlab.callbacks.dylora import find_tuner
    from adapterlab.tuners.lori.model import LoriModel

    class Unsynced(LoriCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step < self.switch_step:
                return
            tuner = find_tuner(kwargs["model"], LoriModel)
            if self._is_sparse(tuner):
                return
            report = tuner.sparsify_(sync=False)
            swap_optimizer_params_(kwargs["optimizer"], report.swapped)
            report.swapped.clear()

    return Unsynced(switch_step)


def case_lori_switch(ctx: dict[str, int]) -> tuple[Any, list[Any], dict[str, Any]]:
    from adapterlab.callbacks import LoriCallback
    from adapterlab.tuners import LoriConfig

    cfg = LoriConfig(r=4, lora_alpha=8, target_modules=TARGETS, sparsity=0.5)
    return _peft(cfg), [LoriCallback(3, lr_s=2e-2)], {"max_steps": 6, "accum": 2}


def case_lori_switch_static_reducer(ctx: dict[str, int]) -> tuple[Any, list[Any], dict[str, Any]]:
    """``find_unused_parameters=False`` (the Trainer's choice under gradient checkpointing): the old dense B
    stay in DDP's reducer without ever getting a gradient again after the switch."""
    model, callbacks, kw = case_lori_switch(ctx)
    return model, callbacks, {**kw, "find_unused": False}


def case_lori_switch_unsynced(ctx: dict[str, int]) -> tuple[Any, list[Any], dict[str, Any]]:
    from adapterlab.tuners import LoriConfig

    cfg = LoriConfig(r=4, lora_alpha=8, target_modules=TARGETS, sparsity=0.5)
    return _peft(cfg), [_unsynced_lori_switch(3)], {"max_steps": 6, "accum": 2}


def _shira(
    mask_type: str, broadcast_buffers: bool = True, **kw: Any
) -> Callable[[dict[str, int]], tuple[Any, list[Any], dict[str, Any]]]:
    def make(ctx: dict[str, int]) -> tuple[Any, list[Any], dict[str, Any]]:
        from adapterlab.callbacks import ShiraMaskCallback
        from adapterlab.tuners import ShiraConfig

        cfg = ShiraConfig(mask_type=mask_type, r=2, target_modules=TARGETS, calibration_batches=3, **kw)
        # DDP re-broadcasts rank 0's buffers (the SHiRA indices) before every forward unless told not to
        return _peft(cfg), [ShiraMaskCallback()], {"max_steps": 4, "broadcast_buffers": broadcast_buffers}

    return make


def case_shira_seed_per_rank(ctx: dict[str, int]) -> tuple[Any, list[Any], dict[str, Any]]:
    """A random mask whose seed differs between ranks: ShiraMaskCallback refuses it."""
    from adapterlab.callbacks import ShiraMaskCallback
    from adapterlab.tuners import ShiraConfig

    cfg = ShiraConfig(mask_type="random", r=2, target_modules=TARGETS, random_seed=ctx["rank"])
    return _peft(cfg), [ShiraMaskCallback()], {"max_steps": 1}


def _dylora(**kw: Any) -> Callable[[dict[str, int]], tuple[Any, list[Any], dict[str, Any]]]:
    def make(ctx: dict[str, int]) -> tuple[Any, list[Any], dict[str, Any]]:
        from adapterlab.callbacks import DyLoraCallback
        from adapterlab.tuners import DyLoraConfig

        cfg = DyLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw)
        return _peft(cfg), [DyLoraCallback()], {"max_steps": 6, "accum": 2}

    return make


def case_dylora_seed_per_rank(ctx: dict[str, int]) -> tuple[Any, list[Any], dict[str, Any]]:
    from adapterlab.callbacks import DyLoraCallback
    from adapterlab.tuners import DyLoraConfig

    cfg = DyLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, seed=ctx["rank"])
    return _peft(cfg), [DyLoraCallback()], {"max_steps": 1}


def case_dylora_static_reducer(ctx: dict[str, int]) -> tuple[Any, list[Any], dict[str, Any]]:
    """Components above the sampled rank get no gradient: DDP without unused-parameter detection is refused."""
    model, callbacks, kw = _dylora()(ctx)
    return model, callbacks, {**kw, "max_steps": 1, "find_unused": False}


def case_snella(ctx: dict[str, int]) -> tuple[Any, list[Any], dict[str, Any]]:
    from adapterlab.callbacks import SnellCallback
    from adapterlab.tuners import SnellConfig

    cfg = SnellConfig(r=4, target_modules=TARGETS, sparsity=0.5)
    return _peft(cfg), [SnellCallback(0.6, init_sparsity=0.2)], {"max_steps": 5}


def case_spp_logger(ctx: dict[str, int]) -> tuple[Any, list[Any], dict[str, Any]]:
    from peft import get_peft_model

    from adapterlab.callbacks import SparsityRankLogger
    from adapterlab.tuners import SppConfig

    cfg = SppConfig(r=8, lora_dropout=0.0, target_modules=TARGETS)
    return get_peft_model(_pruned_tiny(), cfg), [SparsityRankLogger()], {"max_steps": 4}


def case_lors_init(ctx: dict[str, int]) -> tuple[Any, list[Any], dict[str, Any]]:
    from peft import get_peft_model

    from adapterlab.tuners import LorsConfig

    model = get_peft_model(_pruned_tiny(), LorsConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    ids = torch.randint(4, 100, (8, SEQ), generator=torch.Generator().manual_seed(5))
    per = PER_RANK * (2 // ctx["world"])  # init batch per rank; one process takes the global batch
    model.lors_init_(shard(ids, ctx["rank"], ctx["world"], per), batch_size=per)
    return model, [], {"max_steps": 4}


def _perp(scope: str, lr: float = 1e-2) -> Callable[[dict[str, int]], tuple[Any, list[Any], dict[str, Any]]]:
    def make(ctx: dict[str, int]) -> tuple[Any, list[Any], dict[str, Any]]:
        from adapterlab.retrain import perp_

        model = _pruned_tiny()
        perp_(model, scope, r=2, alpha=4.0, target_modules=TARGETS)
        return model, [], {"max_steps": 4, "retrain": True, "lr": lr}

    return make


CASES: dict[str, Callable[[dict[str, int]], tuple[Any, list[Any], dict[str, Any]]]] = {
    "lori_switch": case_lori_switch,
    "lori_switch_static_reducer": case_lori_switch_static_reducer,
    "lori_switch_unsynced": case_lori_switch_unsynced,
    "shira_random": _shira("random"),
    "shira_grad": _shira("grad"),
    "shira_grad_no_buffer_broadcast": _shira("grad", broadcast_buffers=False),
    "shira_snip_abs": _shira("snip", grad_accum="abs"),
    "shira_seed_per_rank": case_shira_seed_per_rank,
    "dylora": _dylora(),
    "dylora_rslora": _dylora(use_rslora=True, frozen_mode=False),
    "dylora_seed_per_rank": case_dylora_seed_per_rank,
    "dylora_static_reducer": case_dylora_static_reducer,
    "snella": case_snella,
    "spp_logger": case_spp_logger,
    "lors_init": case_lors_init,
    "perp_mask_lora": _perp("mask_lora"),
    # full fine-tuning: Adam moves an entry with a near-zero gradient by up to ~lr whatever its rounding, so the
    # 1-vs-2-process comparison of all 8k base weights needs a small lr to stay inside the fp32 tolerance
    "perp_full_mask_keeper": _perp("full", lr=1e-3),
}


# FSDP2 (``fully_shard``, gloo, CPU): a plain training loop, each decoder layer and the root sharded
def _fsdp_cases() -> dict[str, tuple[Callable[[], Any], torch.dtype]]:
    from adapterlab import tuners as T

    return {
        "fsdp_lori": (lambda: T.LoriConfig(r=4, lora_alpha=8, target_modules=TARGETS), torch.float32),
        "fsdp_shira": (lambda: T.ShiraConfig(mask_type="random", r=2, target_modules=TARGETS), torch.float32),
        "fsdp_dylora": (lambda: T.DyLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), torch.float32),
        # a bf16 base with fp32 adapter parameters in one sharded unit (mixed dtypes and requires_grad)
        "fsdp_dylora_bf16": (lambda: T.DyLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), torch.bfloat16),
        "fsdp_snell": (lambda: T.SnellConfig(r=4, target_modules=TARGETS, sparsity=0.5), torch.float32),
        "fsdp_spp": (lambda: T.SppConfig(r=8, lora_dropout=0.0, target_modules=TARGETS), torch.float32),
        "fsdp_lors": (lambda: T.LorsConfig(r=4, lora_alpha=4, target_modules=TARGETS), torch.float32),
    }


FSDP_NAMES = ["fsdp_lori", "fsdp_shira", "fsdp_dylora", "fsdp_dylora_bf16", "fsdp_snell", "fsdp_spp", "fsdp_lors"]


def run_fsdp_case(name: str, out: Path, *, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """3 AdamW steps on this rank's half of each global batch, then ``save_adapter`` (every rank calls it)."""
    from peft import get_peft_model, get_peft_model_state_dict

    from adapterlab import distributed
    from adapterlab.models import tiny_llama
    from adapterlab.tuners import save_adapter

    make, dtype = _fsdp_cases()[name]
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(dtype=dtype), make())
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = shard(torch.tensor(dataset()["input_ids"]), rank, world, PER_RANK * (2 // world))
    step = PER_RANK * (2 // world)
    for j in range(3):
        x = ids[j * step : (j + 1) * step]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    folder = out / name / "adapter"
    result: dict[str, Any] = {"error": None, "logs": [{"loss": None}] * 3}
    try:
        save_adapter(model, folder)
    except ValueError as err:
        result["error"] = str(err)
    result["tensors"] = distributed.full_tensors(get_peft_model_state_dict(model))  # collective: every rank
    result["hash"] = tensor_hash(result["tensors"])
    if world > 1 and name == "fsdp_lori":  # what refuses sharded parameters, with one clear error
        from adapterlab.callbacks import MaskKeeperCallback

        refused = []
        keeper = MaskKeeperCallback(masks={"model.layers.0.self_attn.q_proj": torch.ones(64, 64, dtype=torch.bool)})
        for attempt in (lambda: model.sparsify_(), lambda: keeper.on_train_begin(None, None, None, model=model)):  # type: ignore[arg-type]
            try:
                attempt()
                refused.append(None)
            except ValueError as err:
                refused.append(str(err))
        result["refused"] = refused
    return result


# ---------------------------------------------------------------------------------------------
# running one case


def adapter_tensors(model: Any) -> dict[str, torch.Tensor]:
    """What would be saved: peft's adapter state dict, or PERP's trainable subset."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    from adapterlab.retrain import perp_state_dict

    return {k: v.detach().clone() for k, v in perp_state_dict(model).items()}


def run_case(name: str, out: Path, *, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Train case ``name`` on this process's shard; returns the adapter tensors, logs and any error."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from adapterlab.models import tiny_tokenizer

    ctx = {"rank": rank, "world": world}
    torch.manual_seed(0)
    model, callbacks, kw = CASES[name](ctx)
    folder = out / name / f"rank{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"error": None, "logs": [], "initial_hash": tensor_hash(adapter_tensors(model))}
    try:
        if kw.get("retrain"):
            from adapterlab.retrain import retrain_

            ids = torch.tensor(dataset()["input_ids"])  # the same windows on every rank: DDP shards them
            res = retrain_(model, ids, steps=kw["max_steps"], lr=kw["lr"], batch_size=PER_RANK * (2 // world), seed=0)
            result["logs"] = [{"loss": x} for x in res.losses]
            result["mask_keeper"] = res.mask_keeper
        else:
            args = TrainingArguments(
                output_dir=str(folder),
                max_steps=kw["max_steps"],
                per_device_train_batch_size=PER_RANK * (2 // world),
                gradient_accumulation_steps=kw.get("accum", 1),
                learning_rate=1e-2,
                lr_scheduler_type="constant",
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                use_cpu=True,
                remove_unused_columns=False,
                dataloader_num_workers=0,
                disable_tqdm=True,
                seed=0,
                ddp_backend="gloo" if world > 1 else None,
                ddp_broadcast_buffers=kw.get("broadcast_buffers", True),
                ddp_find_unused_parameters=kw.get("find_unused"),
            )
            tok = tiny_tokenizer()
            collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
            trainer = Trainer(
                model=model, args=args, train_dataset=dataset(), data_collator=collator, callbacks=callbacks
            )
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            trainer.save_model(str(folder))  # writes on the main process only
            result["logs"] = [h for h in trainer.state.log_history if "loss" in h]
    except ValueError as err:
        result["error"] = str(err)
    result["tensors"] = adapter_tensors(model)
    result["hash"] = tensor_hash(result["tensors"])
    return result


def main(argv: list[str]) -> None:
    from adapterlab import distributed

    out = Path(argv[0])
    names = argv[1:] or [*CASES, *FSDP_NAMES]
    torch.distributed.init_process_group("gloo")
    rank, world = distributed.rank(), distributed.world_size()
    results: dict[str, Any] = {}
    for name in names:
        try:
            runner = run_fsdp_case if name.startswith("fsdp_") else run_case
            res = runner(name, out, rank=rank, world=world)
        except Exception:  # noqa: BLE001 - recorded for the test to show
            res = {"error": traceback.format_exc(), "hash": None, "tensors": {}, "logs": []}
        gathered = distributed.all_gather_object({"hash": res["hash"], "error": res["error"]})
        if distributed.is_rank0():
            from safetensors.torch import save_file

            if res["tensors"]:
                save_file(
                    {k: v.contiguous() for k, v in res["tensors"].items()}, str(out / name / "tensors.safetensors")
                )
            results[name] = {
                "hashes": [g["hash"] for g in gathered],
                "errors": [g["error"] for g in gathered],
                "logs": res["logs"],
                **{k: res[k] for k in ("mask_keeper", "refused") if k in res},
            }
    if distributed.is_rank0():
        (out / "results.json").write_text(json.dumps(results, indent=1))
    del results, res, gathered
    end_without_finalizers()


def end_without_finalizers() -> None:
    """Tear the process group down while the interpreter is whole, then leave without its finalization.

    About 1 launch in 7 here (and once in CI) a rank aborted after all its work was done, with
    ``terminate called without an active exception`` and no Python traceback: gloo's C++ worker threads
    can still own work objects whose tensors hold Python references, and destroying those during
    interpreter finalization aborts (the failure pytorch/pytorch#179291 describes). Everything this
    worker writes is flushed before, so ``os._exit`` loses nothing.
    """
    import gc

    gc.collect()  # models, optimizers and DTensors of the last case: release them while Python is alive
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main(sys.argv[1:])
