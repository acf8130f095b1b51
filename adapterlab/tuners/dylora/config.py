"""``DyLoraConfig``: one LoRA module of rank ``r`` (= r_max) trained so every prefix rank works.

Reference:
    Valipour et al., DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic
    Search-Free Low-Rank Adaptation, EACL 2023, https://arxiv.org/abs/2210.07558.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from adapterlab.peft_compat import peft_type
from adapterlab.tuners._lowrank import check_common, check_int

NAME = "adapterlab_dylora"
PREFIX = "dylora_"
RANK_DISTRIBUTIONS = ("uniform",)


@dataclass
class DyLoraConfig(PeftConfig):
    """A peft config for DyLoRA (usable with ``get_peft_model``, ``PeftModel.from_pretrained``).

    Attributes:
        r: the maximum rank ``r_max`` (A is ``r x d_in``, B is ``d_out x r``).
        r_min: the smallest rank sampled in training (1 in the paper).
        lora_alpha: ``alpha``; the scale at rank ``b`` is ``alpha / b`` (``alpha / sqrt(b)`` with rsLoRA).
        lora_dropout: dropout on the adapter input.
        use_rslora: rank-stabilised scaling (peft's ``LoraConfig`` has the same flag).
        target_modules: module names (suffixes), a regex, or None for peft's LoRA defaults.
        exclude_modules: modules to leave alone.
        frozen_mode: the paper's frozen-prefix mode: at sampled rank b only component b is trained;
            the others get no gradient at all, so AdamW skips them (no weight decay, no momentum).
            False trains all b leading components.
        rank_distribution: how b is drawn (``"uniform"`` over ``{r_min..r}``).
        seed: seeds the per-step rank generator (with the optimizer step).
        eval_rank: the rank used outside training and by merge/save; None means ``r``.
            ``set_rank(b)`` updates it, so a saved adapter remembers its deployment rank.
        init_weights: B = 0 at init (output equals the base); False draws B ~ N(0, 0.02) (tests).
        exact_unmerge: merge keeps each merged layer's pre-merge weight (one copy per layer while
            merged) so unmerge restores it bit-exactly; False saves that memory, unmerges by
            subtraction (drifts in bf16/fp16) and warns at merge.
    """

    r: int = field(default=8, metadata={"help": "maximum rank r_max"})
    r_min: int = field(default=1, metadata={"help": "smallest sampled rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "alpha; scale alpha/b at rank b"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    use_rslora: bool = field(default=False, metadata={"help": "scale alpha/sqrt(b) instead of alpha/b"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to adapt"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to skip"})
    frozen_mode: bool = field(default=True, metadata={"help": "train only the b-th component at rank b"})
    rank_distribution: str = field(default="uniform", metadata={"help": "rank sampling distribution"})
    seed: int = field(default=0, metadata={"help": "seed of the per-step rank generator"})
    eval_rank: int | None = field(default=None, metadata={"help": "inference/merge/save rank; None = r"})
    init_weights: bool = field(default=True, metadata={"help": "B = 0 at init"})
    exact_unmerge: bool = field(default=True, metadata={"help": "keep the pre-merge weight so unmerge is bit-exact"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type(NAME)
        check_int("r", self.r)
        check_int("r_min", self.r_min)
        if self.r_min > self.r:
            raise ValueError(
                f"rank range is empty: r_min={self.r_min} > r={self.r}; expected 1 <= r_min <= r (r is r_max)"
            )
        check_common(self)
        if self.rank_distribution not in RANK_DISTRIBUTIONS:
            raise ValueError(
                f"rank_distribution={self.rank_distribution!r} is not supported; choose one of: "
                f"{', '.join(RANK_DISTRIBUTIONS)}"
            )
        check_int("seed", self.seed, minimum=0)
        if self.eval_rank is not None:
            check_int("eval_rank", self.eval_rank)
            if not self.r_min <= self.eval_rank <= self.r:
                raise ValueError(f"eval_rank={self.eval_rank} must be in [r_min, r] = [{self.r_min}, {self.r}]")

    @property
    def r_max(self) -> int:
        return self.r

    @property
    def active_eval_rank(self) -> int:
        return self.r if self.eval_rank is None else int(self.eval_rank)
