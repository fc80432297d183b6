"""The `dg` command line: one Typer app, thin commands over dgcli's library functions.

Each command checks its flags, calls one library function (load + stream_generate, store.pull,
store.list_models, ...), and prints. Errors and exit codes are handled once, in cli_common.DgGroup.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from . import __version__, store
from .canvas_view import CanvasView, PlainView, TokenPieces, consume, format_stats
from .cli_common import (BadUsage, DeviceOpt, DgGroup, DtypeOpt, NoGraphsOpt, EntropyBoundOpt, MaxTokensOpt, ModelOpt,
                         NoiseOpt, SeedOpt, StepsOpt, SystemOpt, TemperatureOpt, ThinkOpt, TMaxOpt, TMinOpt,
                         ImageOpt, NoVisionOpt,
                         check_settings, confirm, echo, stdout_console, load, parse_size, quiet_closed_pipe, read_prompt,
                         resolve_name, sampling, stdout)
from .config import MANIFEST_FILE
from .errors import DgError
from .units import format_bytes

app = typer.Typer(
    cls=DgGroup, name="dg", no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="dg: run DiffusionGemma locally, with the denoising canvas live in your terminal.",
)


def example(*lines: str) -> str:
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def _version(value: bool):
    if value:
        typer.echo(f"dg {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False):
    """dg: run DiffusionGemma locally, with the denoising canvas live in your terminal."""


TraceOpt = Annotated[Optional[Path], typer.Option(
    "--trace", metavar="FILE", help="Write what the sampler did at every step to FILE (JSON Lines; gzip if "
    "it ends in .gz); see `dg trace report` and docs/trace.md.")]


def use_canvas(stream, no_canvas: bool = False) -> bool:
    return (not no_canvas and stream.isatty() and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb")


@app.command(epilog=example('dg run "Write a haiku about rain"', 'cat notes.md | dg run "Summarize:" > summary.txt',
                            'dg run -m tiny --json --seed 1 "hi" | jq .tokens_per_second',
                            'dg run --image photo.jpg "What is in this picture?"'))
def run(
    prompt: Annotated[Optional[str], typer.Argument(metavar="PROMPT",
                                                    help="The prompt; text piped on stdin is appended.")] = None,
    model: ModelOpt = store.DEFAULT_MODEL,
    max_tokens: MaxTokensOpt = None, steps: StepsOpt = None, entropy_bound: EntropyBoundOpt = None,
    t_min: TMinOpt = None, t_max: TMaxOpt = None, temperature: TemperatureOpt = None, seed: SeedOpt = None,
    system: SystemOpt = None, think: ThinkOpt = False,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as it is, without the chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: text, counts, timings, "
                                          "settings.")] = False,
    canvas: Annotated[bool, typer.Option("--canvas", help="Draw the live canvas on stderr (if it is a "
                                         "terminal).")] = False,
    noise: NoiseOpt = "text",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print a stats line on stderr.")] = False,
    device: DeviceOpt = None, dtype: DtypeOpt = None, no_cuda_graphs: NoGraphsOpt = False,
    trace: TraceOpt = None,
    image: ImageOpt = None, no_vision: NoVisionOpt = False,
):
    """Answer one prompt and print the answer: only the answer goes to stdout.

    --temperature T sets the schedule's t_max=T and t_min=T/2 (the sampler cools from t_max to t_min
    over a block's steps). --image FILE shows the model a picture (repeatable).
    """
    settings = sampling(max_tokens, steps, entropy_bound, t_min, t_max, temperature, seed)
    if raw and system:
        raise BadUsage("--system needs the chat template; it cannot be combined with --raw")
    if raw and think:
        raise BadUsage("--think needs the chat template; it cannot be combined with --raw")
    if raw and image:
        raise BadUsage("--image needs the chat template; it cannot be combined with --raw")
    text, system = read_input(prompt, system)
    if trace is not None:
        check_trace_target(trace)  # before the weights load
    from .images import open_image

    pictures = [open_image(f) for f in image or []]  # a bad file fails before the model loads
    m, tok = load(model, device, dtype, cuda_graphs=False if no_cuda_graphs else None, vision=not no_vision)
    check_settings(m, settings)
    from .api import stream_generate

    if pictures:  # one user message: the images, then the text (Hugging Face's content parts)
        text = [{"role": "user", "content": [*({"type": "image", "image": p} for p in pictures),
                                             {"type": "text", "text": text}]}]
    events = stream_generate(m, tok, text, raw=raw, system=system, think=think, **settings)
    print_answer(events, m, tok, model=model, settings=settings, prompt=text, canvas=canvas, noise=noise,
                 as_json=as_json, verbose=verbose, trace=trace)


def check_trace_target(path: Path) -> None:
    from .trace import check_target

    check_target(path)


def trace_writer(path: Path, engine, tok, **kwargs):
    """The --trace view (dgcli/trace.py); it says on stderr where the trace went."""
    from .trace import writer

    return writer(path, engine, tok, notice=lambda message: typer.echo(message, err=True), **kwargs)


def read_input(prompt: str | None, system: str | None, decode=None,
               required: bool = True) -> tuple[str, str | None]:
    """The prompt (argument and piped stdin) and --system as text: bytes that are not UTF-8 become
    U+FFFD, said once on stderr (once per `decode`), rather than failing in the tokenizer."""
    from .repl import InputText

    decode, stdin = decode or InputText(), sys.stdin
    if stdin is not None and not stdin.isatty():
        stdin = io.StringIO(decode.read(stdin, "stdin"))
    return read_prompt(decode(prompt, "the prompt"), stdin, required), decode(system, "--system")


def print_answer(events, engine, tok, *, model: str, settings: dict, prompt, canvas: bool, noise: str,
                 as_json: bool, verbose: bool, trace: Path | None, extra=lambda done: {}) -> None:
    """Show a generation as dg run and dg fill do: the text on stdout as blocks commit (or one JSON
    object, with `extra(done)` added), the canvas on stderr with --canvas, a trace with --trace."""
    with quiet_closed_pipe(), ExitStack() as stack:
        views = [stack.enter_context(v) for v in run_views(tok, canvas, noise, as_json)]
        if trace is not None:
            views.append(stack.enter_context(trace_writer(trace, engine, tok, model=model, settings=settings,
                                                          prompt=prompt)))
        done = consume(events, views)
        if as_json:
            stdout.write(json.dumps({"model": model, **done.to_dict(), **extra(done)}) + "\n")
            stdout.flush()
    if verbose:
        typer.echo(format_stats(done), err=True)


def run_views(tok, canvas: bool, noise: str, as_json: bool) -> list:
    """Plain text on stdout; with --canvas the canvas on stderr, drawing the answer in place when
    stdout is the same terminal. --json: nothing until the end."""
    if not (canvas and use_canvas(sys.stderr)):
        return [] if as_json else [PlainView(stdout)]
    from rich.console import Console

    inline = sys.stdout.isatty() and not as_json
    view = CanvasView(Console(stderr=True), TokenPieces(tok), noise=noise, show_text=inline)
    return [view] if inline or as_json else [view, PlainView(stdout)]


@app.command(epilog=example("dg fill -m tiny --template 'Name: {{name:text:4}}, age {{age:int:3}}, {{choice:cat|dog}}'",
                            "dg fill -m tiny --schema person.json --json 'A person from Paris'",
                            "dg fill -m tiny --prefix head.py --suffix tail.py --length 64"))
def fill(
    prompt: Annotated[Optional[str], typer.Argument(metavar="PROMPT", help="What the filled text answers "
                                                    "(optional); text piped on stdin is appended.")] = None,
    model: ModelOpt = store.DEFAULT_MODEL,
    template: Annotated[Optional[str], typer.Option("--template", help="Template text: fixed text with "
                                                    "{{TYPE}} / {{NAME:TYPE}} holes (docs/fill.md).")] = None,
    template_file: Annotated[Optional[Path], typer.Option("--template-file", help="Read the template from a "
                                                          "file.")] = None,
    schema: Annotated[Optional[Path], typer.Option("--schema", help="A JSON Schema file: the output is JSON "
                                                   "that validates against it.")] = None,
    prefix: Annotated[Optional[Path], typer.Option("--prefix", help="Infill: the text before the gap (a "
                                                   "file).")] = None,
    suffix: Annotated[Optional[Path], typer.Option("--suffix", help="Infill: the text after the gap (a file).")] = None,
    length: Annotated[Optional[int], typer.Option("--length", min=1, help="Infill: most tokens in the gap.")] = None,
    steps: StepsOpt = None, entropy_bound: EntropyBoundOpt = None, t_min: TMinOpt = None, t_max: TMaxOpt = None,
    temperature: TemperatureOpt = None, seed: SeedOpt = None, system: SystemOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as it is, without the chat template "
                                      "(e.g. code infill).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: text, holes, counts, timings, "
                                          "settings.")] = False,
    canvas: Annotated[bool, typer.Option("--canvas", help="Draw the live canvas on stderr (if it is a "
                                         "terminal); pinned positions are drawn apart.")] = False,
    noise: NoiseOpt = "text",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print a stats line on stderr.")] = False,
    device: DeviceOpt = None, dtype: DtypeOpt = None, no_cuda_graphs: NoGraphsOpt = False,
    trace: TraceOpt = None,
):
    """Fill a template: fixed text stays, the model writes the holes around it. Only the filled text
    goes to stdout.

    Give one of --template, --template-file, --schema, or --prefix/--suffix with --length (infill).
    The template sets the answer's length, so there is no --max-tokens.
    """
    from .filling import layout, template_from
    from .repl import InputText

    settings = sampling(None, steps, entropy_bound, t_min, t_max, temperature, seed)
    if raw and system:
        raise BadUsage("--system needs the chat template; it cannot be combined with --raw")
    decode = InputText()  # one notice for the template, the prompt and --system together
    tmpl = read_template(decode(template, "--template"), template_file, schema, prefix, suffix, length)
    text, system = read_input(prompt, system, decode, required=False)
    if trace is not None:
        check_trace_target(trace)  # before the weights load
    m, tok = load(model, device, dtype, cuda_graphs=False if no_cuda_graphs else None)
    check_settings(m, settings)
    from .api import stream_generate

    plan = layout(template_from(tmpl), tok, m, m.sampler_settings(**settings))
    events = stream_generate(m, tok, text, raw=raw, system=system, template=plan, **settings)
    print_answer(events, m, tok, model=model, settings=settings, prompt=text, canvas=canvas, noise=noise,
                 as_json=as_json, verbose=verbose, trace=trace,
                 extra=lambda done: {"holes": plan.read(done.token_ids)[1]})


def read_template(template, template_file, schema, prefix, suffix, length):
    """The one template source the flags give (a Template), or one usage line."""
    from .files import read_file_limited
    from .repl import InputText
    from .template import infill, parse

    infill_flags = prefix is not None or suffix is not None or length is not None
    given = sum(x is not None for x in (template, template_file, schema)) + infill_flags
    if given != 1:
        raise BadUsage("give one of --template, --template-file, --schema, or --prefix/--suffix with --length")

    def read(path: Path, flag: str) -> str:
        try:
            data = read_file_limited(path, 64 * 2**20, f"{flag} {path}")  # /dev/zero is not a template
            return InputText()(data, f"{flag} {path}")  # bad bytes: U+FFFD, said once
        except OSError as e:
            raise BadUsage(f"cannot read {flag} {path}: {e.strerror or e}") from None

    if template is not None:
        return parse(template)
    if template_file is not None:
        return parse(read(template_file, "--template-file"))
    if schema is not None:
        from .schema import to_template

        try:
            value = json.loads(read(schema, "--schema"))
        except (ValueError, RecursionError) as e:
            raise BadUsage(f"--schema {schema} is not JSON: {e or 'nested too deeply'}") from None
        return to_template(value)
    if length is None or (prefix is None and suffix is None):
        raise BadUsage("infill needs --length and --prefix and/or --suffix")
    return infill(read(prefix, "--prefix") if prefix else "", read(suffix, "--suffix") if suffix else "", length)


@app.command(epilog=example("dg chat", "dg chat tiny", "dg chat -m ./my-quantized-model --think"))
def chat(
    name: Annotated[Optional[str], typer.Argument(metavar="NAME", help="Model (same as --model).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", metavar="NAME", help="HF repo id, checkpoint "
                                                 "or quantized directory, or 'tiny'.")] = None,
    max_tokens: MaxTokensOpt = None, steps: StepsOpt = None, entropy_bound: EntropyBoundOpt = None,
    t_min: TMinOpt = None, t_max: TMaxOpt = None, temperature: TemperatureOpt = None, seed: SeedOpt = None,
    system: SystemOpt = None, think: ThinkOpt = False,
    no_canvas: Annotated[bool, typer.Option("--no-canvas", help="Stream plain text instead of the canvas.")] = False,
    noise: NoiseOpt = "text",
    fps: Annotated[float, typer.Option("--fps", min=1, max=60, help="Canvas frames per second.")] = 15.0,
    device: DeviceOpt = None, dtype: DtypeOpt = None, no_cuda_graphs: NoGraphsOpt = False,
    trace: Annotated[Optional[Path], typer.Option(
        "--trace", metavar="FILE", help="Trace every answer: FILE-1, FILE-2, ... (numbered before the .jsonl/.gz "
        "ending); /trace FILE inside traces the next one.")] = None,
    no_vision: NoVisionOpt = False,
):
    """Chat in the terminal, watching each answer denoise on the live canvas.

    Type /help inside for commands (/image FILE attaches a picture to the next message). Enter
    sends, Alt-Enter adds a line; Ctrl-C stops an answer.
    """
    from .repl import ChatSession, InputText, Repl, line_reader, prompt_toolkit_reader

    name = resolve_name(name, model)
    settings = sampling(max_tokens, steps, entropy_bound, t_min, t_max, temperature, seed)
    if sys.stdin is None:  # `dg chat <&-`: no messages can come
        raise BadUsage("stdin is closed: dg chat reads its messages there")
    decode = InputText()
    system = decode(system, "--system")
    if trace is not None:
        check_trace_target(trace)
    m, tok = load(name, device, dtype, cuda_graphs=False if no_cuda_graphs else None, vision=not no_vision)
    check_settings(m, settings)
    session = ChatSession(m, tok, settings=settings, system=system, think=think)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    read = prompt_toolkit_reader(decode=decode) if interactive else line_reader(sys.stdin, decode)
    console = stdout_console(highlight=False)  # failed writes: one error line, or silence for a closed pipe
    with quiet_closed_pipe():
        Repl(session, console, read, canvas=use_canvas(sys.stdout, no_canvas), noise=noise, fps=fps,
             model_name=name, trace=trace).run()


trace_app = typer.Typer(no_args_is_help=True, help="Read traces written by --trace (docs/trace.md).")
app.add_typer(trace_app, name="trace")


@trace_app.command("report", epilog=example("dg trace report t.jsonl.gz", "dg trace report t.jsonl.gz -o replay.html",
                                            "dg trace report t.jsonl.gz --png figures/",
                                            "dg trace report t.jsonl.gz --json | jq .summary.kendall_tau"))
def trace_report(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A trace (from dg run/chat --trace, dg probe).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="HTML", help="Write one self-contained "
                                                "page: a replay of the denoising, the commit heatmap, the "
                                                "metrics.")] = None,
    png: Annotated[Optional[Path], typer.Option("--png", metavar="DIR", help="Write heatmap.png, profile.png "
                                                "and tau.png into DIR.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
):
    """Commit-order numbers from a trace: when each position settled, Kendall's tau of that order at
    granularities 1/4/16/64, commit profile, batch sizes, late burst, revisions, confidence at commit.

    Without --json, -o or --png it prints a table. The definitions are in docs/trace.md.
    """
    from .trace import check_target, read_trace
    from .trace_metrics import metrics
    from .trace_report import text_summary, write_html, write_pngs

    if out is not None:
        check_target(out)
    trace = read_trace(file)
    m = metrics(trace)
    if png is not None:
        if png.exists() and not png.is_dir():
            raise BadUsage(f"--png {png} is a file, not a directory")
        for p in write_pngs(trace, m, png):
            typer.echo(f"wrote {p}", err=True)
    if out is not None:
        typer.echo(f"wrote {write_html(trace, m, out)}", err=True)
    if as_json:
        echo(json.dumps(m))
    elif out is None and png is None:
        echo(text_summary(trace, m))


@app.command(epilog=example("dg probe scripts/probes/*.jsonl --out probe-out --steps 16,32,48",
                            "dg probe my.jsonl --out out -m tiny --max-tokens 64 --steps 4"))
def probe(
    prompts: Annotated[list[Path], typer.Argument(metavar="PROMPTS.jsonl...", help="JSON Lines: {\"prompt\", "
                                                  "\"regime\"?, \"answer\"?} per line (regime: the file's name "
                                                  "by default).")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Where the traces, summary.json and "
                                      "report.html go.")],
    model: ModelOpt = store.DEFAULT_MODEL,
    steps: Annotated[Optional[str], typer.Option("--steps", metavar="N[,N...]", help="Step budgets to run each "
                                                 "prompt at (default: the model's).")] = None,
    max_tokens: MaxTokensOpt = None, entropy_bound: EntropyBoundOpt = None, t_min: TMinOpt = None,
    t_max: TMaxOpt = None, temperature: TemperatureOpt = None, seed: SeedOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, no_cuda_graphs: NoGraphsOpt = False,
):
    """Measure how the model commits tokens on a set of prompts: every prompt at every step budget,
    one trace per run, and per regime the commit order (tau at 1/4/16/64), late burst, batch sizes,
    steps per block, tokens/s and, where prompts give an answer, accuracy against confidence at commit.

    A progress bar on stderr; Ctrl-C keeps the runs that finished (exit 130). The shipped set:
    scripts/probes/*.jsonl (six regimes). Definitions: docs/trace.md.
    """
    from .cli_common import terminate_as_interrupt
    from .probe import make_out_dir, parse_steps, probe as run_probe, read_prompts

    budgets = parse_steps(steps)
    settings = sampling(max_tokens, None, entropy_bound, t_min, t_max, temperature, seed)
    items = read_prompts(prompts)
    if out.exists() and not out.is_dir():
        raise BadUsage(f"--out {out} is a file, not a directory")
    created = not out.exists()
    make_out_dir(out)  # an unusable --out fails before the weights load
    try:
        m, tok = load(model, device, dtype, cuda_graphs=False if no_cuda_graphs else None)
        for b in budgets:
            check_settings(m, {**settings, **({"max_denoising_steps": b} if b else {})})
    except BaseException:  # a bad model or flag: leave no empty --out behind
        if created:
            for d in (out / "traces", out):
                with contextlib.suppress(OSError):
                    d.rmdir()
        raise
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("probe"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    with terminate_as_interrupt() as caught, bar:  # SIGTERM/SIGHUP keep the finished runs, as Ctrl-C does
        task = bar.add_task("probe", total=len(items) * len(budgets))
        summary = run_probe(m, tok, items, out, settings=settings, steps=budgets, model=model,
                            progress=lambda done, total: bar.update(task, completed=done))
    typer.echo(f"{summary['runs_done']} of {summary['runs_planned']} runs: wrote {out / 'summary.json'} and "
               f"{out / 'report.html'}", err=True)
    if summary["interrupted"]:
        raise typer.Exit(128 + caught[0] if caught else 130)


@app.command(epilog=example("dg serve -m tiny", "dg serve --port 11434        # where Ollama's clients look",
                            "DG_API_KEY=secret dg serve --host 0.0.0.0",
                            "curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
                            "-d '{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'"))
def serve(
    model: ModelOpt = store.DEFAULT_MODEL,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; the default is this machine only.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (vLLM's default; 0 picks a free one).")]
    = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="DG_API_KEY", show_envvar=True,
                                                   help="Require 'Authorization: Bearer KEY' on the API.")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, max=100000, help="Requests that may wait while "
                                           "one generates; more get 429 with Retry-After.")] = 16,
    cors_origin: Annotated[Optional[str], typer.Option("--cors-origin", metavar="ORIGIN", help="Let pages from "
                                                       "ORIGIN (e.g. http://localhost:3000) call the API.")] = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, no_cuda_graphs: NoGraphsOpt = False,
    no_vision: NoVisionOpt = False,
):
    """Serve the model over HTTP: OpenAI's API (/v1), Ollama's (/api), and a chat page with the live canvas (/).

    One generation runs at a time; others wait in a queue. SIGTERM or Ctrl-C stops the server
    (the running generation is cancelled). docs/serve.md lists the endpoints and fields.
    """
    import socket

    from .serve import create_app
    from .serve import serve as run_server
    from .serve.app import is_loopback

    if api_key is not None and not api_key.strip():
        raise BadUsage("--api-key (or DG_API_KEY) is empty")
    try:  # refuse a taken port or a bad host before the model loads
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except (OSError, OverflowError) as e:
        raise BadUsage(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    if not is_loopback(host):
        typer.echo(f"warning: listening on {host}: other machines can reach this server"
                   + ("; only clients with the API key can use it" if api_key else
                      " and, without --api-key, use the model freely"), err=True)
    m, tok = load(model, device, dtype, cuda_graphs=False if no_cuda_graphs else None, vision=not no_vision)
    run_server(create_app(m, tok, model, api_key=api_key, max_queue=max_queue, cors_origin=cors_origin),
               host=host, port=port)


@app.command(epilog=example("dg pull", "dg pull google/diffusiongemma-26B-A4B-it", "dg pull tiny"))
def pull(name: Annotated[str, typer.Argument(metavar="NAME", help="HF repo id, or 'tiny'.")] = store.DEFAULT_MODEL):
    """Download a model into the Hugging Face cache (shared with other tools; resumes; uses HF_TOKEN)."""
    path = store.pull(name)
    try:
        kind = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        kind = None
    if kind != store.MODEL_TYPE:
        typer.echo(f"warning: {name} says model_type={kind!r}, not {store.MODEL_TYPE!r}; dg may not run it",
                   err=True)
    echo(f"{name} is ready at {path}")


@app.command("list", epilog=example("dg list", "dg list --json"))
def list_(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False):
    """List the models on this machine: name, kind, size on disk, where."""
    entries = store.list_models()
    if as_json:
        echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    if not entries:
        echo(f"no models yet: `dg pull {store.DEFAULT_MODEL}`, or `dg pull tiny` to try dg without a GPU")
        return
    rows = [("NAME", "KIND", "SIZE", "WHERE")] + [
        (e.name, e.kind, format_bytes(e.size), f"{e.path}{'  (' + e.note + ')' if e.note else ''}") for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    echo("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in rows))


@app.command(epilog=example("dg show tiny", "dg show google/diffusiongemma-26B-A4B-it --context 32768"))
def show(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")] = store.DEFAULT_MODEL,
    context: Annotated[int, typer.Option("--context", min=1, help="Tokens of context for the memory estimate.")] = 8192,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Show a model: architecture, quantization, estimated VRAM, sampler defaults, chat template."""
    path = store.resolve(name)
    info = {"name": name, **store.describe(path, context=context)}
    plan = vram_plan(path, context)
    info["estimated_vram_bytes"] = plan.total_bytes if plan else info["weight_bytes"] + info["kv_cache_bytes"]
    info["vram_plan"] = plan.to_dict() if plan else None
    if as_json:
        echo(json.dumps(info, indent=2))
        return
    a = info["architecture"]
    p = info["parameters"]
    lines = [
        f"{name}  ({info['kind']})", f"  path          {path}",
        (f"  parameters    {p / 1e9:.2f}B" if p >= 1e8 else f"  parameters    {p:,}")
        + (f" (vision tower {info['vision_parameters']:,})" if info["vision_parameters"] else ""),
        f"  layers        {a['layers']} ({a['full_attention_layers']} full attention, the rest sliding window "
        f"{a['sliding_window']})",
        f"  attention     {a['attention_heads']} heads, kv heads {a['kv_heads']}, head dims {a['head_dims']}, "
        f"hidden {a['hidden_size']}",
        f"  experts       {a['experts']} x {a['expert_size']}, {a['experts_per_token']} per token; "
        f"dense MLP {a['dense_mlp_size']}",
        f"  vocabulary    {a['vocab_size']}, canvas {a['canvas_length']} tokens, "
        f"context up to {a['max_position_embeddings']:,}",
        f"  quantization  {describe_quant(info['quantization'])}",
        f"  weights       {format_bytes(info['weight_bytes'])} on disk",
        f"  est. VRAM     {format_bytes(info['estimated_vram_bytes'])} at {context:,} tokens of context"
        + ("" if plan else f" (weights + KV cache {format_bytes(info['kv_cache_bytes'])})"),
        "  sampler       " + ", ".join(f"{k}={v}" for k, v in info["sampler_defaults"].items()),
        f"  chat template {'yes' if info['chat_template'] else 'no (use --raw)'}",
    ]
    if plan:
        lines += ["", plan.table()]
    echo("\n".join(lines))


def describe_quant(manifest) -> str:
    if not manifest:
        return "none"
    groups = manifest.get("groups") or {}
    parts = [f"{k} {v}" for k, v in groups.items()] if isinstance(groups, dict) else []
    if manifest.get("format_version"):
        parts.append(f"format {manifest['format_version']}")
    scheme = manifest.get("scheme", f"see {MANIFEST_FILE}")
    return f"{scheme} ({', '.join(parts)})" if parts else f"{scheme}"


def vram_plan(path: Path, context: int):
    """quant.planner's estimate (weights, KV cache, activations, runtime); None if it cannot be made."""
    from quant.planner import estimate_for_dir

    try:
        return estimate_for_dir(path, context=context)
    except DgError as e:  # a broken manifest: show the rest anyway
        typer.echo(f"warning: no VRAM estimate: {e}", err=True)
        return None


@app.command(epilog=example("dg rm tiny", "dg rm google/diffusiongemma-26B-A4B-it --yes"))
def rm(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A model `dg list` shows.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
):
    """Delete a model dg manages (tiny, dg's models directory, or a repo in the HF cache)."""
    entry = store.find_entry(name)
    if not yes and not confirm(f"delete {entry.name} ({format_bytes(entry.size)}) at {entry.root}?"):
        echo(f"kept {entry.name}: nothing deleted")  # a choice, not a failure: exit 0
        return
    store.remove(entry)
    echo(f"deleted {entry.name} ({format_bytes(entry.size)})")


@app.command(epilog=example("dg quantize google/diffusiongemma-26B-A4B-it",
                            "dg quantize ./ckpt ./ckpt-nf4 --scheme nf4 --budget 24GiB --context 65536"))
def quantize(
    src: Annotated[str, typer.Argument(metavar="SRC", help="Source model (name or directory).")],
    out: Annotated[Optional[Path], typer.Argument(metavar="OUT", help="Output directory (default: "
                                                  "dg's models directory, SRC's name + scheme).")] = None,
    scheme: Annotated[Literal["int4", "nf4"], typer.Option("--scheme", help="4-bit format of the experts.")] = "int4",
    budget: Annotated[str, typer.Option("--budget", help="VRAM to fit: 18GB (10^9), 18GiB (2^30).")] = "18GB",
    context: Annotated[int, typer.Option("--context", min=1, help="Context length the budget must hold.")] = 32768,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
):
    """Write a 4-bit checkpoint that fits a VRAM budget (streams tensors: no GPU, bounded RAM)."""
    budget_bytes = parse_size(budget)
    src_path = store.resolve(src)
    from quant.convert import quantize_checkpoint
    from quant.planner import estimate_for_dir

    out = quantize_checkpoint(src_path, out, scheme=scheme, budget_bytes=budget_bytes, context=context, force=force)
    # The plan's table was printed before; after, one line from what was actually written.
    e = estimate_for_dir(out, context=context, budget_bytes=budget_bytes)
    typer.echo(f"written: {format_bytes(e.weights)} of weights; about {format_bytes(e.total)} of VRAM at "
               f"context {context:,} (`dg show {out}` for the table)", err=True)
    echo(f"wrote {out}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             epilog=example("dg bench -m tiny", "dg bench --config full --experts int4",
                            "dg bench -- --help        # the benchmark's own options"))
def bench(ctx: typer.Context):
    """Time prefill, denoising steps and commits; print a JSON report (arguments go to dgcli.bench)."""
    try:  # dgcli.bench runs scripts/bench.py, which only a source checkout has
        from dgcli import bench as b
    except ImportError as e:
        raise DgError(f"benchmarks are not part of this install ({e})") from None
    raise typer.Exit(b.main(list(ctx.args)) or 0)


def main() -> None:
    app(prog_name="dg")
