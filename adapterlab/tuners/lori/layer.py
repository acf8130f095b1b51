"""LoRI tuner layer: frozen seeded A (a buffer) and a dense or compact-sparse trained B.

Reference:
    Zhang et al., LoRI, https://arxiv.org/abs/2504.07448.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adapterlab.tuners._lowrank import LowRankLayer, lowrank_scale
from adapterlab.tuners.lori.config import LoriConfig
from adapterlab.tuners.lori.functional import from_compact, layer_seed, random_a, to_compact


class FrozenA(nn.Module):
    """The frozen random projection A ``(r, d_in)``: a buffer, never a parameter.

    ``persistent=False`` (the default, ``store_a=False``) keeps it out of the checkpoint: it is
    regenerated from the adapter's ``a_seed`` and the module name.
    """

    def __init__(self, a: torch.Tensor, persistent: bool) -> None:
        super().__init__()
        self.register_buffer("weight", a, persistent=persistent)


class LoriB(nn.Module):
    """B ``(d_out, r)``: dense (parameter ``weight``) or compact sparse (parameter ``values`` (nnz,)
    + int32 buffer ``indices`` (nnz,) of row-major flat positions: the indices are the mask).

    In the sparse form the masked entries are not parameters at all, so no optimizer (AdamW weight
    decay, momentum left from the dense phase) and no gradient clipping can move or count them.
    A buffer ``dims = (d_out, r, d_in)`` is stored too, so loading onto another base fails clearly.
    """

    def __init__(self, b: torch.Tensor, d_in: int) -> None:
        super().__init__()
        self.shape = tuple(b.shape)  # (d_out, r)
        self.register_buffer("dims", torch.tensor([*self.shape, d_in], dtype=torch.int64))
        self.weight = nn.Parameter(b)

    @property
    def is_sparse(self) -> bool:
        return "values" in self._parameters

    def dense(self) -> torch.Tensor:
        """B as a dense ``(d_out, r)`` tensor (differentiable in the trainable entries)."""
        if self.is_sparse:
            return from_compact(self.values, self.indices, self.shape)  # (d_out, r)
        return self.weight

    def mask(self) -> torch.Tensor:
        """Bool ``(d_out, r)``: True where B is trainable."""
        if not self.is_sparse:
            return torch.ones(self.shape, dtype=torch.bool, device=self.weight.device)
        flat = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.bool, device=self.indices.device)
        flat[self.indices.long()] = True
        return flat.view(self.shape)

    def trainable_numel(self) -> int:
        return self.values.numel() if self.is_sparse else self.weight.numel()

    def _set_sparse(self, values: torch.Tensor, indices: torch.Tensor, requires_grad: bool) -> nn.Parameter:
        if "weight" in self._parameters:
            del self._parameters["weight"]
        if "values" in self._parameters:
            del self._parameters["values"]
        self.values = nn.Parameter(values, requires_grad=requires_grad)
        self.register_buffer("indices", indices.to(torch.int32))
        return self.values

    def to_sparse_(self, mask: torch.Tensor, keep_values: bool = True) -> tuple[nn.Parameter, nn.Parameter]:
        """Keep only the entries where ``mask`` is True as parameters (from dense or sparse).

        Args:
            mask: bool ``(d_out, r)``.
            keep_values: start from the current B's values (else from 0, as a fresh LoRI-S run).

        Returns:
            ``(old parameter, new parameter)``, so callers can swap it in an optimizer.
        """
        if tuple(mask.shape) != self.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match B's shape {self.shape}")
        old = self.values if self.is_sparse else self.weight
        values, indices = to_compact(self.dense().detach(), mask.to(old.device))  # (nnz,), (nnz,)
        if not keep_values:
            values = torch.zeros_like(values)
        return old, self._set_sparse(values, indices, old.requires_grad)

    def to_dense_(self) -> tuple[nn.Parameter, nn.Parameter]:
        old = self.values
        dense = self.dense().detach().clone()
        del self._parameters["values"]
        del self._buffers["indices"]
        self.weight = nn.Parameter(dense, requires_grad=old.requires_grad)
        return old, self.weight

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        """Adopt the checkpoint's form (dense or sparse, any nnz) before the tensors are copied."""
        vkey, ikey = prefix + "values", prefix + "indices"
        if vkey in state_dict and ikey in state_dict:
            values, indices = state_dict[vkey], state_dict[ikey]
            numel = self.shape[0] * self.shape[1]
            if values.shape != indices.shape or values.dim() != 1:
                raise ValueError(
                    f"{vkey} and {ikey} must be 1-D of equal length, got {tuple(values.shape)} and {tuple(indices.shape)}"
                )
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
                raise ValueError(
                    f"cannot load {ikey}: flat indices must be in [0, {numel}) for B of shape {self.shape}, "
                    f"got range [{int(indices.min())}, {int(indices.max())}]; the adapter was trained on a base with other shapes"
                )
            old = self.values if self.is_sparse else self.weight
            self._set_sparse(
                torch.empty(values.shape, dtype=old.dtype, device=old.device),
                torch.empty(indices.shape, dtype=torch.int32, device=old.device),
                old.requires_grad,
            )
        elif prefix + "weight" in state_dict and self.is_sparse:
            self.to_dense_()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class LoriLayer(LowRankLayer):
    """One target linear layer with LoRI adapters.

    Semantics:
        y = base(x) + (alpha / r) * dropout(x) A^T (B ⊙ M)^T      # A frozen, M = mask (all-ones in LoRI-D)
    """

    adapter_layer_names = ("lori_A", "lori_B")
    other_param_names = ("r", "lora_alpha", "use_rslora", "exact_unmerge", "lori_dropout")
    dropout_name = "lori_dropout"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoriConfig, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.lori_A = nn.ModuleDict({})
        self.lori_B = nn.ModuleDict({})
        self.lori_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def update_layer(self, adapter_name: str, config: LoriConfig, **kwargs: Any) -> None:
        r = config.r
        a = random_a(r, self.in_features, layer_seed(config.a_seed, self.key))  # (r, d_in)
        b = torch.zeros(self.out_features, r)  # (d_out, r)
        if not config.init_weights:
            b = torch.randn(self.out_features, r, generator=torch.Generator().manual_seed(config.a_seed % 2**31)) * 0.02
        self.lori_A[adapter_name] = FrozenA(a, persistent=config.store_a)
        self.lori_B[adapter_name] = LoriB(b, self.in_features)
        self._add_dropout(adapter_name, config.lora_dropout)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = float(config.lora_alpha)
        self.use_rslora[adapter_name] = config.use_rslora
        self.exact_unmerge[adapter_name] = config.exact_unmerge
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """peft's move, except that the frozen A keeps the dtype it was drawn in (fp32).

        peft casts every adapter tensor to the base dtype and then upcasts only *parameters* back
        to fp32; A is a buffer, so on a bf16/fp16 base it would stay rounded (and no longer equal
        the A regenerated from ``a_seed``). Forward and merge compute in the promoted dtype.
        """
        frozen = self.lori_A[adapter_name].weight if adapter_name in self.lori_A else None
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        if frozen is not None:
            self.lori_A[adapter_name].weight = frozen.to(self.lori_A[adapter_name].weight.device)

    def factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        a = self.lori_A[adapter].weight  # (r, d_in)
        b = self.lori_B[adapter].dense()  # (d_out, r)
        return a, b, lowrank_scale(self.lora_alpha[adapter], self.r[adapter], self.use_rslora[adapter])
