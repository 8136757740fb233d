"""The labelling application: a project on a folder of the user's images, labelled by people
in a browser (``dalbt init``, ``query``, ``serve``, ``export``, ``import``).

Modules: :mod:`~dalbt.labelling.project` (the project's state and its AL query),
:mod:`~dalbt.labelling.server` (the web page and its JSON API; needs ``pip install
'dalbt[label]'``) and :mod:`~dalbt.labelling.interchange` (CSV and Label Studio files).

The names below are imported on first use, so that importing this package (as the command
line does for its defaults) loads neither numpy nor torch nor the web server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dalbt.labelling.interchange import export_project, import_file
    from dalbt.labelling.project import Project, ProjectConfig, QueryResult, QueueItem
    from dalbt.labelling.server import create_app, serve

__all__ = [
    "Project",
    "ProjectConfig",
    "QueryResult",
    "QueueItem",
    "create_app",
    "export_project",
    "import_file",
    "serve",
]

_MODULE = {"create_app": "server", "serve": "server", "export_project": "interchange",
           "import_file": "interchange"}  # the others are in project


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_MODULE.get(name, 'project')}")
    return getattr(module, name)
