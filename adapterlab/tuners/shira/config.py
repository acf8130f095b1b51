"""``ShiraConfig``: Sparse High Rank Adapters with every mask strategy of the paper.

Reference:
    Bhardwaj et al., Sparse High Rank Adapters (SHiRA), NeurIPS 2024, https://arxiv.org/abs/2406.13175.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from adapterlab.peft_compat import peft_type
from adapterlab.tuners._lowrank import check_int
from adapterlab.tuners.shira.functional import MASK_TYPES

NAME = "adapterlab_shira"
PREFIX = "adapterlab_shira_"
GRAD_ACCUM = ("sum", "abs")


@dataclass
class ShiraConfig(PeftConfig):
    """A peft config for SHiRA (usable with ``get_peft_model``, ``PeftModel.from_pretrained``).

    Only the ``K`` masked entries of each target weight are trainable (one fp32 parameter of
    length K per layer, initialised to 0); the mask is fixed before training and stored as one
    flat index per entry next to the values.

    Attributes:
        mask_type: ``random`` (seeded uniform), ``struct`` (diagonal + strided rows), ``wm``
            (largest ``|W|``), ``grad`` (largest ``|G|``) or ``snip`` (largest ``|W * G|``);
            ``grad``/``snip`` need a calibration pass (``model.calibrate_masks_(batches)`` or
            ``adapterlab.callbacks.ShiraMaskCallback``) before training.
        density: ``K = density * m * n`` per layer, in (0, 1]. Exactly one of density / r.
        r: LoRA-equivalent budget, ``K = r * (m + n)`` (the parameter count of a rank-r LoRA).
        target_modules / exclude_modules: as in peft (linear layers only).
        random_seed: seed of the ``random`` mask (per layer mixed with the module name); saved.
        respect_base_sparsity: only choose positions where the base weight is non-zero, so a
            pruned base stays exactly as sparse after fusing.
        grad_accum: ``sum`` (``|sum_b G_b|``, default) or ``abs`` (``sum_b |G_b|``) over the
            calibration batches.
        calibration_batches: default number of calibration batches (the callback's default).
        init_weights: values start at 0 (output equals the base); False draws N(0, 0.02) (tests).
    """

    mask_type: str = field(default="random", metadata={"help": "random, struct, wm, grad or snip"})
    density: float | None = field(default=None, metadata={"help": "fraction of entries trained, in (0, 1]"})
    r: int | None = field(default=None, metadata={"help": "LoRA-equivalent budget: K = r (m + n)"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to adapt"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to skip"})
    random_seed: int = field(default=0, metadata={"help": "seed of the random mask"})
    respect_base_sparsity: bool = field(default=False, metadata={"help": "choose only non-zero base entries"})
    grad_accum: str = field(default="sum", metadata={"help": "sum or abs (calibration gradient accumulation)"})
    calibration_batches: int = field(default=64, metadata={"help": "calibration batches for grad/snip"})
    init_weights: bool = field(default=True, metadata={"help": "values = 0 at init"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type(NAME)
        if self.mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type={self.mask_type!r} is not supported; choose one of: {', '.join(MASK_TYPES)}")
        if (self.density is None) == (self.r is None):
            raise ValueError(
                f"give exactly one of density (fraction of entries, e.g. 0.01) or r (LoRA-equivalent budget, "
                f"e.g. 32); got density={self.density!r}, r={self.r!r}"
            )
        if self.density is not None:
            d = self.density
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < float(d) <= 1.0:
                raise ValueError(f"density must be in (0, 1], got {d!r}")
            self.density = float(d)
        else:
            check_int("r", self.r)
        check_int("random_seed", self.random_seed, minimum=0)
        check_int("calibration_batches", self.calibration_batches)
        if self.grad_accum not in GRAD_ACCUM:
            raise ValueError(f"grad_accum={self.grad_accum!r} is not supported; choose one of: {', '.join(GRAD_ACCUM)}")
        for name in ("respect_base_sparsity", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        tm = self.target_modules
        if tm is not None and not isinstance(tm, (str, list, set, tuple)):
            raise ValueError(f"target_modules must be a list of module names, a regex string or None, got {tm!r}")
        if isinstance(tm, (list, tuple)):
            self.target_modules = set(tm)
