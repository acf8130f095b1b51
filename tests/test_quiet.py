"""``adapterlab._quiet``: bitsandbytes' missing-``kernels`` notice and transformers'
``is_gradient_checkpointing`` FutureWarning are gone, and nothing else is filtered."""

from __future__ import annotations

import logging
import warnings

import pytest

from adapterlab import _quiet
from tests.test_lazy_import import run_fresh

KERNELS_NEEDLE = "kernels-community"
GC_NEEDLE = "is_gradient_checkpointing"
GC_MESSAGE = (
    "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` instead."
)


def _record(msg: str, exc: BaseException | None, name: str = _quiet.BNB_CPU_OPS_LOGGER) -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, "ops.py", 253, msg, (exc,) if exc is not None else None, None)


def _missing_kernels() -> ModuleNotFoundError:
    return ModuleNotFoundError("No module named 'kernels'", name="kernels")


def test_kernels_notice_is_demoted_to_debug_and_dropped_unless_debug_is_on() -> None:
    notice = _quiet.MissingKernelsNotice()
    msg = _quiet.BNB_KERNELS_MESSAGE + ": %s. Please make sure you already `pip install kernels`"
    logger = logging.getLogger(_quiet.BNB_CPU_OPS_LOGGER)
    old = logger.level
    try:
        logger.setLevel(logging.WARNING)
        rec = _record(msg, _missing_kernels())
        assert notice.filter(rec) is False and rec.levelno == logging.DEBUG and rec.levelname == "DEBUG"
        logger.setLevel(logging.DEBUG)
        rec = _record(msg, _missing_kernels())
        assert notice.filter(rec) is True and rec.levelname == "DEBUG"
    finally:
        logger.setLevel(old)


@pytest.mark.parametrize(
    "msg, exc",
    [
        # kernels installed but its download / load failed: a real problem, keeps its WARNING
        (_quiet.BNB_KERNELS_MESSAGE + ": %s.", RuntimeError("hub offline")),
        (
            _quiet.BNB_KERNELS_MESSAGE + ": %s.",
            ModuleNotFoundError("No module named 'huggingface_hub'", name="huggingface_hub"),
        ),
        # any other bitsandbytes warning on that logger
        ("Something else: %s", ModuleNotFoundError("No module named 'kernels'", name="kernels")),
    ],
)
def test_other_records_pass_untouched(msg: str, exc: BaseException) -> None:
    rec = _record(msg, exc)
    assert _quiet.MissingKernelsNotice().filter(rec) is True and rec.levelno == logging.WARNING


def test_install_is_idempotent_and_targets_one_logger() -> None:
    with warnings.catch_warnings():
        _quiet.install()
        _quiet.install()
        n_filters = len(warnings.filters)
        _quiet.install()
        assert len(warnings.filters) == n_filters
    bnb = logging.getLogger(_quiet.BNB_CPU_OPS_LOGGER)
    assert sum(isinstance(f, _quiet.MissingKernelsNotice) for f in bnb.filters) == 1
    for name in ("", "bitsandbytes", "transformers", "peft", "adapterlab"):
        assert not any(isinstance(f, _quiet.MissingKernelsNotice) for f in logging.getLogger(name).filters)


def _warn(message: str, module: str, category: type[Warning] = FutureWarning) -> None:
    warnings.warn_explicit(message, category, "modeling_utils.py", 3312, module=module)


def test_warning_filter_drops_only_that_message_from_transformers() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # no filters but ours: everything else gets the "default" action (shown)
        _quiet.install()
        _warn(GC_MESSAGE, "transformers.modeling_utils")
        _warn("`other_attr` is deprecated", "transformers.modeling_utils")
        _warn(GC_MESSAGE, "my_code")
        _warn(GC_MESSAGE, "transformers.modeling_utils", DeprecationWarning)
    got = [(str(w.message), w.category) for w in caught]
    assert got == [
        ("`other_attr` is deprecated", FutureWarning),
        (GC_MESSAGE, FutureWarning),
        (GC_MESSAGE, DeprecationWarning),
    ]


def test_a_user_filter_wins_over_ours() -> None:
    with warnings.catch_warnings():
        warnings.resetwarnings()
        _quiet.install()
        warnings.simplefilter("error", FutureWarning)  # what ``python -W error::FutureWarning`` does
        with pytest.raises(FutureWarning, match="is_gradient_checkpointing"):
            _warn(GC_MESSAGE, "transformers.modeling_utils")


_NOISY = """
import torch
torch.set_num_threads(1)
{prelude}
import bitsandbytes  # what ``import peft`` does too
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2)
get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj"]))  # reads is_gradient_checkpointing
print("done")
"""


def test_library_use_prints_neither_line_in_a_fresh_process() -> None:
    """The control run (without adapterlab) shows what this machine's stack prints; with
    ``import adapterlab`` first, none of it appears and the run is otherwise the same."""
    control = run_fresh(_NOISY.format(prelude=""))
    assert control.returncode == 0, control.stderr[-3000:]
    noisy = [n for n in (KERNELS_NEEDLE, GC_NEEDLE) if n in control.stderr]
    if not noisy:
        pytest.skip("this machine's bitsandbytes / transformers print neither line (no AVX512-BF16 CPU?)")
    quiet = run_fresh(_NOISY.format(prelude="import adapterlab"))
    assert quiet.returncode == 0 and quiet.stdout.strip() == "done", quiet.stderr[-3000:]
    for needle in noisy:
        assert needle not in quiet.stderr, quiet.stderr[-3000:]


def test_verbose_logging_still_shows_the_kernels_notice_at_debug() -> None:
    proc = run_fresh(
        """
        import logging
        import adapterlab
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s %(message)s")
        import bitsandbytes.functional as F
        print(bool(F.has_avx512bf16()))
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.strip().splitlines()[-1] != "True":
        pytest.skip("bitsandbytes only tries the optional kernel on an AVX512-BF16 CPU")
    lines = [ln for ln in proc.stderr.splitlines() if KERNELS_NEEDLE in ln]
    assert lines and all(ln.startswith(f"DEBUG {_quiet.BNB_CPU_OPS_LOGGER} ") for ln in lines), proc.stderr[-3000:]
