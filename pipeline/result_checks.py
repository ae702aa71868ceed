"""Checks a TagResult against the taxonomy before the writer stores it.

The writer refuses a batch holding a result outside the taxonomy rather than store a tag no
reader can interpret; these checks say which result and why, one 'field: reason' per problem.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.errors import InputError
from schemas.results import TagResult
from schemas.taxonomy import CATEGORY, Taxonomy


class InvalidResultError(InputError):
    """A result outside the taxonomy or malformed; `problems` maps batch index -> 'sku: field: why'."""

    code = "invalid_result"

    def __init__(self, problems: dict[int, str]) -> None:
        first = next(iter(problems.values()))
        more = f" (and {len(problems) - 1} more results)" if len(problems) > 1 else ""
        super().__init__(f"invalid result: {first}{more}; nothing from this batch was written")
        self.problems = problems


def result_problems(result: TagResult, taxonomy: Taxonomy) -> list[str]:
    """What is wrong with one result, as 'field: reason'; empty when it may be written."""
    problems: list[str] = []
    if result.job_id is None:
        problems.append("job_id: missing")
    if result.provenance.taxonomy_version != taxonomy.version:
        problems.append(
            f"provenance.taxonomy_version: {result.provenance.taxonomy_version!r} but this writer "
            f"validates against {taxonomy.version!r} (run workers and writer on the same taxonomy)"
        )
    if result.status == "failed":
        if result.error is None:
            problems.append("error: a failed result needs an error code and message")
        return problems
    category = result.category
    if category is None:
        return [*problems, f"attributes.{CATEGORY}: missing"]
    values = {name: tag.value for name, tag in result.attributes.items()}
    problems += [f"attributes.{problem}" for problem in taxonomy.check_tags(category, values)]
    problems += _runner_up_problems(result, taxonomy)
    if result.summary is not None and len(result.summary) > taxonomy.summary_max_chars:
        problems.append(f"summary: {len(result.summary)} characters, over the cap of {taxonomy.summary_max_chars}")
    return problems


def _runner_up_problems(result: TagResult, taxonomy: Taxonomy) -> list[str]:
    allowed = {CATEGORY: taxonomy.category_attribute.value_ids}
    category = result.category
    if category is not None and category in taxonomy.categories:
        allowed |= {a.name: a.value_ids for a in taxonomy.attributes_for(category)}
    return [
        f"attributes.{name}.runner_up: {tag.runner_up!r} is not an allowed value"
        for name, tag in result.attributes.items()
        if tag.runner_up is not None and name in allowed and tag.runner_up not in allowed[name]
    ]


def find_invalid(results: Sequence[TagResult], taxonomy: Taxonomy) -> dict[int, str]:
    invalid = {}
    for index, result in enumerate(results):
        problems = result_problems(result, taxonomy)
        if problems:
            invalid[index] = f"sku {result.sku!r}: {problems[0]}"
    return invalid
