"""What the dg commands share: option types, the error formatter and exit codes, prompt and flag helpers.

Exit codes: 0 success, 1 a runtime failure (DgError; also output that cannot be written: stdout closed,
disk full), 2 bad usage, 130 Ctrl-C, 141 a closed pipe (the reader left: silent).
Known errors print one line, `error: ...`, on stderr; DG_DEBUG=1 prints the traceback before it (same exit code).
"""

from __future__ import annotations

import math
import errno
import os
import re
import sys
import traceback
from contextlib import contextmanager
from typing import Annotated, Literal, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 carries its own copy of click: its exceptions are the ones raised
    from typer._click import exceptions as cx
except ImportError:  # pragma: no cover
    from click import exceptions as cx

from . import store
from .config import MAX_DENOISING_STEPS, MAX_SEED, MAX_STEPS_WHY, MAX_TEMPERATURE, temperature_shorthand
from .errors import DgError, first_line
from .settings import debug


class BadUsage(DgError):
    """A flag or prompt the user has to change (exit code 2)."""

    exit_code = 2


class OutputError(DgError):
    """stdout cannot take the output: closed (`>&-`), disk full, an I/O error (exit code 1)."""


def error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


class DgGroup(TyperGroup):
    """The app's root command: turns known exceptions into one line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        tracebacks = False
        try:
            tracebacks = debug()  # a bad DG_DEBUG value is a DgError: reported below like any other
            check_stdout()  # every command reports there: refuse before doing work that cannot be reported
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
            code = rv if isinstance(rv, int) else 0
        except cx.NoArgsIsHelpError as e:
            e.show()
            code = 0
        except cx.UsageError as e:
            if tracebacks:
                traceback.print_exc()
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            error(e.format_message() + hint)
            code = e.exit_code
        except cx.ClickException as e:
            error(e.format_message())
            code = e.exit_code
        except typer.Abort as e:
            code = 130 if isinstance(e.__context__, KeyboardInterrupt) else 1
            if code == 1:
                error("aborted")
        except KeyboardInterrupt:
            code = 130
        except DgError as e:
            if tracebacks:  # the traceback, then the same line and exit code as without DG_DEBUG
                traceback.print_exc()
            error(str(e))
            code = e.exit_code
        if standalone_mode:
            sys.exit(code)
        return code


def _stdout_to_devnull() -> None:
    """Point fd 1 at /dev/null so the interpreter's last flush of what is left cannot fail again
    (as the Python docs advise for a closed pipe)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # stdout is closed or not a real file (tests)
        pass


@contextmanager
def quiet_closed_pipe():
    """Write the output inside this: the reader went away (`dg run ... | head`) stops quietly with 141
    (128 + SIGPIPE); an OutputError (disk full, ...) is reported once, with nothing left to flush."""
    try:
        yield
    except BrokenPipeError:
        _stdout_to_devnull()
        raise typer.Exit(141) from None
    except OutputError:
        _stdout_to_devnull()
        raise


@contextmanager
def terminate_as_interrupt():
    """SIGTERM and SIGHUP stop the work inside as Ctrl-C does (a KeyboardInterrupt), so what finished is
    kept and temporary files go; yields a list that holds the signal's number once one came (exit 128+N).
    A second signal during the cleanup is ignored."""
    import signal
    import threading

    caught: list[int] = []
    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield caught
        return

    def stop(signum, frame):
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        caught.append(signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, stop) for s in signals}
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def check_stdout() -> None:
    """Refuse to start work whose output has nowhere to go (`dg run ... >&-`)."""
    if sys.stdout is None or getattr(sys.stdout, "closed", False):
        raise OutputError("stdout is closed: nowhere to write the output (redirect it, e.g. > /dev/null)")


class Stdout:
    """sys.stdout (looked up at each call: tests swap it) whose failed writes are OutputErrors.
    A closed pipe stays a BrokenPipeError: quiet_closed_pipe makes that one silent."""

    def _call(self, name: str, *args):
        check_stdout()
        try:
            return getattr(sys.stdout, name)(*args)
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as e:  # ValueError: a file closed under us
            why = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
            raise OutputError(f"cannot write the output: {why}") from None

    def write(self, text: str) -> int:
        return self._call("write", text)

    def flush(self) -> None:
        self._call("flush")

    def isatty(self) -> bool:
        return sys.stdout is not None and sys.stdout.isatty()


stdout = Stdout()


def stdout_console(**kwargs):
    """A rich Console on `stdout` whose closed pipe is a BrokenPipeError for quiet_closed_pipe, as
    everywhere else (rich's own answer is exit code 1 after dup2 on a real file descriptor)."""
    from rich.console import Console

    class PipeConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    return PipeConsole(file=stdout, **kwargs)


def confirm(question: str) -> bool:
    """Ask on stderr, read the answer from stdin: only y/yes is yes. stdout stays the command's report
    (click's confirm writes part of its prompt there, so a full disk would fail the question)."""
    typer.echo(f"{question} [y/N]: ", nl=False, err=True)
    line = sys.stdin.readline() if sys.stdin is not None else ""
    if not line:  # end of input: no answer was given, so nothing was chosen
        typer.echo("", err=True)
        raise DgError("no answer on stdin (pass --yes to skip the question)")
    return line.strip().lower() in ("y", "yes")


def echo(text: str) -> None:
    """One piece of output (a line is added) on stdout, flushed now so that a failure is seen here:
    a closed pipe exits 141 silently, any other failure is one `error:` line and exit 1."""
    with quiet_closed_pipe():
        stdout.write(text + "\n")
        stdout.flush()


# ---- shared options ---------------------------------------------------------------------------------

def _check_device(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", value):  # what the loader runs on
        raise typer.BadParameter("expected cpu, cuda or cuda:N")
    return value


def _check_steps(value: int | None) -> int | None:
    if value is not None and not 1 <= value <= MAX_DENOISING_STEPS:
        raise typer.BadParameter(f"must be from 1 to {MAX_DENOISING_STEPS}{MAX_STEPS_WHY}, got {value}")
    return value


def _check_temperature(value: float | None) -> float | None:
    """Finite, and at most MAX_TEMPERATURE (dgcli/config.py says why): inf, nan and 1e308 are typos."""
    if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_TEMPERATURE):
        raise typer.BadParameter(f"must be a finite number from 0 to {MAX_TEMPERATURE:g} (above it sampling is near-"
                                 f"uniform noise), got {value}")
    return value


ModelOpt = Annotated[str, typer.Option("--model", "-m", metavar="NAME",
                                       help="HF repo id, checkpoint or quantized directory, or 'tiny'.")]
MaxTokensOpt = Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Most tokens to generate.")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", callback=_check_steps,
                                                  help="Most denoising steps per block.")]
EntropyBoundOpt = Annotated[Optional[float], typer.Option(
    "--entropy-bound", help="Entropy (nats) a step may accept; higher = more tokens per step, less care.")]
TMinOpt = Annotated[Optional[float], typer.Option("--t-min", callback=_check_temperature,
                                                  help="Temperature at the last step of a block.")]
TMaxOpt = Annotated[Optional[float], typer.Option("--t-max", callback=_check_temperature,
                                                  help="Temperature at the first step of a block.")]
TemperatureOpt = Annotated[Optional[float], typer.Option(
    "--temperature", "-t", callback=_check_temperature,
    help="Shorthand: --t-max T --t-min T/2 (cannot be combined with them).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", min=0, max=MAX_SEED,
                                                help="Seed: the same seed repeats a run.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")]
ThinkOpt = Annotated[bool, typer.Option("--think", help="Turn the thinking channel on.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", callback=_check_device,
                                                  help="cpu, cuda, cuda:N (default: cuda if present).")]
NoGraphsOpt = Annotated[bool, typer.Option(
    "--no-cuda-graphs", help="Launch each denoising step's kernels one by one instead of replaying a "
    "captured CUDA graph: slower; for debugging (also DG_CUDA_GRAPHS=0).")]
ImageOpt = Annotated[Optional[list[str]], typer.Option(
    "--image", metavar="FILE", help="An image for the model to look at (repeatable; the images come before "
    "the prompt text). Needs a model with a vision tower.")]
NoVisionOpt = Annotated[bool, typer.Option(
    "--no-vision", help="Do not load the vision tower (text only: less memory, no images).")]
DtypeOpt = Annotated[Optional[Literal["bfloat16", "float16", "float32"]], typer.Option(
    "--dtype",
    help="Weight dtype (default: the checkpoint's; float32 on CPU).")]
NoiseOpt = Annotated[Literal["text", "dots", "draft"], typer.Option("--noise",
                                       help="Canvas: draw noise as dimmed tokens, as dots, or as the draft.")]


def sampling(max_tokens=None, steps=None, entropy_bound=None, t_min=None, t_max=None, temperature=None,
             seed=None) -> dict:
    """Engine settings (reference names) from the flags that were given."""
    if temperature is not None:
        if t_min is not None or t_max is not None:
            raise BadUsage("--temperature sets --t-min and --t-max; give either it or them")
        if temperature <= 0:
            raise BadUsage("--temperature must be > 0")
        shorthand = temperature_shorthand(temperature)
        t_max, t_min = shorthand["t_max"], shorthand["t_min"]
    if entropy_bound is not None and entropy_bound <= 0:
        raise BadUsage("--entropy-bound must be > 0")
    s = dict(max_new_tokens=max_tokens, max_denoising_steps=steps, entropy_bound=entropy_bound, t_min=t_min,
             t_max=t_max, seed=seed)
    return {k: v for k, v in s.items() if v is not None}


def check_settings(model, settings: dict) -> None:
    """Validate flags against the model's own defaults (e.g. --t-max below its t_min): bad usage."""
    from .errors import ConfigError
    from .api import sampler_settings

    try:
        sampler_settings(model, **settings)
    except ConfigError as e:
        raise BadUsage(str(e)) from None


def read_prompt(argument: str | None, stdin=None, required: bool = True) -> str:
    """The argument, the text piped on stdin, or both (argument, a blank line, then the piped text);
    "" when there is neither and the prompt is not `required` (dg fill)."""
    stdin = stdin or sys.stdin
    piped = None
    if stdin is not None and not stdin.isatty():
        piped = stdin.read().rstrip("\n")
    parts = [p for p in (argument, piped) if p and p.strip()]
    if not parts and required:
        raise BadUsage("empty prompt: give it as an argument or pipe it on stdin")
    return "\n\n".join(parts)


def load(name: str, device: str | None = None, dtype: str | None = None, quiet: bool = False,
         cuda_graphs: bool | None = None, vision: bool = True):
    """(model, tokenizer), with a spinner on a terminal's stderr while the weights load."""
    import dgcli
    from rich.console import Console

    err = Console(stderr=True)
    try:
        if err.is_terminal and not quiet:
            with err.status(f"loading {name}", spinner="dots"):
                return dgcli.load(name, device=device, dtype=dtype, cuda_graphs=cuda_graphs, vision=vision)
        return dgcli.load(name, device=device, dtype=dtype, cuda_graphs=cuda_graphs, vision=vision)
    except RuntimeError as e:  # e.g. a CUDA error from a device that exists but cannot be used
        if device is None or debug():
            raise
        raise DgError(f"cannot use device '{device}': {first_line(e)}") from None


def parse_size(text: str) -> int:
    """units.parse_bytes, a bad size being bad usage (exit 2)."""
    from .units import parse_bytes

    try:
        return parse_bytes(text)
    except DgError as e:
        raise BadUsage(str(e)) from None


def resolve_name(positional: str | None, option: str | None) -> str:
    if positional and option and positional != option:
        raise BadUsage(f"two models named: '{positional}' and --model '{option}'")
    return store.check_name(next((n for n in (positional, option) if n is not None), store.DEFAULT_MODEL))
