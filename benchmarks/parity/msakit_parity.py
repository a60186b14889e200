"""What every parity check shares: reading `--official`, building unpadded batches, copying weights by
name, measuring differences, and writing `benchmarks/results/parity/<method>.{json,md}`.

A check builds the official model from a checkout the user names (never vendored), copies its
weights into msakit's model by name, feeds both the same unpadded inputs and records the largest
absolute differences of predictions and losses, and the largest gradient difference relative to
the largest gradient. The report states the tolerances reached, the parameter counts and the
commit of the official code.

Gradients in float32 are compared on one branch (`Branches`): a model with ReLUs or max-pooling
is piecewise smooth, its forward pass continuous but its gradient not, and float32 rounding can put
an input lying within rounding of a kink on either side of it, differently in two implementations
that sum in different orders. Such a flip moves that unit's whole contribution to the gradient, so
a float32 gradient comparison measures luck at the kinks, not the code. A check that meets it runs
each model in float64 as well (the same weights and inputs, cast), records there which side of
every kink each input falls on, and imposes those choices on the float32 pass; the float32
gradients are then those of one smooth branch and differ by summation order alone. The report also
gives the float32 gradients as computed and how many choices the float32 passes would have made
otherwise.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from msakit.data.schema import MODALITIES, Batch
from msakit.fileio import atomic_write_json, atomic_write_text

RESULTS = Path("benchmarks/results/parity")
PREDICTION_TOLERANCE = 1e-5  # absolute, predictions and losses
GRADIENT_TOLERANCE = 1e-4  # relative to the largest gradient
# a row's float32 gradients as computed, each model on the branches its own float32 pass takes
OWN_BRANCHES = "gradients on float32's own branches"
_RELU = F.relu
_NORMAL = torch.Tensor.normal_
_RANDN_LIKE = torch.randn_like


def parse_args(method: str, repository: str, commit: str) -> argparse.Namespace:
    """`--official PATH` (a checkout of `repository`, expected at `commit`) and `--output`."""
    parser = argparse.ArgumentParser(description=f"Numerical parity of msakit's {method} with {repository}")
    parser.add_argument("--official", required=True, type=Path,
                        help=f"a checkout of {repository} (tested at {commit[:7]})")
    parser.add_argument("--output", type=Path, default=RESULTS / method,
                        help="results stem: writes STEM.json and STEM.md")
    args = parser.parse_args()
    if not args.official.is_dir():
        parser.error(f"--official {args.official}: not a folder")
    return args


def official_commit(root: Path, expected: str) -> str:
    """The commit of the checkout at `root` when it is a git work tree, else the expected one (an
    exported archive has no history; the report then says which commit it was exported from)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return f"{expected} (exported archive, not verified)"
    return out.stdout.strip()


def import_official(root: Path, *modules: str) -> list:
    """Import `modules` from the official checkout, its root first on the path."""
    import importlib

    sys.path.insert(0, str(root))
    return [importlib.import_module(m) for m in modules]


def mmsa_packages(root: Path, *packages: str) -> Path:
    """Stand-in packages for MMSA's `packages` (their real __init__ files import every model and
    MMSA's runner), so that one model's and trainer's files import with their relative imports, and
    MMSA.utils with the trainer's metric table stubbed (no loss reads it). MMSA modules imported
    before are dropped. Returns MMSA's source folder (`root/src`, or `root` itself)."""
    src = root / "src" if (root / "src" / "MMSA").is_dir() else root
    for name in [n for n in sys.modules if n == "MMSA" or n.startswith("MMSA.")]:
        del sys.modules[name]
    sys.path.insert(0, str(src))
    for name in packages:
        package = types.ModuleType(name)
        package.__path__ = [str(src.joinpath(*name.split(".")))]
        sys.modules[name] = package
    utils = types.ModuleType("MMSA.utils")
    utils.MetricsTop = lambda mode: types.SimpleNamespace(getMetics=lambda dataset: None)
    utils.dict_to_str = str
    sys.modules["MMSA.utils"] = utils
    return src


def full_batch(labels: torch.Tensor, clean: Batch | None = None, **inputs: torch.Tensor) -> Batch:
    """A batch of unpadded inputs: every token and frame valid, every modality present."""
    size = labels.shape[0]
    masks = {f"{m}_mask": torch.ones(v.shape[:2], dtype=torch.bool)
             for m, v in inputs.items() if m in MODALITIES}
    return Batch(labels=labels, index=torch.arange(size), ids=[str(i) for i in range(size)],
                 presence=torch.ones(size, 3, dtype=torch.bool), clean=clean, **inputs, **masks)


def rename_state(state: dict[str, torch.Tensor], rules: Iterable[tuple[str, str]],
                 inner: Iterable[tuple[str, str]] = ()) -> dict[str, torch.Tensor]:
    """Official parameter names -> msakit's: the first matching rule of `rules`, then every rule of
    `inner` in order (regex substitutions)."""
    rules, inner = list(rules), list(inner)
    out = {}
    for name, value in state.items():
        new = name
        for pattern, repl in rules:
            if re.search(pattern, new):
                new = re.sub(pattern, repl, new)
                break
        for pattern, repl in inner:
            new = re.sub(pattern, repl, new)
        out[new] = value
    return out


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def gradient_difference(official: nn.Module, ours: nn.Module, official_name: Callable[[str], str],
                        transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                        ) -> dict[str, float]:
    """Largest absolute gradient difference over msakit's parameters (each matched to the official
    parameter `official_name` maps it to), the largest official gradient, and their ratio. A
    parameter with a gradient on one side only counts its whole gradient as the difference. An
    official parameter allocated longer than it is read (e.g. positions for more steps than the
    model sees) is compared on msakit's leading part, and its gradient beyond counts as a difference;
    one stored in another shape of the same size (a 1x1 convolution) is compared reshaped.
    `transform(name, gradient)`, when given, first puts the official gradient of msakit's parameter
    `name` into msakit's layout (e.g. the same permutation the weights were copied with)."""
    theirs = dict(official.named_parameters())
    worst, scale = 0.0, 0.0
    for name, param in ours.named_parameters():
        other = theirs[official_name(name)]
        mine = torch.zeros_like(param) if param.grad is None else param.grad
        ref = torch.zeros_like(other) if other.grad is None else other.grad
        if transform is not None:
            ref = transform(name, ref)
        if ref.shape != mine.shape and ref.numel() == mine.numel():  # e.g. a 1x1 convolution
            ref = ref.reshape(mine.shape)
        if ref.shape != mine.shape:
            part = tuple(slice(0, n) for n in mine.shape)
            beyond = ref.clone()
            beyond[part] = 0
            worst = max(worst, beyond.abs().max().item())
            ref = ref[part]
        worst = max(worst, max_abs(mine, ref))
        scale = max(scale, ref.abs().max().item())
    return {"max_abs_diff": worst, "largest_gradient": scale,
            "relative": worst / scale if scale else worst}


class Branches:
    """The side of every kink one pass of a model takes, recorded in its float64 pass and imposed
    on its float32 pass (see the module docstring): which ReLU inputs are positive, and which step
    each max-pool takes. Calls are matched by order, so both passes must run the same code.
    `departures` counts, per kind, the choices the imposed pass would have made otherwise (ties
    exact in float64, such as the identical steps of an all-zero input, are not counted)."""

    def __init__(self) -> None:
        self.imposing = False
        self.departures = {"ReLU": 0, "max-pool": 0}
        self._relu: list[torch.Tensor] = []
        self._max: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._calls = {"ReLU": 0, "max-pool": 0}

    def _recorded(self, kind: str, store: list) -> object:
        index = self._calls[kind]
        if index >= len(store):
            raise RuntimeError(f"the imposed pass makes more {kind} calls than the recorded {len(store)}")
        self._calls[kind] += 1
        return store[index]

    def impose(self) -> None:
        """From now on, impose the recorded choices, from the first call on."""
        self.imposing = True
        self._calls = {kind: 0 for kind in self._calls}

    def relu(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        positive = x > 0
        if not self.imposing:
            self._relu.append(positive)
            return _RELU(x, inplace=inplace)
        recorded = self._recorded("ReLU", self._relu).to(x.device)
        self.departures["ReLU"] += int((recorded != positive).sum())
        return x.masked_fill(~recorded, 0.0)

    def max(self, x: torch.Tensor, dim: int, original: Callable[[], torch.Tensor],
            keepdim: bool = False) -> torch.Tensor:
        """Max of `x` over `dim`: recording, the step the max takes is noted and `original()` (the
        model's own pooling) returned; imposing, the value at the recorded step."""
        if not self.imposing:
            best = x.amax(dim=dim, keepdim=True)
            tied = (x == best).sum(dim=dim, keepdim=True) > 1
            self._max.append((x.argmax(dim=dim, keepdim=True), tied))
            return original()
        step, tied = self._recorded("max-pool", self._max)
        chosen = x.gather(dim, step.to(x.device))
        self.departures["max-pool"] += int(((chosen < x.amax(dim=dim, keepdim=True)) & ~tied).sum())
        return chosen if keepdim else chosen.squeeze(dim)


@contextmanager
def relus_through(branches: Branches, *models: nn.Module) -> Iterator[None]:
    """Every ReLU of `models` through `branches`: F.relu (nn.ReLU calls it too) and the
    `activation` of layers holding F.relu itself (nn.TransformerEncoderLayer's default)."""
    holders = [m for model in models for m in model.modules() if getattr(m, "activation", None) is _RELU]
    F.relu = branches.relu
    for module in holders:
        module.activation = branches.relu
    try:
        yield
    finally:
        F.relu = _RELU
        for module in holders:
            module.activation = _RELU


@contextmanager
def float32_draws() -> Iterator[None]:
    """Normal draws (`Tensor.normal_`, `torch.randn_like`) taken in float32 and cast, so that a
    float64 pass under the same seed gets the noise of the float32 pass."""

    def normal_(self: torch.Tensor, mean: float = 0.0, std: float = 1.0, *,
                generator: torch.Generator | None = None) -> torch.Tensor:
        draw = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        return self.copy_(_NORMAL(draw, mean, std, generator=generator))

    def randn_like(like: torch.Tensor, *, dtype: torch.dtype | None = None, **kwargs: object) -> torch.Tensor:
        return _RANDN_LIKE(like, dtype=torch.float32, **kwargs).to(dtype or like.dtype)

    torch.Tensor.normal_, torch.randn_like = normal_, randn_like
    try:
        yield
    finally:
        torch.Tensor.normal_, torch.randn_like = _NORMAL, _RANDN_LIKE


def within_tolerance(row: dict) -> bool:
    return (max(row["max_abs_diff"].values()) <= PREDICTION_TOLERANCE
            and row["gradients"]["relative"] <= GRADIENT_TOLERANCE)


def write_report(method: str, output: Path, repository: str, commit: str, rows: list[dict],
                 switches: dict[str, str], notes: str = "") -> str:
    """STEM.json and STEM.md: one row per dataset size with its differences. `switches` names each
    msakit setting the check turned on to follow the official behaviour, with the reason."""
    command = shlex.join(["python", *sys.argv])
    record = {"method": method, "command": command, "official": {"repository": repository,
                                                                 "commit": commit},
              "tolerance": {"predictions_and_losses_abs": PREDICTION_TOLERANCE,
                            "gradients_relative": GRADIENT_TOLERANCE},
              "switches": switches, "rows": rows,
              "passed": all(within_tolerance(r) for r in rows)}
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(f"{output}.json"), record)
    keys = list(dict.fromkeys(k for row in rows for k in row["max_abs_diff"]))  # rows may differ
    own = any(OWN_BRANCHES in row for row in rows)
    lines = [f"# {method} parity with `{repository}` @ {commit}", "",
             "| dataset | parameters (official / msakit) | " + " | ".join(keys)
             + " | gradients (max abs / largest / relative) | "
             + ("gradients on float32's own branches: relative (choices off the float64 branch, "
                "official / msakit) | " if own else "") + "within tolerance |",
             "|---" * (len(keys) + 4 + own) + "|"]
    for row in rows:
        p, g = row["parameters"], row["gradients"]
        cells = [f"{row['max_abs_diff'][k]:.1e}" if k in row["max_abs_diff"] else "-" for k in keys]
        cells.append(f"{g['max_abs_diff']:.1e} / {g['largest_gradient']:.1e} / {g['relative']:.1e}")
        if own:
            free = row.get(OWN_BRANCHES)
            cells.append("-" if free is None else f"{free['relative']:.1e} ("
                         + " / ".join(", ".join(f"{n} {kind}" for kind, n in free['departures'][side].items())
                                      for side in ("official", "msakit")) + ")")
        lines.append(f"| {row['dataset']} | {p['official']:,} / {p['msakit']:,} | " + " | ".join(cells)
                     + f" | {'yes' if within_tolerance(row) else 'NO'} |")
    lines += ["", f"Tolerances: predictions and losses {PREDICTION_TOLERANCE:g} absolute, gradients "
              f"{GRADIENT_TOLERANCE:g} relative to the largest gradient "
              + ("(CPU; float32 gradients on the branches of the float64 pass, `Branches` in "
                 "benchmarks/parity/msakit_parity.py)." if own else "(float32, CPU).")]
    if switches:
        lines += ["", "msakit settings switched to the official behaviour for this check:", ""]
        lines += [f"- `{k}`: {v}" for k, v in switches.items()]
    if notes:
        lines += ["", notes]
    lines += ["", f"Command: `{command}`"]
    text = "\n".join(lines) + "\n"
    atomic_write_text(Path(f"{output}.md"), text)
    return text
