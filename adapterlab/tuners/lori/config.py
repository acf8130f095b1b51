"""``LoriConfig``: LoRA with a frozen, per-task seeded random A and a (sparse) trained B.

Reference:
    Zhang et al., LoRI: Reducing Cross-Task Interference in Multi-Task Low-Rank Adaptation,
    COLM 2025, https://arxiv.org/abs/2504.07448.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from adapterlab.peft_compat import peft_type
from adapterlab.tuners._lowrank import check_common, check_int
from adapterlab.tuners.lori.functional import derive_a_seed

NAME = "adapterlab_lori"
PREFIX = "lori_"
VARIANTS = ("D", "S")
MASK_SCOPES = ("global", "matrix")
A_INITS = ("kaiming_uniform",)


@dataclass
class LoriConfig(PeftConfig):
    """A peft config for LoRI (usable with ``get_peft_model``, ``PeftModel.from_pretrained``).

    Attributes:
        r: rank; ``lora_alpha``: scale ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        variant: ``"D"`` (dense B) or ``"S"`` (sparse B: only the kept entries are parameters).
            A fresh model always starts dense; ``sparsify_`` / ``LoriCallback`` / loading a LoRI-S
            checkpoint switch layers to sparse and set ``variant="S"``.
        sparsity: fraction of B entries masked by ``sparsify_`` (default 0.9), in [0, 1).
        mask_scope: ``"global"`` (one magnitude threshold over all B of the model, the paper's
            default) or ``"matrix"``.
        task: task name; with ``seed`` it derives ``a_seed`` when that is None.
        a_seed: seed of the frozen random A (per layer: a digest of ``a_seed`` and the module
            name). Saved in the config; two adapters of one model must not share it.
        seed: global seed mixed into the derived ``a_seed``.
        store_a: also store A in the safetensors file (A is regenerated from ``a_seed`` otherwise).
        allow_shared_a: permit another adapter in the same model with the same ``a_seed``.
        a_init: how A is drawn (``"kaiming_uniform"``: U(-1/sqrt(d_in), 1/sqrt(d_in))).
        init_weights: B = 0 at init (output equals the base); False draws B ~ N(0, 0.02) (tests).
        exact_unmerge: merge keeps each merged layer's pre-merge weight (one copy per layer while
            merged) so unmerge restores it bit-exactly; False saves that memory, unmerges by
            subtraction (drifts in bf16/fp16) and warns at merge.
    """

    r: int = field(default=32, metadata={"help": "rank"})
    lora_alpha: float = field(default=64.0, metadata={"help": "alpha; scale alpha/r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    use_rslora: bool = field(default=False, metadata={"help": "scale alpha/sqrt(r) instead of alpha/r"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to adapt"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to skip"})
    variant: str = field(default="D", metadata={"help": "D (dense B) or S (sparse B)"})
    sparsity: float = field(default=0.9, metadata={"help": "fraction of B masked in LoRI-S"})
    mask_scope: str = field(default="global", metadata={"help": "global or matrix"})
    task: str | None = field(default=None, metadata={"help": "task name (derives a_seed)"})
    a_seed: int | None = field(default=None, metadata={"help": "seed of the frozen random A"})
    seed: int = field(default=0, metadata={"help": "global seed mixed into the derived a_seed"})
    store_a: bool = field(default=False, metadata={"help": "store A in the checkpoint too"})
    allow_shared_a: bool = field(default=False, metadata={"help": "allow two adapters with one a_seed"})
    a_init: str = field(default="kaiming_uniform", metadata={"help": "distribution of A"})
    init_weights: bool = field(default=True, metadata={"help": "B = 0 at init"})
    exact_unmerge: bool = field(default=True, metadata={"help": "keep the pre-merge weight so unmerge is bit-exact"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type(NAME)
        check_int("r", self.r)
        check_common(self)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} is not supported; choose one of: {', '.join(VARIANTS)}")
        if (
            isinstance(self.sparsity, bool)
            or not isinstance(self.sparsity, (int, float))
            or not 0.0 <= self.sparsity < 1.0
        ):
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.mask_scope not in MASK_SCOPES:
            raise ValueError(
                f"mask_scope={self.mask_scope!r} is not supported; choose one of: {', '.join(MASK_SCOPES)}"
            )
        if self.a_init not in A_INITS:
            raise ValueError(f"a_init={self.a_init!r} is not supported; choose one of: {', '.join(A_INITS)}")
        check_int("seed", self.seed, minimum=0)
        if self.a_seed is None:
            self.a_seed = derive_a_seed(self.task, self.seed)
        check_int("a_seed", self.a_seed, minimum=0)
