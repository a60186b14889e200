"""MkDocs hook: pages include facts that live elsewhere instead of retyping them.

A page writes one of these directives on a line of its own:

    <!-- docstring: tfn -->             the model file's docstring (equations, deviations), verbatim
    <!-- docstring: msakit.study.spec -->  a module's docstring (a dotted name), verbatim
    <!-- include: PATH -->              a Markdown file as it is (the changelog)
    <!-- file: PATH -->                 a file as a fenced code block, its language from the suffix
    <!-- results: PATH -->              a results document, its headings moved below the page's
    <!-- rows: PATH | NAME NAME ... -->  the table of a results document cut to the rows whose first
                                        cell is one of the NAMEs, with the commands that made them
    <!-- section: PATH | HEADING -->    the part of a results document under its heading HEADING (up
                                        to the next heading), e.g. one table of a study's leaderboard
    <!-- section: PATH | HEADING | NAME NAME ... -->  the same, its table cut to the rows whose
                                        first cell is one of the NAMEs

PATH is relative to the repository root; directives inside code blocks are left as they are. A
directive whose file, model or rows are missing fails the build, and so does a page that names a
msakit module or name that does not exist (`msakit.data.load_dataset`, `from msakit.data import
...`), so `mkdocs build --strict` catches a page that points at something gone. Docstrings and
names are read with `ast` (msakit is not imported, so the build needs neither torch nor data);
docstrings are shown as preformatted text: they are plain text with aligned equations, which
Markdown would reflow.
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Callable
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
MODELS = SRC / "msakit" / "models"
DOTTED_NAME = re.compile(r"\bmsakit(?:\.\w+)+")
FROM_IMPORT = re.compile(r"\bfrom (msakit(?:\.\w+)*) import ([\w, ]+)")
log = logging.getLogger("mkdocs.hooks.msakit")
DIRECTIVE = re.compile(r"^<!-- (docstring|include|file|results|rows|section): (.+?) -->$")
LANGUAGES = {".yaml": "yaml", ".py": "python", ".json": "json", ".md": "markdown"}


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    def expand(match: re.Match[str]) -> str:
        kind, argument = match.group(1), match.group(2).strip()
        try:
            return EXPANDERS[kind](argument)
        except (OSError, ValueError, SyntaxError) as error:
            raise PluginError(f"{page.file.src_path}: <!-- {kind}: {argument} -->: {error}") from error

    lines, in_fence = [], False
    for line in markdown.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        lines.append(line if in_fence else DIRECTIVE.sub(expand, line))
    for name in sorted(set(names_used(markdown))):
        if not resolves(name):
            log.warning("%s names %s, which does not exist in src/", page.file.src_path, name)
    return "\n".join(lines)


def names_used(markdown: str) -> list[str]:
    """Every msakit name a page mentions: dotted names and `from msakit... import name`."""
    names = DOTTED_NAME.findall(markdown)
    for module, imported in FROM_IMPORT.findall(markdown):
        names += [f"{module}.{name.strip()}" for name in imported.split(",") if name.strip()]
    return names


def resolves(dotted: str) -> bool:
    """Whether the longest module prefix of `dotted` exists under src/ and defines the next part."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        base = SRC.joinpath(*parts[:end])
        source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if source.is_file():
            return end == len(parts) or parts[end] in top_level_names(source)
    return False


def top_level_names(source: Path) -> set[str]:
    """Names a module defines or imports at its top level."""
    names: set[str] = set()
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def read(path: str) -> str:
    return (ROOT / path).read_text(encoding="utf-8")


def model_docstring(name: str) -> str:
    """The docstring of the module that registers `name`, and its class docstring where that says
    more than the one line `msakit models` prints; for a dotted name, that module's docstring."""
    source = SRC.joinpath(*name.split(".")).with_suffix(".py") if "." in name else MODELS / f"{name}.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    parts = [ast.get_docstring(tree) or ""]
    for node in tree.body:
        registered_here = isinstance(node, ast.ClassDef) and any(
            isinstance(d, ast.Call) and d.args and getattr(d.args[0], "value", None) == name
            for d in node.decorator_list
        )
        class_doc = ast.get_docstring(node) if registered_here else None
        if class_doc and "\n" in class_doc.strip():
            parts.append(class_doc)
    text = "\n\n".join(p for p in parts if p).strip()
    if not text:
        raise ValueError(f"{source.relative_to(ROOT)} has no docstring")
    return f"From `{source.relative_to(ROOT)}`:\n\n```text\n{text}\n```"


def code_file(path: str) -> str:
    language = LANGUAGES.get(Path(path).suffix, "text")
    return f"`{path}`:\n\n```{language}\n{read(path).rstrip()}\n```"


def results(path: str) -> str:
    """A results document; its headings become level-4 ones so they sit under the page's own."""
    text = re.sub(r"^#+ ", "#### ", read(path), flags=re.MULTILINE)
    return f"{text.rstrip()}\n\n(`{path}`)"


def first_cell(row: str) -> str:
    """A Markdown table row's first cell (a results table's row name)."""
    return row.split("|")[1].strip()


def section(argument: str) -> str:
    path, heading, *names = (part.strip() for part in argument.split("|"))
    wanted = names[0].split() if names else None
    lines = read(path).splitlines()
    starts = [i for i, line in enumerate(lines) if re.fullmatch(rf"#+ {re.escape(heading)}", line)]
    if len(starts) != 1:
        raise ValueError(f"{path} has {len(starts)} headings {heading!r}, not one")
    body = []
    for line in lines[starts[0] + 1:]:
        if line.startswith("#"):
            break
        body.append(line)
    if wanted is not None:
        table = [i for i, line in enumerate(body) if line.startswith("|")]
        kept = [i for i in table[2:] if first_cell(body[i]) in wanted]
        found = {first_cell(body[i]) for i in kept}
        missing = [name for name in wanted if name not in found]
        if missing:  # a name may have several rows (a per-seed table), but at least one
            raise ValueError(f"{path}, {heading}: no row for {', '.join(missing)}")
        body = [line for i, line in enumerate(body) if i not in table[2:] or i in kept]
    return "\n".join([*body, "", f"(`{path}`, {heading})"]).strip() + "\n"


def rows(argument: str) -> str:
    path, _, names = argument.partition("|")
    path, wanted = path.strip(), names.split()
    lines = read(path).splitlines()
    table = [line for line in lines if line.startswith("|")]
    if len(table) < 3:
        raise ValueError(f"{path} holds no table")
    kept = [line for line in table[2:] if first_cell(line) in wanted]
    if not kept:
        raise ValueError(f"{path} has no row for {', '.join(wanted)}")
    commands = [
        command
        for line in lines if re.search(r"(?:Commands?|Regenerate): `", line)
        for command in re.findall(r"`([^`]+)`", line)
    ]
    names = re.compile("|".join(rf"(?<![\w-]){re.escape(n)}(?![\w-])" for n in wanted))
    commands = [c for c in commands if names.search(c)] or commands
    if not commands:
        raise ValueError(f"{path} names no command that made it (a `Command:` or `Regenerate:` line)")
    made_by = "; ".join(f"`{c}`" for c in commands)
    return "\n".join([*table[:2], *kept, "", f"Made by {made_by} (`{path}`)."])


EXPANDERS: dict[str, Callable[[str], str]] = {
    "docstring": model_docstring, "include": read, "file": code_file, "results": results, "rows": rows,
    "section": section,
}
