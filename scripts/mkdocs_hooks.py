"""MkDocs hooks of the docs site (mkdocs.yml ``hooks:``): the reference pages are generated from the code at
every build (scripts/docs_reference.py) and added to the site as if they were files under docs/."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

_SOURCE = Path(__file__).resolve().parent / "docs_reference.py"


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("docs_reference", _SOURCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files: Files, config: MkDocsConfig) -> Files:
    reference = _generator()
    for page in reference.PAGES:
        files.append(File.generated(config, page, content=reference.generate(page)))
    return files
