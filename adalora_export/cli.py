"""The adalora-export command line: parses arguments and calls one library function per command.

Exit codes: 0 done; 2 bad input or usage (one line on stderr naming the problem, nothing
written); 1 an unexpected failure.

Each command imports its library module when it runs: at import this module reads only the choices
its options offer (from modules that do not load torch), so ``--help`` and ``infer`` never load torch.
"""

from __future__ import annotations

import dataclasses
import signal
import sys

import click

from .errors import UserError
from .formats.lora_dir import LORA_FORMATS, LORA_LAYOUTS
from .formats.onnx_dir import (
    DTYPES,
    INT4_ACCURACY_LEVELS,
    INT4_BLOCK_SIZES,
    INT4_HEADS,
    INT4_SENSITIVE,
    MAX_OPSET,
    MIN_OPSET,
    OPTIMIZED_DTYPES,
    TARGETS,
)
from .io import disk_full, disk_full_message
from .serving.providers import PROVIDERS
from .training.args import TrainArgs, option_types


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adalora-export")
def cli() -> None:
    """Train with AdaLoRA, prune to per-layer ranks, and ship the result."""


def _option(name: str, **kwargs):
    """An option that takes both spellings, --max_steps and --max-steps."""
    dashed = name.replace("_", "-")
    return click.option(f"--{name}", *([f"--{dashed}"] if dashed != name else []), name, **kwargs)


def _parsed_by(parse):
    """A click callback that reads the flag's text with the library's own parser."""
    return lambda ctx, param, value: parse(value) if value is not None else None


def _train_options(func):
    """The train command's options, one per ``TrainArgs`` field: its help, choices and default."""
    types = option_types()
    for f in reversed(dataclasses.fields(TrainArgs)):
        meta = f.metadata
        kind = click.Choice(meta["choices"]) if meta["choices"] else click.Path() if meta["path"] else types[f.name]
        if kind is bool:  # a switch: --fsdp
            func = _option(f.name, is_flag=True, default=f.default, help=meta["help"])(func)
            continue
        func = _option(
            f.name,
            type=kind,
            default=f.default,
            required=f.name == "output",
            show_default=f.default is not None,
            help=meta["help"],
            callback=_parsed_by(meta["parse"]) if meta["parse"] else None,
        )(func)
    return func


@cli.command()
@_train_options
@click.option("--resume", is_flag=True, help="Continue the run in --output from its latest checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.pass_context
def train(ctx: click.Context, resume: bool, overwrite: bool, **options) -> None:
    """Train an AdaLoRA adapter: --model BASE_DIR --data FILE --output RUN_DIR (torchrun for several ranks)."""
    from .training import train as run_training

    if resume:  # the run's own options apply; pass on only what was given, to be checked against them
        source = click.core.ParameterSource
        options = {k: v for k, v in options.items() if k == "output" or ctx.get_parameter_source(k) != source.DEFAULT}
    result = run_training(options.pop("output"), resume=resume, overwrite=overwrite, **options)
    if result.is_main:
        click.echo(result.summary())


@cli.command()
@click.option("--output", type=click.Path(), default=None, help="Where to leave the demo's files (default: temp).")
@click.option("--steps", type=int, default=None, help="Optimizer steps (default: the demo's own).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output directory.")
@click.option("--real", is_flag=True, help="The real demo: SmolLM2-135M-Instruct on Debian's packages (~10 min).")
@click.option(
    "--packages", type=click.Path(), default=None, help="--real: a Packages file (default: apt-cache dumpavail)."
)
def demo(output: str | None, steps: int | None, overwrite: bool, real: bool, packages: str | None) -> None:
    """The whole path on a built-in tiny model and data set (no downloads); --real on a real LLM."""
    from .demo import run_demo

    if packages is not None and not real:
        raise UserError("--packages applies to the real demo only: add --real")
    run_demo(output=output, steps=steps, overwrite=overwrite, real=real, packages=packages)


@cli.command()
@click.argument("adapter_dir", type=click.Path())
@click.option("--output", "-o", required=True, type=click.Path(), help="Directory (or file, with --graph) to write.")
@click.option("--base", type=click.Path(), default=None, help="Base HF model directory (default: the adapter's).")
@click.option("--merge", is_flag=True, help="Merge the adapter into the base weights.")
@click.option("--onnx", is_flag=True, help="Export an ONNX graph for onnxruntime.")
@click.option("--to", "to", type=click.Choice(LORA_FORMATS), default=None, help="Convert to another adapter format.")
@click.option(
    "--lora-layout",
    type=click.Choice(LORA_LAYOUTS),
    default=None,
    help="With --to lora: compact (per-module ranks; default) or uniform (all at the largest rank; README).",
)
@click.option(
    "--dtype",
    type=click.Choice(sorted(set(DTYPES) | set(OPTIMIZED_DTYPES))),
    default=None,
    help="With --onnx: weight dtype (default fp32; int4 with --optimized).",
)
@click.option("--opset", type=int, default=None, help=f"With --onnx: ONNX opset ({MIN_OPSET}..{MAX_OPSET}).")
@click.option("--with-past", is_flag=True, help="With --onnx: causal LM graph with a KV cache.")
@click.option("--adapter-inputs", is_flag=True, help="With --onnx: adapter weights are hot-swappable inputs.")
@click.option(
    "--optimized",
    is_flag=True,
    help="With --onnx --merge: onnxruntime-genai's builder makes the graph (fused attention, KV cache; Llama and kin).",
)
@click.option("--target", type=click.Choice(TARGETS), default=None, help="With --optimized: cpu (default) or cuda.")
@click.option(
    "--tolerance",
    type=float,
    default=None,
    help="With --onnx: largest relative ONNX/torch logit difference; with --dtype int4 --optimized: largest "
    "relative perplexity increase on the check text (README).",
)
@click.option(
    "--int4-block-size",
    type=click.Choice([str(b) for b in INT4_BLOCK_SIZES]),
    default=None,
    callback=_parsed_by(int),
    help="With --optimized --dtype int4: weights per quantization block (default 64).",
)
@click.option(
    "--int4-accuracy-level",
    type=click.Choice([str(a) for a in INT4_ACCURACY_LEVELS]),
    default=None,
    callback=_parsed_by(int),
    help="With --optimized --dtype int4: MatMulNBits compute type, 4 = int8 activations "
    "(default: 4 on cpu, 0 on cuda).",
)
@click.option(
    "--int4-head",
    type=click.Choice(INT4_HEADS),
    default=None,
    help="With --optimized --dtype int4: precision of the output head and a tied embedding (default int8).",
)
@click.option(
    "--int4-sensitive",
    type=click.Choice(INT4_SENSITIVE),
    default=None,
    help="With --optimized --dtype int4: precision of the most quantization-sensitive projections (default int8).",
)
@click.option(
    "--graph",
    type=click.Path(),
    default=None,
    help="With --onnx: write the adapter as FILE.onnx_adapter for this existing --adapter-inputs graph.",
)
@click.option("--workers", type=int, default=None, help="With --merge: threads sharing each shard's work (1).")
@click.option("--verify", is_flag=True, help="With --merge: compare merged against base+adapter.")
@click.option("--allow-pickle", is_flag=True, help="Allow reading .bin/.pt files (weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def export(adapter_dir, output, **options) -> None:
    """Ship an adapter: --to lora, --merge into the base, or --onnx [--merge | --adapter-inputs]."""
    from .export import export_adapter

    for line in export_adapter(adapter_dir, output, **options).lines:
        click.echo(line)


@cli.command()
@click.argument("source", type=click.Path())
@click.option("--output", "-o", required=True, type=click.Path(), help="Adapter directory to write.")
@click.option("--allow-pickle", is_flag=True, help="Allow reading .bin/.pt files (weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def prune(source, output, allow_pickle, overwrite) -> None:
    """Write the compact adapter of a run, a checkpoint or a PEFT AdaLoRA directory."""
    from .prune import prune as prune_source

    adapter = prune_source(source, output, overwrite=overwrite, allow_pickle=allow_pickle)
    click.echo(
        f"wrote {output}: {len(adapter.modules)} modules, total rank {sum(adapter.rank_pattern.values())}, "
        f"{adapter.num_parameters():,} adapter parameters"
    )


@cli.command("inspect")
@click.argument("adapter_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option("--plot", type=click.Path(), default=None, help="Also draw the rank heat map into FILE.png.")
@click.option("--allow-pickle", is_flag=True, help="Allow reading .bin/.pt files (weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace an existing plot file.")
def inspect_command(adapter_dir, as_json, plot, allow_pickle, overwrite) -> None:
    """Ranks per module, parameters and share of the budget; --plot draws the rank heat map."""
    from .report import inspect_adapter

    click.echo(inspect_adapter(adapter_dir, as_json=as_json, plot=plot, overwrite=overwrite, allow_pickle=allow_pickle))


@cli.command()
@click.argument("onnx_dir", type=click.Path())
@click.option("--prompt", default=None, help="Causal LM: text to continue.")
@click.option("--chat", default=None, help="Causal LM: a user message, answered through the model's chat template.")
@click.option("--system", default=None, help="With --chat: the system message before it.")
@click.option("--max_new_tokens", "--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=None, help="With --sample: divides the logits (default 1.0).")
@click.option("--top_k", "--top-k", type=int, default=None, help="With --sample: draw among the k best.")
@click.option("--top_p", "--top-p", type=float, default=None, help="With --sample: draw from the nucleus of mass p.")
@click.option("--seed", type=int, default=None, help="With --sample: seed of the draws.")
@click.option(
    "--repetition_penalty",
    "--repetition-penalty",
    type=float,
    default=None,
    help="Above 1 discourages tokens already in the text (greedy or --sample; default 1.0).",
)
@click.option("--stop", multiple=True, help="End when the text contains this (cut before it); repeatable.")
@click.option("--text", default=None, help="Classifier: label the text; encoder: embed it.")
@click.option("--adapter", type=click.Path(), default=None, help="FILE.onnx_adapter for an --adapter-inputs graph.")
@click.option(
    "--provider",
    type=click.Choice(PROVIDERS),
    default="auto",
    show_default=True,
    help="Optimized graphs run on the provider they were built for (export --target).",
)
def infer(onnx_dir, **options) -> None:
    """Run an exported graph: --prompt or --chat for causal LMs, --text for encoders/classifiers."""
    from .serving import infer as run_inference

    if options["prompt"] is None and options["chat"] is None:
        click.echo(run_inference(onnx_dir, **options))
        return
    # Generated text is printed as it arrives, then the line is ended.
    run_inference(onnx_dir, on_text=lambda piece: click.echo(piece, nl=False), **options)
    click.echo()


def _exit_on_sigterm(signum, frame) -> None:
    # SystemExit unwinds the stack, so atomic outputs remove their temporary files on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input (a full disk included) is exit code 2 with one line on stderr, never a traceback."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if hasattr(signal, "SIGXFSZ"):  # past a file-size limit, a write fails with EFBIG instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        cli.main(args=argv, prog_name="adalora-export", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors: click's own message, exit 2
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except UserError as exc:
        click.echo(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # out of space outside an atomic output (those raise UserError): exit 2 as well
        error = disk_full(exc)
        if error is None:
            raise
        click.echo(f"error: {disk_full_message(error)}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
