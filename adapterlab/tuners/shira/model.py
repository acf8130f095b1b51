"""``ShiraModel``: the peft tuner for SHiRA, mask calibration (grad/snip) and peft-format interop.

Reference:
    Bhardwaj et al., SHiRA, https://arxiv.org/abs/2406.13175.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from adapterlab import distributed
from adapterlab.quant import is_4bit, is_8bit
from adapterlab.tuners._lowrank import check_target_modules, replace_with
from adapterlab.tuners.shira.config import GRAD_ACCUM, NAME, PREFIX, ShiraConfig
from adapterlab.tuners.shira.functional import (
    DATA_MASK_TYPES,
    flat_to_rowcol,
    mask_indices,
    rowcol_to_flat,
)
from adapterlab.tuners.shira.layer import DIMS, INDICES, VALUES, ShiraLayer

logger = logging.getLogger(__name__)

#: peft's own SHiRA checkpoint keys (``<module>.shira_weight`` values, ``<module>.shira_indices`` (2, K) int32).
PEFT_VALUES, PEFT_INDICES = "shira_weight", "shira_indices"


def shira_layers(model: nn.Module, adapter_name: str | None = None) -> list[tuple[str, ShiraLayer]]:
    """``(module key, layer)`` of every :class:`ShiraLayer` in ``model`` (holding ``adapter_name`` if given)."""
    return [
        (m.key, m)
        for m in model.modules()
        if isinstance(m, ShiraLayer) and (adapter_name is None or adapter_name in m.adapterlab_shira_values)
    ]


@dataclass
class CalibrationReport:
    """What :func:`calibrate_masks_` did.

    Attributes:
        adapter: the calibrated adapter.
        batches: calibration batches used.
        mask_type: grad or snip.
        layers: module key -> K.
    """

    adapter: str
    batches: int
    mask_type: str
    layers: dict[str, int] = field(default_factory=dict)


def _as_batch(batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(
            f"calibration batches must be tensors of input ids or dicts with 'input_ids', got {type(batch).__name__}"
        )
    out = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out.setdefault("labels", out["input_ids"])
    return out


def calibrate_masks_(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    adapter_name: str | None = None,
    max_batches: int | None = None,
    grad_accum: str | None = None,
    sync: bool | None = None,
) -> CalibrationReport:
    """Fix the masks of a grad/snip SHiRA adapter from task-loss gradients (before training).

    ``G = sum_b dL_b/dW`` (``grad_accum="sum"``) or ``sum_b |dL_b/dW|`` (``"abs"``) is accumulated
    in fp32 for every targeted base weight; each weight's gradient is folded into its accumulator
    and dropped as soon as autograd produces it, and each accumulator is freed right after that
    layer's top-K is taken, so at most one extra weight-sized gradient is alive besides the
    accumulators. The model runs with adapters disabled (values are 0 anyway) and is restored.

    Args:
        model: a peft model (or a model with SHiRA layers).
        batches: tensors of input ids or dicts (input_ids, attention_mask, labels); labels
            default to input_ids.
        adapter_name: the adapter (default: the only grad/snip adapter awaiting calibration).
        max_batches: use at most this many (default: the config's ``calibration_batches``).
        grad_accum: override the config's ``grad_accum``.
        sync: reduce over the processes of a distributed run (default: whenever a process group of
            more than one process is initialised; every rank must then call this). Each rank
            calibrates on its own batches and the statistics are averaged over the ranks, so the
            mask is the one a single process would pick from the same global batches: ``sum``
            averages ``G`` once at the end, ``abs`` averages each batch's gradient before its
            ``|.|``; every rank uses as many batches as the rank with the fewest, and the chosen
            indices of rank 0 are used everywhere.

    Raises:
        ValueError: no such adapter, it is not grad/snip, no batches, or a quantized base.
    """
    tuner = next((m for m in model.modules() if isinstance(m, ShiraModel)), None)
    configs = tuner.peft_config if tuner is not None else getattr(model, "peft_config", {})
    data_adapters = [n for n, c in configs.items() if isinstance(c, ShiraConfig) and c.mask_type in DATA_MASK_TYPES]
    if adapter_name is None:
        if len(data_adapters) != 1:
            raise ValueError(f"adapter_name is required: grad/snip SHiRA adapters are {data_adapters or '(none)'}")
        adapter_name = data_adapters[0]
    if adapter_name not in data_adapters:
        raise ValueError(
            f"adapter {adapter_name!r} is not a grad/snip SHiRA adapter; calibratable adapters: {', '.join(data_adapters) or '(none)'}"
        )
    cfg = configs[adapter_name]
    accum = grad_accum or cfg.grad_accum
    if accum not in GRAD_ACCUM:
        raise ValueError(f"grad_accum={accum!r} is not supported; choose one of: {', '.join(GRAD_ACCUM)}")
    limit = max_batches if max_batches is not None else cfg.calibration_batches
    layers = shira_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"no SHiRA layer holds adapter {adapter_name!r}")
    for key, layer in layers:
        if is_4bit(layer.get_base_layer()) or is_8bit(layer.get_base_layer()):
            raise ValueError(
                f"{key}: mask_type={cfg.mask_type!r} needs gradients of the base weight, which a bitsandbytes quantized "
                f"layer has not; use mask_type wm, random or struct on quantized bases"
            )

    weights = [layer.get_base_layer().weight for _, layer in layers]
    acc = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    disabled = [(layer, layer._disable_adapters) for _, layer in layers]
    hooks = []

    sync = distributed.is_distributed() if sync is None else sync

    def make_hook(i: int) -> Any:
        def hook(p: torch.Tensor) -> None:
            g = p.grad.float()
            if sync and accum == "abs":
                distributed.all_reduce_mean_(g)  # |mean over ranks| of this batch's gradient
            acc[i].add_(g.abs() if accum == "abs" else g)
            p.grad = None  # freed immediately: one weight-sized gradient alive at a time

        return hook

    def all_have(have: bool) -> bool:
        """Whether every rank has a batch for this round (one tiny collective per batch under ``sync``)."""
        if not sync:
            return have
        flag = torch.tensor([int(have)])
        distributed.all_reduce_sum_(flag)
        return int(flag) == distributed.world_size()

    n_batches = 0
    exhausted = True
    try:
        for p, _ in saved_flags:
            p.requires_grad_(False)
        for i, w in enumerate(weights):
            w.requires_grad_(True)
            hooks.append(w.register_post_accumulate_grad_hook(make_hook(i)))
        for layer, _ in disabled:
            layer._disable_adapters = True
        model.eval()  # no dropout during calibration
        device = weights[0].device
        for batch in batches:
            if n_batches >= limit or not all_have(True):
                exhausted = False
                break
            out = model(**_as_batch(batch, device))
            out.loss.backward()
            n_batches += 1
        if sync and exhausted and n_batches < limit:
            all_have(False)  # this rank ran out: the others stop at the same round
    finally:
        for h in hooks:
            h.remove()
        weight_ids = {id(w) for w in weights}
        for p, flag in saved_flags:
            p.requires_grad_(flag)
            if id(p) in weight_ids:
                p.grad = None
        for layer, flag in disabled:
            layer._disable_adapters = flag
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("calibration got no batches; expected at least one batch of task data")

    report = CalibrationReport(adapter=adapter_name, batches=n_batches, mask_type=cfg.mask_type)
    chosen: list[torch.Tensor] = []
    for i, (key, layer) in enumerate(layers):
        k = layer.adapterlab_shira_values[adapter_name].numel()
        w = weights[i].detach()
        allowed = (w != 0) if cfg.respect_base_sparsity else None
        if sync and accum == "sum":
            distributed.all_reduce_mean_(acc[i])  # G = sum_b mean_ranks dL_b/dW
        chosen.append(mask_indices(cfg.mask_type, layer.shape, k, weight=w, grad=acc[i], allowed=allowed))
        acc[i] = None  # type: ignore[call-overload]  # freed layer by layer
        report.layers[key] = k
    if sync:
        distributed.broadcast_tensors_(chosen)  # rank 0 decides (ties, non-deterministic kernels)
    for (_, layer), idx in zip(layers, chosen):
        layer.set_indices_(adapter_name, idx)
    logger.info(
        "calibrated %s masks of adapter %r on %d batches (%d layers)",
        cfg.mask_type,
        adapter_name,
        n_batches,
        len(layers),
    )
    return report


class ShiraModel(BaseTuner):
    """peft tuner model for :class:`ShiraConfig` (built by ``peft.get_peft_model``).

    Extra API (a ``PeftModel`` forwards these look-ups): ``calibrate_masks_``, ``masks``,
    ``trainable_count``, ``delta_weights``, ``export_peft``.
    """

    prefix: str = PREFIX
    tuner_layer_cls = ShiraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: nn.Module, config: ShiraConfig, adapter_name: str) -> None:
        check_target_modules(model, config.target_modules)

    def _create_and_replace(
        self,
        peft_config: ShiraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        replace_with(self, ShiraLayer, peft_config, adapter_name, target, target_name, parent, current_key, NAME)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return super()._remap_adapter_state_dict_for_load(
            model, config, adapter_name, from_peft_state_dict(model, state_dict)
        )

    # -- helpers -------------------------------------------------------------------------------
    def _adapter(self, adapter_name: str | None) -> str:
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; choose one of: {', '.join(self.peft_config)}")
        return name

    def calibrate_masks_(self, batches: Iterable[Any], **kwargs: Any) -> CalibrationReport:
        """See :func:`calibrate_masks_`."""
        return calibrate_masks_(self.model, batches, **kwargs)

    def masks(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Module key -> sorted flat int64 indices of the trainable entries."""
        name = self._adapter(adapter_name)
        return {k: layer.adapterlab_shira_indices[name].long().clone() for k, layer in shira_layers(self.model, name)}

    def trainable_count(self, adapter_name: str | None = None) -> int:
        name = self._adapter(adapter_name)
        return sum(layer.adapterlab_shira_values[name].numel() for _, layer in shira_layers(self.model, name))

    def delta_weights(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Module key -> dense fp32 ``alpha * S`` (for inspection; O(m n) per layer)."""
        name = self._adapter(adapter_name)
        return {k: layer.delta_weight(name) for k, layer in shira_layers(self.model, name)}

    def export_peft(self, save_directory: str | os.PathLike[str], adapter_name: str | None = None) -> Path:
        """Write the adapter in peft's own SHiRA format (loadable by ``peft.PeftModel.from_pretrained``).

        peft sizes every layer as ``K = r (m + n)``, so the adapter must have been built with ``r``
        (not ``density``) and every layer must hold exactly that many entries.
        """
        from peft import ShiraConfig as PeftShiraConfig

        from adapterlab.io import save_tensors
        from adapterlab.staging import staged_dir

        name = self._adapter(adapter_name)
        cfg = self.peft_config[name]
        if cfg.r is None:
            raise ValueError(
                f"adapter {name!r} was built with density={cfg.density}; peft's SHiRA format needs r (K = r (m + n))"
            )
        tensors: dict[str, torch.Tensor] = {}
        for key, layer in shira_layers(self.model, name):
            m, n = layer.shape
            vals = layer.adapterlab_shira_values[name].detach()
            if vals.numel() != cfg.r * (m + n):
                raise ValueError(
                    f"{key}: {vals.numel()} entries, but peft's format needs exactly r (m + n) = {cfg.r * (m + n)}"
                )
            tensors[f"base_model.model.{key}.{PEFT_VALUES}"] = (vals * layer.shira_scaling[name]).float().cpu()
            tensors[f"base_model.model.{key}.{PEFT_INDICES}"] = (
                flat_to_rowcol(layer.adapterlab_shira_indices[name], n).to(torch.int32).cpu()
            )
        tm = cfg.target_modules
        pcfg = PeftShiraConfig(
            r=cfg.r,
            mask_type="random",
            random_seed=cfg.random_seed,
            target_modules=sorted(tm) if isinstance(tm, (set, list, tuple)) else tm,
            base_model_name_or_path=cfg.base_model_name_or_path,
        )
        out = Path(save_directory)
        with staged_dir(out, overwrite=True) as stage:
            pcfg.save_pretrained(str(stage))
            save_tensors(
                Path(stage) / "adapter_model.safetensors", tensors, metadata={"format": "pt", "adapterlab_source": NAME}
            )
        return out


# ---------------------------------------------------------------------------------------------
# peft's own SHiRA format


def from_peft_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert peft SHiRA keys (``<m>.shira_weight``, ``<m>.shira_indices`` (2, K)) to adapterlab's.

    Keys already in adapterlab's format pass through. The layer widths come from the model's
    SHiRA layers (peft does not store shapes); a row/col pair outside the layer is an error.
    """
    if not any(k.endswith((f".{PEFT_VALUES}", f".{PEFT_INDICES}")) for k in state_dict):
        return dict(state_dict)
    widths: dict[str, tuple[int, int]] = {}
    for key, layer in shira_layers(model):
        widths[key] = layer.shape
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        head, _, leaf = k.rpartition(".")
        if leaf not in (PEFT_VALUES, PEFT_INDICES):
            out[k] = v
            continue
        key = head.removeprefix("base_model.model.")
        if key not in widths:
            raise ValueError(
                f"cannot load {k!r}: the model has no SHiRA layer {key!r} (expected one of: {', '.join(sorted(widths)) or '(none)'})"
            )
        m, n = widths[key]
        if leaf == PEFT_VALUES:
            out[f"{head}.{VALUES}"] = v.float()
            out[f"{head}.{DIMS}"] = torch.tensor([m, n], dtype=torch.int64)
        else:
            rc = v.round().long() if v.is_floating_point() else v.long()  # peft saves float32 indices on Windows
            if rc.dim() != 2 or rc.shape[0] != 2:
                raise ValueError(f"cannot load {k!r}: expected (2, K) row/col indices, got shape {tuple(rc.shape)}")
            if rc.numel() and (int(rc[0].max()) >= m or int(rc[1].max()) >= n or int(rc.min()) < 0):
                raise ValueError(
                    f"cannot load {k!r}: row/col indices exceed the layer's shape ({m}, {n}); the adapter was "
                    f"trained on a base with other shapes"
                )
            out[f"{head}.{INDICES}"] = rowcol_to_flat(rc, n)
    return out


def is_peft_shira_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds an adapter saved by peft's own SHiRA (``peft_type: "SHIRA"``)."""
    cfg = Path(path) / "adapter_config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("peft_type") == "SHIRA"


def load_shira(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
) -> Any:
    """Load a SHiRA adapter directory saved by adapterlab **or by peft itself** as an adapterlab SHiRA adapter.

    Args:
        model: a base model (a ``PeftModel`` is returned) or a ``PeftModel`` with adapterlab SHiRA
            adapters (the adapter is added under ``adapter_name``, e.g. to switch between them).
        path: the adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        adapter_name: the name to load it under.
        is_trainable: keep the values trainable.

    Returns:
        The ``PeftModel``.
    """
    from peft import PeftModel, set_peft_model_state_dict

    from adapterlab.io import load_tensors

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"{path} is not an adapter directory (no adapter_config.json)")
    if not is_peft_shira_dir(path):
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name, is_trainable=is_trainable)
            return model
        return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=is_trainable)
    raw = json.loads((path / "adapter_config.json").read_text())
    tm = raw.get("target_modules")
    cfg = ShiraConfig(
        r=int(raw.get("r", 32)),
        mask_type="random",
        random_seed=int(raw.get("random_seed") or 0),
        target_modules=sorted(tm) if isinstance(tm, list) else tm,
        inference_mode=not is_trainable,
        base_model_name_or_path=raw.get("base_model_name_or_path"),
    )
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, cfg)
        pm = model
    else:
        from peft import get_peft_model

        pm = get_peft_model(model, cfg, adapter_name=adapter_name)
    sd = load_tensors(path / "adapter_model.safetensors")
    result = set_peft_model_state_dict(pm, sd, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if PREFIX in k and f".{adapter_name}" in k]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} SHiRA tensor(s), e.g. {missing[0]!r}")
    if not is_trainable:
        for _, layer in shira_layers(pm, adapter_name):
            layer.adapterlab_shira_values[adapter_name].requires_grad_(False)
    return pm
