"""Model cards rendered from ``hub_cards/`` templates, folder validation, and pushing folders to the Hub.

Example:
    >>> card = render_card("quickstart", title="...", ...)  # doctest: +SKIP
    >>> validate_folder("quickstart_output")  # doctest: +SKIP
    >>> push_folder("quickstart_output", "me/smollm2-effllm", dry_run=True)  # doctest: +SKIP
"""

from .cards import REQUIRED_METADATA, REQUIRED_SECTIONS, render_card, template_path, validate_card
from .push import push_folder, validate_folder

__all__ = [
    "REQUIRED_METADATA",
    "REQUIRED_SECTIONS",
    "push_folder",
    "render_card",
    "template_path",
    "validate_card",
    "validate_folder",
]
