"""``SnellConfig``: kernelized low-rank delta with per-forward competition-based sparsification.

Reference:
    Shen et al., Expanding Sparse Tuning for Low Memory Usage (SNELL), NeurIPS 2024,
    https://arxiv.org/abs/2411.01800; SNELLA (bi-level competition and the softmax kernel term),
    https://arxiv.org/abs/2510.24037.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peft.config import PeftConfig

from adapterlab.peft_compat import peft_type
from adapterlab.tuners._lowrank import check_int

NAME = "adapterlab_snell"
PREFIX = "snell_"
KERNELS = ("snell", "snella")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


@dataclass
class SnellConfig(PeftConfig):
    """A peft config for SNELL (usable with ``get_peft_model``, ``PeftModel.from_pretrained``).

    Per target linear layer (``d_in = n``, ``d_out = m``) the adapter holds ``P (heads, n, r/heads)``
    and ``Q (heads, m, r/heads)``; the generated delta is the ``n x m`` matrix
    ``K = sum_h c_h cdist(P_h, Q_h, p)`` with ``c_h = coeff * (-1)^h`` (``kernel="snella"`` adds
    ``alpha * softmax(K / gamma, -1) + beta`` with three learnable scalars). In every forward only
    the ``keep = N - floor(sparsity * N)`` entries of largest ``|K|`` survive (``N = n * m``); no
    index is stored. The delta is NOT zero at init (random P, Q) unless ``zero_init_offset=True``.

    Attributes:
        r: total latent dimensions, split evenly over ``heads`` (must be divisible by it).
        heads: number of distance kernels ``H`` (2 in the reference).
        coeff: magnitude ``c`` of the fixed mixing coefficients ``(+c, -c, +c, ...)``.
        norm_p: the ``p`` of the distance ``||P_h[j] - Q_h[i]||_p`` (``> 0``; 2 in the reference).
        kernel: ``"snell"`` (distance kernel) or ``"snella"`` (+ learnable softmax term).
        sparsity: initial fraction ``s`` of each layer's delta that is zeroed, in ``[0, 1)``;
            0 disables sparsification. ``SnellCallback`` can re-allocate it per layer.
        snell_reference_square: the released code's sparsifier (kept entries become
            ``K_ij * |K_ij|`` detached) instead of the paper's plain ``K_ij`` (default False).
        zero_init_offset: subtract the kernel of the initial ``(P0, Q0)`` (stored as buffers), so
            the output equals the base at init. Then every ``|K - K0|`` is 0 at step 0, so ties of
            the competition are broken by the largest ``|K0|`` (the entries the reference, which has no
            offset, keeps at step 0), then by flat position: the first selection follows the seeded
            init, not the position, and is the same in every process for the same seed / saved adapter.
        lora_alpha: optional extra scale ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``);
            None = no extra scale (the reference).
        use_rslora: rank-stabilised scale; needs ``lora_alpha``.
        lora_dropout: dropout on the adapter input (the reference uses 0.1).
        drop_path: per-sample drop probability of the whole adapter branch (the reference uses 0.1).
        checkpoint_kernel: recompute the ``n x m`` kernel in backward instead of keeping it
            (activation checkpointing of the branch; the reference does this).
        target_modules: module names (suffixes), a regex, or None for peft's LoRA defaults.
        exclude_modules: modules to leave alone.
    """

    r: int = field(default=8, metadata={"help": "total latent dims (split over heads)"})
    heads: int = field(default=2, metadata={"help": "number of distance kernels"})
    coeff: float = field(default=0.1, metadata={"help": "mixing coefficient magnitude"})
    norm_p: float = field(default=2.0, metadata={"help": "p of the distance"})
    kernel: str = field(default="snell", metadata={"help": "snell or snella"})
    sparsity: float = field(default=0.3, metadata={"help": "fraction of the delta zeroed per layer"})
    snell_reference_square: bool = field(default=False, metadata={"help": "reference code's squared sparsifier"})
    zero_init_offset: bool = field(default=False, metadata={"help": "output == base at init"})
    lora_alpha: float | None = field(default=None, metadata={"help": "optional scale alpha/r"})
    use_rslora: bool = field(default=False, metadata={"help": "scale alpha/sqrt(r) instead of alpha/r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    drop_path: float = field(default=0.0, metadata={"help": "per-sample drop of the adapter branch"})
    checkpoint_kernel: bool = field(default=True, metadata={"help": "recompute the kernel in backward"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to adapt"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to skip"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type(NAME)
        check_int("r", self.r)
        check_int("heads", self.heads)
        if self.r % self.heads:
            raise ValueError(f"r={self.r} must be divisible by heads={self.heads} (each head gets r/heads dims)")
        if not _is_number(self.coeff) or self.coeff == 0:
            raise ValueError(f"coeff must be a non-zero number, got {self.coeff!r}")
        if not _is_number(self.norm_p) or self.norm_p <= 0:
            raise ValueError(f"norm_p must be a positive number, got {self.norm_p!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel={self.kernel!r} is not supported; choose one of: {', '.join(KERNELS)}")
        if not _is_number(self.sparsity) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        for key in ("snell_reference_square", "zero_init_offset", "use_rslora", "checkpoint_kernel"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be True or False, got {getattr(self, key)!r}")
        if self.lora_alpha is not None and (not _is_number(self.lora_alpha) or self.lora_alpha <= 0):
            raise ValueError(f"lora_alpha must be a positive number or None, got {self.lora_alpha!r}")
        if self.use_rslora and self.lora_alpha is None:
            raise ValueError(
                "use_rslora=True needs lora_alpha (the scale is lora_alpha / sqrt(r)); set lora_alpha or use_rslora=False"
            )
        for key in ("lora_dropout", "drop_path"):
            value = getattr(self, key)
            if not _is_number(value) or not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {value!r}")
        tm = self.target_modules
        if tm is not None and not isinstance(tm, (str, list, set, tuple)):
            raise ValueError(f"target_modules must be a list of module names, a regex string or None, got {tm!r}")
        if isinstance(tm, (list, tuple)):
            self.target_modules = set(tm)
