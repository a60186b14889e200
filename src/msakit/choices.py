"""What the command line offers to choose from, known without importing torch or numpy.

`msakit --help`, `msakit models` and `msakit datasets` must start at once, so the choices they show
live here or are read from the source files that define them: the models from their classes'
`@register_model("name")` decorators and docstrings, the datasets from `msakit.data.catalog`'s
`DATASETS` literal. The registry and the catalog stay the one place each fact is written; a test
checks that this reading equals theirs.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

# dataset families: which settings section and metric rules apply; "custom" is none of the benchmarks
# (the model's default settings, MOSI's metric rules)
FAMILIES = ("mosi", "mosei", "sims", "simsv2", "synthetic", "custom")
CUE_BACKENDS = ("offline", "openai")

_PACKAGE = Path(__file__).parent
_NOT_MODEL_FILES = {"base.py", "registry.py", "__init__.py"}


def _registered_classes(source: str) -> dict[str, str]:
    """{name: first docstring line} of each class in `source` decorated `@register_model("name")`.

    Reads only the tokens from each decorator to the class's docstring: parsing every model file
    whole took ten times as long (0.1 s against 0.01 s on a loaded 2-core machine).
    """
    found = {}
    for match in re.finditer(r"^@register_model\(", source, flags=re.MULTILINE):
        tokens = (t for t in tokenize.generate_tokens(io.StringIO(source[match.start():]).readline)
                  if t.type not in (tokenize.NL, tokenize.COMMENT))
        next(tokens), next(tokens), next(tokens)  # @ register_model (
        name_token, closing = next(tokens), next(tokens)
        if closing.string == ",":
            closing = next(tokens)
        if name_token.type != tokenize.STRING or closing.string != ")":
            continue  # a name that is not a plain literal: left to the registry (the test compares both)
        depth = 0
        for token in tokens:  # on to the ":" that ends the class header
            if token.type != tokenize.OP:
                continue
            if token.string in ("(", "[", "{"):
                depth += 1
            elif token.string in (")", "]", "}"):
                depth -= 1
            elif token.string == ":" and depth == 0:
                break
        parts = []
        for token in tokens:  # the body's first statement, if it is a string, is the docstring
            if token.type in (tokenize.NEWLINE, tokenize.INDENT):
                continue
            if token.type != tokenize.STRING:
                break
            parts.append(token.string)
        lines = ast.literal_eval(" ".join(parts)).strip().splitlines() if parts else []
        found[ast.literal_eval(name_token.string)] = lines[0] if lines else ""
    return found


def describe_models() -> list[dict[str, str]]:
    """Every model in `msakit/models/*.py` with the first line of its class docstring, by name, as
    `msakit.models.registry.describe_models` gives them after importing every model."""
    found = {}
    for path in sorted((_PACKAGE / "models").glob("*.py")):
        if path.name not in _NOT_MODEL_FILES and not path.name.startswith("_"):
            found.update(_registered_classes(path.read_text(encoding="utf-8")))
    return [{"name": name, "description": found[name]} for name in sorted(found)]


def describe_datasets() -> list[dict[str, str]]:
    """Name, description and what must be given, for each catalog dataset, as
    `msakit.data.catalog.list_datasets` gives them."""
    path = _PACKAGE / "data" / "catalog.py"
    for node in ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "DATASETS" for t in targets):
            datasets = ast.literal_eval(node.value)
            return [{"name": name, "description": entry["description"], "needs": entry["needs"]}
                    for name, entry in datasets.items()]
    raise LookupError(f"no DATASETS literal in {path}")
