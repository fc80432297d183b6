"""The `dg` command line: one Typer app, thin commands over dgcli's library functions.

Each command checks its flags, calls one library function (load + stream_generate, store.pull,
store.list_models, ...), and prints. Errors and exit codes are handled once, in cli_common.DgGroup.
"""

from __future__ import annotations

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
                         check_settings, confirm, echo, load, parse_size, quiet_closed_pipe, read_prompt,
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


def use_canvas(stream, no_canvas: bool = False) -> bool:
    return (not no_canvas and stream.isatty() and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb")


@app.command(epilog=example('dg run "Write a haiku about rain"', 'cat notes.md | dg run "Summarize:" > summary.txt',
                            'dg run -m tiny --json --seed 1 "hi" | jq .tokens_per_second'))
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
):
    """Answer one prompt and print the answer: only the answer goes to stdout.

    --temperature T sets the schedule's t_max=T and t_min=T/2 (the sampler cools from t_max to t_min
    over a block's steps).
    """
    settings = sampling(max_tokens, steps, entropy_bound, t_min, t_max, temperature, seed)
    if raw and system:
        raise BadUsage("--system needs the chat template; it cannot be combined with --raw")
    if raw and think:
        raise BadUsage("--think needs the chat template; it cannot be combined with --raw")
    text, system = read_input(prompt, system)
    m, tok = load(model, device, dtype, cuda_graphs=False if no_cuda_graphs else None)
    check_settings(m, settings)
    from .api import stream_generate

    events = stream_generate(m, tok, text, raw=raw, system=system, think=think, **settings)
    with quiet_closed_pipe(), ExitStack() as stack:
        views = [stack.enter_context(v) for v in run_views(tok, canvas, noise, as_json)]
        done = consume(events, views)
        if as_json:
            stdout.write(json.dumps({"model": model, **done.to_dict()}) + "\n")
            stdout.flush()
    if verbose:
        typer.echo(format_stats(done), err=True)


def read_input(prompt: str | None, system: str | None) -> tuple[str, str | None]:
    """The prompt (argument and piped stdin) and --system as text: bytes that are not UTF-8 become
    U+FFFD, said once on stderr, rather than failing in the tokenizer."""
    from .repl import InputText

    decode, stdin = InputText(), sys.stdin
    if stdin is not None and not stdin.isatty():
        stdin = io.StringIO(decode.read(stdin, "stdin"))
    return read_prompt(decode(prompt, "the prompt"), stdin), decode(system, "--system")


def run_views(tok, canvas: bool, noise: str, as_json: bool) -> list:
    """Plain text on stdout; with --canvas the canvas on stderr, drawing the answer in place when
    stdout is the same terminal. --json: nothing until the end."""
    if not (canvas and use_canvas(sys.stderr)):
        return [] if as_json else [PlainView(stdout)]
    from rich.console import Console

    inline = sys.stdout.isatty() and not as_json
    view = CanvasView(Console(stderr=True), TokenPieces(tok), noise=noise, show_text=inline)
    return [view] if inline or as_json else [view, PlainView(stdout)]


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
):
    """Chat in the terminal, watching each answer denoise on the live canvas.

    Type /help inside for commands. Enter sends, Alt-Enter adds a line; Ctrl-C stops an answer.
    """
    from rich.console import Console

    from .repl import ChatSession, InputText, Repl, line_reader, prompt_toolkit_reader

    name = resolve_name(name, model)
    settings = sampling(max_tokens, steps, entropy_bound, t_min, t_max, temperature, seed)
    if sys.stdin is None:  # `dg chat <&-`: no messages can come
        raise BadUsage("stdin is closed: dg chat reads its messages there")
    decode = InputText()
    system = decode(system, "--system")
    m, tok = load(name, device, dtype, cuda_graphs=False if no_cuda_graphs else None)
    check_settings(m, settings)
    session = ChatSession(m, tok, settings=settings, system=system, think=think)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    read = prompt_toolkit_reader() if interactive else line_reader(sys.stdin, decode)
    console = Console(highlight=False)
    Repl(session, console, read, canvas=use_canvas(sys.stdout, no_canvas), noise=noise, fps=fps,
         model_name=name).run()


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
    m, tok = load(model, device, dtype, cuda_graphs=False if no_cuda_graphs else None)
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
        f"  parameters    {p / 1e9:.2f}B" if p >= 1e8 else f"  parameters    {p:,}",
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
