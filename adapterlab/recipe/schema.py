"""Recipe schema: pydantic v2 models (``extra="forbid"``) for ``adapterlab train`` and ``adapterlab run``.

A *train recipe* (``recipes/train/*.yaml``) is one :class:`TrainRecipe`. A *pipeline*
(``recipes/pipelines/*.yaml``) is a :class:`PipelineRecipe`: a list of steps, each a mapping with
one verb key whose body is exactly what that verb accepts on its own:

============  ==========================================================================
verb          body
============  ==========================================================================
``prune``     :class:`PruneStep` — the options of ``adapterlab prune`` (``model``, ``method`` ...)
``train``     :class:`TrainRecipe` — a train recipe
``perp``      :class:`PerpStep` — PERP retraining of a pruned model folder
``merge``     :class:`MergeStep` — a merge YAML (``adapterlab merge``) plus ``output_dir``
``extract``   :class:`ExtractStep` — the options of ``adapterlab extract``
``compress``  :class:`CompressStep` — the options of ``adapterlab compress``
``put``       :class:`PutStep` — put an adapter folder into the registry
``evaluate``  :class:`EvaluateStep` — task accuracy and / or perplexity of a model (+ adapter)
============  ==========================================================================

A later step refers to an earlier step's result with ``${steps.NAME.KEY}`` (``${NAME}`` is short
for ``${steps.NAME.output}``); the keys each verb produces are in :data:`STEP_OUTPUTS`. A single
step file (``recipes/prune/*.yaml``: ``prune: {...}``) is a one-step pipeline.

Unknown keys are errors whose message names the key path (``steps.1.train.adapter.parms:
unknown key``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapterlab.config import apply_set, format_validation_error, read_yaml_mapping
from adapterlab.jobs.merge import MergeConfig
from adapterlab.recipe.fields import TRAINER_RANGES, check_values, dataclass_hints, folder_target, registry_name

__all__ = [
    "STEP_OUTPUTS",
    "VERBS",
    "AdapterSpec",
    "CompressStep",
    "DataSpec",
    "EvalSpec",
    "EvaluateStep",
    "ExtractStep",
    "HubSpec",
    "MergeStep",
    "PerpStep",
    "PipelineRecipe",
    "PruneSpec",
    "PruneStep",
    "PutStep",
    "StepEntry",
    "TrainRecipe",
    "apply_set",
    "as_pipeline",
    "check_trainer_args",
    "validate",
    "format_validation_error",
    "load_yaml",
]

#: ``${steps.NAME.KEY}`` or ``${NAME}`` inside a string value.
REF_PATTERN = re.compile(r"\$\{\s*([A-Za-z_][\w-]*(?:\.[\w-]+)*)\s*\}")
#: A step name (matched with ``fullmatch``: ``$`` would accept a trailing newline).
_NAME = re.compile(r"[A-Za-z_][\w-]*")

#: A registry ref name / tag (the registry's own check), an output folder, a registry root.
RefName = Annotated[str, AfterValidator(lambda v: registry_name(v, "name"))]
TagName = Annotated[str, AfterValidator(lambda v: registry_name(v, "tag"))]
OutputDir = Annotated[str, AfterValidator(lambda v: folder_target(v, "output"))]
HubRoot = Annotated[str, AfterValidator(lambda v: folder_target(v, "registry root"))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_trainer_args(value: dict[str, Any]) -> dict[str, Any]:
    """Every key must be a field of transformers' ``TrainingArguments`` or trl's ``SFTConfig``, and
    every value of the field's type and range (:func:`~adapterlab.recipe.fields.check_values`:
    ``max_steps: ten`` is refused here, not inside the training loop; ``"1e-3"`` becomes 0.001)."""
    from trl import SFTConfig

    allowed = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
    for key in value:
        if key not in allowed:
            close = [a for a in sorted(allowed) if a.startswith(str(key)[:4])][:6]
            hint = f" (did you mean: {', '.join(close)}?)" if close else ""
            raise ValueError(f"{key}: unknown key (not a TrainingArguments / SFTConfig field){hint}")
    return check_values(value, dataclass_hints(SFTConfig), TRAINER_RANGES)


# ---------------------------------------------------------------------------------------------
# train


class PruneSpec(_Strict):
    """Prune the base in memory before training (``adapterlab prune`` options, no model/output)."""

    method: str = "wanda"
    sparsity: float | None = Field(default=None, ge=0.0, lt=1.0)
    pattern: str | None = None
    scope: str | None = None
    nsamples: int = Field(default=32, ge=1)
    seqlen: int = Field(default=256, ge=2)
    seed: int = Field(default=0, ge=0)
    batch_size: int = Field(default=8, ge=1)
    output: OutputDir | None = None  # also save the pruned base (model folder + masks) here


class AdapterSpec(_Strict):
    """The adapter: a method name (see ``adapterlab.recipe.training.METHODS``) and its config params.

    ``callbacks`` maps names of ``adapterlab.callbacks`` classes to their keyword arguments, e.g.
    ``{LoriCallback: {switch_step: 50}}``; DyLoRA gets its ``DyLoraCallback`` automatically.
    """

    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    callbacks: dict[str, dict[str, Any]] = Field(default_factory=dict)


class DataSpec(_Strict):
    """Training data: a packaged task (``adapterlab.data.task_names()``) and how much of it."""

    task: str
    max_examples: int | None = Field(default=256, ge=1)
    max_length: int = Field(default=256, ge=4)
    seed: int = Field(default=0, ge=0)


class EvalSpec(_Strict):
    """Evaluation after training (and before, with ``zero_shot``): task accuracy on ``split``."""

    n: int | None = Field(default=200, ge=1)
    split: Literal["train", "test"] = "test"
    zero_shot: bool = True
    batch_size: int = Field(default=16, ge=1)


class HubSpec(_Strict):
    """Where the trained adapter goes in the registry (``AdapterRegistry(root).put``)."""

    name: RefName | None = None  # default: the output folder's name
    tags: list[TagName] = Field(default_factory=list)
    root: HubRoot | None = None  # default: $ADAPTERLAB_HUB, else ./hub


class TrainRecipe(_Strict):
    """``adapterlab train RECIPE.yaml``: base (+ optional prune), adapter, data, trainer, eval, output."""

    base: str = "default"
    quantize: Literal[4, 8] | None = None
    prune: PruneSpec | None = None
    adapter: AdapterSpec
    data: DataSpec
    backend: Literal["trainer", "sft"] = "trainer"
    trainer: dict[str, Any] = Field(default_factory=dict)
    eval: EvalSpec | None = Field(default_factory=EvalSpec)
    output: OutputDir
    overwrite: bool = False
    resume: bool | str | None = None
    put: HubSpec | None = Field(default_factory=HubSpec)
    seed: int = Field(default=0, ge=0)

    @field_validator("trainer")
    @classmethod
    def _known_trainer_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_trainer_args(value)


# ---------------------------------------------------------------------------------------------
# the other verbs


class PruneStep(_Strict):
    """``adapterlab prune`` as a step: the same options, by their long names."""

    model: str = "default"
    method: str = "wanda"
    sparsity: float | None = Field(default=None, ge=0.0, lt=1.0)
    pattern: str | None = None
    scope: str | None = None
    nsamples: int = Field(default=128, ge=1)
    seqlen: int = Field(default=512, ge=2)
    seed: int = Field(default=0, ge=0)
    batch_size: int = Field(default=8, ge=1)
    output: OutputDir
    overwrite: bool = False


class PerpStep(_Strict):
    """PERP: retrain a small parameter subset of a pruned model folder (``adapterlab.perp_`` +
    ``adapterlab.retrain.retrain_``) on windows of a packaged corpus, then merge it keeping sparsity."""

    model: str
    scope: str | list[str] = "default"  # preset (default, bias_norm, mask_lora, scale_lora, full) or subsets
    r: int = Field(default=4, ge=1)
    alpha: float = Field(default=8.0, gt=0.0)
    target_modules: list[str] | None = None
    corpus: Literal["wiki", "lee"] = "wiki"
    nsamples: int = Field(default=64, ge=1)
    seqlen: int = Field(default=256, ge=2)
    steps: int = Field(default=60, ge=1)
    lr: float = Field(default=5e-4, gt=0.0)
    batch_size: int = Field(default=2, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    seed: int = Field(default=0, ge=0)
    eval_windows: int | None = Field(default=16, ge=1)
    output: OutputDir
    overwrite: bool = False


class MergeStep(MergeConfig):
    """A merge YAML (``adapterlab merge``: ``method``, ``adapters``, ``params``, ``output`` = the
    output *format* spec) plus ``output_dir``, the folder ``-o`` names."""

    output_dir: OutputDir
    overwrite: bool = False


class ExtractStep(_Strict):
    """``adapterlab extract`` as a step."""

    base: str = "default"
    tuned: str
    output: OutputDir
    rank: int | None = Field(default=None, ge=1)
    energy: float | None = Field(default=None, gt=0.0, le=1.0)
    min_rank: int = Field(default=1, ge=1)
    max_rank: int | None = Field(default=None, ge=1)
    randomized: bool = False
    skip_extras: bool = False
    threshold: float = Field(default=1e-4, ge=0.0)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    overwrite: bool = False

    @model_validator(mode="after")
    def _one_of_rank_energy(self) -> ExtractStep:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of rank and energy")
        return self


class CompressStep(_Strict):
    """``adapterlab compress`` as a step: a shared basis for many LoRA adapters."""

    adapters: list[str] | dict[str, str] = Field(min_length=1)
    rank: int = Field(ge=1)
    mode: Literal["full", "diagonal"] = "full"
    clusters: int | None = Field(default=None, ge=1)
    seed: int = Field(default=0, ge=0)
    output: OutputDir
    overwrite: bool = False
    put: RefName | None = None  # also put the bundle into the registry under this name


class PutStep(_Strict):
    """Put a PEFT adapter folder into the registry."""

    src: str
    name: RefName | None = None  # default: the folder's name
    tags: list[TagName] = Field(default_factory=list)
    base: str | None = None  # model folder (or "default") whose fingerprint is recorded
    root: HubRoot | None = None


class EvaluateStep(_Strict):
    """Task accuracy and / or perplexity of a model folder, optionally with an adapter on it."""

    model: str = "default"
    adapter: str | None = None
    task: str | None = None
    n: int | None = Field(default=200, ge=1)
    split: Literal["train", "test"] = "test"
    corpus: str | None = None
    seqlen: int = Field(default=512, ge=2)
    max_windows: int | None = Field(default=20, ge=1)

    @model_validator(mode="after")
    def _something(self) -> EvaluateStep:
        if self.task is None and self.corpus is None:
            raise ValueError("give a task (accuracy) and / or a corpus (perplexity)")
        return self


VERBS: dict[str, type[BaseModel]] = {
    "prune": PruneStep,
    "train": TrainRecipe,
    "perp": PerpStep,
    "merge": MergeStep,
    "extract": ExtractStep,
    "compress": CompressStep,
    "put": PutStep,
    "evaluate": EvaluateStep,
}

#: What each verb's step produces, for ``${steps.NAME.KEY}``.
STEP_OUTPUTS: dict[str, tuple[str, ...]] = {
    "prune": ("output", "sparsity"),
    "train": ("output", "digest", "ref", "accuracy"),
    "perp": ("output", "perplexity"),
    "merge": ("output",),
    "extract": ("output",),
    "compress": ("output", "digest"),
    "put": ("output", "digest", "ref"),
    "evaluate": ("accuracy", "perplexity"),
}


class StepEntry(_Strict):
    """One pipeline step: an optional ``name`` and exactly one verb key."""

    name: str | None = None
    prune: PruneStep | None = None
    train: TrainRecipe | None = None
    perp: PerpStep | None = None
    merge: MergeStep | None = None
    extract: ExtractStep | None = None
    compress: CompressStep | None = None
    put: PutStep | None = None
    evaluate: EvaluateStep | None = None

    @model_validator(mode="after")
    def _one_verb(self) -> StepEntry:
        given = [v for v in VERBS if getattr(self, v) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a step needs exactly one verb key, got {given or 'none'}; choose one of: {', '.join(VERBS)}"
            )
        if self.name is not None and not _NAME.fullmatch(self.name):
            raise ValueError(f"step name {self.name!r} must be letters, digits, '_' or '-'")
        return self

    @property
    def verb(self) -> str:
        return next(v for v in VERBS if getattr(self, v) is not None)

    @property
    def body(self) -> BaseModel:
        return getattr(self, self.verb)


class PipelineRecipe(_Strict):
    """``adapterlab run RECIPE.yaml``: steps run in order; names default to the verb."""

    description: str | None = None
    steps: list[StepEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> PipelineRecipe:
        seen: set[str] = set()
        for i, step in enumerate(self.steps):
            if step.name is None:
                step.name = step.verb if step.verb not in seen else f"{step.verb}_{i}"
            if step.name in seen:
                raise ValueError(f"steps.{i}.name: {step.name!r} is used by an earlier step")
            seen.add(step.name)
        return self


# ---------------------------------------------------------------------------------------------
# loading


def load_yaml(path: str | Path, sets: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML mapping and apply ``--set a.b=c`` overrides (values parsed as YAML)."""
    raw = read_yaml_mapping(path, kind="recipe")
    for s in sets or []:
        apply_set(raw, s)
    return raw


def validate(model: type[BaseModel], raw: dict[str, Any], source: str) -> Any:
    """``model.model_validate(raw)`` with a one-line error naming ``source`` and the key path."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, source)) from None


def as_pipeline(raw: dict[str, Any], source: str) -> PipelineRecipe:
    """A pipeline from a pipeline mapping (``steps:``) or a single-step mapping (``prune: {...}``)."""
    if "steps" in raw:
        return validate(PipelineRecipe, raw, source)
    keys = [k for k in raw if k in VERBS]
    if len(keys) == 1 and set(raw) <= {keys[0], "name"}:
        try:
            return PipelineRecipe.model_validate({"steps": [raw]})
        except ValidationError as exc:
            msg = format_validation_error(exc, source)
            raise ValueError(msg.replace(f"{source}: steps.0.", f"{source}: ", 1)) from None
    raise ValueError(
        f"{source}: expected 'steps:' (a pipeline) or one verb key ({', '.join(VERBS)}); "
        f"got keys {', '.join(map(str, raw)) or 'none'}"
    )
