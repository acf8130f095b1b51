"""Shared-basis compression of many LoRA adapters (Compress then Serve, arXiv 2407.00066).

``compress_adapters(adapters, rank=c, mode="full"|"diagonal", clusters=K)`` returns a
:class:`SharedBasisBundle`: per module shared bases ``U [G, d_out, c]``, ``V [G, c, d_in]`` and one
small core per adapter, fitted in factor form; ``project`` adds adapters without refitting, ``export``
writes one adapter as a PEFT LoRA folder, ``save`` / ``SharedBasisBundle.load`` persist the bundle.
"""

from __future__ import annotations

from adapterlab.compression.shared_basis import MODES, CompressionErrors, SharedBasisBundle, compress_adapters

__all__ = ["MODES", "CompressionErrors", "SharedBasisBundle", "compress_adapters"]
