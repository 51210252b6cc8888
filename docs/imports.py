"""Draw the project's imports and check that they run with the data flow (docs/design.md).

    python docs/imports.py          # print module -> module edges, then the verdict; exit 1 on a bad edge

Every import is counted, those inside functions too (read with ``ast``, nothing is imported). Each
module has a stage; an edge may point to its own stage or an earlier one, never a later one, and
training and the converters never import each other.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "adalora_export"
# Checkout folder -> installed package name (pyproject's package-dir).
FOLDERS = {ROOT / "adalora_export": PACKAGE, ROOT / "converters": f"{PACKAGE}.converters"}

# The flow, earliest first; a module not named takes the stage of its package.
STAGES = [
    ["errors"],
    ["io", "devices"],
    ["hf", "toy", "pretrained"],
    ["config"],
    ["layer"],
    ["model"],
    ["allocator"],
    ["adapter", PACKAGE],
    ["formats"],
    ["sources"],
    ["prune", "report"],
    ["training"],  # the training branch
    ["converters"],
    ["serving"],
    ["export", "debian"],
    ["real_demo"],
    ["demo"],
    ["cli"],
]
NEVER = [
    ("training", "converters"),
    ("converters", "training"),
    ("converters", "serving"),
    ("serving", "converters"),
]
# What a group may not reach through any chain of imports: converters take a CompactAdapter and never
# touch training state or the allocator; the runtime reads exported directories only.
UNREACHABLE = {
    "converters": ["allocator", "training", "sources", "formats.state"],
    "serving": ["allocator", "training", "sources", "formats.state", "formats.peft", "converters"],
}


def module_name(path: Path) -> str:
    for folder, package in FOLDERS.items():
        if path.is_relative_to(folder):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            return ".".join([package, *parts])
    raise ValueError(path)


def modules() -> dict[str, Path]:
    found = {}
    for folder in FOLDERS:
        for path in sorted(folder.rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``path`` imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import mod" imports the module pkg.mod when it exists
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def group(name: str) -> str:
    """The stage key of a module: the part after the package name, by its first component."""
    if name == PACKAGE:
        return PACKAGE
    return name[len(PACKAGE) + 1 :].split(".")[0]


def stage(name: str) -> int:
    key = group(name)
    for i, names in enumerate(STAGES):
        if key in names:
            return i
    raise SystemExit(f"{name} has no stage in docs/imports.py STAGES: add it")


def reach(start: str, edges: dict[str, set[str]]) -> dict[str, list[str]]:
    """Every module ``start`` imports through any chain, with one chain that leads there."""
    paths, todo = {start: [start]}, [start]
    while todo:
        name = todo.pop()
        for target in sorted(edges[name]):
            if target not in paths:
                paths[target] = paths[name] + [target]
                todo.append(target)
    return paths


def unreachable_hits(edges: dict[str, set[str]]) -> list[str]:
    """Chains from a group to a module it may not reach (``UNREACHABLE``)."""
    hits = []
    for name in sorted(edges):
        banned = [f"{PACKAGE}.{b}" for b in UNREACHABLE.get(group(name), [])]
        for target, chain in sorted(reach(name, edges).items()):
            if any(target == b or target.startswith(b + ".") for b in banned):
                hits.append(" -> ".join(chain))
    return hits


def main() -> int:
    found = modules()
    edges = {name: imports_of(name, found[name], set(found)) for name in found}
    bad = []
    for name in sorted(found):
        for target in sorted(edges[name]):
            wrong = stage(target) > stage(name) or (group(name), group(target)) in NEVER
            if wrong:
                bad.append((name, target))
            print(f"{name} -> {target}{'   <-- AGAINST THE FLOW' if wrong else ''}")
    hits = unreachable_hits(edges)
    for chain in hits:
        print(f"REACHES WHAT IT MAY NOT: {chain}")
    print(f"\n{len(found)} modules; {len(bad)} edge(s) against the flow")
    rules = "; ".join(f"{g} never reaches {', '.join(banned)}" for g, banned in UNREACHABLE.items())
    print(f"{len(hits)} chain(s) breaking: {rules}")
    return 1 if bad or hits else 0


if __name__ == "__main__":
    sys.exit(main())
