"""``LorsConfig``: sparsity-preserving LoRA whose delta is masked by the pruned base's zeros.

Reference:
    Hu et al., LoRS: Efficient Low-Rank Adaptation for Sparse Large Language Model,
    https://arxiv.org/abs/2501.08582.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from adapterlab.peft_compat import peft_type
from adapterlab.tuners._lowrank import check_common, check_int
from adapterlab.tuners.lors.functional import GRAD_MODES

NAME = "adapterlab_lors"
PREFIX = "lors_"


@dataclass
class LorsConfig(PeftConfig):
    """A peft config for LoRS (usable with ``get_peft_model``, ``PeftModel.from_pretrained``).

    Per target linear ``W (d_out, d_in)`` (already pruned; ``M = 1[W != 0]``): ``A (r, d_in)``,
    ``B (d_out, r)`` (zeros: the output equals the base at init) and the effective weight
    ``W' = W + s (B A) ⊙ M``, recomputed in the backward instead of stored. After merging, every
    zero of ``W`` is still zero. Call ``peft_model.lors_init_(input_ids)`` for the paper's
    gradient-based initialisation of ``A`` (otherwise ``A`` is kaiming-uniform as in LoRA).

    Attributes:
        r: rank.
        lora_alpha: scale numerator: ``s = lora_alpha / sqrt(r)`` (LoRS's rsLoRA-style scale, the
            default ``use_rslora=True``) or ``lora_alpha / r`` with ``use_rslora=False``.
        lora_dropout: dropout on the adapter input (0 keeps the single fused matmul).
        use_rslora: see ``lora_alpha``.
        lors_grad: ``exact`` (default; the true gradient of the masked objective, one transient
            dense buffer per layer in backward) or ``low_rank_ste`` (the reference's cheaper
            straight-through gradient of the unmasked LoRA).
        lors_samples: training samples used by ``lors_init_`` (reference 128).
        stable_gamma: ``A = V^T[:r] / stable_gamma`` in ``lors_init_`` (reference 1.0).
        target_modules / exclude_modules: as in peft (None: peft's LoRA defaults).
        init_weights: ``B = 0`` at init; False draws ``B ~ N(0, 0.02)`` (tests).
        exact_unmerge: merge keeps each merged layer's pre-merge weight (one copy per layer while
            merged) so unmerge restores it bit-exactly; False saves that memory, unmerges by
            subtraction (drifts in bf16/fp16) and warns at merge.
    """

    r: int = field(default=16, metadata={"help": "rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "alpha; scale alpha/sqrt(r) (rsLoRA) or alpha/r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    use_rslora: bool = field(default=True, metadata={"help": "scale alpha/sqrt(r) (LoRS default) instead of alpha/r"})
    lors_grad: str = field(default="exact", metadata={"help": "exact or low_rank_ste"})
    lors_samples: int = field(default=128, metadata={"help": "samples for the gradient-based init"})
    stable_gamma: float = field(default=1.0, metadata={"help": "A = V^T[:r] / stable_gamma"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to adapt"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to skip"})
    init_weights: bool = field(default=True, metadata={"help": "B = 0 at init"})
    exact_unmerge: bool = field(default=True, metadata={"help": "keep the pre-merge weight so unmerge is bit-exact"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type(NAME)
        check_int("r", self.r)
        check_common(self)
        if self.lors_grad not in GRAD_MODES:
            raise ValueError(f"lors_grad={self.lors_grad!r} is not supported; choose one of: {', '.join(GRAD_MODES)}")
        check_int("lors_samples", self.lors_samples)
        g = self.stable_gamma
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0:
            raise ValueError(f"stable_gamma must be a positive number, got {g!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
