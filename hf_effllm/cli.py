"""The ``hf-effllm`` command.

    hf-effllm quickstart [--model PATH_OR_ID] [--device cpu|cuda] [--output DIR] [--overwrite]
    hf-effllm eval [--model PATH_OR_ID] [--context-length N] [--eval-tokens N] [--json]
    hf-effllm push FOLDER --repo-id USER/NAME [--dry-run] [--private]

Errors exit with status 1 and one line on stderr (no traceback unless ``--debug``); bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from .errors import HfEffllmError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Add --model, --device, --dtype, --context-length and --batch-size to a sub-command's parser."""
    p.add_argument("--model", default=None, help="local folder, .gguf file or Hub id (default: embedded SmolLM2-135M)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: fp32 CPU, bf16 GPU"
    )
    p.add_argument("--context-length", type=_positive_int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="windows per forward pass (default 1)")


CommandFn = Callable[[argparse.Namespace], int]
_EXTRA_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], CommandFn]] = {}


def register_command(
    name: str, help: str, configure: Callable[[argparse.ArgumentParser], None], run: CommandFn
) -> None:
    """Add a sub-command (a method sub-package's, e.g. ``quantize``); registering the same name again replaces it.

    Args:
        name: the sub-command name.
        help: one line for ``hf-effllm --help``.
        configure: adds the sub-command's arguments to its parser (use :func:`add_model_args` for the common ones).
        run: takes the parsed arguments and returns the exit status; raises ``HfEffllmError`` for bad input.
    """
    if name in {"quickstart", "eval", "push"}:
        raise ValueError(f"name={name!r} is a built-in command.")
    _EXTRA_COMMANDS[name] = (help, configure, run)


def build_parser() -> argparse.ArgumentParser:
    import hf_effllm  # noqa: F401  (registers every method, and with it their sub-commands)

    parser = argparse.ArgumentParser(prog="hf-effllm", description="Efficiency methods for Hugging Face models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quickstart", help="run every method on a model and write a Hub-ready results folder")
    add_model_args(q)
    q.add_argument("--output", default="quickstart_output", help="output folder (default: quickstart_output)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    q.add_argument("--eval-tokens", type=_positive_int, default=16384, help="held-out tokens to score (default 16384)")
    q.add_argument("--stages", default=None, help="comma-separated stages to run (default: all)")
    q.add_argument("--no-progress", action="store_true", help="hide progress bars")

    e = sub.add_parser("eval", help="perplexity of a model on the held-out corpus text")
    add_model_args(e)
    e.add_argument("--eval-tokens", type=_positive_int, default=None, help="score only the first N tokens")
    e.add_argument("--stride", type=_positive_int, default=None, help="window step (default: context length)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser("push", help="upload an output folder to the Hub")
    p.add_argument("folder", help="output folder of a hf-effllm command")
    p.add_argument("--repo-id", required=True, help="Hub repo id, user/name")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--dry-run", action="store_true", help="validate the folder and card only; no network")
    for name, (help_text, configure, _) in _EXTRA_COMMANDS.items():
        configure(sub.add_parser(name, help=help_text))
    return parser


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import QuickstartOptions, run_quickstart

    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    run_quickstart(
        QuickstartOptions(
            model=args.model,
            output=args.output,
            overwrite=args.overwrite,
            device=args.device,
            dtype=args.dtype,
            context_length=args.context_length,
            eval_tokens=args.eval_tokens,
            batch_size=args.batch_size,
            stages=stages,
            progress=not args.no_progress,
        )
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .data import corpus_text, load_model, load_tokenizer
    from .evaluation import perplexity

    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(args.model)
    res = perplexity(
        model,
        corpus_text("eval"),
        tokenizer=tokenizer,
        context_length=args.context_length,
        stride=args.stride,
        batch_size=args.batch_size,
        max_tokens=args.eval_tokens,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(res.to_dict()))
    else:
        print(f"perplexity {res.perplexity:.4f} over {res.num_tokens} tokens at context {res.context_length}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_folder

    print(push_folder(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run))
    return 0


COMMANDS = {"quickstart": _cmd_quickstart, "eval": _cmd_eval, "push": _cmd_push}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-effllm`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = COMMANDS.get(args.command) or _EXTRA_COMMANDS[args.command][2]
    try:
        return run(args)
    except KeyboardInterrupt:
        print("hf-effllm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for every failure; --debug shows the traceback
        if args.debug:
            raise
        kind = "" if isinstance(e, HfEffllmError) else f"{type(e).__name__}: "
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"hf-effllm: error: {kind}{message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Run the imported module's main: method packages register their sub-commands on `hf_effllm.cli`, which is a
    # different module object from this `__main__`.
    from hf_effllm.cli import main as _main

    sys.exit(_main())
