"""The train step: base (+ prune) -> adapter -> Trainer / SFTTrainer -> evaluate -> PEFT dir -> registry.

``train_adapter(recipe)`` runs one :class:`~adapterlab.recipe.schema.TrainRecipe`;
``check_train_recipe(recipe)`` does every check that needs no weights (method, params and callbacks
with their types and ranges, task, trainer args, prune settings, ``resume``, output folder, registry
put, the base folder, and the adapter built by peft on a weightless copy of the base) so a bad
recipe fails before any work: if ``--dry-run`` passes, the run does not fail on its configuration.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from pydantic import ValidationError
from torch import nn
from transformers import TrainerCallback

from adapterlab.progress import ProgressFactory, _silent
from adapterlab.recipe.fields import (
    ADAPTER_RANGES,
    check_values,
    dataclass_hints,
    first_error,
    folder_target,
    registry_name,
    signature_hints,
)
from adapterlab.recipe.schema import AdapterSpec, TrainRecipe

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "TrainResult",
    "adapter_config",
    "adapter_callbacks",
    "available_methods",
    "check_adapter_build",
    "check_train_recipe",
    "registry_or_none",
    "train_adapter",
]


@dataclass(frozen=True)
class MethodEntry:
    """Where a method's peft config class lives, and params it always gets."""

    module: str
    cls: str
    defaults: tuple[tuple[str, Any], ...] = ()
    callbacks: tuple[str, ...] = ()  # adapterlab.callbacks classes added unless given


#: adapter method name -> config class. Entries whose class is not importable yet (tuners that
#: other parts of adapterlab add) fail with a clear error when used.
METHODS: dict[str, MethodEntry] = {
    "lora": MethodEntry("peft", "LoraConfig", (("task_type", "CAUSAL_LM"),)),
    "rslora": MethodEntry("peft", "LoraConfig", (("task_type", "CAUSAL_LM"), ("use_rslora", True))),
    "dylora": MethodEntry("adapterlab.tuners", "DyLoraConfig", callbacks=("DyLoraCallback",)),
    "lori": MethodEntry("adapterlab.tuners", "LoriConfig"),
    "shira": MethodEntry("adapterlab.tuners", "ShiraConfig"),
    "snell": MethodEntry("adapterlab.tuners", "SnellConfig"),
    "spp": MethodEntry("adapterlab.tuners", "SppConfig"),
    "lors": MethodEntry("adapterlab.tuners", "LorsConfig"),
}


def _config_class(method: str) -> type | None:
    entry = METHODS[method]
    try:
        return getattr(importlib.import_module(entry.module), entry.cls, None)
    except ImportError:
        return None


def available_methods() -> list[str]:
    """Methods whose config class is importable in this install."""
    return [m for m in METHODS if _config_class(m) is not None]


def adapter_config(spec: AdapterSpec, where: str = "adapter") -> Any:
    """The peft config for ``spec`` (``method`` + ``params``), validated.

    Raises:
        ValueError: unknown or unavailable method, an unknown param, a param of the wrong type or
            range (named with its key path: ``adapter.params.r: Input should be greater than or
            equal to 1 (got -4)``), or a value the config rejects.
    """
    method = spec.method.lower()
    if method not in METHODS:
        raise ValueError(f"{where}.method: unknown adapter method {spec.method!r}; choose one of: {', '.join(METHODS)}")
    cls = _config_class(method)
    if cls is None:
        entry = METHODS[method]
        raise ValueError(
            f"{where}.method: {method!r} is not available in this install ({entry.module} has no {entry.cls}); "
            f"available: {', '.join(available_methods())}"
        )
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in spec.params:
        if key not in allowed:
            raise ValueError(
                f"{where}.params.{key}: unknown key for {cls.__name__} ({method}); allowed: {', '.join(sorted(allowed))}"
            )
    kwargs = {k: v for k, v in METHODS[method].defaults if k in allowed}
    try:
        kwargs.update(check_values(spec.params, dataclass_hints(cls), ADAPTER_RANGES))
    except ValidationError as exc:
        raise ValueError(first_error(exc, f"{where}.params")) from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}.params: {str(exc).splitlines()[0]}") from None


def adapter_callbacks(spec: AdapterSpec, where: str = "adapter") -> list[Any]:
    """The TrainerCallbacks for ``spec``: its ``callbacks`` mapping plus the method's automatic ones.

    Raises:
        ValueError: a callback name not in ``adapterlab.callbacks``, or an unknown / bad argument.
    """
    import adapterlab.callbacks as cbs

    names = sorted(n for n, obj in vars(cbs).items() if inspect.isclass(obj) and issubclass(obj, TrainerCallback))
    wanted = dict(spec.callbacks)
    for auto in METHODS.get(spec.method.lower(), MethodEntry("", "")).callbacks:
        wanted.setdefault(auto, {})
    out = []
    for name, kwargs in wanted.items():
        cls = getattr(cbs, name, None)
        if name not in names or cls is None:
            raise ValueError(f"{where}.callbacks.{name}: unknown callback; choose one of: {', '.join(names)}")
        params = inspect.signature(cls).parameters
        for key in kwargs or {}:
            if key not in params:
                raise ValueError(f"{where}.callbacks.{name}.{key}: unknown key; allowed: {', '.join(params)}")
        try:
            kwargs = check_values(kwargs or {}, signature_hints(cls))
        except ValidationError as exc:
            raise ValueError(first_error(exc, f"{where}.callbacks.{name}")) from None
        try:
            out.append(cls(**kwargs))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}.callbacks.{name}: {str(exc).splitlines()[0]}") from None
    return out


def _skeleton(path: Path) -> nn.Module:
    """A weightless (meta-device) copy of the model in ``path``, built from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_fits(config: Any, model: nn.Module, where: str = "adapter") -> None:
    """The adapter's list-style ``target_modules`` must name modules of ``model``."""
    from adapterlab.tuners._lowrank import check_target_modules

    try:
        check_target_modules(model, getattr(config, "target_modules", None))
    except ValueError as exc:
        raise ValueError(f"{where}.params.{exc}") from None


#: The largest base (fp32 bytes) that :func:`check_adapter_build` fills with placeholder values when a
#: method's layers read the base's weights (SPP and LoRS patterns, SHiRA ``wm`` masks).
PLACEHOLDER_LIMIT_BYTES = 2 << 30


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def check_adapter_build(config: Any, path: Path, where: str = "adapter") -> None:
    """Build the adapter with peft on a weightless copy of the base in ``path``, so that peft's own
    checks (``r`` > 0, dropout in [0, 1], ``bias``, ``init_lora_weights``, the tuner's layer checks)
    run before any work.

    The copy lives on the meta device. When that build fails (also because a method reads the base's
    weights: SPP and LoRS patterns, SHiRA ``wm`` masks, PiSSA's SVD), it is built again on a copy
    filled with placeholder values, and only that failure counts; a base larger than
    :data:`PLACEHOLDER_LIMIT_BYTES` is not filled, and then only peft's config errors (ValueError,
    TypeError, KeyError) from the meta build count. ``config`` itself is not modified.

    Raises:
        ValueError: ``WHERE.params: <peft's reason>``.
    """
    from peft import get_peft_model

    try:
        get_peft_model(_skeleton(path), copy.deepcopy(config))
        return
    except Exception as exc:  # noqa: BLE001 - any failure of the build is looked at again below
        first = exc
    skeleton = _skeleton(path)
    size = sum(p.numel() for p in skeleton.parameters()) * 4
    if size > PLACEHOLDER_LIMIT_BYTES:
        if isinstance(first, (ValueError, TypeError, KeyError)):
            raise ValueError(f"{where}.params: {_reason(first)}") from None
        logger.info("%s: not built before training (%s; base of %d bytes)", where, _reason(first), size)
        return
    skeleton.to_empty(device="cpu")
    with torch.no_grad():
        for p in skeleton.parameters():
            p.fill_(1.0)
    try:
        get_peft_model(skeleton, copy.deepcopy(config))
    except Exception as exc:  # noqa: BLE001 - the config's failure, reported in one line
        raise ValueError(f"{where}.params: {_reason(exc)}") from None


def registry_root(root: str | None = None) -> str:
    """The registry root a put uses: ``root``, else ``$ADAPTERLAB_HUB``, else ``./hub``."""
    return root if root is not None else (os.environ.get("ADAPTERLAB_HUB") or "hub")


def registry_or_none(root: str | None = None) -> Any:
    """``AdapterRegistry(root)`` when ``adapterlab.registry`` provides it, else None."""
    try:
        from adapterlab.registry import AdapterRegistry  # type: ignore[attr-defined]
    except ImportError:
        return None
    return AdapterRegistry(root if root is not None else os.environ.get("ADAPTERLAB_HUB"))


def _check_resume(recipe: TrainRecipe, where: str) -> None:
    """``resume``: a checkpoint folder that exists, or ``true`` with a checkpoint in ``trainer.output_dir``."""
    if isinstance(recipe.resume, str):
        if not (Path(recipe.resume).expanduser() / "trainer_state.json").is_file():
            raise FileNotFoundError(
                f"{where}resume: {recipe.resume!r} is not a Trainer checkpoint folder (no trainer_state.json)"
            )
    elif recipe.resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        out = recipe.trainer.get("output_dir")
        if out is None:
            raise ValueError(
                f"{where}resume: true resumes from the last checkpoint in trainer.output_dir; set trainer.output_dir, "
                f"or give the checkpoint folder"
            )
        if not Path(out).expanduser().is_dir() or get_last_checkpoint(str(Path(out).expanduser())) is None:
            raise FileNotFoundError(f"{where}resume: trainer.output_dir {out!r} holds no checkpoint-* folder")


def _check_put(recipe: TrainRecipe, where: str) -> None:
    """The registry name (default: the output folder's name) and the effective root of the put."""
    assert recipe.put is not None
    if recipe.put.name is None and "${" not in recipe.output:
        try:
            registry_name(Path(recipe.output).name, "name")
        except ValueError as exc:
            raise ValueError(f"{where}put.name: {exc} (the default, the output folder's name; set put.name)") from None
    try:
        folder_target(registry_root(recipe.put.root), "registry root")
    except ValueError as exc:
        given = "put.root" if recipe.put.root is not None else "put.root (default: $ADAPTERLAB_HUB, else ./hub)"
        raise ValueError(f"{where}{given}: {exc}") from None


def check_train_recipe(
    recipe: TrainRecipe, *, where: str = "", base_path: Path | None = None, put: bool = True
) -> tuple[Any, list[Any]]:
    """Every check that needs no weights. Returns ``(peft config, callbacks)``.

    The contract: when this passes, the run does not fail on its configuration. Besides the schema
    (types, ranges, registry names, output folders), it checks the method, params and callbacks,
    the task, the trainer arguments, the prune settings, ``resume``, the output folder, the registry
    put, the base folder (``config.json`` and safetensors weights), and builds the adapter with peft
    on a weightless copy of the base (:func:`check_adapter_build`).

    Args:
        where: key-path prefix for errors (``"steps.1.train."`` in a pipeline).
        base_path: the folder whose config is checked against the adapter (None: ``recipe.base``;
            skipped when the base is produced by an earlier pipeline step).
        put: the run will put the adapter into the registry (False: ``--no-put``; the put's root
            and default name are not checked).
    """
    from adapterlab.data import get_task
    from adapterlab.models import check_model_folder
    from adapterlab.pruning import PRUNERS
    from adapterlab.pruning.functional import parse_pattern
    from adapterlab.staging import check_output_dir

    config = adapter_config(recipe.adapter, f"{where}adapter")
    callbacks = adapter_callbacks(recipe.adapter, f"{where}adapter")
    try:
        get_task(recipe.data.task)
    except ValueError as exc:
        raise ValueError(f"{where}data.task: {exc}") from None
    pruner: Any = None
    if recipe.prune is not None:
        try:
            pruner = PRUNERS.get(recipe.prune.method)
            parse_pattern(recipe.prune.pattern)
        except ValueError as exc:
            raise ValueError(f"{where}prune: {exc}") from None
        scopes = getattr(pruner, "scopes", None)
        if recipe.prune.scope is not None and scopes is not None and recipe.prune.scope not in scopes:
            raise ValueError(
                f"{where}prune.scope: unknown scope {recipe.prune.scope!r}; choose one of: {', '.join(scopes)}"
            )
        if recipe.prune.output is not None:
            check_output_dir(recipe.prune.output, recipe.overwrite)
    check_output_dir(recipe.output, recipe.overwrite)
    _check_data_parallel(recipe, where)
    _training_args(
        recipe, Path(tempfile.gettempdir()) / "adapterlab-train-check", where
    )  # bad trainer values fail here
    _check_resume(recipe, where)
    if put and recipe.put is not None:
        _check_put(recipe, where)
    path = base_path
    if path is None and "${" not in recipe.base:
        path = check_model_folder(recipe.base, f"{where}base")
    if path is not None:
        if recipe.prune is not None and pruner is not None and pruner.needs_calibration:
            _check_seqlen(recipe.prune.seqlen, path, f"{where}prune.seqlen")
        skeleton = _skeleton(path)
        check_fits(config, skeleton, f"{where}adapter")
        check_adapter_build(config, path, f"{where}adapter")
    return config, callbacks


#: Trainer arguments that shard the adapter over processes; ``train_adapter`` saves it with ``save_pretrained``
#: on rank 0, which needs the whole adapter there (plain DDP), so these are refused before any work.
SHARDED_TRAINER_KEYS = ("fsdp", "fsdp_config", "deepspeed")


def _check_data_parallel(recipe: TrainRecipe, where: str) -> None:
    for key in SHARDED_TRAINER_KEYS:
        if recipe.trainer.get(key):
            raise ValueError(
                f"{where}trainer.{key}: sharded training (FSDP, DeepSpeed) is not supported by adapterlab train; "
                f"it trains data-parallel (DDP) under torchrun / accelerate launch. Remove trainer.{key}"
            )


def _check_seqlen(seqlen: int, path: Path, where: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise ValueError(f"{where}: {seqlen} exceeds the base's context length {limit}")


# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What ``train_adapter`` produced."""

    output: Path
    method: str
    task: str
    accuracy: float | None = None
    zero_shot: float | None = None
    digest: str | None = None
    ref: str | None = None
    trainable_params: int = 0
    steps: int = 0
    seconds: float = 0.0
    prune: dict[str, Any] | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["output"] = str(self.output)
        return d


class ProgressBarCallback(TrainerCallback):
    """Advances an adapterlab progress bar (see :mod:`adapterlab.progress`) once per optimizer step."""

    def __init__(self, factory: ProgressFactory) -> None:
        self.factory = factory
        self.step: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = self.factory("train", state.max_steps or None)
        if state.global_step:
            self.step(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.step is not None:
            self.step(1)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs:
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items())
            logger.info("step %d: %s", state.global_step, shown)


def _training_args(recipe: TrainRecipe, scratch: Path, where: str = "") -> Any:
    """TrainingArguments (``trainer``) or SFTConfig (``sft``) with adapterlab's defaults."""
    from transformers import TrainingArguments

    args: dict[str, Any] = {
        "output_dir": str(scratch),
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 10,
        "disable_tqdm": True,
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "seed": recipe.seed,
        "data_seed": recipe.seed,
        "restore_callback_states_from_checkpoint": True,
    }
    if not torch.cuda.is_available():
        args["use_cpu"] = True
    args.update(recipe.trainer)
    if recipe.backend == "sft":
        from trl import SFTConfig

        args.setdefault("bf16", False)
        if not torch.cuda.is_available():
            args.setdefault("gradient_checkpointing", False)
        args.setdefault("max_length", recipe.data.max_length)
        cls: type = SFTConfig
    else:
        cls = TrainingArguments
        allowed = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
        extra = sorted(set(args) - allowed)
        if extra:
            raise ValueError(f"{where}trainer.{extra[0]}: an SFTConfig field; set backend: sft to use it")
    try:
        return cls(**args)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}trainer: {str(exc).splitlines()[0]}") from None


def _load_base(recipe: TrainRecipe) -> nn.Module:
    from adapterlab.models import load_model

    if recipe.quantize is not None:
        from adapterlab.quant import load_quantized

        return load_quantized(recipe.base, bits=recipe.quantize)
    return load_model(recipe.base)


def _prune(model: nn.Module, tok: Any, recipe: TrainRecipe, progress: ProgressFactory) -> dict[str, Any]:
    from adapterlab.data import calibration_ids
    from adapterlab.pruning import PRUNERS, prune_

    spec = recipe.prune
    assert spec is not None
    calibration = None
    if PRUNERS.get(spec.method).needs_calibration:
        calibration = calibration_ids(tok, n_samples=spec.nsamples, seqlen=spec.seqlen, seed=spec.seed, corpus="wiki")
    sparsity = 0.5 if spec.sparsity is None and spec.pattern is None else spec.sparsity
    report = prune_(
        model,
        spec.method,
        sparsity,
        pattern=spec.pattern,
        calibration=calibration,
        scope=spec.scope,
        progress=progress,
        batch_size=spec.batch_size,
    )
    info = report.to_dict()
    info.pop("layers", None)
    info.update(spec.model_dump())
    return info


def _save_pruned(model: nn.Module, tok: Any, out: str, overwrite: bool, info: dict[str, Any]) -> None:
    from adapterlab.pruning import get_masks, save_masks
    from adapterlab.staging import staged_dir

    with staged_dir(out, overwrite) as stage:
        model.save_pretrained(str(stage))
        tok.save_pretrained(str(stage))
        save_masks(stage / "masks.safetensors", get_masks(model), metadata={"method": str(info.get("method"))})
        (stage / "sparsity_report.json").write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")


def _restore_fp32_(model: nn.Module) -> int:
    """SFTTrainer casts trainable parameters to bf16 on quantized bases; put adapterlab's fp32 back."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype == torch.bfloat16:
            p.data = p.data.float()
            n += 1
    return n


def _make_trainer(
    recipe: TrainRecipe, model: nn.Module, config: Any, tok: Any, dataset: Any, callbacks: list[Any], args: Any
) -> Any:
    trainer = _new_trainer(recipe, model, config, tok, dataset, callbacks, args)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # logs go through logging (ProgressBarCallback.on_log)
    return trainer


def _new_trainer(
    recipe: TrainRecipe, model: nn.Module, config: Any, tok: Any, dataset: Any, callbacks: list[Any], args: Any
) -> Any:
    from transformers import DataCollatorForSeq2Seq

    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    if recipe.backend == "sft":
        from trl import SFTTrainer

        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            peft_config=config,
            callbacks=callbacks,
            data_collator=collator,
        )
        if recipe.quantize is not None and _restore_fp32_(trainer.model):
            logger.info("restored fp32 adapter parameters after SFTTrainer's bf16 cast")
        return trainer
    from peft import get_peft_model
    from transformers import Trainer

    pm = get_peft_model(model, config)
    return Trainer(model=pm, args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks)


def train_adapter(
    recipe: TrainRecipe,
    *,
    put: bool = True,
    progress: ProgressFactory | None = None,
    provenance: dict[str, Any] | None = None,
    checked: tuple[Any, list[Any]] | None = None,
) -> TrainResult:
    """Train the adapter a recipe describes, evaluate it, save the PEFT folder, put it in the registry.

    Under ``torchrun`` / ``accelerate launch`` every process runs this: each checks the recipe, loads
    the base (and prunes it the same way) and trains its replica, the Trainer's DDP averaging the
    gradients (``per_device_train_batch_size`` is per process: the global batch is it times the number
    of processes times ``gradient_accumulation_steps``). Rank 0 alone evaluates (the exact computation
    of one process; the others wait), writes the pruned base, the output folder (staged, landing by
    rename) and the registry entry; the other ranks never write there and return rank 0's result.
    Every rank confirms its training ended well before rank 0 writes (:mod:`adapterlab.recipe.processes`).

    Args:
        recipe: a validated :class:`TrainRecipe`.
        put: put the result into the registry when the recipe has ``put`` (``--no-put``: False).
        progress: progress factory for pruning, training and evaluation.
        provenance: extra fields recorded in the registry manifest (e.g. the recipe file).
        checked: the result of :func:`check_train_recipe` when already run.

    Returns:
        A :class:`TrainResult` (the same on every rank); ``output`` holds ``adapter_config.json``,
        ``adapter_model.safetensors`` and ``train_report.json``.

    Raises:
        RankZeroFailed: on ranks > 0, when a step that only rank 0 runs failed there.
    """
    from adapterlab import distributed
    from adapterlab.callbacks.logger import SparsityRankLogger
    from adapterlab.data import tokenize_for_training
    from adapterlab.models import load_tokenizer
    from adapterlab.recipe.processes import agree, on_rank0

    t0 = time.perf_counter()
    progress = progress or _silent
    config, callbacks = checked or check_train_recipe(recipe, put=put)
    if not any(isinstance(c, SparsityRankLogger) for c in callbacks):
        callbacks.append(SparsityRankLogger())
    callbacks.append(ProgressBarCallback(progress))
    scratch = Path(tempfile.mkdtemp(prefix="adapterlab-train-"))  # this process's Trainer folder, never shared
    try:
        args = _training_args(recipe, scratch)  # under a launcher this joins the process group (accelerate)
        if distributed.world_size() > 1 and not distributed.is_distributed():
            raise RuntimeError(
                f"launched as {distributed.world_size()} processes but no process group is initialised; "
                f"start with torchrun or accelerate launch"
            )
        torch.manual_seed(recipe.seed)
        tok = load_tokenizer(recipe.base)
        model = _load_base(recipe)
        result = TrainResult(output=Path(recipe.output), method=recipe.adapter.method, task=recipe.data.task)
        if recipe.prune is not None:
            result.prune = _prune(model, tok, recipe, progress)  # every rank: the same data, the same masks
            prune_out = recipe.prune.output
            if prune_out is not None:
                info = result.prune
                on_rank0(lambda: _save_pruned(model, tok, prune_out, recipe.overwrite, info), "saving the pruned base")
                cast(Any, model).config._name_or_path = str(prune_out)  # the base the adapter belongs to
        dataset = tokenize_for_training(
            tok, recipe.data.task, n=recipe.data.max_examples, seed=recipe.data.seed, max_length=recipe.data.max_length
        )
        ev = recipe.eval
        if ev is not None and ev.zero_shot:
            result.zero_shot = on_rank0(lambda: _accuracy(model, tok, recipe, progress), "zero-shot evaluation")
        trainer = _make_trainer(recipe, model, config, tok, dataset, callbacks, args)
        failure: BaseException | None = None
        try:
            trainer.train(resume_from_checkpoint=recipe.resume)
        except Exception as exc:  # noqa: BLE001 - every rank learns of it before anything is written
            failure = exc
        agree(failure, "training")
    finally:
        if "output_dir" not in recipe.trainer:
            shutil.rmtree(scratch, ignore_errors=True)
    pm = trainer.model
    sharded = [n for n, p in pm.named_parameters() if p.requires_grad and distributed.is_sharded(p)]
    if sharded:
        raise ValueError(
            f"the trained adapter is sharded over the processes ({sharded[0]!r}); adapterlab train saves DDP runs "
            f"only (no FSDP / DeepSpeed ZeRO-3 in the accelerate config)"
        )
    result.steps = int(trainer.state.global_step)
    result.log_history = list(trainer.state.log_history)
    result.trainable_params = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    if ev is not None:
        result.accuracy = on_rank0(lambda: _accuracy(pm, tok, recipe, progress), "evaluation")
    result.seconds = time.perf_counter() - t0
    result.digest, result.ref = on_rank0(
        lambda: _write(pm, recipe, result, put, provenance, distributed.world_size()), "writing the output"
    )
    logger.info(
        "trained %s on %s: accuracy %s (zero-shot %s) -> %s",
        recipe.adapter.method,
        recipe.data.task,
        result.accuracy,
        result.zero_shot,
        recipe.output,
    )
    return result


def _accuracy(model: nn.Module, tok: Any, recipe: TrainRecipe, progress: ProgressFactory) -> float:
    from adapterlab.evaluate import task_accuracy

    ev = recipe.eval
    assert ev is not None
    return task_accuracy(
        model, tok, recipe.data.task, split=ev.split, n=ev.n, batch_size=ev.batch_size, progress=progress
    ).accuracy


def _write(
    pm: nn.Module,
    recipe: TrainRecipe,
    result: TrainResult,
    put: bool,
    provenance: dict[str, Any] | None,
    processes: int,
) -> tuple[str | None, str | None]:
    """The output folder (staged: all of it or nothing lands) and the registry put; ``(digest, ref)``. Rank 0 only."""
    from adapterlab.staging import staged_dir

    with staged_dir(recipe.output, recipe.overwrite) as stage:
        pm.save_pretrained(str(stage))  # type: ignore[operator]
        report = result.to_dict()
        report["processes"] = processes
        report["recipe"] = recipe.model_dump(mode="json")
        (stage / "train_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    if not (put and recipe.put is not None):
        return None, None
    registry = registry_or_none(recipe.put.root)
    if registry is None:
        logger.warning("adapterlab.registry is not available in this install: the adapter was not put in a hub")
        return None, None
    from adapterlab.io import base_fingerprint

    name = recipe.put.name or Path(recipe.output).name
    prov = {
        "kind": "trained",
        "recipe": recipe.model_dump(mode="json"),
        "accuracy": result.accuracy,
        "zero_shot": result.zero_shot,
        "task": recipe.data.task,
        "method": recipe.adapter.method,
        "steps": result.steps,
        "processes": processes,
        **(provenance or {}),
    }
    digest = registry.put(recipe.output, name, provenance=prov, base=base_fingerprint(pm), tags=tuple(recipe.put.tags))
    return digest, f"hub:{name}"
