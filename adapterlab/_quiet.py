"""Two narrowly targeted filters for third-party noise that users cannot act on.

Both are installed by ``adapterlab/__init__.py`` before anything in adapterlab imports peft,
transformers or bitsandbytes (every ``adapterlab.*`` import runs the package ``__init__`` first),
so they cover the CLI, the library and the examples alike. Neither touches any other logger or
warning.

1. **bitsandbytes' missing ``kernels`` notice.** ``import bitsandbytes`` (which ``import peft``
   does, so every adapterlab command that touches an adapter triggers it) runs
   ``bitsandbytes/backends/cpu/ops.py``; on a CPU with AVX512-BF16 that module tries
   ``from kernels import get_kernel`` for an optional fast 4-bit CPU kernel and, when the optional
   ``kernels`` package is not installed, calls
   ``logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. ...", exc)``
   on the ``bitsandbytes.backends.cpu.ops`` logger. With no logging configured Python's
   last-resort handler prints it to stderr on every run. :class:`MissingKernelsNotice` sits on
   that one logger (created ahead of bitsandbytes, which then gets the same object from
   ``logging.getLogger(__name__)``) and demotes exactly that record to DEBUG when the cause is
   ``ModuleNotFoundError`` for ``kernels``: it still shows under ``--verbose`` / a DEBUG logging
   setup, and any other failure of that kernel load (``kernels`` installed but broken) keeps its
   WARNING.
2. **transformers' ``is_gradient_checkpointing`` FutureWarning.** transformers 5 deprecated the
   ``PreTrainedModel.is_gradient_checkpointing`` property (use ``is_activation_checkpointing``);
   peft 0.21 reads it in ``PeftModel.__init__`` (``getattr(model, "is_gradient_checkpointing",
   True)``), so every ``get_peft_model`` / ``PeftModel.from_pretrained`` warns, and trl reads it in
   ``trl.models.utils``. adapterlab itself never reads it, so there is no call of ours to move to the
   new API. :func:`install` adds one ``warnings`` filter for that exact message, category and
   module (``transformers.modeling_utils``, where ``warnings.warn`` is called), **appended** to the
   filter list: ``python -W ...``, ``PYTHONWARNINGS``, pytest's settings and any filter the user
   installs take precedence over it.
"""

from __future__ import annotations

import logging
import warnings

#: The logger bitsandbytes' CPU backend warns on (``logging.getLogger(__name__)`` in its ``ops.py``).
BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
#: The start of the message bitsandbytes logs when its optional CPU kernel cannot be loaded.
BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
#: The regex for transformers' deprecation of ``PreTrainedModel.is_gradient_checkpointing``.
GRADIENT_CHECKPOINTING_MESSAGE = r"`is_gradient_checkpointing` is deprecated"
GRADIENT_CHECKPOINTING_MODULE = r"transformers\.modeling_utils"


class MissingKernelsNotice(logging.Filter):
    """Demote bitsandbytes' "optional ``kernels`` package is not installed" warning to DEBUG.

    Only a record whose message starts with :data:`BNB_KERNELS_MESSAGE` and whose argument is a
    ``ModuleNotFoundError`` for the ``kernels`` package is changed; everything else passes as is.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Return False to drop the demoted record unless its logger is enabled for DEBUG.

        Args:
            record: the log record bitsandbytes emitted.

        Returns:
            Whether the record goes on to the handlers.
        """
        if not _is_missing_kernels_notice(record):
            return True
        record.levelno = logging.DEBUG
        record.levelname = logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def _is_missing_kernels_notice(record: logging.LogRecord) -> bool:
    if not (isinstance(record.msg, str) and record.msg.startswith(BNB_KERNELS_MESSAGE)):
        return False
    args = record.args if isinstance(record.args, tuple) else ()
    exc = args[0] if args else None
    return isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "kernels"


def install() -> None:
    """Install both filters; idempotent, and cheap (imports nothing beyond ``logging`` and ``warnings``)."""
    logger = logging.getLogger(BNB_CPU_OPS_LOGGER)
    if not any(isinstance(f, MissingKernelsNotice) for f in logger.filters):
        logger.addFilter(MissingKernelsNotice())
    # ``filterwarnings(..., append=True)`` does not add a filter that is already in the list.
    warnings.filterwarnings(
        "ignore",
        message=GRADIENT_CHECKPOINTING_MESSAGE,
        category=FutureWarning,
        module=GRADIENT_CHECKPOINTING_MODULE,
        append=True,
    )
