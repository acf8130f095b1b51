"""``SppConfig``: sparsity-preserved PEFT (learnable row and column factors rescaling a sparse weight).

Reference:
    Lu et al., SPP: Sparsity-Preserved Parameter-Efficient Fine-Tuning for Large Language Models,
    ICML 2024, https://arxiv.org/abs/2405.16057.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from adapterlab.peft_compat import peft_type
from adapterlab.tuners._lowrank import check_common, check_int
from adapterlab.tuners.spp.functional import FORWARD_MODES

NAME = "adapterlab_spp"
PREFIX = "spp_"


@dataclass
class SppConfig(PeftConfig):
    """A peft config for SPP (usable with ``get_peft_model``, ``PeftModel.from_pretrained``).

    Per target linear ``W (d_out, d_in)`` (already pruned): ``alpha (groups, d_in)`` (kaiming-uniform)
    and ``beta (d_out, 1)`` (zeros, so the output equals the base at init), and
    ``y = x W^T + s * dropout(x) ((beta ⊙ R) ⊙ W)^T`` with ``R`` = the rows of ``alpha`` repeated
    ``d_out / groups`` times. The merged weight ``W * (1 + s * beta alpha)`` keeps every zero of ``W``.

    Attributes:
        r: only sets the scale ``s = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``); the shape
            is fixed by ``groups`` (reference: r = 8, alpha = 16 -> s = 2).
        lora_alpha: see ``r``.
        lora_dropout: dropout on the adapter input (reference 0.05).
        use_rslora: scale ``lora_alpha / sqrt(r)``.
        groups: ``g``, rows of ``alpha``; must divide every target's ``d_out`` (reference 16).
        target_modules / exclude_modules: as in peft (None: peft's LoRA defaults).
        forward_mode: ``auto`` | ``materialized`` (form ``Delta W``) | ``grouped`` (g batched matmuls,
            the reference's memory-saving form); same math.
        init_weights: ``beta = 0`` at init; False draws ``beta ~ N(0, 0.02)`` (tests).
    """

    r: int = field(default=8, metadata={"help": "sets the scale lora_alpha / r only"})
    lora_alpha: float = field(default=16.0, metadata={"help": "scale numerator"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter input"})
    use_rslora: bool = field(default=False, metadata={"help": "scale alpha/sqrt(r) instead of alpha/r"})
    groups: int = field(default=16, metadata={"help": "rows of alpha; must divide d_out"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to adapt"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to skip"})
    forward_mode: str = field(default="auto", metadata={"help": "auto, materialized or grouped"})
    init_weights: bool = field(default=True, metadata={"help": "beta = 0 at init"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type(NAME)
        check_int("r", self.r)
        check_int("groups", self.groups)
        check_common(self)
        if self.forward_mode not in FORWARD_MODES:
            raise ValueError(
                f"forward_mode={self.forward_mode!r} is not supported; choose one of: {', '.join(FORWARD_MODES)}"
            )
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
