"""`skutag review ...` and `skutag eval`: parse, call one library function, render."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Any

import click

from pipeline.commands.common import OutputPath, open_database, settings_from
from pipeline.errors import InputError
from pipeline.settings import Settings


@click.group()
def review() -> None:
    """Review tags in the browser, sample them for accuracy, exchange them with Label Studio.

    \b
      skutag review serve                     the review app on http://127.0.0.1:8686
      skutag review hash-password NAME        a users-file line for SKUTAG_REVIEW_USERS_FILE
    """


@review.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Another address needs SKUTAG_REVIEW_TOKEN or SKUTAG_REVIEW_USERS_FILE.")  # fmt: skip
@click.option("--port", default=8686, show_default=True, type=click.IntRange(1, 65535))
@click.option("--reviewer", help="Your name in the log when no credentials are set (default: the OS user).")
@click.pass_context
def serve_command(ctx: click.Context, host: str, port: int, reviewer: str | None) -> None:
    """Serve the review app: the queue (lowest confidence first), one item with its image beside
    every attribute (keys: a accept, 1-9 pick, n not visible, u undo, j/k next/previous), a grid
    with bulk accept, and the evaluation report at /report."""
    from pipeline.review.report import report_for_app
    from pipeline.review.serve import serve

    settings = settings_from(ctx)
    engine = open_database(settings)
    click.echo(f"review app on http://{host}:{port}/ (Ctrl+C stops it)", err=True)
    serve(settings, engine, host, port, reviewer, report_html=report_for_app(settings, engine))


@review.command("hash-password")
@click.argument("name")
def hash_password_command(name: str) -> None:
    """Print a `NAME:scrypt$...` line for the users file (the password is asked twice, not echoed)."""
    from pipeline.review.auth import USER_NAME, hash_password

    if not USER_NAME.fullmatch(name):
        raise click.BadParameter("letters, digits and _.@- only, up to 64", param_hint="NAME")
    password = getpass.getpass("password: ")
    if len(password) < 8 or password != getpass.getpass("again: "):
        raise click.ClickException("passwords differ or are shorter than 8 characters")
    click.echo(f"{name}:{hash_password(password)}")


@review.command("sample")
@click.option("--run", "run_id", type=int, help="Sample from this run's results only.")
@click.option("--size", default=200, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--stratify", type=click.Choice(["category"]), help="Draw from every category in proportion.")
@click.option("--blind", is_flag=True, help="Hide the model's answer from the reviewer (no anchoring).")
@click.option("--seed", type=int, help="Make the draw repeatable.")
@click.pass_context
def sample_command(ctx: click.Context, run_id: int | None, size: int, stratify: str | None, blind: bool,
                   seed: int | None) -> None:  # fmt: skip
    """Queue a random sample of confidently tagged items as audit items: their outcomes are the
    gold `skutag eval` measures accuracy with. Review them in the app (filter reason: audit)."""
    from pipeline.review.sampling import queue_audit_sample

    engine = open_database(settings_from(ctx))
    report = queue_audit_sample(engine, size, run_id, stratify == "category", blind, seed)
    split = ", ".join(f"{name} {n}" for name, n in report.by_category.items()) if stratify else ""
    click.echo(
        f"queued {report.sampled} audit items ({report.tasks} attributes{', blind' if blind else ''}) "
        f"out of {report.eligible} eligible{': ' + split if split else ''}"
    )


@review.command("export")
@click.option("--format", "output_format", type=click.Choice(["label-studio"]), default="label-studio",
              show_default=True)  # fmt: skip
@click.option("--all", "everything", is_flag=True, help="Every sku with tags, not only the review queue.")
@click.option("--run", "run_id", type=int, help="Only queue items of this run.")
@click.option("--image-base-url", metavar="URL",
              help="Serve local images through the review app at URL (its /image?sku=...).")  # fmt: skip
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Default: stdout.")
@click.option("--label-config", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the Label Studio labeling config (XML) the tasks fit.")  # fmt: skip
@click.pass_context
def export_command(ctx: click.Context, output_format: str, everything: bool, run_id: int | None,
                   image_base_url: str | None, output: Path | None, label_config: Path | None) -> None:  # fmt: skip
    """Export tasks for Label Studio: per sku the image URL and one prediction per attribute with
    its confidence as score (Label Studio sorts and filters by it). Import the file into a project
    whose labeling config is --label-config."""
    import json

    from pipeline.review import label_studio
    from schemas.taxonomy import load_taxonomy

    settings = settings_from(ctx)
    tasks = label_studio.export_tasks(open_database(settings), not everything, run_id, image_base_url)
    _emit(json.dumps(tasks, ensure_ascii=False, indent=1), output)
    if label_config is not None:
        label_config.write_text(label_studio.label_config(load_taxonomy(settings.taxonomy_path)), encoding="utf-8")
    click.echo(f"{len(tasks)} tasks, {sum(len(t['predictions']) for t in tasks)} predictions", err=True)


@review.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def import_command(ctx: click.Context, file: Path) -> None:
    """Record the annotations of a Label Studio JSON export (of tasks skutag exported) as reviews:
    validated like the app's decisions; refused ones are listed with a code, the rest recorded."""
    from pipeline.review import label_studio
    from schemas.taxonomy import load_taxonomy

    settings = settings_from(ctx)
    tasks = label_studio.read_export(file)
    report = label_studio.import_annotations(
        open_database(settings), load_taxonomy(settings.taxonomy_path), tasks, settings.notify_channel
    )
    for refusal in report.refused[:20]:
        click.echo(f"refused {refusal.sku} {refusal.attribute}: {refusal.code}: {refusal.message}", err=True)
    for reason in report.skipped[:20]:
        click.echo(f"skipped {reason}", err=True)
    click.echo(f"{report.tasks} tasks: {report.recorded} decisions recorded, {len(report.refused)} refused, "
               f"{len(report.skipped)} tasks without a usable annotation")  # fmt: skip
    if report.refused:
        ctx.exit(2)


@click.command("eval")
@click.option("--run", "run_id", type=int, help="Score this run's results (default: the current tags).")
@click.option("--gold", "gold_file", type=click.Path(dir_okay=False, path_type=Path),
              help="CSV with sku,attribute,value (default: audit reviews).")  # fmt: skip
@click.option("--recommend-thresholds", is_flag=True, help="Per attribute, the threshold reaching --target-precision.")
@click.option("--target-precision", default=0.95, show_default=True, type=click.FloatRange(0.0, 1.0))
@click.option("--write", is_flag=True, help="With --recommend-thresholds: store them as the thresholds in force.")
@click.option("--compare", nargs=2, type=int, metavar="RUN_A RUN_B", help="Agreement of two runs on the same images.")
@click.option("--format", "output", type=click.Choice(["table", "json", "html"]), default="table", show_default=True)
@click.option("--output-file", type=OutputPath(), help="Write there instead of stdout.")
@click.pass_context
def eval_command(ctx: click.Context, run_id: int | None, gold_file: Path | None, recommend_thresholds: bool,
                 target_precision: float, write: bool, compare: tuple[int, int] | None, output: str,
                 output_file: Path | None) -> None:  # fmt: skip
    """How accurate the tags are, per attribute: n, accuracy, macro-F1, coverage and precision at
    the threshold in force, AUROC of the confidence, calibration error (ECE, 10 bins) and the most
    confused values; gold from audit reviews or --gold. --compare RUN_A RUN_B instead reports how
    often two runs agree on the same images (e.g. int8 against bf16 before switching)."""
    from pipeline.review import evaluation

    if write and not recommend_thresholds:
        raise click.UsageError("--write stores recommended thresholds: add --recommend-thresholds")
    settings = settings_from(ctx)
    engine = open_database(settings)
    if compare:
        _echo_agreement(engine, compare, output, output_file)
        return
    reports, n = _evaluate(settings, engine, run_id, gold_file, target_precision if recommend_thresholds else None)
    _echo_reports(reports, output, output_file, run_id)
    if write:
        chosen = {r.attribute: r.recommended for r in reports if r.recommended is not None}
        stored = evaluation.write_thresholds(engine, chosen, target_precision, n, getpass.getuser())
        click.echo(f"stored {stored} thresholds in force (attributes with no threshold reaching the target: "
                   f"{sum(1 for r in chosen.values() if r.threshold is None)})", err=True)  # fmt: skip


def _evaluate(settings: Settings, engine: Any, run_id: int | None, gold_file: Path | None,
              target: float | None) -> tuple[list[Any], dict[str, int]]:  # fmt: skip
    from pipeline.review import evaluation
    from pipeline.routing import Thresholds

    paired, thresholds = evaluation.load_scored(
        engine, run_id, gold_file, Thresholds.from_settings(settings), settings.attribute_thresholds
    )
    if not paired:
        raise InputError(
            "no gold answer matches a prediction: audit a sample first (skutag review sample, then review "
            "it) or pass --gold FILE with sku,attribute,value rows"
        )
    return evaluation.evaluate(paired, thresholds, target), {name: len(items) for name, items in paired.items()}


def _emit(text: str, output_file: Path | None) -> None:
    if output_file is None:
        click.echo(text)
    else:
        output_file.write_text(text, encoding="utf-8")
        click.echo(f"wrote {output_file}", err=True)


def _echo_reports(reports: list[Any], output: str, output_file: Path | None, run_id: int | None) -> None:
    import json

    from pipeline.review import evaluation, report

    if output == "json":
        _emit(json.dumps(evaluation.as_json(reports), indent=2), output_file)
    elif output == "html":
        scope = f"run {run_id}" if run_id is not None else "current tags"
        _emit(report.render_html(reports, f"skutag evaluation: {scope}"), output_file)
    else:
        header, rows = report.table_rows(reports)
        _emit(_table(header, rows), output_file)


def _echo_agreement(engine: Any, runs: tuple[int, int], output: str, output_file: Path | None) -> None:
    import json
    from dataclasses import asdict

    from pipeline.review import evaluation

    agreement = evaluation.compare_runs(engine, *runs)
    if not agreement:
        raise InputError(f"runs {runs[0]} and {runs[1]} share no image (same sku and image sha256)")
    if output == "json":
        _emit(json.dumps([asdict(a) for a in agreement], indent=2), output_file)
        return
    header = ["attribute", "images", "agreement", f"most frequent differences (run {runs[0]}->run {runs[1]})"]
    rows = [[a.attribute, str(a.n), f"{a.agreement:.1%}",
             ", ".join(f"{x}->{y} ({n})" for x, y, n in a.disagreements) or "-"] for a in agreement]  # fmt: skip
    _emit(_table(header, rows), output_file)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]  # fmt: skip
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])
