"""Image roots and catalog paths: SKUTAG_IMAGE_ROOTS is honoured by every command (`run` and
`--image-root` add to it), and a catalog's relative image paths are resolved against the catalog's
own folder when it is read, and stored absolute."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from PIL import Image
from sqlalchemy.engine import Engine

from pipeline.catalog import catalog_folder, read_catalog
from pipeline.cli import main
from pipeline.ledger import CatalogRow
from pipeline.settings import load_settings


def _image(path: Path, shade: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (120, 160), (shade, 90, 140)).save(path, "JPEG")
    return path


def test_relative_paths_become_absolute_under_the_catalog_folder(tmp_path: Path) -> None:
    text = (
        "sku,image_uri\nA,images/a.jpg\nB,./x/../b.jpg\nC,/abs/c.jpg\nD,https://cdn.example/d.jpg\n"
        "E,file:///abs/e.jpg\nF,../up.jpg\n"
    )
    rows = [row for _, row in read_catalog(io.StringIO(text), "c.csv", tmp_path)]
    assert [row.image_uri for row in rows if isinstance(row, CatalogRow)] == [
        str(tmp_path / "images/a.jpg"), str(tmp_path / "b.jpg"), "/abs/c.jpg", "https://cdn.example/d.jpg",
        "file:///abs/e.jpg", str(tmp_path.parent / "up.jpg"),
    ]  # fmt: skip
    assert catalog_folder(str(tmp_path / "sub" / "c.csv")) == (tmp_path / "sub").resolve()
    assert catalog_folder("-") == Path.cwd()


def test_extra_image_roots_add_to_the_setting(tmp_path: Path) -> None:
    settings = load_settings(image_roots=[tmp_path / "a"])
    roots = settings.with_image_roots(tmp_path / "b", tmp_path / "a", tmp_path / "b").image_roots
    assert roots == [tmp_path / "a", tmp_path / "b"]


def test_submit_stores_absolute_paths_whatever_the_working_directory(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = tmp_path / "shop" / "catalog.jsonl"
    catalog.parent.mkdir()
    catalog.write_text(json.dumps({"sku": "S-1", "image_uri": "img/1.jpg"}) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    url = engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(
        main, ["--database-url", url, "submit", str(catalog)], env={"SKUTAG_BROKER_URL": "redis://127.0.0.1:1/0"}
    )
    assert result.exit_code == 3, result.output  # no broker: the jobs wait in the ledger
    with engine.connect() as conn:
        item = conn.execute(sa.text("SELECT image_uri FROM items WHERE sku = 'S-1'")).scalar_one()
        job = conn.execute(sa.text("SELECT image_uri FROM jobs WHERE sku = 'S-1'")).scalar_one()
    assert item == job == str(tmp_path / "shop" / "img" / "1.jpg")


def test_run_adds_the_catalog_folder_and_image_roots_to_the_setting(tmp_path: Path, tiny_model_dir: Path) -> None:
    shared = tmp_path / "data" / "images"  # SKUTAG_IMAGE_ROOTS
    extra = tmp_path / "extra"  # --image-root
    outside = tmp_path / "outside"  # no root at all
    catalog = tmp_path / "shop" / "catalog.csv"
    _image(catalog.parent / "images" / "own.jpg", 10)
    rows = {
        "OWN": "images/own.jpg",
        "SHARED": str(_image(shared / "shared.jpg", 60)),
        "EXTRA": str(_image(extra / "extra.jpg", 110)),
        "OUTSIDE": str(_image(outside / "outside.jpg", 160)),
    }
    catalog.write_text("sku,image_uri\n" + "".join(f"{sku},{uri}\n" for sku, uri in rows.items()))
    url = f"sqlite:///{tmp_path}/roots.db"
    result = CliRunner().invoke(
        main,
        ["--database-url", url, "run", str(catalog), "--image-root", str(extra), "--model", str(tiny_model_dir),
         "--quantization", "fp32"],
        env={"SKUTAG_IMAGE_ROOTS": json.dumps([str(shared)]), "SKUTAG_SUMMARY_MAX_TOKENS": "2"},
    )  # fmt: skip
    assert result.exit_code == 4, result.output
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        outcome = dict(conn.execute(sa.text("SELECT sku, COALESCE(last_error_code, state) FROM jobs")).all())
    engine.dispose()
    assert outcome["OUTSIDE"] == "forbidden_address"
    assert {outcome[sku] for sku in ("OWN", "SHARED", "EXTRA")} <= {"done", "needs_review"}, outcome
