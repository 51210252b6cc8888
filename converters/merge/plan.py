"""The merge plan: what each output tensor is (copied, merged or put) and where it goes, from headers only.

Every adapter module and extra weight is mapped to the base tensor that holds it and checked
(shape through ``CompactAdapter.check_fits``, the one definition of "fits"; dtype; duplicates), so
that bad input fails before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adalora_export.adapter import CompactAdapter
from adalora_export.errors import UserError
from adalora_export.layer import weight_layout_factors

from .base_weights import FLOAT_DTYPES, ITEMSIZE, BaseWeights, Entry, dtype_code, resolve_tensor_name


@dataclass
class Merge:
    """Write ``source`` + scale * L @ R (rows of the base layout) under ``name``."""

    name: str
    source: Entry | torch.Tensor  # a base tensor, or an extra weight that replaced the tie source
    dtype: str
    shape: list[int]
    L: torch.Tensor
    R: torch.Tensor
    scale: float


@dataclass
class Put:
    """Write an extra weight (already in ``dtype``) under ``name``."""

    name: str
    value: torch.Tensor
    dtype: str
    shape: list[int]


@dataclass
class Copy:
    """Copy a base tensor unchanged."""

    name: str
    source: Entry

    @property
    def dtype(self) -> str:
        return self.source.dtype

    @property
    def shape(self) -> list[int]:
        return self.source.shape


Item = Copy | Merge | Put


def nbytes(item: Item) -> int:
    """Bytes of an output tensor."""
    count = 1
    for dim in item.shape:
        count *= dim
    return count * ITEMSIZE[item.dtype]


@dataclass
class Plan:
    """The output shards (items in write order, one list per base file) and what the merge did."""

    shards: list[list[Item]] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)
    merged: int = 0
    replaced: int = 0
    added: list[str] = field(default_factory=list)


@dataclass
class Placement:
    """Where a model parameter lands in the base checkpoint."""

    out_name: str  # the output tensor's name
    target: Entry | None  # the base tensor it replaces; None for a new tensor (a tied copy the base lacks)
    base: Entry  # the tensor holding its base value (the tie source when tied)
    tied: bool


def factors(adapter: CompactAdapter, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with scale * L @ R == adapter.delta_weight(path), in the base weight's layout.

    Blockwise merging needs the two low-rank factors, not the full delta; Conv1D stores in x out.
    """
    module = adapter.modules[path]
    left, right = weight_layout_factors(*module.factors(), module.fan_in_fan_out)
    return left.contiguous(), right.contiguous()


def _cast(value: torch.Tensor, dtype: str) -> torch.Tensor:
    """An extra weight in the base tensor's dtype, contiguous, ready to write."""
    target = FLOAT_DTYPES.get(dtype)
    return (value.to(target) if target is not None else value).contiguous()


class _Planner:
    """Builds a Plan; holds the base weights, the tie map and the items found so far."""

    def __init__(self, adapter: CompactAdapter, base_weights: BaseWeights, tied: dict[str, str]):
        self.adapter, self.base_weights, self.tied = adapter, base_weights, tied
        self.names = base_weights.entries
        self.where = f"the base {base_weights.directory}"
        self.merges: dict[str, Merge] = {}
        self.puts: dict[str, Put] = {}
        self.after: dict[str, list[Merge | Put]] = {}  # new tensors, written right after their tie source
        self.extra_sources: dict[str, torch.Tensor] = {}  # base tensors an extra weight replaces
        self.plan = Plan()

    def place(self, model_name: str, what: str) -> Placement:
        """Resolve a model parameter name (following ties) to the base tensors it concerns."""
        names = self.names
        source_name = self.tied.get(model_name)
        if source_name is not None:
            source = resolve_tensor_name(source_name, names)
            if source is None:
                raise UserError(f"{what} is tied to {source_name}, which {self.where} does not hold")
            own = resolve_tensor_name(model_name, names)  # some checkpoints store the tied copy too
            return Placement(own or model_name, names[own] if own else None, names[source], True)
        found = resolve_tensor_name(model_name, names)
        if found is None:
            raise UserError(f"{what} matches no tensor of {self.where} (looked for {model_name})")
        return Placement(found, names[found], names[found], False)

    def build(self) -> Plan:
        modules, missing = {}, None
        for path in self.adapter.modules:
            try:
                modules[path] = self.place(path + ".weight", f"adapter module {path}")
            except UserError as error:
                missing = missing or error
        extras = {name: self._place_extra(name) for name in self.adapter.extra_weights}
        # Shapes first: a base of another size fails on its first layer's shape, as the other exporters
        # report it, not on a layer it lacks further down.
        self._check_fits(modules, extras)
        if missing is not None:
            raise missing
        for path, placed in modules.items():
            self._add_merge(path, placed)
        for name, placed in extras.items():
            self._add_extra(name, placed)
        for merge in self.merges.values():
            if isinstance(merge.source, Entry) and merge.source.name in self.extra_sources:
                merge.source = self.extra_sources[merge.source.name]  # apply_to too puts extras in first
        return self._layout()

    def _place_extra(self, name: str) -> Placement | None:
        """None for a weight the base lacks (a fresh classification head): it is added."""
        if name not in self.tied and resolve_tensor_name(name, self.names) is None:
            return None
        return self.place(name, f"extra weight {name}")

    def _check_fits(self, modules: dict[str, Placement], extras: dict[str, Placement | None]) -> None:
        """Shapes, through the adapter's own check: base layouts turned into (out, in) and parameter shapes."""
        layers = {}
        for path, placed in modules.items():
            shape = list(placed.base.shape)
            module = self.adapter.modules[path]
            if module.fan_in_fan_out:
                shape.reverse()
            if len(shape) != 2:
                expected = [module.out_features, module.in_features][:: -1 if module.fan_in_fan_out else 1]
                raise UserError(
                    f"adapter module {path} needs a weight of shape {expected}; "
                    f"{self.where} has {placed.base.name} of shape {placed.base.shape}"
                )
            layers[path] = (shape[0], shape[1])
        params = {
            name: tuple(placed.base.shape) if placed else tuple(self.adapter.extra_weights[name].shape)
            for name, placed in extras.items()
        }
        self.adapter.check_fits(layers, params, base=str(self.base_weights.directory))

    def _add_merge(self, path: str, placed: Placement) -> None:
        what, base = f"adapter module {path}", placed.base
        if base.dtype not in FLOAT_DTYPES:
            raise UserError(f"{what}: {base.name} in {self.where} is {base.dtype}; only float weights can take a merge")
        if placed.out_name in self.merges:
            raise UserError(
                f"adapter modules {self.merges[placed.out_name].name} and {path} map to the same tensor "
                f"{placed.out_name}"
            )
        if self.adapter.modules[path].rank == 0:
            return  # nothing to add (and a tie may stay)
        compute = torch.float64 if base.dtype == "F64" else torch.float32
        left, right = (t.to(compute) for t in factors(self.adapter, path))
        merge = Merge(placed.out_name, base, base.dtype, base.shape, left, right, self.adapter.scale)
        self.merges[placed.out_name] = merge
        if placed.tied:
            self.plan.untied.append(path + ".weight")
        if placed.target is None:
            self.after.setdefault(base.name, []).append(merge)

    def _add_extra(self, name: str, placed: Placement | None) -> None:
        value = self.adapter.extra_weights[name]
        if placed is None:  # added at the end, in the model's dtype (that of its largest float tensor)
            floats = [e for e in self.names.values() if e.dtype in FLOAT_DTYPES]
            model_dtype = max(floats, key=lambda e: e.nbytes).dtype if floats else None
            dtype = model_dtype if value.is_floating_point() and model_dtype else dtype_code(value.dtype, "", "")
            last = self.base_weights.names_in(len(self.base_weights.files) - 1)[-1]
            self.after.setdefault(last, []).append(Put(name, _cast(value, dtype), dtype, list(value.shape)))
            self.plan.added.append(name)
            return
        if placed.out_name in self.merges:
            raise UserError(f"extra weight {name} is also an adapted module's weight; the adapter is inconsistent")
        base = placed.base
        put = Put(placed.out_name, _cast(value, base.dtype), base.dtype, base.shape)
        self.puts[placed.out_name] = put
        if placed.tied:
            self.plan.untied.append(name)
        if placed.target is None:
            self.after.setdefault(base.name, []).append(put)
        else:
            self.extra_sources[placed.target.name] = put.value

    def _layout(self) -> Plan:
        """The base's tensor order, each file's items in place and new tensors beside their source."""
        plan = self.plan
        for file in range(len(self.base_weights.files)):
            items: list[Item] = []
            for name in self.base_weights.names_in(file):
                items.append(self.merges.get(name) or self.puts.get(name) or Copy(name, self.names[name]))
                items.extend(self.after.get(name, []))
            plan.shards.append(items)
        plan.merged = sum(1 for m in self.merges.values() if m.L.shape[1] > 0)
        plan.replaced = len(self.puts)
        plan.added += [m.name for m in self.merges.values() if m.name not in self.base_weights.entries]
        return plan


def make_plan(adapter: CompactAdapter, base_weights: BaseWeights, tied: dict[str, str]) -> Plan:
    """Map every adapter module and extra weight to the base, checking everything before any write."""
    return _Planner(adapter, base_weights, tied).build()
