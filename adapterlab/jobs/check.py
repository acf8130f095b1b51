"""Pre-flight of an adapter folder for a serving engine: the job behind ``adapterlab check --for vllm``.

:func:`check_vllm` lists, one line each, what makes vLLM refuse (or silently misserve) an adapter:
a peft type other than LoRA, ``modules_to_save``, a bias other than ``none`` (or ``lora_bias``), DoRA,
a rank above ``max_lora_rank`` or outside vLLM's rank set, tensors that are not LoRA factors, ranks
that disagree with the config, NaN/Inf values, and — given the base — target modules the base does
not have, shapes (an embedding / LM-head vocabulary) other than the base's, and a
``base_model_name_or_path`` other than the served name. An empty list means the folder is servable.
The config is read through :mod:`adapterlab.adapter_config`, the tensors through :mod:`adapterlab.io`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

__all__ = ["SERVERS", "check_vllm", "vllm_check_folder"]

SERVERS = ("vllm",)
_PREFIX = "base_model.model."
_KEY = re.compile(
    r"^(?P<mod>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$"
)


def _base_shapes(base: Any) -> tuple[dict[str, tuple[int, int]], set[str], str]:
    """``(module -> weight shape of each Linear ([d_out, d_in]) / Embedding ([vocab, dim]), embedding names, label)``
    of a base model (a module, a folder or ``"default"``), built on the meta device: no weight is read."""
    import torch
    from torch import nn

    if isinstance(base, nn.Module):
        model, label = base, type(base).__name__
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        from adapterlab.models import check_model_folder

        path = check_model_folder(os.fspath(base), "--base")
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        label = str(base)
    shapes: dict[str, tuple[int, int]] = {}
    embeddings: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            shapes[name] = (int(m.out_features), int(m.in_features))
        elif isinstance(m, nn.Embedding):
            shapes[name] = (int(m.num_embeddings), int(m.embedding_dim))  # the weight's [vocab, dim]
            embeddings.add(name)
    return shapes, embeddings, label


def _same_base(recorded: str, base: str) -> bool:
    """Two base names agree: equal, both the embedded default, or the same existing folder."""
    from adapterlab.models import is_default

    if recorded == base or (is_default(recorded) and is_default(base)):
        return True
    a, b = Path(recorded).expanduser(), Path(base).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def check_vllm(
    adapter: str | os.PathLike[str],
    *,
    base: Any = None,
    served_name: str | None = None,
    max_lora_rank: int | None = None,
    registry: Any = None,
) -> list[str]:
    """The reasons vLLM would refuse or misserve an adapter folder (empty: servable).

    Args:
        adapter: a PEFT adapter folder or ``"hub:NAME"``.
        base: the base model (module, folder or ``"default"``): target modules and shapes are checked
            against it, and its name against ``base_model_name_or_path`` when ``served_name`` is None.
        served_name: the name vLLM serves the base under (``--served-model-name`` / ``--model``):
            ``base_model_name_or_path`` must equal it.
        max_lora_rank: vLLM's ``--max-lora-rank``: no module's rank may be above it.

    Returns:
        One line per violation, each naming the key, module or tensor and what vLLM allows.

    Raises:
        ValueError / FileNotFoundError: not an adapter folder, or a config / safetensors file that does not
            parse (one line naming the file).
    """
    from adapterlab.adapter_config import read_adapter_config
    from adapterlab.extraction.to_lora import VLLM_RANKS, _folder_of
    from adapterlab.io import nonfinite_count, open_tensors

    if max_lora_rank is not None and max_lora_rank not in VLLM_RANKS:
        raise ValueError(f"--max-lora-rank {max_lora_rank}: vLLM allows one of {', '.join(map(str, VLLM_RANKS))}")
    folder, _ = _folder_of(os.fspath(adapter), "adapter", registry)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a PEFT adapter folder (no adapter_config.json)")
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        if (folder / "adapter_model.bin").is_file():
            raise ValueError(f"{str(folder)!r} holds adapter_model.bin (pickle); vLLM and adapterlab read safetensors")
        raise FileNotFoundError(f"{str(folder)!r} has no adapter_model.safetensors")
    raw, _ = read_adapter_config(cfg_path)
    out: list[str] = []
    peft_type = str(raw.get("peft_type", ""))
    if peft_type.upper() != "LORA":
        out.append(
            f"peft_type is {peft_type!r}: vLLM serves plain LoRA only "
            f"(adapterlab export {os.fspath(adapter)} --to lora --for vllm -o OUT)"
        )
    mts = raw.get("modules_to_save") or []
    if mts:
        out.append(f"modules_to_save is {list(mts)}: vLLM loads only the LoRA factors; export without modules_to_save")
    bias = raw.get("bias", "none")
    if bias not in (None, "none"):
        out.append(f"bias is {bias!r}: vLLM allows only 'none'")
    if raw.get("lora_bias"):
        out.append("lora_bias is true: vLLM does not support LoRA biases")
    if raw.get("use_dora"):
        out.append("use_dora is true: vLLM does not support DoRA")

    def rank_problem(what: str, r: Any) -> None:
        if not isinstance(r, int) or isinstance(r, bool):
            return  # the schema has refused garbage already
        if r not in VLLM_RANKS:
            out.append(
                f"{what} is {r}: not one of vLLM's ranks {', '.join(map(str, VLLM_RANKS))} (export --for vllm pads)"
            )
        elif max_lora_rank is not None and r > max_lora_rank:
            out.append(f"{what} is {r}: above --max-lora-rank {max_lora_rank}")

    r_cfg = raw.get("r")
    rank_problem("r", r_cfg)
    for key, r in sorted((raw.get("rank_pattern") or {}).items()):
        rank_problem(f"rank_pattern[{key!r}]", r)

    base_shapes: dict[str, tuple[int, int]] | None = None
    base_emb: set[str] = set()
    if base is not None:
        base_shapes, base_emb, _ = _base_shapes(base)
    found: dict[str, dict[str, tuple[int, ...]]] = {}
    with open_tensors(weights) as fh:
        for key in fh.keys():
            k = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
            t = fh.get(key)
            bad = nonfinite_count(t)
            if bad:
                out.append(f"tensor {key!r} holds {bad} NaN/Inf value(s)")
            m = _KEY.match(k)
            if m is None:
                out.append(
                    f"tensor {key!r} is not a LoRA factor (lora_A / lora_B / lora_embedding_A / _B): vLLM refuses it"
                )
                continue
            found.setdefault(m["mod"], {})[m["kind"]] = tuple(t.shape)
    patterns = raw.get("rank_pattern") or {}
    for mod, kinds in sorted(found.items()):
        emb = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        a, b = kinds.get("lora_embedding_A" if emb else "lora_A"), kinds.get("lora_embedding_B" if emb else "lora_B")
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            out.append(f"module {mod!r} does not have both 2-D LoRA factors (A and B)")
            continue
        r = a[0]
        want = next((v for p, v in patterns.items() if re.fullmatch(rf"(.*\.)?({p})", mod)), r_cfg)
        if r != want:
            out.append(f"module {mod!r} has rank {r} in its tensors but the config says {want}")
        elif r != r_cfg:
            rank_problem(f"module {mod!r} rank", r)
        shape = (a[1], b[0]) if emb else (b[0], a[1])  # weight layout; embeddings: A [r, vocab], B [dim, r]
        if base_shapes is None:
            continue
        if mod not in base_shapes:
            out.append(
                f"module {mod!r} is not a Linear or Embedding layer of the base (target modules must exist in it)"
            )
        elif shape != base_shapes[mod]:
            have = base_shapes[mod]
            if mod in base_emb or mod.rsplit(".", 1)[-1] == "lm_head":
                out.append(
                    f"module {mod!r}: the LoRA covers a vocabulary of {shape[0]} but the base's is {have[0]} "
                    f"(weight shapes {list(shape)} vs {list(have)}); vLLM needs the base's vocabulary"
                )
            else:
                out.append(
                    f"module {mod!r}: the LoRA delta has shape {list(shape)} but the base's weight is {list(have)}"
                )
    if not found:
        out.append("the adapter holds no LoRA tensors")
    recorded = raw.get("base_model_name_or_path") or None
    want_name = (
        served_name if served_name is not None else (os.fspath(base) if isinstance(base, (str, os.PathLike)) else None)
    )
    if want_name is not None:
        if recorded is None:
            out.append(f"base_model_name_or_path is not set; it must name the served base {want_name!r}")
        elif not _same_base(str(recorded), want_name):
            out.append(
                f"base_model_name_or_path is {recorded!r} but the served base is {want_name!r} "
                f"(re-export with --served-name {want_name!r})"
            )
    return out


def vllm_check_folder(adapter: str | os.PathLike[str], **kwargs: Any) -> None:
    """:func:`check_vllm`, raising ``ValueError`` with the first violation (and how many) when there is one."""
    problems = check_vllm(adapter, **kwargs)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{os.fspath(adapter)}: {problems[0]}{more}")
