"""The command line starts without the heavy libraries, and its light listings match the real ones."""

from __future__ import annotations

import subprocess
import sys

import pytest

from msakit import choices
from msakit.data.catalog import list_datasets
from msakit.models.registry import describe_models

HEAVY = ("torch", "transformers", "matplotlib", "mediapipe")


def test_the_model_listing_read_from_the_source_is_the_registrys():
    assert choices.describe_models() == describe_models()


def test_the_dataset_listing_read_from_the_source_is_the_catalogs():
    assert choices.describe_datasets() == list_datasets()


def test_a_model_without_a_literal_name_or_docstring_is_read_as_the_registry_would():
    source = '''
@register_model("plain")
class Plain(MSAModel):
    x = 1


@register_model(
    "spread",  # a comment
)
@some.other(decorator={"a": 1})
class Spread(
    MSAModel,
):
    # a comment first
    """First line
    and more."""


@register_model("one_line")
class OneLine(MSAModel): "Short." "Joined."


@register_model(NAME)
class Named(MSAModel):
    """Not a literal name: only the registry knows it."""
'''
    assert choices._registered_classes(source) == {"plain": "", "spread": "First line",
                                                    "one_line": "Short.Joined."}


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["models"], ["datasets"]])
def test_help_and_the_listings_do_not_import_torch(args: list[str]):
    script = (
        "import sys\n"
        "from msakit.cli import main\n"
        f"sys.argv = ['msakit', *{args!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        f"print('imported:', *sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip(), "the command printed nothing"
    assert process.stderr.strip().splitlines()[-1] == "imported:", process.stderr
