"""The pipeline files shipped with the package: the embedded default and the paper's recipes.

They are the repository's ``configs/*.yaml`` (``pipeline.yaml`` is ``configs/default.yaml``),
installed as the package data ``pipeline._recipes`` so that an installed wheel has them too.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import ConfigError

DATA = "pipeline._recipes"


def _files() -> dict:
    """Recipe name -> its file: the installed package data, or in a checkout run from its folder
    (where ``pipeline`` is imported from the working tree) the ``configs`` folder beside it."""
    try:
        folder = resources.files(DATA)
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parents[1] / "configs"
    return {f.name.removesuffix(".yaml"): f for f in folder.iterdir() if f.name.endswith(".yaml")}


def recipe_names() -> list[str]:
    return sorted(_files(), key=lambda n: (n != "default", n))


def recipe_text(name: str) -> str:
    files = _files()
    if name not in files:
        raise ConfigError(f"--recipe: {name!r} is not a shipped recipe ({', '.join(recipe_names())})")
    return files[name].read_text(encoding="utf-8")


def recipe_summaries() -> list[tuple[str, str]]:
    """(name, the first line of its header comment) of every recipe, the default first."""
    out = []
    for name in recipe_names():
        first = next((line.lstrip("# ").strip() for line in recipe_text(name).splitlines() if line.startswith("#")),
                     "")
        out.append((name, first))
    return out
