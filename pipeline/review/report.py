"""The evaluation as a terminal table and as a self-contained HTML page with a reliability diagram
per attribute (matplotlib PNG, embedded), for `skutag eval --format html` and the app's /report."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from io import BytesIO

from sqlalchemy.engine import Engine

from pipeline.review import evaluation
from pipeline.routing import Thresholds
from pipeline.settings import Settings


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_rows(reports: list[evaluation.AttributeReport]) -> tuple[list[str], list[list[str]]]:
    header = ["attribute", "n", "accuracy", "macro-F1", "threshold", "coverage", "precision", "AUROC", "ECE",
              "most confused (gold->predicted)"]  # fmt: skip
    recommend = any(r.recommended for r in reports)
    if recommend:
        header += ["recommended", "its coverage", "its precision"]
    rows = []
    for r in reports:
        confused = ", ".join(f"{g}->{p} ({n})" for g, p, n in r.confused) or "-"
        row = [r.attribute, str(r.n), _pct(r.accuracy), _num(r.macro_f1), _num(r.threshold, 2), _pct(r.coverage),
               _pct(r.precision), _num(r.auroc), _num(r.ece), confused]  # fmt: skip
        if recommend:
            rec = r.recommended
            row += (
                [_num(rec.threshold), _pct(rec.coverage), _pct(rec.precision)]
                if rec and rec.threshold is not None
                else ["none reaches the target", "0.0%", "-"]
            )
        rows.append(row)
    return header, rows


def reliability_png(report: evaluation.AttributeReport) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(3.2, 3.2), dpi=80)
    centers = [(b.low + b.high) / 2 for b in report.bins]
    accuracies = [b.accuracy if b.accuracy is not None else 0.0 for b in report.bins]
    axis.bar(centers, accuracies, width=0.1, edgecolor="#24364b", color="#7fa7d6", label="accuracy")
    axis.plot([0, 1], [0, 1], linestyle="--", color="#b00020", linewidth=1, label="perfect calibration")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("confidence")
    axis.set_ylabel("accuracy")
    axis.set_title(f"{report.attribute} (ECE {_num(report.ece)})", fontsize=9)
    axis.legend(fontsize=6, loc="upper left")
    figure.tight_layout()
    buffer = BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def render_html(reports: list[evaluation.AttributeReport], title: str) -> str:
    header, rows = table_rows(reports)
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    figures = "".join(
        f'<figure><img alt="reliability diagram of {html.escape(r.attribute)}" '
        f'src="data:image/png;base64,{base64.b64encode(reliability_png(r)).decode()}"></figure>'
        for r in reports
    )
    empty = "<p>No gold answers yet: audit a sample (skutag review sample) or pass --gold FILE.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
th,td{{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:left}} figure{{display:inline-block;margin:.5em}}
</style></head><body>
<h1>{html.escape(title)}</h1>
{"<table><thead><tr>" + head + "</tr></thead><tbody>" + body + "</tbody></table>" if reports else empty}
<p>Coverage and precision at the threshold in force: the share of answers published without review
(confidence at or above the threshold) and how often they are right. AUROC: how well the confidence
ranks right answers above wrong ones (0.5 is chance). ECE: expected calibration error, 10 bins.</p>
<section>{figures}</section>
</body></html>"""


def report_for_app(settings: Settings, engine: Engine) -> Callable[[], str]:
    """The /report page of the review app: audits against the current tags, computed on request."""

    def build() -> str:
        with engine.connect() as conn:
            gold = evaluation.gold_from_audits(conn)
            predicted = evaluation.current_predictions(conn, {sku for sku, _ in gold})
            thresholds = evaluation.thresholds_in_force(
                conn, Thresholds.from_settings(settings), settings.attribute_thresholds
            )
        reports = evaluation.evaluate(evaluation.pair_up(gold, predicted), thresholds)
        return render_html(reports, "skutag evaluation: audited items, current tags")

    return build
