"""Validate an output folder and push it to the Hub with ``huggingface_hub``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import HfEffllmError
from .cards import validate_card

RESULTS_FILE = "results.json"


def validate_folder(folder: str | os.PathLike) -> list[str]:
    """Check that ``folder`` is ready for the Hub: a valid ``README.md`` card, a readable ``results.json``, and
    every file the card's "What is inside" table names present.

    Returns:
        The files that would be uploaded (relative paths, sorted).

    Raises:
        HfEffllmError: naming the folder and what is wrong.
    """
    path = Path(folder)
    if not path.is_dir():
        raise HfEffllmError(f"folder={str(path)!r} is not a folder; give the output folder of a hf-effllm command.")
    card = validate_card(path / "README.md")
    results = path / RESULTS_FILE
    if not results.is_file():
        raise HfEffllmError(f"folder={str(path)!r} has no {RESULTS_FILE}; it is not a hf-effllm output folder.")
    try:
        json.loads(results.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HfEffllmError(f"{results} is not valid JSON ({e.msg} at line {e.lineno}).") from e
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    named = set()
    in_inside = False
    for line in card.text.splitlines():
        if line.startswith("#"):
            in_inside = line.lstrip("#").strip() == "What is inside"
        elif in_inside and line.startswith("| `"):
            named.add(line.split("`")[1])
    missing = sorted(n for n in named if not (path / n).exists())
    if missing:
        raise HfEffllmError(
            f"folder={str(path)!r}: the card lists {missing} under 'What is inside' but they are missing."
        )
    return files


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str = "Upload with hf-effllm",
) -> str:
    """Validate ``folder`` and upload it to the Hub model repo ``repo_id`` (created if needed).

    Args:
        folder: output folder of a hf-effllm command.
        repo_id: "user/name".
        private: create the repo as private.
        dry_run: only validate; no network access.
        token: Hub token (default: the logged-in one).
        commit_message: commit message on the Hub.

    Returns:
        The repo URL, or a summary line for a dry run.
    """
    files = validate_folder(folder)
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HfEffllmError(f"repo_id={repo_id!r} is not a Hub repo id; use 'user/name'.")
    if dry_run:
        return f"dry run: {len(files)} file(s) in {folder} are valid for {repo_id}: {', '.join(files)}"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message=commit_message, ignore_patterns=[".*"]
        )
    except (HfHubHTTPError, OSError) as e:
        raise HfEffllmError(f"pushing {folder} to {repo_id} failed: {e}") from e
    return str(url)
