"""adapterlab: adapters for sparse and quantized language models.

Importing this package registers every adapterlab tuner with peft (see ``peft_compat``).
"""

from __future__ import annotations

__version__ = "0.1.0"

from adapterlab.models import load_default_model, load_model, load_tokenizer, tiny_llama
