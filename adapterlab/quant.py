"""bitsandbytes 4-bit / 8-bit bases on CPU: loading, inspection and correct dequantization.

Facts about bitsandbytes 0.50.2 on CPU that this module handles (each verified by an experiment
on a tiny Llama and by ``tests/test_quant.py``):

1. **4-bit CPU repack.** On a CPU with AVX512-BF16 (``bitsandbytes.functional.has_avx512bf16()``),
   the first ``Linear4bit.forward`` that runs in eval mode with an input that does not require grad
   converts the weight *in place* to a CPU-specific layout: ``weight.data`` goes from
   ``[N*K/2, 1]`` to ``[N, K/2]`` (nibbles interleaved in blocks of 32 rows), ``quant_state.absmax``
   is de-nested, transposed to ``[K/blocksize, N]`` and **rounded to bfloat16**, and
   ``quant_state.packing_format_for_cpu`` is set. Consequences:

   * ``bitsandbytes.functional.dequantize_4bit`` (and peft's ``dequantize_bnb_weight``) read that
     layout as if it were the standard one and return garbage (max error larger than the weights);
   * the repacked matmul (``gemv_4bit``) has no autograd kernel, so no gradient flows back through
     a repacked layer: after one eval forward, LoRA training on the 4-bit base silently gets wrong
     gradients (observed: **none at all** for LoRA on q/v, whose only path to the loss runs through
     the 4-bit ``o_proj``); torch only emits a UserWarning;
   * bitsandbytes' inverse conversion (run by ``state_dict``/``save_pretrained``/``.cuda()``) leaves a
     non-nested ``absmax`` in transposed order, so saving after a forward corrupts the saved *and*
     the in-memory weights (observed: error ~40 % of the weight range); with double quantization
     the inverse re-quantizes absmax and adds a small error instead;
   * the repack asserts ``out_features % 32 == 0`` and needs ``in_features % blocksize == 0``
     (blocksize 64): other layers raise on their first inference forward.

   :func:`load_quantized` therefore turns the repack off by default (``cpu_repack=False``: every
   ``Linear4bit`` gets ``support_avx512bf16_for_cpu = False``); the generic path is slower for
   inference but exact, differentiable and stable under save. :func:`dequantize_weight` decodes both
   layouts correctly without touching the module, and :func:`unpack_cpu_` restores repacked modules
   to the standard layout exactly (absmax kept at its bf16-rounded value).
2. **Shape rule.** To make the set of quantized layers independent of the CPU and of the repack flag,
   :func:`load_quantized` keeps every ``nn.Linear`` with ``out_features % 32 != 0`` or
   ``in_features % 64 != 0`` in full precision for 4-bit (adds it to ``llm_int8_skip_modules``) and
   logs a warning, or raises ``ValueError`` with ``strict=True``. 8-bit has no shape constraint on CPU.
3. **8-bit.** ``Linear8bitLt`` moves ``weight.SCB`` into ``module.state.SCB`` on the first forward
   (``weight.SCB`` becomes None); :func:`dequantize_weight` reads either. The int8 CPU inference path
   casts activations to float16.
4. NF4 and FP4 code books both contain an exact 0 and absmax scaling maps 0 to 0, so zeros of a
   pruned base survive 4-bit quantization (quantization may add zeros).

5. **Writing weights back.** :func:`set_weight_` / :func:`requantize_4bit_` / :func:`requantize_8bit_`
   store an fp32 weight into a layer (requantized with the layer's own quant type and block size, in
   the standard layout); :func:`snapshot_weight` / :func:`restore_weight_` keep and restore the exact
   codes (for unmerge); :func:`check_cpu_4bit_inference` names 4-bit layers that would fail fact 1's
   shape assertion. The quantization-aware merge (:func:`adapterlab.merge`) is built on them.

Reference: QLoRA (NF4, double quantization), https://arxiv.org/abs/2305.14314;
LLM.int8(), https://arxiv.org/abs/2208.07339.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from adapterlab._paths import cache_dir
from adapterlab.models import is_default, resolve_model_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

BITS_CHOICES = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
#: Row block of the CPU repack (``out_features`` must be a multiple of it).
CPU_REPACK_BLOCK_N = 32
#: bitsandbytes' 4-bit quantization block size (``in_features`` must be a multiple of it to repack).
BNB_4BIT_BLOCKSIZE = 64
#: bitsandbytes' int8 dequantization constant (1/127), as in ``int8_vectorwise_dequant``.
_INV_127 = 7.874015718698502e-3


# ---------------------------------------------------------------------------------------------
# module inspection


def _is_bnb(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` (NF4/FP4)."""
    return _is_bnb(module) and type(module.weight).__name__ == "Params4bit"


def is_8bit(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear8bitLt``."""
    return _is_bnb(module) and type(module.weight).__name__ == "Int8Params"


def module_quantization(module: nn.Module) -> str | None:
    """``"bnb-4bit-nf4"``, ``"bnb-4bit-fp4"``, ``"bnb-8bit"``, or None for an unquantized module."""
    module = _base_layer(module)
    if is_4bit(module):
        qs = getattr(module.weight, "quant_state", None)
        qt = getattr(qs, "quant_type", None) or getattr(module.weight, "quant_type", "nf4")
        return f"bnb-4bit-{qt}"
    if is_8bit(module):
        return "bnb-8bit"
    return None


def _base_layer(module: nn.Module) -> nn.Module:
    """Unwrap peft tuner layers (anything with a ``base_layer`` submodule)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = cast(nn.Module, module.base_layer)
    return module


def _is_tuner_layer(module: nn.Module) -> bool:
    # duck-typed: peft's BaseTunerLayer has base_layer + adapter_layer_names (no peft import here)
    return isinstance(getattr(module, "base_layer", None), nn.Module) and hasattr(module, "adapter_layer_names")


def base_named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The base model's modules under their base-model names, through peft wrappers.

    Strips a leading ``base_model.model.`` and every ``.base_layer`` segment, skips tuner layers
    themselves and everything inside them except their ``base_layer`` (i.e. adapter modules).
    """
    tuner_names: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") and not name.startswith(t + ".base_layer") for t in tuner_names):
            continue
        if _is_tuner_layer(module):
            tuner_names.append(name)
            continue
        canonical = name.removeprefix("base_model.model.").replace(".base_layer", "")
        yield canonical, module


def _linear_is_cpu_4bit_safe(in_features: int, out_features: int, blocksize: int = BNB_4BIT_BLOCKSIZE) -> bool:
    return out_features % CPU_REPACK_BLOCK_N == 0 and in_features % blocksize == 0


# ---------------------------------------------------------------------------------------------
# dequantization


def _decode_cpu_packed_4bit(packed: torch.Tensor, qs: Any) -> torch.Tensor:
    """Dequantize a weight in bitsandbytes' CPU repack layout (see module docstring) to fp32.

    Semantics: ``W[n, k] = code[c[n, k]] * absmax[k // blocksize, n]`` where ``c`` are the 4-bit
    codes recovered from the ``[N, K/2]`` layout (inverse of ``_convert_weight_packed_for_cpu``).
    """
    n, k = (int(s) for s in qs.shape)
    block_n = CPU_REPACK_BLOCK_N
    p = packed.reshape(-1, block_n)  # [N*K/64, 32]: low nibbles = first 32 entries, high = last 32
    codes = torch.cat([p & 0xF, (p >> 4) & 0xF], dim=-1)  # [N*K/64, 64]
    codes = codes.reshape(n // block_n, k // 2, block_n, 2)  # [N/32, K/2, 32, 2]
    codes = codes.transpose(1, 2).reshape(n, k).long()  # [N, K]
    values = qs.code.to(torch.float32)[codes]  # [N, K]
    absmax = qs.absmax.to(torch.float32).t()  # [K/bs, N] -> [N, K/bs]
    return values * absmax.repeat_interleave(qs.blocksize, dim=1)  # [N, K]


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 weight ``[out_features, in_features]`` of a (possibly quantized) linear layer.

    Correct before and after forwards: it decodes bitsandbytes' CPU repack layout itself and reads
    the 8-bit scales from ``weight.SCB`` or ``state.SCB``. Never modifies the module; the result
    never aliases the module's storage. Accepts peft tuner layers (uses their base layer).
    """
    module = _base_layer(module)
    weight: Any = module.weight  # Params4bit / Int8Params (quant_state, SCB) or a plain tensor
    if is_4bit(module):
        import bitsandbytes.functional as bnbF

        qs = weight.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            return _decode_cpu_packed_4bit(weight.data, qs)
        return bnbF.dequantize_4bit(weight.data, qs).to(torch.float32).reshape(tuple(qs.shape)).clone()
    if is_8bit(module):
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is None:
            raise ValueError(f"8-bit layer {type(module).__name__} has no scales (SCB); is it quantized?")
        return weight.data.to(torch.float32) * scb.to(torch.float32).view(-1, 1) * _INV_127
    if isinstance(weight, torch.Tensor):
        return weight.detach().to(torch.float32).clone()
    raise TypeError(f"cannot dequantize {type(module).__name__}: no weight tensor")


# ---------------------------------------------------------------------------------------------
# CPU repack control


def set_cpu_repack_(model: nn.Module, enabled: bool) -> int:
    """Allow or forbid bitsandbytes' in-place CPU repack on every ``Linear4bit``; returns how many.

    Forbidding it does not undo a repack that already happened (use :func:`unpack_cpu_`).
    Layers created later (e.g. by a requantizing merge) get bitsandbytes' default again.
    """
    count = 0
    for module in model.modules():
        if is_4bit(module):
            linear4bit: Any = module  # bitsandbytes Linear4bit
            linear4bit.support_avx512bf16_for_cpu = bool(enabled) and _cpu_has_avx512bf16()
            count += 1
    return count


def _cpu_has_avx512bf16() -> bool:
    try:
        from bitsandbytes.functional import has_avx512bf16

        return bool(has_avx512bf16())
    except Exception:  # pragma: no cover - depends on the bnb build
        return False


def unpack_cpu_(model: nn.Module) -> int:
    """Restore every CPU-repacked ``Linear4bit`` to bitsandbytes' standard layout; returns how many.

    Exact: the restored module dequantizes to the same values as the repacked one (absmax stays at
    its bf16-rounded value, stored as fp32 and not nested). Use it before ``state_dict`` /
    ``save_pretrained`` or training on a model that already ran inference forwards.
    """
    from bitsandbytes.functional import QuantState

    count = 0
    for module in model.modules():
        if not is_4bit(module):
            continue
        linear4bit: Any = module  # bitsandbytes Linear4bit: weight.quant_state, quant_state
        qs = linear4bit.weight.quant_state
        if not getattr(qs, "packing_format_for_cpu", False):
            continue
        n, k = (int(s) for s in qs.shape)
        packed = linear4bit.weight.data.reshape(-1, CPU_REPACK_BLOCK_N)
        codes = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)
        codes = codes.reshape(n // CPU_REPACK_BLOCK_N, k // 2, CPU_REPACK_BLOCK_N, 2)
        codes = codes.transpose(1, 2).reshape(-1)  # [N*K] row-major codes
        qweight = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)  # [N*K/2]: even index = high nibble
        qweight = qweight.reshape(getattr(qs, "original_qshape", (n * k // 2, 1)))
        storage = getattr(qs, "original_storage_type", None)
        if storage is not None:
            qweight = qweight.view(storage)
        absmax = qs.absmax.to(torch.float32).t().contiguous().reshape(-1)  # [K/bs, N] -> [N*K/bs]
        new_qs = QuantState(
            absmax=absmax,
            shape=torch.Size((n, k)),
            code=qs.code,
            blocksize=qs.blocksize,
            quant_type=qs.quant_type,
            dtype=getattr(qs, "original_dtype", torch.float32),
        )
        linear4bit.weight.data = qweight
        linear4bit.weight.quant_state = new_qs
        if hasattr(linear4bit, "quant_state"):
            linear4bit.quant_state = new_qs
        count += 1
    return count


# ---------------------------------------------------------------------------------------------
# loading


def _check_bits(bits: int, quant_type: str) -> None:
    if bits not in BITS_CHOICES:
        raise ValueError(f"bits={bits!r} is not supported; choose one of: {', '.join(map(str, BITS_CHOICES))}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; choose one of: {', '.join(QUANT_TYPES)}")


def _skeleton(path: Path) -> nn.Module:
    """The model built on the meta device from its config (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def cpu_incompatible_linears(model: nn.Module, blocksize: int = BNB_4BIT_BLOCKSIZE) -> list[str]:
    """Names of ``nn.Linear`` layers that bitsandbytes 4-bit cannot run on CPU when repacking.

    The rule: ``out_features % 32 != 0`` or ``in_features % blocksize != 0`` (module docstring, fact 1).
    """
    return [
        name
        for name, m in base_named_modules(model)
        if isinstance(m, nn.Linear) and not _linear_is_cpu_4bit_safe(m.in_features, m.out_features, blocksize)
    ]


def _default_skips(skeleton: nn.Module) -> list[str]:
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        return list(get_keys_to_not_convert(skeleton))
    except Exception:  # pragma: no cover - transformers layout changed
        out = cast(Any, skeleton).get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None
        return [n for n, m in skeleton.named_modules() if out is not None and m is out]


def _matches_any(name: str, patterns: list[str]) -> bool:
    """Whether transformers would skip ``name`` given ``llm_int8_skip_modules`` patterns."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return not should_convert_module(name, patterns)
    except ImportError:  # pragma: no cover - transformers layout changed
        return any(name == p or name.endswith("." + p) for p in patterns)


def load_quantized(
    model_id_or_path: str | os.PathLike[str] | None = None,
    bits: int = 4,
    *,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = False,
    skip_modules: list[str] | None = None,
    strict: bool = False,
    cpu_repack: bool = False,
    cache: bool | None = None,
) -> nn.Module:
    """Load a causal LM from a local folder as a bitsandbytes 4-bit or 8-bit base on CPU.

    Args:
        model_id_or_path: a local model folder, or None/``"default"`` for the embedded default model.
        bits: 4 (NF4/FP4 ``Linear4bit``) or 8 (LLM.int8 ``Linear8bitLt``).
        quant_type: ``"nf4"`` or ``"fp4"`` (4-bit only).
        compute_dtype: 4-bit compute dtype; non-quantized parameters are loaded in this dtype too.
        double_quant: quantize the 4-bit absmax scales again (QLoRA double quantization).
        skip_modules: extra module names (transformers' ``llm_int8_skip_modules`` patterns) to keep
            in full precision; the output head is always kept.
        strict: raise instead of keeping 4-bit-incompatible layers in full precision.
        cpu_repack: allow bitsandbytes' in-place CPU repack of 4-bit weights (faster inference on
            AVX512-BF16 CPUs, but no gradients through repacked layers and lossy save; see the
            module docstring). Default False.
        cache: keep the quantized checkpoint under ``<cache_dir>/quantized/<key>`` and reuse it
            (bitsandbytes' CPU quantizer needs ~15 s for the 135M default model, a cached load
            ~0.3 s, with identical weights). The key covers the source files (name, size, mtime),
            the settings and the library versions. None (default): only for the embedded model.

    Returns:
        The quantized model in eval mode. For 4-bit, every ``nn.Linear`` with
        ``out_features % 32 != 0`` or ``in_features % 64 != 0`` stays in full precision (a warning
        names them) so the model runs on any CPU; :func:`quant_info` lists them.

    Raises:
        ValueError: bad ``bits``/``quant_type``, or (``strict=True``) 4-bit-incompatible layers.
        FileNotFoundError: the path does not exist.
    """
    _check_bits(bits, quant_type)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = resolve_model_path(model_id_or_path)
    skeleton = _skeleton(path)
    skips = _default_skips(skeleton) + list(skip_modules or [])
    if bits == 4:
        bad = [n for n in cpu_incompatible_linears(skeleton) if not _matches_any(n, skips)]
        if bad and strict:
            raise ValueError(
                f"{len(bad)} linear layer(s) cannot be 4-bit quantized on CPU (bitsandbytes needs "
                f"out_features % {CPU_REPACK_BLOCK_N} == 0 and in_features % {BNB_4BIT_BLOCKSIZE} == 0): "
                f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}; "
                f"pass strict=False to keep them in full precision"
            )
        if bad:
            logger.warning(
                "keeping %d linear layer(s) in full precision (4-bit on CPU needs out_features %% %d == 0 "
                "and in_features %% %d == 0): %s",
                len(bad),
                CPU_REPACK_BLOCK_N,
                BNB_4BIT_BLOCKSIZE,
                ", ".join(bad),
            )
            skips += bad
        qcfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=double_quant,
            llm_int8_skip_modules=skips,
        )
    else:
        qcfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skips)
    del skeleton

    use_cache = is_default(model_id_or_path) if cache is None else bool(cache)
    cached = cache_dir() / "quantized" / _cache_key(path, qcfg) if use_cache else None
    model: PreTrainedModel | None = _load_cached(cached, compute_dtype) if cached is not None else None
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            quantization_config=qcfg,
            dtype=compute_dtype,
            device_map={"": "cpu"},
            local_files_only=True,
        )
        if cached is not None:
            _store_cached(model, cached)
    model.config._name_or_path = str(path)
    if bits == 4:
        set_cpu_repack_(model, cpu_repack)
    model.eval()
    return model


def _cache_key(path: Path, qcfg: Any) -> str:
    """Digest of the source files' names/sizes/mtimes, config.json, the quantization config and versions."""
    import hashlib
    import json
    from importlib.metadata import version

    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin", ".json") or f.name.endswith(".index.json")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update((path / "config.json").read_bytes() if (path / "config.json").exists() else b"")
    h.update(json.dumps(qcfg.to_dict(), sort_keys=True, default=str).encode())
    for dist in ("bitsandbytes", "transformers", "torch"):
        h.update(f"{dist}={version(dist)}\n".encode())
    return h.hexdigest()[:24]


def _load_cached(cached: Path, compute_dtype: torch.dtype) -> PreTrainedModel | None:
    if not (cached / "config.json").is_file():
        return None
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            str(cached), dtype=compute_dtype, device_map={"": "cpu"}, local_files_only=True
        )
    except Exception as exc:  # a broken cache entry is rebuilt, never fatal
        logger.warning("ignoring unreadable quantized cache %s (%s)", cached, exc)
        return None


def _store_cached(model: PreTrainedModel, cached: Path) -> None:
    """Save a freshly quantized model (never run forward, so no CPU repack) by atomic rename."""
    import shutil

    if any(
        getattr(cast(Any, m.weight).quant_state, "packing_format_for_cpu", False) for m in model.modules() if is_4bit(m)
    ):
        return
    staging: Path | None = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".stage-", dir=cached.parent))
        model.save_pretrained(staging, safe_serialization=True)
        if cached.exists():
            shutil.rmtree(cached, ignore_errors=True)
        os.replace(staging, cached)
        logger.info("cached the quantized model at %s", cached)
    except OSError as exc:  # e.g. another process won the race, read-only cache: keep going
        logger.warning("could not cache the quantized model at %s (%s)", cached, exc)
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def quantize_model(model: nn.Module, bits: int = 4, **kwargs: Any) -> nn.Module:
    """A quantized copy of an in-memory (unquantized) model: saved to a temporary folder, reloaded.

    Takes the keyword arguments of :func:`load_quantized`. The input model is left unchanged and the
    copy keeps the input's ``config._name_or_path``.
    """
    _check_bits(bits, kwargs.get("quant_type", "nf4"))
    if any(module_quantization(m) for m in model.modules()):
        raise ValueError("the model is already quantized")
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    with tempfile.TemporaryDirectory(prefix="adapterlab-quant-") as tmp:
        cast(Any, model).save_pretrained(tmp, safe_serialization=True)  # a transformers PreTrainedModel
        qmodel = load_quantized(tmp, bits, **{"cache": False, **kwargs})
    if name is not None:
        cast(Any, qmodel).config._name_or_path = name
    return qmodel


def quant_info(model: nn.Module) -> dict[str, Any]:
    """Summary of a model's bitsandbytes quantization.

    Returns:
        ``bits`` (4, 8 or None), ``quant_type`` (``"nf4"``/``"fp4"``/None), ``double_quant``,
        ``compute_dtype``, ``n_quantized`` (bnb linears), ``n_skipped`` and ``skipped`` (plain
        ``nn.Linear`` layers of the base, e.g. the output head), ``n_cpu_repacked`` (4-bit layers
        currently in the CPU repack layout) and ``cpu_repack`` (whether any 4-bit layer may repack).
    """
    bits: set[int] = set()
    qtypes: set[str] = set()
    double = False
    compute: set[str] = set()
    n_quant = n_repacked = 0
    may_repack = False
    skipped: list[str] = []
    for name, m in base_named_modules(model):
        if is_4bit(m):
            n_quant += 1
            bits.add(4)
            qs = cast(Any, m.weight).quant_state
            qtypes.add(qs.quant_type)
            double = double or bool(getattr(qs, "nested", False)) or bool(getattr(qs, "original_nested", False))
            if getattr(qs, "packing_format_for_cpu", False):
                n_repacked += 1
            may_repack = may_repack or bool(getattr(m, "support_avx512bf16_for_cpu", False))
            if getattr(m, "compute_dtype", None) is not None:
                compute.add(str(m.compute_dtype).removeprefix("torch."))
        elif is_8bit(m):
            n_quant += 1
            bits.add(8)
        elif isinstance(m, nn.Linear):
            skipped.append(name)
    if len(bits) > 1:
        logger.warning("model mixes 4-bit and 8-bit layers")
    return {
        "bits": max(bits) if len(bits) == 1 else (sorted(bits) if bits else None),
        "quant_type": next(iter(qtypes)) if len(qtypes) == 1 else (sorted(qtypes) or None),
        "double_quant": double,
        "compute_dtype": next(iter(compute)) if len(compute) == 1 else (sorted(compute) or None),
        "n_quantized": n_quant,
        "n_skipped": len(skipped),
        "skipped": skipped,
        "n_cpu_repacked": n_repacked,
        "cpu_repack": may_repack,
    }


# ---------------------------------------------------------------------------------------------
# writing weights back (quantization-aware merge)


def check_cpu_4bit_inference(model: nn.Module) -> None:
    """Raise ``ValueError`` if a 4-bit layer of ``model`` would fail bitsandbytes' CPU inference.

    With the CPU repack allowed (``cpu_repack=True`` / ``set_cpu_repack_(model, True)``) on an
    AVX512-BF16 CPU, the first eval forward of a ``Linear4bit`` asserts ``out_features % 32 == 0``
    and needs ``in_features % 64 == 0`` (module docstring, fact 1). This check names such layers
    before anything runs.

    Raises:
        ValueError: naming the offending layers, their shapes and the two ways out.
    """
    bad = []
    for name, m in base_named_modules(model):
        if not is_4bit(m) or not getattr(m, "support_avx512bf16_for_cpu", False):
            continue
        qs = cast(Any, m.weight).quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            continue  # already repacked: it ran
        n, k = (int(s) for s in qs.shape)
        if not _linear_is_cpu_4bit_safe(k, n, int(qs.blocksize)):
            bad.append(f"{name} (out_features={n}, in_features={k})")
    if bad:
        raise ValueError(
            f"4-bit inference on CPU fails for {len(bad)} layer(s) whose out_features is not a multiple of "
            f"{CPU_REPACK_BLOCK_N} (or in_features not a multiple of {BNB_4BIT_BLOCKSIZE}): "
            f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}; load the base with "
            f"adapterlab.load_quantized (keeps such layers in full precision) or call "
            f"adapterlab.quant.set_cpu_repack_(model, False)"
        )


def snapshot_weight(module: nn.Module) -> dict[str, Any]:
    """An exact copy of a linear layer's stored weight (4-bit codes + quant state, 8-bit codes +
    scales, or the plain tensor), for :func:`restore_weight_`."""
    module = _base_layer(module)
    w: Any = module.weight  # Params4bit / Int8Params (quant_state, SCB) or a plain tensor
    if is_4bit(module):
        return {"kind": "4bit", "data": w.data.clone(), "quant_state": w.quant_state}
    if is_8bit(module):
        scb = getattr(w, "SCB", None)
        on_weight = scb is not None
        if scb is None:
            scb = cast(Any, module).state.SCB  # Linear8bitLt.state after the first forward
        return {"kind": "8bit", "data": w.data.clone(), "SCB": scb.clone(), "on_weight": on_weight}
    return {"kind": "plain", "data": w.data.clone()}


def restore_weight_(module: nn.Module, snapshot: dict[str, Any]) -> None:
    """Put a :func:`snapshot_weight` back (exact)."""
    module = _base_layer(module)
    kind = snapshot["kind"]
    if kind == "4bit":
        linear4bit: Any = module  # bitsandbytes Linear4bit: weight.quant_state, quant_state
        linear4bit.weight.data = snapshot["data"]
        linear4bit.weight.quant_state = snapshot["quant_state"]
        if hasattr(linear4bit, "quant_state"):
            linear4bit.quant_state = snapshot["quant_state"]
    elif kind == "8bit":
        _set_int8_(module, snapshot["data"], snapshot["SCB"])
    else:
        module.weight.data = snapshot["data"]


def _set_int8_(module: nn.Module, cb: torch.Tensor, scb: torch.Tensor) -> None:
    weight: Any = module.weight  # bitsandbytes Int8Params: CB, SCB
    weight.data = cb
    if getattr(weight, "SCB", None) is not None:
        weight.CB = cb
        weight.SCB = scb
    state = getattr(module, "state", None)
    if state is not None and getattr(state, "SCB", None) is not None:
        state.SCB = scb
        if getattr(state, "CB", None) is not None:
            state.CB = cb
    elif getattr(weight, "SCB", None) is None:
        weight.CB = cb
        weight.SCB = scb


def requantize_4bit_(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace a ``Linear4bit``'s weight by ``weight`` (fp32 ``[out, in]``), quantized again.

    Same ``quant_type``, block size, double quantization and storage dtype as the layer has; new
    absmax per block. The result is in bitsandbytes' standard layout (not the CPU repack layout),
    whatever layout the layer was in. Exact zeros of ``weight`` dequantize to exact zeros (both code
    books contain 0; an all-zero block keeps absmax 0).
    """
    import bitsandbytes.functional as bnbF

    module = _base_layer(module)
    if not is_4bit(module):
        raise TypeError(f"{type(module).__name__} is not a bitsandbytes Linear4bit")
    linear4bit: Any = module  # bitsandbytes Linear4bit: weight.quant_state, quant_state
    p = linear4bit.weight
    old = p.quant_state
    shape = tuple(int(s) for s in old.shape)
    if tuple(weight.shape) != shape:
        raise ValueError(f"new weight has shape {tuple(weight.shape)}, the 4-bit layer has {shape}")
    orig_dtype = getattr(old, "original_dtype", None) or old.dtype
    storage = getattr(old, "original_storage_type", None) or getattr(p, "quant_storage", torch.uint8)
    nested = bool(getattr(old, "nested", False) or getattr(old, "original_nested", False))
    qweight, qs = bnbF.quantize_4bit(
        weight.detach().to(device=p.device, dtype=torch.float32).contiguous(),
        blocksize=int(old.blocksize),
        compress_statistics=nested,
        quant_type=old.quant_type,
        quant_storage=storage,
    )
    qs.dtype = orig_dtype  # dequantize to the layer's original dtype, as before
    p.data = qweight
    p.quant_state = qs
    if hasattr(linear4bit, "quant_state"):
        linear4bit.quant_state = qs


def requantize_8bit_(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace a ``Linear8bitLt``'s weight by ``weight`` (fp32 ``[out, in]``), row-wise int8 again."""
    import bitsandbytes.functional as bnbF

    module = _base_layer(module)
    if not is_8bit(module):
        raise TypeError(f"{type(module).__name__} is not a bitsandbytes Linear8bitLt")
    cb, scb, _ = bnbF.int8_vectorwise_quant(weight.detach().to(torch.float16))  # (out, in) int8, (out,)
    _set_int8_(module, cb.to(module.weight.device), scb.to(module.weight.device))


def set_weight_(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an fp32 weight ``[out, in]`` into a linear layer: requantized for bitsandbytes 4/8-bit
    layers, cast once to the stored dtype otherwise."""
    base = _base_layer(module)
    if is_4bit(base):
        requantize_4bit_(base, weight)
    elif is_8bit(base):
        requantize_8bit_(base, weight)
    else:
        w = cast(torch.Tensor, base.weight)
        if tuple(weight.shape) != tuple(w.shape):
            raise ValueError(f"new weight has shape {tuple(weight.shape)}, the layer has {tuple(w.shape)}")
        w.data = weight.detach().to(device=w.device, dtype=w.dtype)
