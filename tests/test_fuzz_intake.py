"""Property-based fuzzing (Hypothesis) of what skutag reads from outside: image bytes through
intake, and catalog rows through the catalog reader.

Random bytes, tiny files, and the Pillow test corpus truncated, bit-flipped and spliced go through
ImageIntake.prepare (a real file under a real image root, the worker's and local mode's per-item
boundary): every one ends as a PreparedImage under twice the engine's side, or an IntakeFailure
whose code is one of intake's documented codes, never internal_error, never an exception; memory
stays bounded. Random rows (unicode, control characters, huge fields, broken quoting, random
bytes) go through read_catalog: each line ends as a row or a bad row with its number, or the whole
file is refused with one InputError.

Derandomized with a fixed example budget, so CI runs the same examples in bounded time; set
SKUTAG_FUZZ_EXAMPLES to search longer locally.
"""

from __future__ import annotations

import csv
import io
import os
import resource
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.catalog import LIMITS, RowError, read_catalog
from pipeline.errors import InputError
from pipeline.images import ImageIntake
from pipeline.ledger import CatalogRow
from pipeline.settings import load_settings
from schemas.images import IntakeFailure, PreparedImage
from schemas.results import ErrorCode

SHARED_CORPUS = Path(__file__).parents[2] / "shared" / "corpus" / "pillow-test-images"
CORPUS = SHARED_CORPUS if SHARED_CORPUS.exists() else Path(__file__).parent / "corpus" / "pillow-test-images"
SEEDS = {path.name: path.read_bytes() for path in sorted(CORPUS.glob("*")) if path.suffix != ".tsv" and path.is_file()}
SEEDS = {name: data for name, data in SEEDS.items() if len(data) <= 200_000}  # keep each example quick

INTAKE_CODES = {
    ErrorCode.NOT_AN_IMAGE, ErrorCode.CORRUPT, ErrorCode.UNSUPPORTED_FORMAT, ErrorCode.DECOMPRESSION_BOMB,
    ErrorCode.TOO_LARGE,
}  # fmt: skip
SIDE = 384
# A failing example with a 300,000-character field makes Hypothesis warn that its report is large;
# the suite turns warnings into errors, which would hide the real failure behind that one.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
EXAMPLES = int(os.environ.get("SKUTAG_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # CI: the same examples every run, so a failure is reproducible and time bounded
    database=None,
    deadline=None,  # a shared 2-core machine: time per example varies; the suite timeout still applies
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-images")


@pytest.fixture(scope="module")
def intake(root: Path) -> ImageIntake:
    # A 4M-pixel cap: a bit flip in a header declares huge sizes; the cap (and the pixel budget)
    # is what bounds them, and a low one keeps each example fast.
    return ImageIntake(load_settings(image_roots=[root], max_image_pixels=4_000_000, decode_budget_mb=64))


def check_one(intake: ImageIntake, root: Path, data: bytes) -> None:
    path = root / "item.bin"
    path.write_bytes(data)
    outcome = intake.prepare(str(path))
    if isinstance(outcome, PreparedImage):
        side = outcome.pixels.shape[0]
        assert outcome.pixels.shape == (side, side, 3) and outcome.pixels.dtype == np.uint8
        assert 1 <= side < 2 * SIDE
    else:
        assert isinstance(outcome, IntakeFailure), outcome
        assert outcome.error.code in INTAKE_CODES, (outcome.error, data[:64])
        assert outcome.error.message
    budget = intake.policy.budget
    assert budget is not None and budget.held == 0


@st.composite
def mutated_seed(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "zero"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:
            data[at : at + draw(st.integers(1, 64))] = b"\0" * min(64, len(data) - at)
    return bytes(data)


MAGIC = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"RIFF\0\0\0\0WEBPVP8 ", b"BM", b"II*\0"]


@FUZZ
@given(data=st.one_of(st.binary(max_size=8), st.binary(max_size=4096), st.sampled_from(MAGIC).flatmap(
    lambda magic: st.binary(max_size=2048).map(lambda tail: magic + tail))))  # fmt: skip
def test_random_and_tiny_bytes_end_as_an_item_result(intake: ImageIntake, root: Path, data: bytes) -> None:
    check_one(intake, root, data)


@FUZZ
@given(data=mutated_seed())
def test_mutated_corpus_images_end_as_an_item_result(intake: ImageIntake, root: Path, data: bytes) -> None:
    check_one(intake, root, data)


def test_fuzzing_intake_keeps_memory_bounded(intake: ImageIntake, root: Path) -> None:
    # Every corpus file truncated at 8 points and bit-flipped at 8: peak RSS may rise by one
    # capped decode, not by the sum of them.
    before = _peak_rss_mb()
    for data in SEEDS.values():
        for fraction in range(1, 9):
            check_one(intake, root, data[: len(data) * fraction // 9])
            flipped = bytearray(data)
            flipped[len(data) * fraction // 9] ^= 0x10
            check_one(intake, root, bytes(flipped))
    assert _peak_rss_mb() - before < 400, f"peak RSS grew {_peak_rss_mb() - before:.0f} MB"


# --- catalog rows ----------------------------------------------------------------------------
def check_catalog(source: io.TextIOBase | io.StringIO, name: str) -> None:
    last = 0
    try:
        for number, row in read_catalog(source, name):  # type: ignore[arg-type]
            assert number > last, (number, last)  # one result per line, in order
            last = number
            if isinstance(row, CatalogRow):
                assert row.sku and row.image_uri and len(row.sku) <= LIMITS["sku"]
                assert not any(ord(c) < 32 for c in row.sku + row.image_uri)
                assert len(row.image_uri) <= LIMITS["image_uri"]
            else:
                assert isinstance(row, RowError) and row.line == number and row.reason
    except InputError as exc:  # the whole file refused: one line that says why
        assert exc.message and "\n" not in exc.message


cells = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=5),  # control characters
    st.sampled_from(["http://[::1/x.jpg", "file:///a.jpg%00", "=cmd()", "a\tb", '"', "\r", "\ufeff"]),
    st.integers(0, 300_000).map(lambda n: "x" * n),  # huge fields, over csv's 131,072 and LIMITS
)
rows_strategy = st.lists(st.lists(cells, min_size=0, max_size=6), max_size=12)


@FUZZ
@given(header=st.sampled_from([["sku", "image_uri"], ["SKU", "Image_URL", "title"], ["image", "sku", "category"]]),
       rows=rows_strategy)  # fmt: skip
def test_random_csv_rows_end_as_rows_or_bad_rows(header: list[str], rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    check_catalog(io.StringIO(buffer.getvalue()), "catalog.csv")


json_values = st.one_of(
    cells, st.booleans(), st.none(), st.integers(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2)
)


@FUZZ
@given(rows=st.lists(st.dictionaries(st.sampled_from(["sku", "image_uri", "title", "category", "x"]), json_values),
       max_size=10))  # fmt: skip
def test_random_jsonl_records_end_as_rows_or_bad_rows(rows: list[dict[str, object]]) -> None:
    import json

    text = "".join(json.dumps(row) + "\n" for row in rows)
    check_catalog(io.StringIO(text), "catalog.jsonl")


@FUZZ
@given(data=st.binary(max_size=2048), name=st.sampled_from(["catalog.csv", "catalog.jsonl"]))
def test_random_text_ends_as_rows_or_bad_rows(data: bytes, name: str) -> None:
    # Raw bytes as UTF-8 text: broken quoting, stray separators, NULs; invalid UTF-8 is replaced
    # here (undecodable bytes in a real file are the submit's concern, tested with it).
    check_catalog(io.StringIO(data.decode("utf-8", "replace")), name)
