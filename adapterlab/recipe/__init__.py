"""Recipes: YAML files for ``adapterlab train`` (one adapter) and ``adapterlab run`` (a pipeline).

``schema`` holds the pydantic models (unknown keys are errors naming their path), ``training``
the train step, ``runner`` the pipeline runner.
"""

from __future__ import annotations

from adapterlab.recipe.runner import PipelineResult, check_pipeline, load_pipeline, plan, run_pipeline
from adapterlab.recipe.schema import PipelineRecipe, TrainRecipe, load_yaml, validate
from adapterlab.recipe.training import METHODS, TrainResult, available_methods, check_train_recipe, train_adapter

__all__ = [
    "METHODS",
    "PipelineRecipe",
    "PipelineResult",
    "TrainRecipe",
    "TrainResult",
    "available_methods",
    "check_pipeline",
    "check_train_recipe",
    "load_pipeline",
    "load_train_recipe",
    "load_yaml",
    "plan",
    "run_pipeline",
    "train_adapter",
    "validate",
]


def load_train_recipe(path: str, sets: list[str] | None = None) -> TrainRecipe:
    """Read a train YAML, apply ``--set a.b=c`` overrides, validate it (errors name the key path)."""
    from pathlib import Path

    return validate(TrainRecipe, load_yaml(path, sets), str(Path(path)))
