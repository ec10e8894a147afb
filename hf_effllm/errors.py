"""The one error type that hf-effllm raises for bad user input."""

from __future__ import annotations


class HfEffllmError(ValueError):
    """Bad input or an unusable environment, with a message meant for the user.

    The message names the argument, the value given and what would work. The CLI prints it as one line
    (no traceback unless ``--debug``).
    """
