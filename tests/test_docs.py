"""docs/studies.md's config reference is generated from the schema (harness.studies_doc) and current."""

from typing import get_args

from pydantic import BaseModel

from harness.config import RunConfig
from harness.studies_doc import BEGIN, END, extract_block, generate

from .helpers import REPO

STUDIES = REPO / "docs" / "studies.md"


def schema_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field of ``model`` and of its nested sections as a dotted path (walked here, independently
    of the generator)."""
    paths = []
    for name, field in model.model_fields.items():
        paths.append(prefix + name)
        for candidate in (field.annotation, *get_args(field.annotation)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                paths += schema_paths(candidate, f"{prefix}{name}.")
    return paths


def test_studies_reference_is_generated_from_the_schema():
    """A field added or changed in harness/config.py without regenerating the page fails here."""
    text = STUDIES.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "docs/studies.md: marker lines missing or repeated"
    assert extract_block(text) == generate(), (
        "docs/studies.md is out of date with harness/config.py; run python -m harness.studies_doc"
    )


def test_every_config_field_appears_in_the_generated_reference():
    paths = schema_paths(RunConfig)
    assert {"seed", "moe.losses.sample_similarity.beta_d", "model.gate_network.fc", "distributed.run_name"} <= set(
        paths
    )
    generated = generate()
    assert [path for path in paths if f"| `{path}` |" not in generated] == []
