"""Render and validate model cards (front matter + fixed sections) from the ``hub_cards/`` templates."""

from __future__ import annotations

import importlib.resources
import os
import re
from pathlib import Path
from typing import Any

import jinja2
import yaml
from huggingface_hub import ModelCard

from ..errors import HfEffllmError

REQUIRED_METADATA: tuple[str, ...] = ("library_name", "base_model", "tags")
REQUIRED_SECTIONS: tuple[str, ...] = ("How to use", "What is inside", "Results")


def template_path(name: str | os.PathLike) -> Path:
    """Path of a card template: a bundled name ("quickstart", "spqr", ...) or a path to a ``.md`` file."""
    path = Path(name)
    if path.suffix == ".md" and path.is_file():
        return path
    bundled = importlib.resources.files("hf_effllm.hub_cards") / f"{name}.md"
    if not bundled.is_file():
        known = sorted(
            p.name[:-3] for p in importlib.resources.files("hf_effllm.hub_cards").iterdir() if p.name.endswith(".md")
        )
        raise HfEffllmError(f"template={str(name)!r} is not a bundled card template or a .md file; bundled: {known}.")
    return Path(str(bundled))


def render_card(template: str | os.PathLike, **context: Any) -> ModelCard:
    """Render a card template with Jinja (undefined variables are errors) and validate the result.

    Args:
        template: bundled template name or path of a ``.md`` template.
        **context: template variables.

    Returns:
        A validated ``huggingface_hub.ModelCard``.

    Raises:
        HfEffllmError: the template is missing or corrupt, a variable is missing, or the rendered card lacks
            required metadata or sections.
    """
    path = template_path(template)
    try:
        source = path.read_text(encoding="utf-8")
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
        text = env.from_string(source).render(**context)
    except jinja2.TemplateSyntaxError as e:
        raise HfEffllmError(f"card template {path} is corrupt at line {e.lineno}: {e.message}") from e
    except jinja2.UndefinedError as e:
        raise HfEffllmError(f"card template {path} needs a value that was not given: {e.message}") from e
    card = _parse(text, source=str(path))
    validate_card(card, source=str(path))
    return card


def _parse(text: str, source: str) -> ModelCard:
    if not text.startswith("---"):
        raise HfEffllmError(f"card {source} has no YAML front matter (it must start with '---').")
    try:
        return ModelCard(text, ignore_metadata_errors=False)
    except (ValueError, yaml.YAMLError) as e:
        raise HfEffllmError(f"card {source} has invalid front matter: {e}") from e


def validate_card(card: ModelCard | str | os.PathLike, *, source: str | None = None) -> ModelCard:
    """Check a card: front matter with ``library_name``, ``base_model`` and ``tags``, and the sections
    "How to use", "What is inside" and "Results" (as Markdown headings).

    Args:
        card: a ``ModelCard``, or the path of a README.md.

    Returns:
        The card.

    Raises:
        HfEffllmError: naming the card and what is missing.
    """
    if not isinstance(card, ModelCard):
        path = Path(card)
        if not path.is_file():
            raise HfEffllmError(f"card {str(path)!r} does not exist.")
        source = source or str(path)
        card = _parse(path.read_text(encoding="utf-8"), source=source)
    source = source or "card"
    data = card.data.to_dict()
    missing = [k for k in REQUIRED_METADATA if not data.get(k)]
    if missing:
        raise HfEffllmError(
            f"card {source} lacks front-matter field(s) {missing}; required: {list(REQUIRED_METADATA)}."
        )
    if not isinstance(data["tags"], list):
        raise HfEffllmError(f"card {source}: 'tags' must be a list, got {data['tags']!r}.")
    headings = {m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", card.text, flags=re.M)}
    absent = [s for s in REQUIRED_SECTIONS if s not in headings]
    if absent:
        raise HfEffllmError(f"card {source} lacks section(s) {absent}; required: {list(REQUIRED_SECTIONS)}.")
    return card
