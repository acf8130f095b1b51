"""``LorsModel``: the peft tuner for LoRS (gradient-based init, sparsity check).

Reference:
    Hu et al., LoRS, https://arxiv.org/abs/2501.08582.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapterlab import distributed
from adapterlab.tuners._lowrank import AdapterlabTuner, check_int, tuner_layers
from adapterlab.tuners.lors.config import NAME, PREFIX
from adapterlab.tuners.lors.functional import gradient_init_a
from adapterlab.tuners.lors.layer import LorsLayer
from adapterlab.tuners.spp.functional import check_patterns, zeros_preserved

logger = logging.getLogger(__name__)


@dataclass
class LorsInitReport:
    """What :meth:`LorsModel.lors_init_` did.

    Attributes:
        samples: training sequences the mean gradient was estimated on.
        batches: forward/backward passes.
        layers: LoRS layers initialised.
        grad_norms: module key -> Frobenius norm of the mean gradient ``G``.
    """

    samples: int
    batches: int
    layers: int
    grad_norms: dict[str, float] = field(default_factory=dict)


def _init_batches(data: Any, n_samples: int, batch_size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Causal-LM batches (``input_ids`` + ``labels``) covering the first ``n_samples`` sequences."""
    out: list[dict[str, torch.Tensor]] = []
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"lors_init_ data must be a (n_samples, seqlen) integer tensor of input ids or an iterable "
                f"of batches (dicts with input_ids [, labels, attention_mask]); got a {data.dtype} tensor "
                f"of shape {tuple(data.shape)}"
            )
        ids = data[:n_samples].long().to(device)
        for start in range(0, ids.shape[0], batch_size):
            chunk = ids[start : start + batch_size]  # (<= batch_size, seqlen)
            out.append({"input_ids": chunk, "labels": chunk})
        return out
    if not isinstance(data, Iterable):
        raise ValueError(
            f"lors_init_ data must be an input-id tensor or an iterable of batches, got {type(data).__name__}"
        )
    seen = 0
    for batch in data:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError(
                f"lors_init_ batches must be dicts with an 'input_ids' tensor (and optionally 'labels', "
                f"'attention_mask'); got {type(batch).__name__}"
            )
        item = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        item.setdefault("labels", item["input_ids"])
        out.append(item)
        seen += int(item["input_ids"].shape[0])
        if seen >= n_samples:
            break
    return out


class LorsModel(AdapterlabTuner):
    """peft tuner model for :class:`LorsConfig`.

    Besides peft's API (merge, unmerge, disable_adapter, merge_and_unload, save/load) it offers
    ``lors_init_`` (the gradient-based initialisation), ``delta_weights`` and ``check_sparsity``;
    a ``PeftModel`` forwards these look-ups to it. Loading an adapter onto a base whose nonzero
    pattern differs from the one it was trained on raises ``ValueError``.
    """

    prefix: str = PREFIX
    tuner_layer_cls = LorsLayer
    tuner_name = NAME

    @classmethod
    def check_loaded(cls, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
        super().check_loaded(model, state_dict)
        check_patterns(model.state_dict(), state_dict, ".lors_pattern.")

    def _adapter(self, adapter_name: str | None) -> str:
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; choose one of: {', '.join(self.peft_config)}")
        return name

    def _layers(self, name: str) -> list[tuple[str, LorsLayer]]:
        return [(k, layer) for k, layer in tuner_layers(self.model, LorsLayer) if name in layer.lors_A]

    def delta_weights(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Module key -> masked ``s (B A) ⊙ M`` (fp32, ``(d_out, d_in)``)."""
        name = self._adapter(adapter_name)
        return {k: layer.delta_weight(name) for k, layer in self._layers(name)}

    def check_sparsity(self, adapter_name: str | None = None) -> bool:
        """True when merging ``adapter_name`` keeps every zero of every adapted base weight zero."""
        name = self._adapter(adapter_name)
        for _, layer in self._layers(name):
            w = layer.get_base_layer().weight.detach()
            if not zeros_preserved(w, (w.to(torch.float32) + layer.delta_weight(name)).to(w.dtype)):
                return False
        return True

    # -- gradient-based initialisation ----------------------------------------------------------
    def lors_init_(
        self,
        data: torch.Tensor | Iterable[Mapping[str, torch.Tensor]],
        *,
        batch_size: int = 2,
        n_samples: int | None = None,
        adapter_name: str | None = None,
        sync: bool | None = None,
    ) -> LorsInitReport:
        """LoRS's gradient-based initialisation, in place: ``A = V^T[:r] / stable_gamma``, ``B = 0``.

        Runs forward/backward on ``n_samples`` sequences (default: the config's ``lors_samples``)
        with every adapted base weight requiring grad, averages ``G = dL/dW`` over the batches,
        and sets ``A`` of each layer to the top-``r`` right singular vectors of its ``G``
        (randomised SVD, ``q = min(4 r, d_out, d_in)``, 4 power iterations). Dropout is off
        during the pass (eval mode). The model's output is unchanged (``B = 0``).

        Memory: one dense gradient per adapted layer while the pass runs (the size of those
        weights), freed afterwards.

        Args:
            data: ``(n, seqlen)`` input ids (labels = input ids), or an iterable of batches (dicts
                with ``input_ids`` and optionally ``labels`` / ``attention_mask``).
            batch_size: sequences per pass when ``data`` is a tensor.
            n_samples: sequences to use (default ``lors_samples``).
            adapter_name: the adapter to initialise (default: the active one).
            sync: average over the processes of a distributed run (default: whenever a process
                group of more than one process is initialised; every rank must then call this).
                Each rank passes its own data (its shard, or all of it); ``G`` is the mean over
                every rank's batches (the sum of the gradients and of the batch counts are
                reduced), so with equal shards it is the single-process ``G`` of the union, and
                rank 0's ``A`` is used everywhere.

        Returns:
            A :class:`LorsInitReport`.
        """
        name = self._adapter(adapter_name)
        cfg = self.peft_config[name]
        check_int("batch_size", batch_size)
        n = cfg.lors_samples if n_samples is None else n_samples
        check_int("n_samples", n)
        layers = self._layers(name)
        if not layers:
            raise ValueError(f"adapter {name!r} has no LoRS layers to initialise")
        if any(layer.merged for _, layer in layers):
            raise RuntimeError("lors_init_ needs the adapter unmerged; call unmerge_adapter() first")
        device = layers[0][1].get_base_layer().weight.device
        batches = _init_batches(data, n, batch_size, device)
        if not batches:
            raise ValueError("lors_init_ got no data; expected at least one sequence")
        flags = {p: p.requires_grad for p in self.model.parameters()}
        weights = [layer.get_base_layer().weight for _, layer in layers]
        was_training = self.model.training
        samples = 0
        try:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for w in weights:
                w.grad = None
                w.requires_grad_(True)
            self.model.eval()
            for batch in batches:
                loss = self.model(**batch).loss
                if loss is None:
                    raise ValueError("lors_init_: the model returned no loss; pass labels (or input ids as a tensor)")
                loss.backward()
                samples += int(batch["input_ids"].shape[0])
            sync = distributed.is_distributed() if sync is None else sync
            n_batches = len(batches)
            if sync:
                counts = torch.tensor([n_batches, samples], dtype=torch.int64)
                distributed.all_reduce_sum_(counts)
                n_batches, samples = int(counts[0]), int(counts[1])
            report = LorsInitReport(samples=samples, batches=n_batches, layers=len(layers))
            with torch.no_grad():
                for (key, layer), w in zip(layers, weights):
                    grad = w.grad.float()  # (d_out, d_in), sum over this rank's batches
                    if sync:
                        distributed.all_reduce_sum_(grad)  # sum over every rank's batches
                    grad = grad / n_batches  # mean over batches
                    report.grad_norms[key] = float(grad.norm())
                    a = gradient_init_a(
                        grad, layer.r[name], gamma=float(cfg.stable_gamma), seed=zlib.crc32(key.encode())
                    )
                    if sync:
                        distributed.broadcast_tensor_(a)  # rank 0 decides (SVD kernels may differ)
                    layer.lors_A[name].copy_(a.to(layer.lors_A[name].dtype))  # (r, d_in)
                    layer.lors_B[name].zero_()
                    w.grad = None
        finally:
            for w in weights:
                w.grad = None
            for p, flag in flags.items():
                p.requires_grad_(flag)
            self.model.train(was_training)
        logger.info("LoRS init: %d layers from the mean gradient of %d sequences", report.layers, report.samples)
        return report
