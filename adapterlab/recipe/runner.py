"""Pipeline runner for ``adapterlab run``: check every step, then run them in order.

Each verb has one registered :class:`StepRunner` (``@register_step("merge")``) with three parts:
``inputs`` (the path-valued keys it reads), ``check`` (validation that loads no weights) and
``run`` (the work; returns the step's outputs, see :data:`~adapterlab.recipe.schema.STEP_OUTPUTS`).

Before the first step runs, :func:`check_pipeline` validates the whole pipeline: references
``${steps.NAME.KEY}`` point at an earlier step and a key it produces, every input that is not a
reference exists (relative paths: the current folder, then the recipe's folder), every output
folder is free (or ``overwrite``), and each step's own checks pass. A bad pipeline fails with one
line naming the key path and nothing is written.

The prune, merge and extract steps run the same jobs (:mod:`adapterlab.jobs`) as their single-verb
commands.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterlab._named import Registry
from adapterlab.progress import ProgressFactory, _silent
from adapterlab.recipe.fields import folder_target, registry_name
from adapterlab.recipe.schema import (
    REF_PATTERN,
    STEP_OUTPUTS,
    PipelineRecipe,
    StepEntry,
    as_pipeline,
    load_yaml,
    validate,
)

logger = logging.getLogger(__name__)

__all__ = ["PipelineResult", "StepRunner", "check_pipeline", "load_pipeline", "plan", "register_step", "run_pipeline"]


@dataclass
class Context:
    """What a step sees: the recipe's folder, earlier outputs, global switches."""

    source: Path
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    put: bool = True
    progress: ProgressFactory = _silent
    #: The running step, for error messages (``RECIPE: steps.3.merge``).
    where: str = ""


class StepRunner:
    """One verb of a pipeline (subclass, register with :func:`register_step`)."""

    #: Keys (dotted, ``*`` for every list item) whose values are input paths / refs.
    inputs: tuple[str, ...] = ()

    def check(self, body: Any, where: str, ctx: Context, steps: list[StepEntry], index: int) -> None:
        """Validation without loading weights (raise ValueError / FileNotFoundError)."""

    def run(self, body: Any, ctx: Context) -> dict[str, Any]:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} defines no run()")

    def output_of(self, body: Any) -> str | None:
        """The folder this step writes (None: it writes none)."""
        out = getattr(body, "output", None)
        return out if isinstance(out, str) else None

    def describe(self, body: Any) -> str:
        out = self.output_of(body)
        return f"-> {out}" if out else ""


STEPS: Registry[StepRunner] = Registry("pipeline step")


def register_step(name: str) -> Callable[[type[StepRunner]], type[StepRunner]]:
    def deco(cls: type[StepRunner]) -> type[StepRunner]:
        STEPS.register(name)(cls())
        return cls

    return deco


# ---------------------------------------------------------------------------------------------
# references and paths


def _refs(value: str) -> list[str]:
    return [m.group(1) for m in REF_PATTERN.finditer(value)]


def _parse_ref(ref: str) -> tuple[str, str]:
    parts = ref.split(".")
    if parts[0] == "steps":
        parts = parts[1:]
    if len(parts) == 1:
        return parts[0], "output"
    if len(parts) == 2:
        return parts[0], parts[1]
    raise ValueError(f"${{{ref}}}: expected ${{steps.NAME.KEY}} or ${{NAME}}")


def _walk(obj: Any, path: str = "") -> list[tuple[str, str]]:
    """Every string value in a nested dict/list with its dotted key path."""
    out: list[tuple[str, str]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _walk(v, f"{path}.{i}" if path else str(i))
    elif isinstance(obj, str):
        out.append((path, obj))
    return out


def _substitute(obj: Any, outputs: dict[str, dict[str, Any]]) -> Any:
    if isinstance(obj, dict):
        return {k: _substitute(v, outputs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, outputs) for v in obj]
    if isinstance(obj, str) and "${" in obj:

        def repl(m: Any) -> str:
            name, key = _parse_ref(m.group(1))
            value = outputs.get(name, {}).get(key)
            if value is None:
                raise ValueError(f"${{{m.group(1)}}}: step {name!r} produced no {key!r}")
            return str(value)

        return REF_PATTERN.sub(repl, obj)
    return obj


def _get(data: Any, dotted: str) -> list[tuple[str, Any]]:
    """Values at ``dotted`` (``*`` expands a list) with their concrete key paths."""
    items: list[tuple[str, Any]] = [("", data)]
    for part in dotted.split("."):
        nxt: list[tuple[str, Any]] = []
        for path, node in items:
            if part == "*" and isinstance(node, list):
                nxt += [(f"{path}.{i}".lstrip("."), v) for i, v in enumerate(node)]
            elif part == "*" and isinstance(node, dict):
                nxt += [(f"{path}.{k}".lstrip("."), v) for k, v in node.items()]
            elif isinstance(node, dict) and node.get(part) is not None:
                nxt.append((f"{path}.{part}".lstrip("."), node[part]))
        items = nxt
    return items


def _set(data: Any, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def resolve_input(value: str, source: Path, where: str) -> str:
    """An input path: a reference, ``default``, ``hub:NAME``, or an existing path (current folder
    first, then next to the recipe). Raises FileNotFoundError naming ``where``."""
    from adapterlab.models import is_default

    if "${" in value or is_default(value) or value.startswith("hub:"):
        return value
    p = Path(value).expanduser()
    if p.exists():
        return str(p)
    alt = source.parent / value
    if not p.is_absolute() and alt.exists():
        return str(alt)
    raise FileNotFoundError(
        f"{where}: {value!r} does not exist (looked in the current folder and next to {source.name})"
    )


def _check_hub(value: str, where: str) -> None:
    if not value.startswith("hub:"):
        return
    from adapterlab.recipe.training import registry_or_none

    reg = registry_or_none()
    if reg is None:
        raise ValueError(f"{where}: {value!r} needs adapterlab.registry, which this install does not have")
    try:
        reg.resolve(value[4:])
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise ValueError(f"{where}: {value!r}: {str(exc).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------
# loading, checking, planning


def load_pipeline(path: str | Path, sets: list[str] | None = None) -> PipelineRecipe:
    """Read a pipeline (or single-step) YAML, apply ``--set`` overrides, validate the schema."""
    path = Path(path)
    return as_pipeline(load_yaml(path, sets), str(path))


def _model_source(steps: list[StepEntry], name: str) -> str | None:
    """The model folder a step's model output derives from (for checks before it exists)."""
    for step in steps:
        if step.name != name:
            continue
        body = step.body
        src = getattr(body, "model", None) if step.verb in ("prune", "perp") else None
        if src is None and step.verb == "merge":
            src = getattr(body, "base", None)
        if isinstance(src, str) and "${" in src:
            refs = _refs(src)
            return _model_source(steps, _parse_ref(refs[0])[0]) if refs else None
        return src
    return None


def check_pipeline(recipe: PipelineRecipe, source: Path, ctx: Context | None = None) -> None:
    """Validate references, inputs, outputs and every step, loading no weights."""
    ctx = ctx or Context(source=source)
    seen: dict[str, str] = {}
    outputs: dict[str, str] = {}
    for i, step in enumerate(recipe.steps):
        where = f"{source}: steps.{i}.{step.verb}."
        runner = STEPS.get(step.verb)
        data = step.body.model_dump()
        for path, value in _walk(data):
            for ref in _refs(value):
                name, key = _parse_ref(ref)
                if name not in seen:
                    earlier = ", ".join(seen) or "none"
                    raise ValueError(f"{where}{path}: ${{{ref}}} names no earlier step (earlier steps: {earlier})")
                if key not in STEP_OUTPUTS[seen[name]]:
                    raise ValueError(
                        f"{where}{path}: ${{{ref}}}: a {seen[name]} step produces {', '.join(STEP_OUTPUTS[seen[name]])}, not {key!r}"
                    )
        for pattern in runner.inputs:
            for path, value in _get(data, pattern):
                if isinstance(value, str):
                    resolved = resolve_input(value, source, f"{where}{path}")
                    _check_hub(resolved, f"{where}{path}")
                    _set(data, path, resolved)
        body = type(step.body).model_validate(data)
        setattr(step, step.verb, body)
        out = runner.output_of(body)
        if out is not None:
            key = str(Path(out).expanduser().resolve())
            if key in outputs:
                raise ValueError(f"{where}output: {out!r} is also the output of step {outputs[key]!r}")
            outputs[key] = step.name or step.verb
        runner.check(body, where, ctx, recipe.steps, i)
        seen[step.name or step.verb] = step.verb


def plan(recipe: PipelineRecipe) -> list[dict[str, str]]:
    """One row per step: name, verb, what it does."""
    return [
        {"name": s.name or s.verb, "verb": s.verb, "what": STEPS.get(s.verb).describe(s.body)} for s in recipe.steps
    ]


@dataclass
class PipelineResult:
    outputs: dict[str, dict[str, Any]]
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"outputs": self.outputs, "seconds": self.seconds}


def run_pipeline(
    recipe: PipelineRecipe,
    *,
    source: str | Path,
    put: bool = True,
    progress: ProgressFactory | None = None,
    checked: bool = False,
) -> PipelineResult:
    """Check the whole pipeline, then run its steps in order.

    Args:
        recipe: a validated pipeline (see :func:`load_pipeline`).
        source: the recipe file (relative inputs are also looked up next to it; errors name it).
        put: False skips every registry write of train steps (``--no-put``).
        progress: progress factory handed to the steps.
        checked: :func:`check_pipeline` already ran on this recipe.
    """
    ctx = Context(source=Path(source), put=put, progress=progress or _silent)
    if not checked:
        check_pipeline(recipe, ctx.source, ctx)
    seconds: dict[str, float] = {}
    for i, step in enumerate(recipe.steps):
        name = step.name or step.verb
        runner = STEPS.get(step.verb)
        data = _substitute(step.body.model_dump(), ctx.outputs)
        body = validate(type(step.body), data, f"{ctx.source}: steps.{i}.{step.verb}")
        logger.info("step %d/%d: %s (%s) %s", i + 1, len(recipe.steps), name, step.verb, runner.describe(body))
        t0 = time.perf_counter()
        ctx.where = f"{ctx.source}: steps.{i}.{step.verb}"
        if "${" in json.dumps(step.body.model_dump(), default=str):
            runner.check(body, f"{ctx.source}: steps.{i}.{step.verb}.", ctx, recipe.steps, i)
        ctx.outputs[name] = runner.run(body, ctx)
        seconds[name] = time.perf_counter() - t0
    return PipelineResult(outputs=ctx.outputs, seconds=seconds)


# ---------------------------------------------------------------------------------------------
# the steps


def _is_ref(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _check_model_folder(value: str | None, where: str) -> None:
    """A model folder a step reads: ``config.json`` and safetensors weights (see
    :func:`adapterlab.models.check_model_folder`); references and ``default`` pass."""
    from adapterlab.models import check_model_folder, is_default

    if value is not None and not _is_ref(value) and not is_default(value):
        check_model_folder(value, where)


@register_step("prune")
class PruneRunner(StepRunner):
    inputs = ("model",)

    def check(self, body: Any, where: str, ctx: Context, steps: list[StepEntry], index: int) -> None:
        from adapterlab.pruning import PRUNERS
        from adapterlab.pruning.functional import parse_pattern, resolve_sparsity
        from adapterlab.staging import check_output_dir

        try:
            cls = PRUNERS.get(body.method)
            nm = parse_pattern(body.pattern)
            resolve_sparsity(0.5 if body.sparsity is None and nm is None else body.sparsity, nm)
        except ValueError as exc:
            raise ValueError(f"{where}method/pattern: {exc}") from None
        if body.scope is not None and body.scope not in cls.scopes:
            raise ValueError(f"{where}scope: unknown scope {body.scope!r}; choose one of: {', '.join(cls.scopes)}")
        _check_model_folder(body.model, f"{where}model")
        check_output_dir(body.output, body.overwrite)

    def describe(self, body: Any) -> str:
        what = body.pattern or f"{body.sparsity if body.sparsity is not None else 0.5:.0%}"
        return f"{body.method} {what} of {body.model} -> {body.output}"

    def run(self, body: Any, ctx: Context) -> dict[str, Any]:
        from adapterlab.jobs.prune import prune_folder

        job = prune_folder(
            body.output,
            model=body.model,
            method=body.method,
            sparsity=body.sparsity,
            pattern=body.pattern,
            scope=body.scope,
            nsamples=body.nsamples,
            seqlen=body.seqlen,
            seed=body.seed,
            batch_size=body.batch_size,
            overwrite=body.overwrite,
            progress=ctx.progress,
        )
        return {"output": body.output, "sparsity": job.info.get("global_sparsity")}


@register_step("train")
class TrainRunner(StepRunner):
    inputs = ("base",)

    def check(self, body: Any, where: str, ctx: Context, steps: list[StepEntry], index: int) -> None:
        from adapterlab.models import resolve_model_path
        from adapterlab.recipe.training import check_train_recipe

        prefix = where.split(": ", 1)[-1]
        base_path = None
        if _is_ref(body.base):  # check the targets against the model the base will derive from
            src = _model_source(steps[:index], _parse_ref(_refs(body.base)[0])[0])
            base_path = resolve_model_path(src) if src is not None and not _is_ref(src) else None
        try:
            check_train_recipe(body, where=prefix, base_path=base_path, put=ctx.put)
        except (ValueError, FileNotFoundError, FileExistsError) as exc:
            msg = str(exc)
            raise type(exc)(msg if msg.startswith(str(ctx.source)) else f"{ctx.source}: {msg}") from None

    def describe(self, body: Any) -> str:
        return f"{body.adapter.method} on {body.data.task} over {body.base} -> {body.output}"

    def run(self, body: Any, ctx: Context) -> dict[str, Any]:
        from adapterlab.recipe.training import train_adapter

        res = train_adapter(body, put=ctx.put, progress=ctx.progress, provenance={"pipeline": str(ctx.source)})
        return {"output": body.output, "digest": res.digest, "ref": res.ref, "accuracy": res.accuracy}


@register_step("merge")
class MergeRunner(StepRunner):
    inputs = ("adapters.*.path", "base")

    def check(self, body: Any, where: str, ctx: Context, steps: list[StepEntry], index: int) -> None:
        from adapterlab.merging import MERGERS
        from adapterlab.staging import check_output_dir

        try:
            MERGERS.get(body.method).from_params(body.params)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}{exc}") from None
        check_output_dir(body.output_dir, body.overwrite)

    def output_of(self, body: Any) -> str | None:
        return body.output_dir

    def describe(self, body: Any) -> str:
        return f"{body.method} of {len(body.adapters)} adapters -> {body.output_dir} ({body.output.format or 'auto'})"

    def run(self, body: Any, ctx: Context) -> dict[str, Any]:
        from adapterlab.jobs.merge import MergeConfig, merge_folder

        config = MergeConfig.model_validate(body.model_dump(mode="json", exclude={"output_dir", "overwrite"}))
        job = merge_folder(
            config,
            body.output_dir,
            overwrite=body.overwrite,
            source=ctx.where or str(ctx.source),
            config_dir=ctx.source.parent,
            progress=ctx.progress,
        )
        for note in job.result.warnings:
            logger.warning(note)
        return {"output": body.output_dir}


@register_step("extract")
class ExtractRunner(StepRunner):
    inputs = ("base", "tuned")

    def check(self, body: Any, where: str, ctx: Context, steps: list[StepEntry], index: int) -> None:
        from adapterlab.extraction.phlora import _check_settings
        from adapterlab.staging import check_output_dir

        try:
            _check_settings(
                body.rank,
                body.energy,
                body.min_rank,
                body.max_rank,
                body.randomized,
                "skip" if body.skip_extras else "save",
            )
        except ValueError as exc:
            raise ValueError(f"{where}{exc}") from None
        _check_model_folder(body.base, f"{where}base")
        _check_model_folder(body.tuned, f"{where}tuned")
        check_output_dir(body.output, body.overwrite)

    def describe(self, body: Any) -> str:
        how = f"rank {body.rank}" if body.rank is not None else f"energy {body.energy}"
        return f"PHLoRA {how} of {body.tuned} - {body.base} -> {body.output}"

    def run(self, body: Any, ctx: Context) -> dict[str, Any]:
        from adapterlab.jobs.extract import extract_folder

        extract_folder(
            body.output,
            base=body.base,
            tuned=body.tuned,
            rank=body.rank,
            energy=body.energy,
            min_rank=body.min_rank,
            max_rank=body.max_rank,
            randomized=body.randomized,
            skip_extras=body.skip_extras,
            threshold=body.threshold,
            dtype=body.dtype,
            overwrite=body.overwrite,
            progress=ctx.progress,
        )
        return {"output": body.output}


def _default_put_name(src: str) -> str:
    """The ref a put step creates without ``name``: the folder's own name (``.`` resolved)."""
    return Path(src).expanduser().resolve().name if not _is_ref(src) else Path(src).name


def _check_root(root: str | None, where: str) -> None:
    """The registry root a put will write (``root``, else ``$ADAPTERLAB_HUB``, else ``./hub``) can be a folder."""
    from adapterlab.recipe.training import registry_root

    try:
        folder_target(registry_root(root), "registry root")
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _import_or_fail(module: str, name: str, where: str) -> Any:
    import importlib

    try:
        obj = getattr(importlib.import_module(module), name, None)
    except ImportError:
        obj = None
    if obj is None:
        raise ValueError(f"{where}: needs {module}.{name}, which this install does not have")
    return obj


@register_step("compress")
class CompressRunner(StepRunner):
    inputs = ("adapters.*",)

    def check(self, body: Any, where: str, ctx: Context, steps: list[StepEntry], index: int) -> None:
        from adapterlab.staging import check_output_dir

        _import_or_fail("adapterlab.compression", "compress_adapters", f"{where.rstrip('.')}")
        if body.put is not None and ctx.put:
            from adapterlab.recipe.training import registry_or_none

            if registry_or_none() is None:
                raise ValueError(f"{where}put: needs adapterlab.registry, which this install does not have")
            _check_root(None, f"{where}put")
        check_output_dir(body.output, body.overwrite)

    def describe(self, body: Any) -> str:
        return f"shared basis rank {body.rank} ({body.mode}) of {len(body.adapters)} adapters -> {body.output}"

    def run(self, body: Any, ctx: Context) -> dict[str, Any]:
        from adapterlab.staging import staged_dir

        compress = _import_or_fail("adapterlab.compression", "compress_adapters", "compress")
        bundle = compress(body.adapters, rank=body.rank, mode=body.mode, clusters=body.clusters, seed=body.seed)
        with staged_dir(body.output, body.overwrite) as stage:
            bundle.save(stage)
        digest = None
        if body.put is not None and ctx.put:
            from adapterlab.recipe.training import registry_or_none

            digest = registry_or_none().put_bundle(body.output, body.put)
        return {"output": body.output, "digest": digest}


@register_step("put")
class PutRunner(StepRunner):
    inputs = ("src", "base")

    def check(self, body: Any, where: str, ctx: Context, steps: list[StepEntry], index: int) -> None:
        from adapterlab.recipe.training import registry_or_none

        if registry_or_none(body.root) is None:
            raise ValueError(f"{where.rstrip('.')}: needs adapterlab.registry, which this install does not have")
        _check_model_folder(body.base, f"{where}base")
        if not ctx.put:
            return
        if body.name is None and not _is_ref(body.src):
            try:
                registry_name(_default_put_name(body.src), "name")
            except ValueError as exc:
                raise ValueError(f"{where}name: {exc} (the default, the folder's name; set name)") from None
        _check_root(body.root, f"{where}root")

    def output_of(self, body: Any) -> str | None:
        return None

    def describe(self, body: Any) -> str:
        return f"{body.src} -> hub:{body.name or _default_put_name(body.src)}"

    def run(self, body: Any, ctx: Context) -> dict[str, Any]:
        from adapterlab.recipe.training import registry_or_none

        base = None
        if body.base is not None:
            from adapterlab.io import base_fingerprint
            from adapterlab.models import load_model

            base = base_fingerprint(load_model(body.base))
        name = body.name or _default_put_name(body.src)
        if not ctx.put:
            logger.info("--no-put: not putting %s", body.src)
            return {"output": body.src, "digest": None, "ref": None}
        digest = registry_or_none(body.root).put(
            body.src, name, provenance={"pipeline": str(ctx.source)}, base=base, tags=tuple(body.tags)
        )
        return {"output": body.src, "digest": digest, "ref": f"hub:{name}"}


def _load_with_adapter(model_path: str, adapter: str | None) -> tuple[Any, Any]:
    from adapterlab.models import load_model, load_tokenizer

    tok = load_tokenizer(model_path)
    model = load_model(model_path)
    if adapter is None:
        return model, tok
    if adapter.startswith("hub:"):
        from adapterlab.recipe.training import registry_or_none

        reg = registry_or_none()
        if reg is None:
            raise ValueError(f"adapter {adapter!r} needs adapterlab.registry")
        out = reg.load(adapter[4:], model)
        return (out if out is not None else model), tok
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter), tok


@register_step("evaluate")
class EvaluateRunner(StepRunner):
    inputs = ("model", "adapter")

    def check(self, body: Any, where: str, ctx: Context, steps: list[StepEntry], index: int) -> None:
        from adapterlab.data import CORPORA, get_task

        if body.task is not None:
            try:
                get_task(body.task)
            except ValueError as exc:
                raise ValueError(f"{where}task: {exc}") from None
        if body.corpus is not None and body.corpus not in CORPORA:
            raise ValueError(f"{where}corpus: unknown corpus {body.corpus!r}; choose one of: {', '.join(CORPORA)}")
        _check_model_folder(body.model, f"{where}model")

    def describe(self, body: Any) -> str:
        what = " + ".join(
            x for x in (body.task and f"accuracy[{body.task}]", body.corpus and f"perplexity[{body.corpus}]") if x
        )
        return f"{what} of {body.model}" + (f" + {body.adapter}" if body.adapter else "")

    def run(self, body: Any, ctx: Context) -> dict[str, Any]:
        from adapterlab.data import eval_ids
        from adapterlab.evaluate import perplexity, task_accuracy

        model, tok = _load_with_adapter(body.model, body.adapter)
        out: dict[str, Any] = {"accuracy": None, "perplexity": None}
        if body.task is not None:
            out["accuracy"] = task_accuracy(
                model, tok, body.task, split=body.split, n=body.n, progress=ctx.progress
            ).accuracy
        if body.corpus is not None:
            out["perplexity"] = perplexity(
                model,
                eval_ids(tok, body.corpus),
                seqlen=body.seqlen,
                max_windows=body.max_windows,
                progress=ctx.progress,
            )
        logger.info("evaluate: %s", ", ".join(f"{k} {v:.4f}" for k, v in out.items() if v is not None))
        return out


@register_step("perp")
class PerpRunner(StepRunner):
    inputs = ("model",)

    def check(self, body: Any, where: str, ctx: Context, steps: list[StepEntry], index: int) -> None:
        from adapterlab.staging import check_output_dir

        _import_or_fail("adapterlab.retrain", "perp_", where.rstrip("."))
        from adapterlab.retrain import resolve_scope

        try:
            resolve_scope(body.scope)
        except ValueError as exc:
            raise ValueError(f"{where}scope: {exc}") from None
        _check_model_folder(body.model, f"{where}model")
        check_output_dir(body.output, body.overwrite)

    def describe(self, body: Any) -> str:
        return f"PERP ({body.scope}, {body.steps} steps) of {body.model} on {body.corpus} windows -> {body.output}"

    def run(self, body: Any, ctx: Context) -> dict[str, Any]:
        from adapterlab.recipe.perp_step import run_perp

        return run_perp(body, ctx.progress)
