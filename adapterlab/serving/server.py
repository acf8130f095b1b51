"""``AdapterServer``: one base model, many adapters, batched generation with an adapter per request.

The base is loaded once. Its targeted linear layers are wrapped (:class:`MultiAdapterLinear`) on
first use; adapters are read on demand (PEFT folders, ``hub:`` / registry refs, in-memory factors)
into an LRU cache of ``capacity`` LoRA/SHiRA slots with pinning, so hot-swapping an adapter writes a
few small tensors into a bank and never reloads the base. Shared-basis bundles
(:class:`~adapterlab.compression.SharedBasisBundle`) are resident as a whole: all their adapters
cost ``n·c²`` (or ``n·c``) floats per layer.

A batch mixing adapters runs as one forward: grouped LoRA, the shared basis (one GEMM for ``x Vᵀ``,
the per-request core, one GEMM for ``Uᵀ``), and SHiRA fused into the base when the whole batch
shares one SHiRA adapter (sparse on the fly otherwise).

Reference: Brüel-Gabrielsson et al., "Compress then Serve", https://arxiv.org/abs/2407.00066.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from adapterlab.adapter_config import read_adapter_config
from adapterlab.serving.layer import MultiAdapterLinear
from adapterlab.serving.requests import (
    Completion,
    Request,
    check_context,
    check_token_ids,
    context_length_of,
    vocab_size_of,
)
from adapterlab.serving.router import BatchRouter, RowSpec, wrap_linear
from adapterlab.serving.sharing import claim, model_lock, set_child

__all__ = ["AdapterServer", "Completion", "Request", "StepHook", "UnknownAdapterError", "check_adapter_name"]

logger = logging.getLogger(__name__)

#: Both matched with ``fullmatch`` (``$`` would accept a trailing newline).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}")
_SHIRA_KEY = re.compile(r"(?:base_model\.model\.)?(?P<mod>.+?)\.(?:adapterlab_)?shira_(?P<kind>[a-z]+)(?:\.[^.]+)?")


class UnknownAdapterError(ValueError):
    """A request or command names an adapter the server does not know (HTTP 404)."""


#: ``on_step(indices, step, tokens, live) -> stop | None``: called by :meth:`AdapterServer.generate`
#: after every decoding step of a batch. ``indices``: the positions (in the ``requests`` given to
#: ``generate``) of the batch's rows; ``step``: 0 for the first new token; ``tokens`` ``[B]``: the token
#: each row just got; ``live`` ``[B]`` bool: the token belongs to the row's completion (not past its
#: EOS or its ``max_new_tokens``). It may return a bool tensor ``[B]`` of rows to stop now: their
#: completion ends with this step's token, ``finish_reason="stop"``. A batch that is retried (see
#: ``return_exceptions``) calls it again from step 0 with the same greedy tokens.
StepHook = Callable[[Sequence[int], int, Tensor, Tensor], "Tensor | None"]


class _StepCriteria:
    """A ``transformers`` stopping criterion that reports every step to a :data:`StepHook`.

    It also ends each row at its own EOS or ``max_new_tokens`` (a batch stops as soon as every row
    is done), and records where the hook stopped a row (``end`` ``[B]``: tokens kept per row).
    """

    def __init__(self, on_step: StepHook, indices: Sequence[int], prompt_len: int, limits: Tensor, eos: Tensor):
        self.on_step, self.indices, self.prompt_len, self.eos = on_step, list(indices), prompt_len, eos
        self.limits = limits  # [B] max_new_tokens per row
        self.end = limits.clone()  # [B] tokens each row keeps
        self.alive = torch.ones(limits.shape[0], dtype=torch.bool)  # [B] still generating its completion
        self.stopped = torch.zeros(limits.shape[0], dtype=torch.bool)  # [B] stopped by the hook

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        step = input_ids.shape[1] - self.prompt_len - 1
        new = input_ids[:, -1].cpu()  # [B] this step's token per row
        is_eos = torch.isin(new, self.eos)  # [B]
        live = self.alive & ~is_eos & (step < self.limits)  # [B]
        self.alive = live & (step + 1 < self.limits)
        stop = self.on_step(self.indices, step, new, live)
        if stop is not None:
            hit = stop.cpu().bool() & live  # [B] rows the hook ends with this token
            self.end = torch.where(hit, torch.full_like(self.end, step + 1), self.end)
            self.stopped |= hit
            self.alive &= ~hit
        return (~self.alive).to(input_ids.device)


@dataclass
class _Entry:
    name: str
    kind: str  # lora | shira
    slot: int | None
    rank: int
    modules: int
    source: str
    pinned: bool = False


@dataclass
class _Bundle:
    key: str
    names: dict[str, int]  # served name -> core index
    mode: str
    rank: int
    modules: int
    source: str
    storage: dict[str, Any] = field(default_factory=dict)


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _check_finite(name: str, what: str, t: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"adapter {name!r}: tensor {what!r} holds NaN or Inf")


def check_adapter_name(name: Any) -> str:
    """An adapter name the server accepts: 1-200 of letters, digits and ``._:/@+-``, starting with a
    letter or digit (a full match: a trailing newline is refused).

    Raises:
        ValueError: one line naming the value and what is allowed.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"adapter name {name!r} is invalid; use 1-200 characters from letters, digits and ._:/@+- "
            f"(starting with a letter or digit)"
        )
    return name


class AdapterServer:
    """Serve many adapters on one base model with per-request adapter choice.

    Args:
        base: a loaded causal LM, or a model folder / ``"default"`` (the embedded model) to load.
        registry: an ``AdapterRegistry`` (or its root folder): unknown adapter names and ``hub:NAME``
            sources are looked up there.
        tokenizer: needed for text prompts (loaded with the model when ``base`` is a path).
        capacity: LoRA/SHiRA cache slots (LRU; pinned adapters are never evicted).
        max_batch_size: requests per forward in :meth:`generate`.
        plan_mode: ``auto`` | ``grouped`` | ``gather`` — how LoRA rows are batched.
        check_base: refuse registry adapters whose recorded base fingerprint differs from ``base``.
        adapters: ``{name: source}`` registered up front (loaded on first use).
        context_length: longest prompt + ``max_new_tokens`` a request may ask for (default: the
            model config's ``max_position_embeddings``; None there = no limit).

    Several servers may be built on the same model object (e.g. a notebook cell run twice): they
    share one lock, and the one that runs swaps its own layer wrappers in (restoring the others'
    plain layers and fused SHiRA entries first), so each of them sees the original base.

    Example:
        >>> server = AdapterServer(model, tokenizer=tok, adapters={"a": "out/a", "b": "hub:b"})
        >>> server.generate([Request("Hi", "a"), Request("Hi", "b"), Request("Hi", None)])
    """

    def __init__(
        self,
        base: nn.Module | str | os.PathLike[str] | None = None,
        registry: Any = None,
        *,
        tokenizer: Any = None,
        capacity: int = 32,
        max_batch_size: int = 64,
        plan_mode: str = "auto",
        check_base: bool = True,
        adapters: Mapping[str, Any] | None = None,
        context_length: int | None = None,
    ) -> None:
        if context_length is not None and (
            isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2
        ):
            raise ValueError(f"context_length must be an integer >= 2 or None, got {context_length!r}")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if isinstance(base, nn.Module):
            if hasattr(base, "peft_config"):
                raise ValueError("base is a PeftModel; pass the plain base model and give adapters to the server")
            model = base
        else:
            from adapterlab.models import load_model, load_tokenizer

            model = load_model(base)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(base)
        if registry is not None and isinstance(registry, (str, os.PathLike)):
            from adapterlab.registry import AdapterRegistry  # type: ignore[attr-defined]

            registry = AdapterRegistry(registry)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.registry = registry
        self.check_base = check_base
        self.max_batch_size = max_batch_size
        param = next(model.parameters())
        self.router = BatchRouter(capacity, dtype=_float_dtype(model), device=param.device, plan_mode=plan_mode)
        self._sources: dict[str, Any] = {}
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._bundles: dict[str, _Bundle] = {}
        self._bundle_of: dict[str, str] = {}
        self._lock = model_lock(self.model)
        self._tok_lock = threading.Lock()  # HF fast tokenizers are not safe to call from many threads
        self.context_length = context_length if context_length is not None else context_length_of(self.model)
        self._fingerprint: dict[str, Any] | None = None
        self.stats = {"loads": 0, "evictions": 0, "requests": 0, "batches": 0}
        for name, src in (adapters or {}).items():
            self.register(name, src)

    # -- adapter bookkeeping ------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.router.capacity

    def register(self, name: str, source: Any) -> None:
        """Make adapter ``name`` known without loading it (folder, ``hub:REF``, LoraSource, peft model,
        or ``{module: (B, A)}`` factors with the scale folded into B)."""
        self._check_name(name)
        if isinstance(source, (str, os.PathLike)) and not os.fspath(source).startswith("hub:"):
            path = Path(os.fspath(source)).expanduser()
            if not (path / "adapter_config.json").is_file():
                raise FileNotFoundError(
                    f"adapter {name!r}: {str(path)!r} is not a PEFT adapter folder (no adapter_config.json)"
                )
        with self._lock:
            if name in self._bundle_of:
                raise ValueError(f"adapter name {name!r} is already used by bundle {self._bundle_of[name]!r}")
            if name in self._cache and self._sources.get(name) is not source:
                self._evict(name)
            self._sources[name] = source

    @staticmethod
    def _check_name(name: Any) -> None:
        check_adapter_name(name)

    def known(self, name: str) -> bool:
        """True if ``name`` can be served (cached, registered, in a bundle, or in the registry)."""
        if name in self._cache or name in self._sources or name in self._bundle_of:
            return True
        if self.registry is not None:
            try:
                self.registry.resolve(name)
                return True
            except Exception:  # noqa: BLE001 - any lookup failure means "not in the registry"
                return False
        return False

    def adapters(self) -> list[dict[str, Any]]:
        """Every servable adapter: name, kind, loaded, pinned, rank, source."""
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            for name, src in self._sources.items():
                out[name] = {
                    "name": name,
                    "kind": None,
                    "loaded": False,
                    "pinned": False,
                    "rank": None,
                    "source": self._describe(src),
                }
            for name, e in self._cache.items():
                out[name] = {
                    "name": name,
                    "kind": e.kind,
                    "loaded": True,
                    "pinned": e.pinned,
                    "rank": e.rank,
                    "source": e.source,
                }
            for key, b in self._bundles.items():
                for name in b.names:
                    out[name] = {
                        "name": name,
                        "kind": "shared_basis",
                        "loaded": True,
                        "pinned": True,
                        "rank": b.rank,
                        "source": f"{b.source} ({b.mode})",
                        "bundle": key,
                    }
            if self.registry is not None:
                try:
                    for row in self.registry.ls():
                        ref = row.get("name") or row.get("ref")
                        if ref and ref not in out:
                            out[ref] = {
                                "name": ref,
                                "kind": None,
                                "loaded": False,
                                "pinned": False,
                                "rank": None,
                                "source": f"hub:{ref}",
                            }
                except Exception as exc:  # noqa: BLE001 - the list still works without the registry
                    logger.warning("cannot list the registry: %s", exc)
            return sorted(out.values(), key=lambda r: r["name"])

    @staticmethod
    def _describe(src: Any) -> str:
        if isinstance(src, (str, os.PathLike)):
            return os.fspath(src)
        return type(src).__name__

    def load(self, name: str, source: Any = None, *, pin: bool = False) -> dict[str, Any]:
        """Load adapter ``name`` into the cache now (optionally registering ``source`` and pinning it)."""
        with self._lock:
            if source is not None:
                self.register(name, source)
            if name in self._bundle_of:
                return {"name": name, "kind": "shared_basis", "loaded": True, "pinned": True}
            self._ensure(name, busy=set())
            if pin:
                self._cache[name].pinned = True
            e = self._cache[name]
            return {
                "name": name,
                "kind": e.kind,
                "loaded": True,
                "pinned": e.pinned,
                "rank": e.rank,
                "source": e.source,
            }

    def unload(self, name: str) -> None:
        """Drop adapter ``name`` from the cache (it stays registered and reloads on demand)."""
        with self._lock:
            if name in self._bundle_of:
                raise ValueError(f"adapter {name!r} belongs to bundle {self._bundle_of[name]!r}; use remove_bundle")
            if name not in self._cache:
                if self.known(name):
                    return
                raise UnknownAdapterError(f"unknown adapter {name!r}; loaded: {sorted(self._cache)}")
            self._evict(name)

    def pin(self, name: str, pinned: bool = True) -> None:
        """Pin (or unpin) a loaded adapter: pinned adapters are never evicted by the LRU."""
        with self._lock:
            if name in self._bundle_of:
                return
            if name not in self._cache:
                self._ensure(name, busy=set())
            self._cache[name].pinned = pinned

    def loaded(self) -> list[str]:
        """Cached adapter names, least recently used first."""
        return list(self._cache)

    def _evict(self, name: str) -> None:
        e = self._cache.pop(name)
        if e.kind == "lora" and e.slot is not None:
            self.router.clear_slot(e.slot)
        elif e.kind == "shira":
            self.router.remove_shira(name)
        self.stats["evictions"] += 1
        logger.debug("evicted adapter %s", name)

    def _free_slot(self, busy: set[str]) -> int:
        used = {e.slot for e in self._cache.values() if e.slot is not None}
        free = [s for s in range(self.capacity) if s not in used]
        if len(self._cache) < self.capacity and free:
            return free[0]
        for victim, e in self._cache.items():  # least recently used first
            if not e.pinned and victim not in busy:
                slot = e.slot
                self._evict(victim)
                if slot is not None:
                    return slot
                used = {x.slot for x in self._cache.values() if x.slot is not None}
                return next(s for s in range(self.capacity) if s not in used)
        raise RuntimeError(
            f"the adapter cache is full ({self.capacity} slots, all pinned or in the current batch); "
            f"unpin or unload an adapter, or raise capacity"
        )

    def _ensure(self, name: str, busy: set[str]) -> RowSpec:
        """The row spec of adapter ``name``, loading it (and evicting the LRU) when needed."""
        if name in self._bundle_of:
            key = self._bundle_of[name]
            return RowSpec("bundle", (key, self._bundles[key].names[name]))
        if name in self._cache:
            self._cache.move_to_end(name)
            e = self._cache[name]
            return RowSpec("lora", e.slot) if e.kind == "lora" else RowSpec("shira", name)
        source = self._source_of(name)
        try:
            kind, payload, desc = self._read(name, source)
        except (ValueError, FileNotFoundError, KeyError, RuntimeError):
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. SafetensorError on a corrupted or truncated file
            raise ValueError(
                f"adapter {name!r}: cannot read {self._describe(source)} ({type(exc).__name__}: {exc}); "
                f"corrupted or truncated file?"
            ) from None
        slot = self._free_slot(busy)
        if kind == "lora":
            self.router.write_lora(slot, payload)
            rank = max(int(a.shape[0]) for _, a in payload.values())
        else:
            self.router.add_shira(name, payload)
            rank = 0
        self._cache[name] = _Entry(name, kind, slot, rank, len(payload), desc)
        self.stats["loads"] += 1
        logger.info("loaded adapter %s (%s, %d modules) from %s", name, kind, len(payload), desc)
        return RowSpec("lora", slot) if kind == "lora" else RowSpec("shira", name)

    def _source_of(self, name: str) -> Any:
        if name in self._sources:
            return self._sources[name]
        if self.registry is not None and self.known(name):
            return f"hub:{name}"
        raise UnknownAdapterError(
            f"unknown adapter {name!r}; known: {sorted(set(self._sources) | set(self._cache) | set(self._bundle_of))[:20]}"
            + (" (and the registry)" if self.registry is not None else "")
        )

    # -- owning the model ---------------------------------------------------------------------

    def _claim(self) -> None:
        """Install this server's layer wrappers in the model (call under ``self._lock``); see
        :func:`~adapterlab.serving.sharing.claim`."""
        claim(self.model, self.router)

    # -- reading adapters ---------------------------------------------------------------------

    def _base_fingerprint(self) -> dict[str, Any]:
        """``adapterlab.io.base_fingerprint`` of the plain base (wrappers swapped out, SHiRA unfused)."""
        with self._lock:
            if self._fingerprint is None:
                self._fingerprint = self._plain_fingerprint()
            return self._fingerprint

    def _plain_fingerprint(self) -> dict[str, Any]:
        """Fingerprint with every wrapper swapped for its plain layer (call under ``self._lock``)."""
        from adapterlab.io import base_fingerprint

        self._claim()  # nobody else's wrappers or fused entries are left in the model
        self.router.unfuse()
        for mod, wrapper in self.router.wrappers.items():
            set_child(self.model, mod, wrapper.base_layer)
        try:
            return base_fingerprint(self.model)
        finally:
            for mod, wrapper in self.router.wrappers.items():
                set_child(self.model, mod, wrapper)

    def _hub_folder(self, name: str, ref: str) -> Path:
        """The verified registry folder of ``ref``; refuses an adapter recorded for another base."""
        registry = self.registry
        if registry is None:
            from adapterlab.registry import AdapterRegistry  # type: ignore[attr-defined]

            registry = AdapterRegistry(os.environ.get("ADAPTERLAB_HUB", "hub"))
        try:
            folder = Path(registry.get(ref))
        except (KeyError, FileNotFoundError, LookupError) as exc:
            msg = exc.args[0] if exc.args else exc
            raise UnknownAdapterError(f"adapter {name!r}: {msg}") from None
        if self.check_base:
            registry.check_base(ref, fingerprint=self._base_fingerprint())
        return folder

    def _read(self, name: str, source: Any) -> tuple[str, dict[str, tuple[Tensor, Tensor]], str]:
        """Read one adapter into ``(kind, {module: tensors}, description)`` and validate it."""
        from adapterlab.adapters import LoraSource, resolve_adapter

        desc = self._describe(source)
        if isinstance(source, Mapping):  # in-memory {module: (B, A)}
            factors = {m: (b.float(), a.float()) for m, (b, a) in source.items()}
            return "lora", self._check_lora(name, factors), "memory"
        if isinstance(source, (str, os.PathLike)):
            text = os.fspath(source)
            folder = self._hub_folder(name, text[4:]) if text.startswith("hub:") else Path(text).expanduser()
            cfg_path = folder / "adapter_config.json"
            if not cfg_path.is_file():
                raise FileNotFoundError(f"adapter {name!r}: {str(folder)!r} is not a PEFT adapter folder")
            try:  # the one validated config reader: JSON object, known fields with sane values
                config, _ = read_adapter_config(cfg_path)
            except ValueError as exc:
                raise ValueError(f"adapter {name!r}: {exc}") from None
            peft_type = str(config.get("peft_type", "")).upper()
            if "SHIRA" in peft_type:
                return "shira", self._read_shira(name, folder, config), desc
            if peft_type != "LORA":
                raise ValueError(
                    f"adapter {name!r}: peft_type {config.get('peft_type')!r} cannot be served; "
                    f"supported: LORA, SHIRA (and shared-basis bundles via add_bundle)"
                )
            source = resolve_adapter(folder, name=name, where=f"adapter {name!r}")
        elif not isinstance(source, LoraSource):
            source = resolve_adapter(source, name=name, where=f"adapter {name!r}")
        factors = {}
        for mod, info in source.modules.items():
            if info.embedding:
                raise ValueError(f"adapter {name!r}: module {mod!r} is an embedding; only linear layers can be served")
            factors[mod] = source.factors(mod)
        return "lora", self._check_lora(name, factors), desc

    def _target(self, name: str, mod: str, shape: tuple[int, int] | None) -> MultiAdapterLinear:
        try:
            module = self.model.get_submodule(mod)
        except AttributeError:
            raise ValueError(f"adapter {name!r}: the base model has no module {mod!r}") from None
        inner = module.base_layer if isinstance(module, MultiAdapterLinear) else module
        if not isinstance(inner, nn.Linear):
            raise ValueError(f"adapter {name!r}: module {mod!r} is a {type(inner).__name__}, not a linear layer")
        have = (int(inner.out_features), int(inner.in_features))
        if shape is not None and tuple(shape) != have:
            raise ValueError(
                f"adapter {name!r}: module {mod!r} has delta shape {list(shape)} but the base weight is {list(have)} "
                f"(an adapter for a different base?)"
            )
        with self._lock:
            self._claim()
            return wrap_linear(self.model, mod, self.router)

    def _check_lora(self, name: str, factors: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
        if not factors:
            raise ValueError(f"adapter {name!r} holds no LoRA modules")
        for mod, (b, a) in factors.items():
            if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
                raise ValueError(f"adapter {name!r}: module {mod!r} has factors {list(b.shape)} x {list(a.shape)}")
            _check_finite(name, f"{mod}.lora_B", b)
            _check_finite(name, f"{mod}.lora_A", a)
            self._target(name, mod, (int(b.shape[0]), int(a.shape[1])))
        return factors

    def _read_shira(self, name: str, folder: Path, config: Mapping[str, Any]) -> dict[str, tuple[Tensor, Tensor]]:
        from adapterlab.io import load_tensors

        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"adapter {name!r}: {str(folder)!r} has no adapter_model.safetensors")
        tensors = load_tensors(weights)
        parts: dict[str, dict[str, Tensor]] = {}
        for key, t in tensors.items():
            m = _SHIRA_KEY.fullmatch(key)
            if m is None:
                raise ValueError(f"adapter {name!r}: unexpected tensor {key!r} in a SHiRA adapter")
            if m["kind"] in ("values", "weight", "indices"):  # other entries (e.g. dims) are metadata
                parts.setdefault(m["mod"], {})["indices" if m["kind"] == "indices" else "values"] = t
        scale = (
            float(config.get("scaling", 1.0) or 1.0) if isinstance(config.get("scaling", 1.0), (int, float)) else 1.0
        )
        entries: dict[str, tuple[Tensor, Tensor]] = {}
        for mod, kinds in parts.items():
            if "indices" not in kinds or "values" not in kinds:
                raise ValueError(f"adapter {name!r}: module {mod!r} lacks SHiRA values or indices")
            values, idx = kinds["values"].float().reshape(-1) * scale, kinds["indices"].long()
            _check_finite(name, f"{mod}.values", values)
            wrapper = self._target(name, mod, None)
            d_out, d_in = wrapper.out_features, wrapper.in_features
            flat = idx[0] * d_in + idx[1] if idx.dim() == 2 and idx.shape[0] == 2 else idx.reshape(-1)
            if flat.numel() != values.numel():
                raise ValueError(
                    f"adapter {name!r}: module {mod!r} has {flat.numel()} indices for {values.numel()} values"
                )
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= d_out * d_in):
                raise ValueError(f"adapter {name!r}: module {mod!r} has indices outside its {d_out}x{d_in} weight")
            entries[mod] = (flat, values)
        if not entries:
            raise ValueError(f"adapter {name!r} holds no SHiRA tensors")
        return entries

    # -- shared-basis bundles -----------------------------------------------------------------

    def add_bundle(self, bundle: Any, *, key: str | None = None, prefix: str = "") -> list[str]:
        """Serve every adapter of a shared-basis bundle (object, folder, or ``hub:REF`` of a bundle).

        Returns the served adapter names (``prefix + name``).
        """
        from adapterlab.compression import SharedBasisBundle

        source = "memory"
        if isinstance(bundle, (str, os.PathLike)):
            text = os.fspath(bundle)
            if text.startswith("hub:"):
                registry = self.registry
                if registry is None:
                    from adapterlab.registry import AdapterRegistry  # type: ignore[attr-defined]

                    registry = AdapterRegistry(os.environ.get("ADAPTERLAB_HUB", "hub"))
                path = Path(registry.get_bundle(text[4:]))
            else:
                path = Path(text).expanduser()
            bundle, source = SharedBasisBundle.load(path), text
        if not isinstance(bundle, SharedBasisBundle):
            raise ValueError(
                f"add_bundle: expected a SharedBasisBundle, a bundle folder or 'hub:REF', got {type(bundle).__name__}"
            )
        key = key or (Path(source).name if source != "memory" else f"bundle{len(self._bundles)}")
        with self._lock:
            if key in self._bundles:
                raise ValueError(f"bundle key {key!r} is already served; give another key or remove_bundle({key!r})")
            names = {prefix + n: i for i, n in enumerate(bundle.names)}
            clash = [n for n in names if n in self._bundle_of or n in self._sources or n in self._cache]
            if clash:
                raise ValueError(f"bundle {key!r}: adapter names {clash[:5]} are already served; pass prefix=")
            for n in names:
                self._check_name(n)
            tensors = {}
            for mod in bundle.module_names:
                if mod in bundle.embeddings:
                    raise ValueError(
                        f"bundle {key!r}: module {mod!r} is an embedding; only linear layers can be served"
                    )
                U, V, cores, group = bundle.factors(mod)
                _check_finite(key, f"{mod}.cores", cores)
                self._target(f"{key}", mod, (int(U.shape[1]), int(V.shape[2])))
                tensors[mod] = (U, V, cores, group)
            self.router.add_bundle(key, tensors)
            self._bundles[key] = _Bundle(key, names, bundle.mode, bundle.rank, len(tensors), source, bundle.storage())
            for n in names:
                self._bundle_of[n] = key
            return list(names)

    def remove_bundle(self, key: str) -> None:
        with self._lock:
            if key not in self._bundles:
                raise UnknownAdapterError(f"unknown bundle {key!r}; served bundles: {sorted(self._bundles)}")
            for n in self._bundles.pop(key).names:
                self._bundle_of.pop(n, None)
            self.router.remove_bundle(key)

    # -- running a batch ----------------------------------------------------------------------

    def _specs(self, names: Sequence[str | None]) -> list[RowSpec | None]:
        busy = {n for n in names if n is not None}
        distinct = [n for n in dict.fromkeys(names) if n is not None and n not in self._bundle_of]
        if len(distinct) > self.capacity:
            raise ValueError(
                f"a batch uses {len(distinct)} distinct cached adapters but capacity is {self.capacity}; "
                f"raise capacity or split the batch"
            )
        specs: dict[str, RowSpec] = {}
        for n in dict.fromkeys(names):
            if n is not None:
                specs[n] = self._ensure(n, busy)
        return [None if n is None else specs[n] for n in names]

    @torch.no_grad()
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        adapters: Sequence[str | None] | None = None,
        *,
        reference: bool = False,
    ) -> Tensor:
        """Logits ``[B, T, vocab]`` of one batch where row b uses ``adapters[b]`` (None = base).

        ``reference=True`` runs the plain per-row loop of :func:`reference_delta` instead of the kernels.
        """
        B = input_ids.shape[0]
        names = list(adapters) if adapters is not None else [None] * B
        if len(names) != B:
            raise ValueError(f"adapters has {len(names)} entries for a batch of {B} rows")
        with self._lock:
            self.router.set_batch(self._specs(names))
            self._claim()
            self.router.reference = reference
            try:
                return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            finally:
                self.router.reference = False
                self.router.clear_batch()

    # -- validating and running requests ----------------------------------------------------

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass tokenizer= or give token ids")
            with self._tok_lock:
                ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            if not ids:
                raise ValueError("the prompt tokenizes to nothing")
            return list(ids)
        ids = list(prompt)
        check_token_ids(ids, vocab_size_of(self.model))
        return ids

    def check(self, request: Request | Mapping[str, Any]) -> Request:
        """Validate one request before it is queued or batched; return it with its prompt as token ids.

        Checks that the adapter is known, every token id is in the vocabulary, and that prompt +
        ``max_new_tokens`` fits in :attr:`context_length`, so a bad request is refused on its own
        instead of failing the batch it would have joined.

        Args:
            request: a :class:`Request` or its fields as a mapping.

        Returns:
            The request with ``prompt`` tokenized (the text is encoded once, here).

        Raises:
            UnknownAdapterError: the adapter is not served (HTTP 404).
            ValueError: a bad prompt, token id, ``max_new_tokens`` or context overflow (HTTP 400),
                naming the bad value and what is allowed.
        """
        if isinstance(request, Request):
            req = request
        elif isinstance(request, Mapping):
            unknown = sorted(set(request) - {"prompt", "adapter", "max_new_tokens"})
            if unknown or "prompt" not in request:
                raise ValueError(
                    f"request fields {sorted(request)} are invalid; give 'prompt' and optionally "
                    f"'adapter' and 'max_new_tokens'"
                )
            req = Request(**dict(request))
        else:
            raise ValueError(f"a request must be a Request or a mapping, got {type(request).__name__}")
        if req.adapter is not None and not self.known(req.adapter):
            self._source_of(req.adapter)  # raises UnknownAdapterError naming the known adapters
        ids = self._encode(req.prompt)
        check_context(len(ids), req.max_new_tokens, self.context_length)
        return req if req.prompt is ids else Request(ids, req.adapter, req.max_new_tokens)

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for cand in (
            getattr(tok, "pad_token_id", None),
            getattr(tok, "eos_token_id", None),
            getattr(self.model.config, "pad_token_id", None),
            getattr(self.model.config, "eos_token_id", None),
        ):
            if isinstance(cand, int):
                return cand
            if isinstance(cand, (list, tuple)) and cand:
                return int(cand[0])
        return 0

    def _eos_ids(self) -> set[int]:
        out: set[int] = set()
        for cand in (getattr(self.tokenizer, "eos_token_id", None), getattr(self.model.config, "eos_token_id", None)):
            if isinstance(cand, int):
                out.add(cand)
            elif isinstance(cand, (list, tuple)):
                out.update(int(c) for c in cand)
        return out

    @overload
    def generate(
        self,
        requests: Iterable[Request | Mapping[str, Any]],
        *,
        return_exceptions: Literal[False] = False,
        on_step: StepHook | None = None,
    ) -> list[Completion]: ...

    @overload
    def generate(
        self,
        requests: Iterable[Request | Mapping[str, Any]],
        *,
        return_exceptions: Literal[True],
        on_step: StepHook | None = None,
    ) -> list[Completion | Exception]: ...

    @torch.no_grad()
    def generate(
        self,
        requests: Iterable[Request | Mapping[str, Any]],
        *,
        return_exceptions: bool = False,
        on_step: StepHook | None = None,
    ) -> list[Completion] | list[Completion | Exception]:
        """Greedy completions; every request names its own adapter. Order is kept.

        Every request is validated first (:meth:`check`). Requests are run ``max_batch_size`` at a
        time (and so that each forward needs at most ``capacity`` distinct cached adapters); each
        forward is one batched call.

        Args:
            requests: :class:`Request` objects or their fields as mappings.
            return_exceptions: False: the first bad request raises. True: a bad request's slot holds
                its exception and the others still run; a batch that fails is split in halves and
                retried, so a request that fails inside a batch fails only itself.
            on_step: a :data:`StepHook` told every new token as it is decided (streaming) and able
                to end a row early (stop sequences, a client gone); it never changes the tokens of
                the rows it does not stop.

        Returns:
            One :class:`Completion` (or, with ``return_exceptions``, exception) per request.
        """
        reqs = list(requests)
        out: list[Completion | Exception | None] = [None] * len(reqs)
        todo: list[tuple[int, Request]] = []
        for i, r in enumerate(reqs):
            try:
                todo.append((i, self.check(r)))
            except Exception as exc:  # noqa: BLE001 - reported in the request's slot
                if not return_exceptions:
                    raise
                out[i] = exc
        chunk: list[tuple[int, Request]] = []
        distinct: set[str] = set()
        for i, r in todo:
            cached = r.adapter is not None and r.adapter not in self._bundle_of
            grows = cached and r.adapter not in distinct
            if chunk and (len(chunk) >= self.max_batch_size or (grows and len(distinct) >= self.capacity)):
                self._run_chunk(chunk, out, return_exceptions, on_step)
                chunk, distinct = [], set()
            chunk.append((i, r))
            if cached:
                distinct.add(r.adapter)  # type: ignore[arg-type]
        if chunk:
            self._run_chunk(chunk, out, return_exceptions, on_step)
        return out  # type: ignore[return-value]

    def _run_chunk(
        self,
        chunk: list[tuple[int, Request]],
        out: list[Completion | Exception | None],
        isolate: bool,
        on_step: StepHook | None = None,
    ) -> None:
        """Run one batch into ``out``; with ``isolate``, a failing batch is retried in halves."""
        try:
            results = self._generate_batch([r for _, r in chunk], [i for i, _ in chunk], on_step)
        except Exception as exc:  # noqa: BLE001 - isolated below, or raised
            if not isolate:
                raise
            if len(chunk) == 1:
                logger.info(
                    "request failed alone: %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else ""
                )
                out[chunk[0][0]] = exc
                return
            logger.info("a batch of %d requests failed (%s); retrying it in halves", len(chunk), type(exc).__name__)
            half = len(chunk) // 2
            self._run_chunk(chunk[:half], out, isolate, on_step)
            self._run_chunk(chunk[half:], out, isolate, on_step)
            return
        for (i, _), res in zip(chunk, results):
            out[i] = res

    def _generate_batch(
        self, reqs: list[Request], indices: Sequence[int] = (), on_step: StepHook | None = None
    ) -> list[Completion]:
        prompts = [self._encode(r.prompt) for r in reqs]
        L = max(len(p) for p in prompts)
        pad = self._pad_id()
        device = self.router.device
        ids = torch.full((len(reqs), L), pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), L), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding: one copy per request
            ids[b, L - len(p) :] = torch.tensor(p)
            mask[b, L - len(p) :] = 1
        n_new = max(r.max_new_tokens for r in reqs)
        eos = self._eos_ids()
        criteria = None
        if on_step is not None:
            from transformers import StoppingCriteriaList

            limits = torch.tensor([r.max_new_tokens for r in reqs])  # [B]
            criteria = _StepCriteria(on_step, indices, L, limits, torch.tensor(sorted(eos), dtype=torch.long))
        with self._lock:
            self.router.set_batch(self._specs([r.adapter for r in reqs]))
            self._claim()
            try:
                seq = self.model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=n_new,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad,
                    eos_token_id=sorted(eos) or None,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    stopping_criteria=StoppingCriteriaList([criteria]) if criteria is not None else None,
                )
            finally:
                self.router.clear_batch()
            self.stats["batches"] += 1
            self.stats["requests"] += len(reqs)
        new = seq[:, L:].cpu()  # [B, n] generated ids (n <= n_new: generate stops once every row hit EOS)
        limit = torch.tensor([r.max_new_tokens for r in reqs]).clamp_(max=new.shape[1])  # [B]
        if criteria is not None:
            limit = torch.minimum(limit, criteria.end)  # rows the hook stopped end there
        inside = torch.arange(new.shape[1])[None, :] < limit[:, None]  # [B, n]: within the request's budget
        is_eos = (
            inside & torch.isin(new, torch.tensor(sorted(eos), dtype=new.dtype)) if eos else torch.zeros_like(inside)
        )
        stopped = is_eos.any(1)  # [B]
        keep = torch.where(stopped, is_eos.int().argmax(1), limit).tolist()  # first EOS, else the budget
        if criteria is not None:
            stopped |= criteria.stopped  # ended by on_step: finish_reason "stop" too
        rows = new.tolist()
        results = []
        for b, (r, p) in enumerate(zip(reqs, prompts)):
            toks = rows[b][: keep[b]]
            if self.tokenizer is not None:
                with self._tok_lock:
                    text = self.tokenizer.decode(toks, skip_special_tokens=True)
            else:
                text = None
            results.append(Completion(r.adapter, toks, text, len(p), "stop" if bool(stopped[b]) else "length"))
        return results

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens`` (special tokens skipped), as :meth:`generate` decodes a completion."""
        if self.tokenizer is None:
            raise ValueError("decoding text needs a tokenizer; pass tokenizer= to AdapterServer")
        with self._tok_lock:
            return str(self.tokenizer.decode(list(tokens), skip_special_tokens=True))

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of a chat (``[{"role", "content"}, ...]``) through the tokenizer's chat template,
        ending with the assistant's generation prompt.

        Raises:
            ValueError: no tokenizer, no chat template, or a template that refuses the messages.
        """
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError(
                "the served tokenizer has no chat template; use /v1/completions with a prompt, or serve a model "
                "whose tokenizer defines one (tokenizer_config.json or chat_template.jinja)"
            )
        with self._tok_lock:
            try:
                out = tok.apply_chat_template(
                    [dict(m) for m in messages], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            except Exception as exc:  # noqa: BLE001 - jinja's TemplateError and kin: the template refused them
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ValueError(f"the chat template refused the messages: {first}") from None
        ids = out["input_ids"] if isinstance(out, Mapping) else out
        if not ids:
            raise ValueError("the chat template produced an empty prompt")
        return [int(t) for t in ids]

    def close(self) -> None:
        """Restore any SHiRA adapter fused into the base weights."""
        with self._lock:
            self.router.unfuse()
