"""Budgets: is this model within the challenge rules?

A budget is data (`budgets.toml` beside this file): a byte limit, the weight dtypes allowed,
how many models one artefact may hold, and whether it must carry real weights. The default,
`challenge-15mb`, is the challenge's rule set: at most 15 MB, float32 only, a single model,
non-zero weights. **MB means 10^6 bytes** (the stricter reading): 15 MB = 15,000,000 bytes.

`flm.budgets.measure` measures an artefact (checkpoint, preset, ONNX, Core ML) into a
`Measurement`; `evaluate` turns a measurement and a budget into one `RuleResult` per rule, and
`enforce` raises `BudgetExceeded` naming every failing rule with its numbers.

Torch is imported only inside the functions that build models, so reading the table costs nothing.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from flm.errors import BudgetExceeded, FlmError, UsageError

BUDGETS_FILE = Path(__file__).with_name("budgets.toml")
DEFAULT_BUDGET = "challenge-15mb"
MB = 1_000_000  # one MB is 10^6 bytes, never 2^20
FLOAT32_BYTES = 4
# Widths tried, largest first, when suggesting a `--width` that fits (presets with a width option).
WIDTH_CANDIDATES = (2.0, 1.75, 1.5, 1.25, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)


@dataclass(frozen=True)
class Budget:
    name: str
    description: str
    max_bytes: int  # bytes; MB = 10^6 bytes
    allowed_dtypes: tuple[str, ...] = ("float32",)
    max_models: int = 1
    require_weights: bool = True


@dataclass(frozen=True)
class RuleResult:
    rule: str  # size | dtypes | models | weights
    measured: str
    limit: str
    passed: bool


def some_of(names: list[str], shown: int = 5) -> str:
    """The first few names, and how many more: `a, b, c and 12 more`."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def format_bytes(n: int) -> str:
    """`44.96 MB (44,960,032 bytes)` — MB is 10^6 bytes; the exact count settles edge cases."""
    return f"{n / MB:.2f} MB ({n:,} bytes)"


def _parse_budget(name: str, entry, source) -> Budget:
    if not isinstance(entry, dict):
        raise FlmError(f"{source}: [{name}] must be a table of settings")
    known = {"description", "max_bytes", "allowed_dtypes", "max_models", "require_weights"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise FlmError(f"{source}: [{name}] has unknown key(s) {unknown}; known: {sorted(known)}")
    max_bytes = entry.get("max_bytes")
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
        raise FlmError(f"{source}: [{name}] max_bytes must be a positive integer number of bytes, "
                       f"got {max_bytes!r}")
    dtypes = entry.get("allowed_dtypes", ["float32"])
    if not isinstance(dtypes, list) or not dtypes or not all(isinstance(d, str) for d in dtypes):
        raise FlmError(f"{source}: [{name}] allowed_dtypes must be a non-empty list of dtype names, got {dtypes!r}")
    max_models = entry.get("max_models", 1)
    if not isinstance(max_models, int) or max_models < 1:
        raise FlmError(f"{source}: [{name}] max_models must be an integer >= 1, got {max_models!r}")
    return Budget(name=name, description=str(entry.get("description", "")), max_bytes=max_bytes,
                  allowed_dtypes=tuple(dtypes), max_models=max_models,
                  require_weights=bool(entry.get("require_weights", True)))


def load_budgets(path=None) -> dict[str, Budget]:
    """Read a budgets TOML file (default: the one shipped with flm)."""
    path = Path(path) if path is not None else BUDGETS_FILE
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise FlmError(f"{path}: cannot read the budgets table ({e})") from None
    return {name: _parse_budget(name, entry, path) for name, entry in table.items()}


@lru_cache(maxsize=1)
def _shipped() -> dict[str, Budget]:
    return load_budgets()


def budget_names() -> list[str]:
    return list(_shipped())


def get_budget(name: str | Budget) -> Budget:
    if isinstance(name, Budget):
        return name
    budgets = _shipped()
    if name not in budgets:
        raise UsageError(f"unknown budget {name!r}; known: {', '.join(budgets)}",
                         example=f"flm check-budget best.pt --budget {DEFAULT_BUDGET}")
    return budgets[name]


# --------------------------------------------------------------------------- rules


def _dtype_summary(counts) -> str:
    return ", ".join(f"{d}: {c.tensors} tensor{'s' if c.tensors != 1 else ''}" for d, c in sorted(counts.items()))


def evaluate(m, budget: str | Budget = DEFAULT_BUDGET) -> list[RuleResult]:
    """One result per rule, in table order: size, dtypes, models, weights."""
    budget = get_budget(budget)
    size = m.size_bytes
    results = [RuleResult("size", f"{format_bytes(size)}, {m.size_basis_text}",
                          f"<= {format_bytes(budget.max_bytes)}", size <= budget.max_bytes)]

    bad = {d: c for d, c in m.weight_dtypes.items() if d not in budget.allowed_dtypes}
    if not m.weight_dtypes:
        measured = "no weight tensors"
    elif bad:
        allowed = {d: c for d, c in m.weight_dtypes.items() if d not in bad}
        measured = f"not allowed: {_dtype_summary(bad)}" + (f" (allowed: {_dtype_summary(allowed)})" if allowed else "")
    else:
        measured = _dtype_summary(m.weight_dtypes)
    results.append(RuleResult("dtypes", measured, " or ".join(budget.allowed_dtypes) + " only", not bad))

    labels = f" ({', '.join(m.model_labels)})" if m.models > 1 and m.model_labels else ""
    unused = m.unused_weights
    beside = f"; {len(unused)} tensor(s) beside it that the model does not use: {some_of(unused)}" if unused else ""
    results.append(RuleResult("models", f"{m.models}{labels}{beside}",
                              f"<= {budget.max_models}, no weights beside the model",
                              m.models <= budget.max_models and not unused))

    if budget.require_weights:
        if m.weight_elements == 0:
            measured, ok = "no weights", False
        elif m.nonzero is False:
            measured, ok = f"all {m.weight_elements:,} weight values are zero", False
        else:
            measured, ok = f"{m.weight_elements:,} weight values, not all zero", True
        results.append(RuleResult("weights", measured, "> 0 weights, not all zero", ok))
    return results


def enforce(results: list[RuleResult], budget: str | Budget = DEFAULT_BUDGET) -> None:
    """Raise `BudgetExceeded` naming every failing rule; return quietly when all pass."""
    failures = [(r.rule, r.measured, r.limit) for r in results if not r.passed]
    if failures:
        raise BudgetExceeded(get_budget(budget).name, failures)


# --------------------------------------------------------------------------- presets


def preset_footprint(model: str, img_size: int | None = None, width: float | None = None,
                     head: list[int] | None = None, upsample: str | None = None) -> tuple[int, int]:
    """(parameters, float32 bytes of parameters + floating-point buffers) of a preset with these
    build options, built on torch's meta device (no memory, no initialisation: milliseconds even
    for ResNet-18)."""
    import torch

    from flm.pipeline.models import build_model, preset_options

    with torch.device("meta"):
        module = build_model(model, img_size, preset_options(width, head, upsample=upsample))
    params = sum(p.numel() for p in module.parameters())
    buffers = sum(b.numel() for b in module.buffers() if b.is_floating_point())
    return params, FLOAT32_BYTES * (params + buffers)


def preset_fits(model: str, img_size: int | None = None, width: float | None = None,
                budget: str | Budget = DEFAULT_BUDGET, head: list[int] | None = None,
                upsample: str | None = None) -> tuple[bool, str]:
    """Can preset `model` (at this input size / width / head / upsampling) fit `budget`? Returns (ok, message).

    A preset is float32, one model and initialised with non-zero weights, so only its size can
    fail; the message names the measured size and what would fit instead (a smaller `--width`
    for presets that have one, else presets with the same landmark scheme and output kind).
    """
    from flm.pipeline.models import PRESETS, get_preset

    budget = get_budget(budget)
    preset = get_preset(model)
    params, size = preset_footprint(model, img_size, width, head, upsample)
    what = f"preset {model!r}" + (f" at --width {width:g}" if width is not None else "") + \
           (f" with --head {','.join(map(str, head))}" if head is not None else "") + \
           (f" --upsample {upsample}" if upsample is not None else "") + \
           (f" at --img-size {img_size}" if img_size is not None else "")
    needs = f"{what} needs {format_bytes(size)} of float32 weights ({params:,} parameters)"
    if size <= budget.max_bytes:
        return True, f"{needs}: within budget {budget.name!r} ({format_bytes(budget.max_bytes)})"

    message = f"{needs}, over budget {budget.name!r}: max {format_bytes(budget.max_bytes)}, where MB = 10^6 bytes"
    if img_size is not None:  # some presets (fully connected heads) grow with the input size
        for size_try in range(img_size - 32, 31, -32):
            _, s = preset_footprint(model, size_try, width, head, upsample)
            if s <= budget.max_bytes:
                return False, f"{message}; --img-size {size_try} fits ({format_bytes(s)})"
    if upsample is None and "upsample" in preset.options:
        _, s = preset_footprint(model, img_size, width, head, "light")
        if s <= budget.max_bytes:
            return False, f"{message}; --upsample light fits ({format_bytes(s)})"
    if "width" in preset.options:
        # size grows with width, so the largest width that fits is smaller than the current one
        for w in WIDTH_CANDIDATES:
            try:
                _, s = preset_footprint(model, img_size, w, head, upsample)
            except (KeyError, ValueError, RuntimeError, FlmError):  # a width this preset cannot build
                continue
            if s <= budget.max_bytes:
                return False, f"{message}; --width {w:g} fits ({format_bytes(s)})"
    if head is not None:
        _, s = preset_footprint(model, img_size, width)
        if s <= budget.max_bytes:
            return False, f"{message}; with the default head it fits ({format_bytes(s)})"
    spec = preset.spec
    fitting = []
    for name, other in PRESETS.items():
        if name == model or other.spec.scheme != spec.scheme or other.spec.output != spec.output:
            continue
        _, s = preset_footprint(name, img_size)
        if s <= budget.max_bytes:
            fitting.append((s, name))
    if fitting:
        fitting.sort(reverse=True)
        return False, f"{message}; these fit: " + ", ".join(f"--model {n} ({s / MB:.2f} MB)" for s, n in fitting)
    return False, f"{message}; no preset with the same scheme ({spec.scheme}) and output fits; see `flm models`"

