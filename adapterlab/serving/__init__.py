"""Serving many adapters on one base: batched generation where every request names its adapter.

``AdapterServer`` loads the base once and keeps adapters in an LRU cache (pinning, hot swap); a
mixed batch runs as one forward through :class:`MultiAdapterLinear` layers (grouped LoRA, shared
basis, SHiRA fused switching). ``adapterlab.serving.http.ServingHTTP`` puts it behind a small HTTP API.
"""

from __future__ import annotations

from adapterlab.serving.layer import MultiAdapterLinear, reference_delta
from adapterlab.serving.router import BatchRouter, RowSpec
from adapterlab.serving.server import AdapterServer, Completion, Request, UnknownAdapterError

__all__ = [
    "AdapterServer",
    "BatchRouter",
    "Completion",
    "MultiAdapterLinear",
    "Request",
    "RowSpec",
    "UnknownAdapterError",
    "reference_delta",
]
