"""Optional packages (the pyproject extras) and the one-line reason a study that chose one cannot run.

Looked up without importing them, so a study validates fast and before Ray starts. A leaf module: the
config schema, the search spaces and the COCO evaluator all ask here.
"""

from __future__ import annotations

import importlib.util

# metrics.coco_backend -> the module it needs and the command that installs it.
COCO_BACKENDS = {
    "pycocotools": ("pycocotools", "pip install pycocotools"),
    "faster_coco_eval": ("faster_coco_eval", "pip install 'moe-bench[fastcoco]'"),
}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (a broken or half-imported install counts as absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_extra(module: str, extra: str) -> str | None:
    """None when ``module`` is installed, else the rest of an error line naming the extra that brings it:
    ``needs the mlflow package, which is not installed: pip install 'moe-bench[mlflow]'``."""
    if installed(module):
        return None
    return f"needs the {module} package, which is not installed: pip install 'moe-bench[{extra}]'"


def missing_coco_backend(backend: str) -> str | None:
    """Why ``backend`` (a key of :data:`COCO_BACKENDS`) cannot run here, as the rest of a
    ``metrics.coco_backend: ...`` line naming the install command; None when its module is installed."""
    module, install = COCO_BACKENDS[backend]
    if installed(module):
        return None
    instead = "" if backend == "pycocotools" else ", or set metrics.coco_backend: pycocotools"
    return f"{backend} is not installed; install it with {install}{instead}"


def installed_coco_backend(backend: str) -> str:
    """``backend`` when it is installed, else ValueError naming the install command (the validator of
    ``metrics.coco_backend``, which adds the field's name)."""
    problem = missing_coco_backend(backend)
    if problem is not None:
        raise ValueError(problem)
    return backend
