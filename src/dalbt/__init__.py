"""dalbt: deep active learning with Barlow Twins.

The public API (everything else is private by convention):

- Array level: :func:`select` picks from model outputs you computed yourself.
- Model level: :class:`ActiveLearner` runs rounds on your ``nn.Module`` and images.
- One round: :func:`run_round` with :class:`RoundData` (what the loop, the labelling project and
  the learner all call).
- Progress: :class:`ProgressEvent` (what ``run_round(on_progress=...)`` and a labelling
  project's query report), :data:`ProgressCallback`, :class:`PhaseLog`.
- Experiments: :class:`RunConfig`, :func:`run_experiment`, :class:`Store`, :class:`TrainConfig`.
- Strategies: :data:`STRATEGIES`, :func:`build_strategy`, :func:`register_strategy`,
  :class:`Strategy`, :class:`QueryContext`, :class:`Outputs`.
- Models and data: :func:`build_model`, :class:`DALBTNet`, :func:`load_dataset`,
  :class:`ImageDataset` and the adapters ``from_tensors``, ``from_dataset``,
  ``from_image_folder``, ``from_hf``.

Names load on first use, so ``import dalbt`` (and the command line's listings) stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dalbt.errors import DalbtError

if TYPE_CHECKING:
    from dalbt.al_round import RoundData, RoundResult, run_round
    from dalbt.data.adapters import from_dataset, from_hf, from_image_folder, from_tensors
    from dalbt.data.datasets import ImageDataset, load_dataset
    from dalbt.learner import ActiveLearner, ClassifierModule
    from dalbt.loop import run_experiment
    from dalbt.models.net import DALBTNet, build_model
    from dalbt.outputs import Outputs
    from dalbt.progress import PhaseLog, ProgressCallback, ProgressEvent
    from dalbt.recipe import RunConfig, TrainConfig
    from dalbt.selection import select
    from dalbt.store import Store
    from dalbt.strategies import (
        STRATEGIES,
        QueryContext,
        Strategy,
        build_strategy,
        register_strategy,
    )

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "ActiveLearner": "dalbt.learner",
    "ClassifierModule": "dalbt.learner",
    "DALBTNet": "dalbt.models.net",
    "ImageDataset": "dalbt.data.datasets",
    "Outputs": "dalbt.outputs",
    "PhaseLog": "dalbt.progress",
    "ProgressCallback": "dalbt.progress",
    "ProgressEvent": "dalbt.progress",
    "QueryContext": "dalbt.strategies",
    "RoundData": "dalbt.al_round",
    "RoundResult": "dalbt.al_round",
    "RunConfig": "dalbt.recipe",
    "STRATEGIES": "dalbt.strategies",
    "Store": "dalbt.store",
    "Strategy": "dalbt.strategies",
    "TrainConfig": "dalbt.recipe",
    "build_model": "dalbt.models.net",
    "build_strategy": "dalbt.strategies",
    "from_dataset": "dalbt.data.adapters",
    "from_hf": "dalbt.data.adapters",
    "from_image_folder": "dalbt.data.adapters",
    "from_tensors": "dalbt.data.adapters",
    "load_dataset": "dalbt.data.datasets",
    "register_strategy": "dalbt.strategies",
    "run_experiment": "dalbt.loop",
    "run_round": "dalbt.al_round",
    "select": "dalbt.selection",
}

__all__ = [
    "DalbtError",
    "__version__",
    "ActiveLearner",
    "ClassifierModule",
    "DALBTNet",
    "ImageDataset",
    "Outputs",
    "PhaseLog",
    "ProgressCallback",
    "ProgressEvent",
    "QueryContext",
    "RoundData",
    "RoundResult",
    "RunConfig",
    "STRATEGIES",
    "Store",
    "Strategy",
    "TrainConfig",
    "build_model",
    "build_strategy",
    "from_dataset",
    "from_hf",
    "from_image_folder",
    "from_tensors",
    "load_dataset",
    "register_strategy",
    "run_experiment",
    "run_round",
    "select",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dalbt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
