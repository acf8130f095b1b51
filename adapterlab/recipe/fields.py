"""The checks every recipe value gets before a run uses it, shared by the train and pipeline schemas.

A recipe hands values on to other libraries (``TrainingArguments``, a peft config, a callback, the
registry, the file system) that check them late or not at all: ``max_steps: ten`` is accepted by
``TrainingArguments`` and fails inside the training loop, ``r: -4`` is accepted by ``LoraConfig``
and fails when peft builds the layers, ``put.name: ../../evil`` fails at the registry put after
training. The helpers here make each of those a one-line refusal naming the key path, at schema
time (``--dry-run``):

* :func:`check_values` validates a mapping against the type hints of the fields it will be passed to
  (pydantic, lax mode: ``"10"`` is the integer 10, ``"1e-3"`` the float 0.001, ``"ten"`` is refused)
  and a table of ranges; the errors carry the key as their location, so inside a pydantic validator
  the full path (``steps.1.train.trainer.max_steps``) comes out;
* :func:`dataclass_hints` / :func:`signature_hints` give those hints for a dataclass config or a
  callable's keyword arguments;
* :func:`registry_name` is the registry's own name check (:func:`adapterlab.registry.manifest.check_name`);
* :func:`folder_target` refuses an output or registry root that cannot become a folder.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from adapterlab.staging import folder_problem

__all__ = [
    "ADAPTER_RANGES",
    "TRAINER_RANGES",
    "Range",
    "check_values",
    "dataclass_hints",
    "first_error",
    "folder_target",
    "is_ref",
    "registry_name",
    "signature_hints",
]


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds for a number: ``lo <= x`` (``lo < x`` when not ``lo_inclusive``), likewise ``hi``."""

    lo: float | None = None
    hi: float | None = None
    lo_inclusive: bool = True
    hi_inclusive: bool = True

    def problem(self, value: float) -> str | None:
        if self.lo is not None and (value < self.lo if self.lo_inclusive else value <= self.lo):
            return f"Input should be greater than {'or equal to ' if self.lo_inclusive else ''}{_num(self.lo)}"
        if self.hi is not None and (value > self.hi if self.hi_inclusive else value >= self.hi):
            return f"Input should be less than {'or equal to ' if self.hi_inclusive else ''}{_num(self.hi)}"
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


#: Ranges of ``trainer:`` values that ``TrainingArguments`` takes but torch / the Trainer refuse later.
TRAINER_RANGES: dict[str, Range] = {
    "learning_rate": Range(0.0),
    "weight_decay": Range(0.0),
    "adam_beta1": Range(0.0, 1.0, hi_inclusive=False),
    "adam_beta2": Range(0.0, 1.0, hi_inclusive=False),
    "adam_epsilon": Range(0.0),
    "max_grad_norm": Range(0.0),
    "num_train_epochs": Range(0.0),
    "per_device_train_batch_size": Range(1),
    "per_device_eval_batch_size": Range(1),
    "gradient_accumulation_steps": Range(1),
    "warmup_steps": Range(0.0),
    "warmup_ratio": Range(0.0, 1.0),
    "logging_steps": Range(0.0, lo_inclusive=False),
    "save_steps": Range(0.0, lo_inclusive=False),
    "eval_steps": Range(0.0, lo_inclusive=False),
    "seed": Range(0, 2**32 - 1),
    "data_seed": Range(0, 2**32 - 1),
    "dataloader_num_workers": Range(0),
    "max_length": Range(1),
}

#: Ranges of adapter ``params`` (any method) that peft only checks when it builds the layers.
ADAPTER_RANGES: dict[str, Range] = {
    "r": Range(1),
    "lora_dropout": Range(0.0, 1.0),
}


def is_ref(value: Any) -> bool:
    """A ``${steps.NAME.KEY}`` reference (checked once the step it names has run)."""
    return isinstance(value, str) and "${" in value


def _has_literal(hint: Any) -> bool:
    if typing.get_origin(hint) is Literal:
        return True
    return any(_has_literal(a) for a in typing.get_args(hint))


@functools.lru_cache(maxsize=512)
def _adapter(hint: Any) -> TypeAdapter[Any] | None:
    try:
        return TypeAdapter(hint)
    except Exception:  # noqa: BLE001 - a hint pydantic cannot check is left to the library that takes it
        return None


def dataclass_hints(cls: type) -> dict[str, Any]:
    """``{field: type hint}`` of a dataclass's ``__init__`` fields (empty when the hints do not resolve)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check against
        return {}
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name in hints}


def signature_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """``{keyword: type hint}`` of a callable (a class: its ``__init__``), for the annotated ones."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001
        return {}
    return {k: v for k, v in hints.items() if k not in ("return", "self")}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _error(key: str, value: Any, reason: str) -> InitErrorDetails:
    text = f"{reason} (got {_short(value)})"
    return InitErrorDetails(
        type=PydanticCustomError("recipe_value", "{reason}", {"reason": text}), loc=(key,), input=value
    )


def check_values(
    values: Mapping[str, Any], hints: Mapping[str, Any], ranges: Mapping[str, Range] | None = None
) -> dict[str, Any]:
    """Validate each value against its type hint and range; return the values to pass on.

    A string that parses as the number its hint asks for is replaced by that number (YAML reads
    ``1e-3`` as a string; ``TrainingArguments`` would keep it one). Hints holding a ``Literal`` are
    not checked here (the config's own validation is exact about those), nor keys without a hint,
    nor ``${...}`` references.

    Raises:
        pydantic.ValidationError: one error per bad key, located at the key (inside a pydantic
            validator the location joins the field's path).
    """
    ranges = ranges or {}
    out = dict(values)
    errors: list[InitErrorDetails] = []
    for key, value in values.items():
        hint = hints.get(key)
        if is_ref(value):
            continue
        if hint is not None and not _has_literal(hint):
            try:
                adapter = _adapter(hint)
            except TypeError:  # an unhashable hint
                adapter = None
            if adapter is not None:
                try:
                    checked = adapter.validate_python(value)
                except ValidationError as exc:
                    errors.append(_error(key, value, exc.errors()[0]["msg"]))
                    continue
                if isinstance(value, str) and isinstance(checked, (int, float)) and not isinstance(checked, bool):
                    out[key] = value = checked
        limit = ranges.get(key)
        if limit is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            problem = limit.problem(value)
            if problem is not None:
                errors.append(_error(key, value, problem))
    if errors:
        raise ValidationError.from_exception_data("values", errors)
    return out


def first_error(exc: ValidationError, where: str) -> str:
    """``WHERE.KEY: message`` for the first error of :func:`check_values`."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{where}.{loc}: {err['msg']}" if where else f"{loc}: {err['msg']}"


def registry_name(value: str | None, what: str = "name") -> str | None:
    """The registry's own check of a ref or tag name (None and ``${...}`` pass)."""
    if value is None or is_ref(value):
        return value
    from adapterlab.registry.manifest import check_name

    return check_name(value, what)


def folder_target(value: str | None, what: str = "output") -> str | None:
    """Refuse a path that cannot become (or be written as) a folder: a file, a path under a file, a
    dangling link, or a read-only parent. None and ``${...}`` pass; the folder is not created."""
    if value is None or is_ref(value):
        return value
    problem = folder_problem(value)
    if problem is not None:
        raise ValueError(f"{what} {value!r} {problem}")
    return value
