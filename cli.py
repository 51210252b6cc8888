"""The adalora-export command line: parses arguments and calls one library function per command.

Exit codes: 0 done; 2 bad input or usage (one line on stderr naming the problem, nothing
written); 1 an unexpected failure.
"""

from __future__ import annotations

import sys

import click

from adalora_export.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adalora-export")
def cli() -> None:
    """Train with AdaLoRA, prune to per-layer ranks, and ship the result."""


@cli.command()
@click.option("--output", type=click.Path(), default=None, help="Where to leave the demo's files.")
@click.option("--steps", type=int, default=None, help="Optimizer steps (default: the demo's own).")
def demo(output: str | None, steps: int | None) -> None:
    """The whole path on a built-in tiny model and data set (no downloads)."""
    from adalora_export.demo import run_demo

    run_demo(output=output, steps=steps)


@cli.command()
@click.argument("adapter_dir", type=click.Path())
@click.option("--output", "-o", required=True, type=click.Path(), help="Directory to write.")
@click.option("--base", type=click.Path(), default=None, help="Base HF model directory (default: the adapter's).")
@click.option("--merge", is_flag=True, help="Merge the adapter into the base weights.")
@click.option("--onnx", is_flag=True, help="Export an ONNX graph for onnxruntime.")
@click.option("--to", "to_format", type=click.Choice(["lora"]), default=None, help="Convert to another adapter format.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", help="ONNX weight dtype.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--with-past", is_flag=True, help="ONNX causal LM graph with a KV cache.")
@click.option("--adapter-inputs", is_flag=True, help="ONNX graph whose adapter weights are hot-swappable inputs.")
@click.option("--tolerance", type=float, default=None, help="Largest relative ONNX/torch difference accepted.")
@click.option("--workers", type=int, default=1, show_default=True, help="Shards merged in parallel.")
@click.option("--verify", is_flag=True, help="After merging, compare merged against base+adapter.")
@click.option("--allow-pickle", is_flag=True, help="Allow reading .bin/.pt files (weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def export(
    adapter_dir,
    output,
    base,
    merge,
    onnx,
    to_format,
    dtype,
    opset,
    with_past,
    adapter_inputs,
    tolerance,
    workers,
    verify,
    allow_pickle,
    overwrite,
) -> None:
    """Ship an adapter: --to lora, --merge into the base, or --onnx [--merge]."""
    chosen = sum([to_format is not None, onnx, merge and not onnx])
    if chosen != 1:
        raise click.UsageError("choose exactly one of --to lora, --merge, --onnx [--merge]")
    if to_format == "lora":
        from converters.lora import export_lora

        export_lora(adapter_dir, output, overwrite=overwrite, allow_pickle=allow_pickle)
    elif onnx:
        from converters.onnx_export import export_onnx

        export_onnx(
            adapter_dir,
            output,
            base=base,
            merge=merge,
            dtype=dtype,
            opset=opset,
            with_past=with_past,
            adapter_inputs=adapter_inputs,
            tolerance=tolerance,
            overwrite=overwrite,
            allow_pickle=allow_pickle,
        )
    else:
        from converters.merge import merge_into_base

        merge_into_base(
            adapter_dir,
            output,
            base=base,
            workers=workers,
            verify=verify,
            overwrite=overwrite,
            allow_pickle=allow_pickle,
        )


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input is exit code 2 with one line on stderr, never a traceback."""
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


if __name__ == "__main__":
    main()
