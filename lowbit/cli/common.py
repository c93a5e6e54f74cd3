"""What every ``lowbit`` subcommand shares: the typer app, consoles, one-line errors, loading models and texts."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

_WIDE = None if sys.stdout.isatty() else 130  # piped or logged: do not squeeze tables to 80 columns
console = Console(width=_WIDE)
err = Console(stderr=True, width=_WIDE)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="lowbit: make language models small (8, 4, 3 and 1.58 bits) and measure what it costs.")


def _version(value: bool) -> None:
    if value:
        from lowbit.version import __version__

        console.print(f"lowbit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """lowbit: make language models small (8, 4, 3 and 1.58 bits) and measure what it costs."""

MODEL_HELP = "smollm2-135m (bundled), a .gguf file, a transformers folder, or a lowbit checkpoint folder"
TEXT_HELP = "text file to evaluate on (default: the bundled Python Tutorial)"


SPEED_PROTOCOL = ("prefill of 128 tokens, greedy decode of 16 tokens with the KV cache, batch 1, median of 3 runs, "
                  "on lowbit.generate's decode loop")


class UserError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def friendly(fn):
    """Turn the errors a user can cause into one red line and exit code 2 (bugs still show a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from huggingface_hub.errors import StrictDataclassError

        from lowbit.checkpoint import CheckpointError

        try:
            return fn(*args, **kwargs)
        except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                CheckpointError, ValueError, TypeError) as e:
            err.print(f"[bold red]error:[/] {first_line(e)}", highlight=False, soft_wrap=True)  # one line, however long
            raise typer.Exit(2) from None
        except StrictDataclassError as e:  # a config.json field transformers refuses, wherever it is read
            err.print(f"[bold red]error:[/] config.json: {' '.join(str(e).split())}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def setup() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not sys.stderr.isatty():  # logs and pipes get no \r-redrawn progress bars (tqdm reads this at each bar)
        os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    from lowbit.interop.bitsandbytes import quiet_kernel_notice

    quiet_kernel_notice()  # before peft, transformers or doctor import bitsandbytes

    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("once", message="ternary weights made post-training")

    def one_line(message, category, filename, lineno, file=None, line=None):  # a user warning, not a code location
        err.print(f"[yellow]warning:[/] {message}", highlight=False)

    warnings.showwarning = one_line
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    try:  # transformers' per-tensor "Loading weights" bar: noise on second-long loads, and it splits error output
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def out_path(value: str, option: str = "--out") -> Path:
    """The path an output option names; UserError for an empty or blank one, which Path() would turn into ".",
    the current folder, and so write the output where nobody asked."""
    if not value.strip():
        raise UserError(f"{option} is empty: give a file or folder name (\".\" for the current folder)")
    return Path(value)


def check_writable_dir(path: Path, option: str = "--out") -> None:
    """Before any work: ``path`` can be a folder this command writes files into."""
    from lowbit.checkpoint import blocking_ancestor

    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} exists and is not a folder")
    parent = blocking_ancestor(path)
    if parent is not None:
        raise UserError(f"{option} {path}: {parent} is not writable")


def check_writable_file(path: Path, option: str) -> None:
    """Before any work: ``path`` can be written as a file (its folder exists and is writable)."""
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder, not a file")
    if not path.parent.is_dir():
        raise UserError(f"{option} {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{option} {path} is not writable")


def check_scoring(tokens: int, window: int, stride: Optional[int]) -> None:
    if tokens < 2 or window < 2 or (stride is not None and not 0 < stride <= window):
        raise UserError("--tokens and --window must be >= 2, and --stride in 1..window")


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user..steal


def idle_cores(sample_s: float = 0.25) -> float | None:
    """How many cores sat idle over the next ``sample_s`` seconds (this process sleeps meanwhile), or None."""
    import time

    a = _cpu_times()
    time.sleep(sample_s)
    b = _cpu_times()
    if a is None or b is None or b[1] <= a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1]) * (os.cpu_count() or 1)


def default_threads() -> int:
    """Threads to compute with: the cores this process may use that are idle now (a 0.25 s sample of
    /proc/stat; elsewhere, less the 1-minute load average). With one of 2 cores busy, 2 threads decode 2.4-3.2x slower
    than 1 (docs/benchmarks.md); on an idle machine 2 are 1.3-1.6x faster."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = idle_cores()
    if idle is None:
        try:
            idle = cores - os.getloadavg()[0]
        except OSError:
            idle = cores
    return max(1, min(cores, round(idle)))


THREADS_HELP = "CPU threads (default: the cores idle when the command starts)"


def forced_threads(argv: list[str]) -> int | None:
    """The count given with ``--threads N`` / ``--threads=N`` in a command line, else None."""
    for i, a in enumerate(argv):
        value = argv[i + 1] if a == "--threads" and i + 1 < len(argv) else a.partition("=")[2] if a.startswith("--threads=") else None
        if value is not None:
            return int(value) if value.isdigit() else None
    return None


def passive_wait_needed(argv: list[str], env, idle: Callable[[], float | None] | None = None) -> bool:
    """Whether OpenMP should run with OMP_WAIT_POLICY=PASSIVE: the command line asks for more threads than there are
    idle cores and the user has not chosen a policy. Under the default (threads spin a while between parallel regions)
    2 threads with one of 2 cores busy decode 3.0 / 4.5 tok/s (fp32 / nf4), passive 7.3 / 10.4; on an idle machine
    passive costs 15% in fp32 decode (11.5 vs 9.8), so it is not the default (docs/benchmarks.md)."""
    n = forced_threads(argv)
    if n is None or n < 2 or "OMP_WAIT_POLICY" in env:
        return False
    free = (idle or idle_cores)()
    return free is not None and n > free + 0.5


def use_threads(threads: Optional[int]) -> int:
    """Set torch's (and lowbit's kernels') thread count: ``threads`` or ``default_threads()``; returns it."""
    import torch

    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    n = threads or default_threads()
    torch.set_num_threads(n)
    return n


def ensure_kernels() -> None:
    """Load the CPU kernels now (installed by pip install; using lowbit never compiles them): a missing build is one
    warning line here, before any work, not inside the first layer call."""
    from lowbit.kernels import fast

    fast()


def read_text(path: Optional[Path]) -> tuple[str, str]:
    from lowbit.data import DEFAULT_TEXT, default_text

    if path is None:
        return default_text(), f"{DEFAULT_TEXT.name} (bundled)"
    if not path.is_file():
        raise UserError(f"text file not found: {path}")
    return path.read_text(encoding="utf-8", errors="replace"), str(path)


def calibration_ids(tok, calib_text: Optional[Path]):
    """GPTQ / SpQR calibration ids: from --calib-text, else the bundled text past its first 8192 (scored) tokens."""
    from lowbit.calibrate import calibration_batches

    body, _ = read_text(calib_text)
    return calibration_batches(tok, body, skip_tokens=0 if calib_text else 8192)


def read_plan(path: Optional[Path], method: Optional[str], embeddings: Optional[str], options: dict):
    """The plan in ``path`` (None without one), its embeddings set by --embeddings if given; options that a plan
    replaces are one error line."""
    if path is None:
        return None
    from lowbit.plan import Plan

    given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None] + (["--method"] if method else [])
    if given:
        raise UserError(f"--plan sets every layer's format: drop {', '.join(given)}")
    if not path.is_file():
        raise UserError(f"--plan {path} is not a file")
    try:
        plan = Plan.load(path)
        if embeddings is not None:
            plan = Plan(plan.layers, plan.default, embeddings, plan.notes)
    except ValueError as e:
        raise UserError(f"--plan {path}: {first_line(e)}") from None
    return plan


def apply_plan(model, tok, plan, calib_text: Optional[Path], name: str) -> None:
    """Quantize ``model`` in place by ``plan`` (its GPTQ / SpQR layers calibrated as calibration_ids says); a plan
    that does not fit the model named ``name`` is one error line."""
    import lowbit

    calibration = calibration_ids(tok, calib_text) if plan.needs_calibration() else None
    try:
        lowbit.quantize(model, plan, calibration=calibration)
    except ValueError as e:  # a plan that does not fit this model
        raise UserError(f"the plan does not fit {name}: {first_line(e)}") from None


def rotate_model(model) -> None:
    """--rotate: a random Hadamard rotation folded into the model (one line for a model it does not cover)."""
    from lowbit.rotation import rotate

    try:
        rotate(model)
    except ValueError as e:
        raise UserError(f"--rotate: {first_line(e)}") from None


def parse_methods(spec: str) -> list[str]:
    from lowbit.app.methods import check_method

    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise UserError("--methods is empty")
    return [check_method(m) for m in names]


def load(spec: str, encoders: bool = False, native: bool = False, tokenizer: bool = True):
    """(model, tokenizer) by lowbit.app.models.load_model (load_any with ``encoders``, load_native with ``native``);
    load failures as one line. Without ``tokenizer`` a folder that holds none gives (model, None)."""
    from lowbit.app.models import load_any, load_model, load_native
    from lowbit.manifest import CONFIG_ERRORS

    with console.status(f"loading {spec}" + (" in its GGUF file's own weights" if native else "")):
        try:
            if native:
                return load_native(spec, progress=False)
            if encoders:
                return load_any(spec)
            return load_model(spec, tokenizer_required=tokenizer)
        except FileNotFoundError:
            raise
        # transformers' ways of saying "not a model I know": a config.json it cannot build (a field of the wrong
        # type, a zero head count) comes out as any of CONFIG_ERRORS
        except (KeyError, *CONFIG_ERRORS) as e:
            raise UserError(f"cannot load {spec}: {type(e).__name__}: {first_line(e)}") from None


def describe_protocol(tokens: int, window: int, stride: Optional[int], text_name: str, dtype: str = "float32 compute") -> str:
    windows = "non-overlapping windows" if not stride or stride == window else f"sliding windows, stride {stride}"
    return f"perplexity on the first {tokens} tokens of {text_name}, {window}-token {windows}, {dtype}"


def print_signs(signs: list[dict], checked: str, follow_up: Optional[str] = None) -> None:
    """The hard-case signs of `lowbit.analysis.hard_case` (what, figure, advice) and, once after them, ``follow_up``;
    or one line saying none showed."""
    if not signs:
        console.print(f"[green]no sign of a hard case to quantize[/] ({checked})")
        return
    console.print("[bold yellow]this model looks like a hard case to quantize:[/]")
    for s in signs:
        console.print(f"  [yellow]{s['what']}[/]: {s['figure']}.\n    {s['advice']}", highlight=False)
    if follow_up:
        console.print(f"  {follow_up}", highlight=False)
