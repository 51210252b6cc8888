"""``inspect``: an adapter's ranks as a table, as JSON, and as a heat map of layers x module types."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .adapter import CompactAdapter
from .errors import UserError
from .io import atomic_output_file, check_output_path
from .sources import load_adapter

# A module path's first numeric component is its layer: "model.layers.3.self_attn.q_proj" -> 3.
_LAYERED = re.compile(r"(.*?)\.(\d+)\.(.+)")


def inspect_adapter(
    adapter_dir: str | os.PathLike,
    as_json: bool = False,
    plot: str | os.PathLike | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> str:
    """The report on an adapter (a table, or JSON with ``as_json``); with ``plot``, also draw the heat map."""
    if plot is not None:
        _check_png_path(plot, overwrite, inputs={"the adapter source": adapter_dir})
    adapter = load_adapter(adapter_dir, allow_pickle=allow_pickle)
    if plot is not None:
        plot_rank_heatmap(adapter, plot, overwrite=overwrite)
    if as_json:
        return json.dumps(adapter.summary(), indent=2)
    return format_table(adapter)


def format_table(adapter: CompactAdapter) -> str:
    """One line per module (rank, shape, parameters, share of the budget), then totals against init_r."""
    s = adapter.summary()
    width = max([len("module")] + [len(m["module"]) for m in s["modules"]])
    lines = [f"{'module':<{width}}  {'rank':>4}  {'in x out':>11}  {'params':>10}  {'share':>6}"]
    for m in s["modules"]:
        share = "-" if m["share"] is None else f"{100 * m['share']:.1f}%"
        shape = f"{m['in_features']} x {m['out_features']}"
        lines.append(f"{m['module']:<{width}}  {m['rank']:>4}  {shape:>11}  {m['parameters']:>10,}  {share:>6}")
    lines.append("")
    lines.append(budget_line(s))
    share = s["total_parameters"] / s["initial_parameters"] if s["initial_parameters"] else 0.0
    lines.append(
        f"parameters: {s['total_parameters']:,} ({100 * share:.1f}% of {s['initial_parameters']:,} at init_r); "
        f"modules at rank 0: {s['rank_zero_modules']}"
    )
    lines.append(lora_comparison(s["total_parameters"], s["lora_parameters"]))
    if s["extra_weights"]:
        extra = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in s["extra_weights"].items())
        lines.append(f"extra trained weights: {extra}")
    return "\n".join(lines)


def budget_line(s: dict) -> str:
    """The adapter's total against its budget, in the budget's unit (``CompactAdapter.summary``'s dict)."""
    n = s["matrices"]
    if s["budget_unit"] == "triplets":
        return (
            f"{n} matrices: total rank {s['total_rank']} against budget {s['budget']} "
            f"(target_r {s['target_r']} x {n}); init_r {s['init_r']} x {n} = {s['initial_budget']}"
        )
    return (
        f"{n} matrices: total rank {s['total_rank']}, {s['total_parameters']:,} parameters against a budget of "
        f"{s['budget']:,} (LoRA at r={s['target_r']} on these matrices); {s['initial_budget']:,} at init_r "
        f"{s['init_r']}"
    )


def lora_comparison(parameters: int, lora: dict[int, int]) -> str:
    """One line: this adapter's size next to LoRA at each uniform rank on the same matrices."""
    sizes = ", ".join(f"r={r} {n:,}" for r, n in lora.items())
    ranks = list(lora)
    below = [r for r in ranks if lora[r] <= parameters]
    above = [r for r in ranks if lora[r] > parameters]
    if below and lora[below[-1]] == parameters:
        where = f"the size of LoRA r={below[-1]}"
    elif below and above:
        where = f"between LoRA r={below[-1]} and r={above[0]}"
    else:
        where = f"below LoRA r={ranks[0]}" if above else f"above LoRA r={ranks[-1]}"
    return f"LoRA on the same matrices: {sizes}; this adapter is {where}"


def rank_grid(adapter: CompactAdapter) -> tuple[list[str], list[str], dict[tuple[int, int], int]]:
    """(row labels = layers, column labels = module types, {(row, col): rank}) in model order.

    Modules outside numbered layers (a pooler, say) form a last row labelled "other".
    """
    rows: list[tuple[str, int | None]] = []
    types: list[str] = []
    cells = {}
    for path, module in adapter.modules.items():
        match = _LAYERED.fullmatch(path)
        row, kind = ((match.group(1), int(match.group(2))), match.group(3)) if match else (("", None), path)
        if row not in rows:
            rows.append(row)
        if kind not in types:
            types.append(kind)
        cells[(row, kind)] = module.rank
    stem_order = list(dict.fromkeys(stem for stem, _ in rows))
    rows.sort(key=lambda r: (r[1] is None, stem_order.index(r[0]), r[1] or 0))
    stems = {stem for stem, index in rows if index is not None}
    labels = [
        "other" if index is None else (str(index) if len(stems) == 1 else f"{stem}.{index}") for stem, index in rows
    ]
    grid = {(rows.index(r), types.index(k)): rank for (r, k), rank in cells.items()}
    return labels, _short_names(types), grid


def _short_names(types: list[str]) -> list[str]:
    """The shortest dotted suffix of each type that no other type shares ("q_proj", "attn.c_proj")."""
    out = []
    for kind in types:
        parts = kind.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(1 for other in types if other == suffix or other.endswith("." + suffix)) == 1:
                break
        out.append(suffix)
    return out


def plot_rank_heatmap(adapter: CompactAdapter, png_path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Draw the rank heat map (rows: layers, columns: module types, each cell its rank) into a PNG, atomically."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure  # a bare Figure renders with Agg; pyplot's global state is untouched
    from matplotlib.ticker import MaxNLocator

    _check_png_path(png_path, overwrite)
    labels, types, grid = rank_grid(adapter)
    init_r = adapter.config.init_r
    values = np.full((len(labels), len(types)), np.nan)
    for (i, j), rank in grid.items():
        values[i, j] = rank
    fig = Figure(figsize=(max(5.0, 1.6 + 0.85 * len(types)), max(3.0, 1.6 + 0.32 * len(labels))))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")  # grey: a layer without that module type
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=init_r, aspect="auto")
    fontsize = max(6, min(11, 220 // max(len(labels), 1)))
    for (i, j), rank in grid.items():
        color = "white" if rank < 0.6 * init_r else "black"  # viridis is dark at the low end
        ax.text(j, i, str(rank), ha="center", va="center", color=color, fontsize=fontsize)
    ax.set_xticks(range(len(types)), types, rotation=35, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    s = adapter.summary()
    budget = (
        f"budget {s['budget']} (target_r {s['target_r']} x {s['matrices']})"
        if s["budget_unit"] == "triplets"
        else f"{s['total_parameters']:,} of {s['budget']:,} parameters (LoRA r={s['target_r']})"
    )
    ax.set_title(f"AdaLoRA ranks: total {s['total_rank']}, {budget}, init_r {init_r}", fontsize=10)
    fig.colorbar(image, ax=ax, label="rank", ticks=MaxNLocator(integer=True))
    fig.tight_layout()
    with atomic_output_file(png_path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(png_path)


def _check_png_path(path: str | os.PathLike, overwrite: bool, inputs: dict | None = None) -> None:
    if Path(path).suffix.lower() != ".png":
        raise UserError(f"plot file {path} must end in .png")
    check_output_path(path, overwrite, inputs=inputs)
