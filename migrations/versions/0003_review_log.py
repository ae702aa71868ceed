"""Reviews become a validated, append-only log; the current decisions, the review queue (tasks and
items) and its reasons get tables; the consumer views read decisions for the current image.

The database itself refuses a review whose value is outside the taxonomy, whose image hash is
missing, or any UPDATE/DELETE of the log: Postgres with statement-level triggers (set-based, so a
bulk accept of thousands of rows stays one pass), SQLite with row triggers.

Revision ID: 0003_review_log
Revises: 0002_listing_issues
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_review_log"
down_revision: str | None = "0002_listing_issues"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Ts = sa.DateTime(timezone=True)

# Why an item is in the queue. More can be added as rows; tasks and reviews refer to them.
REASONS = (
    ("low_confidence", "the model's confidence is under the threshold in force"),
    ("audit", "a random sample of confident answers, checked to measure accuracy (gold)"),
    ("import", "an annotation imported from Label Studio"),
    ("manual", "a decision recorded outside the queue"),
    ("legacy", "a review from before the review log"),
)
ACTIONS = ("accept", "correct", "not_visible", "undo")
NOT_VISIBLE = "not_visible"


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.execute("DROP VIEW IF EXISTS sku_tags_json")
    op.execute("DROP VIEW IF EXISTS sku_tags_current")
    op.rename_table("reviews", "reviews_0001")
    if postgres:  # constraint names are per schema in Postgres; the new log takes pk_reviews
        op.execute("ALTER TABLE reviews_0001 RENAME CONSTRAINT pk_reviews TO pk_reviews_0001")
    _create_reasons()
    _create_log()
    _create_queue()
    if postgres:
        for statement in _PG_TRIGGERS:
            op.execute(statement)
    else:
        for statement in _SQLITE_TRIGGERS:
            op.execute(statement)
    _copy_legacy_reviews()
    op.drop_table("reviews_0001")
    _open_tasks_for_existing_results(postgres)
    _create_views(postgres)


def _create_reasons() -> None:
    reasons = op.create_table(
        "review_reasons",
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("reason", name="pk_review_reasons"),
    )
    op.bulk_insert(reasons, [{"reason": r, "description": d} for r, d in REASONS])


def _create_log() -> None:
    actions = ", ".join(repr(a) for a in ACTIONS)
    op.create_table(
        "reviews",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("sku", sa.Text, nullable=False),
        sa.Column("attribute", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("value", sa.Text),
        sa.Column("value_before", sa.Text),
        sa.Column("image_sha256", sa.Text, nullable=False),
        sa.Column("job_id", BigId),
        sa.Column("taxonomy_version", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("reviewer", sa.Text, nullable=False),
        sa.Column("blind", sa.Boolean, server_default=sa.false(), nullable=False),
        sa.Column("undoes", BigId),
        sa.Column("note", sa.Text),
        sa.Column("reviewed_at", Ts, nullable=False),
        sa.CheckConstraint(f"action IN ({actions})", name="ck_reviews_action"),
        sa.CheckConstraint("value IS NOT NULL OR action = 'undo'", name="ck_reviews_value"),
        sa.CheckConstraint("undoes IS NOT NULL OR action <> 'undo'", name="ck_reviews_undo"),
        sa.CheckConstraint("length(image_sha256) > 0 AND length(reviewer) > 0", name="ck_reviews_present"),
        sa.ForeignKeyConstraint(["reason"], ["review_reasons.reason"], name="fk_reviews_reason_review_reasons"),
        sa.ForeignKeyConstraint(["undoes"], ["reviews.id"], name="fk_reviews_undoes_reviews"),
        sa.PrimaryKeyConstraint("id", name="pk_reviews"),
    )
    op.create_index("ix_reviews_sku_attribute", "reviews", ["sku", "attribute", "id"])
    op.create_index("ix_reviews_reason_id", "reviews", ["reason", "id"])
    op.create_table(
        "review_decisions",
        sa.Column("sku", sa.Text, nullable=False),
        sa.Column("attribute", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("image_sha256", sa.Text, nullable=False),
        sa.Column("review_id", BigId, nullable=False),
        sa.Column("reviewer", sa.Text, nullable=False),
        sa.Column("reviewed_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("sku", "attribute", name="pk_review_decisions"),
    )


def _create_queue() -> None:
    op.create_table(
        "review_tasks",
        sa.Column("sku", sa.Text, nullable=False),
        sa.Column("attribute", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("image_sha256", sa.Text, nullable=False),
        sa.Column("blind", sa.Boolean, server_default=sa.false(), nullable=False),
        sa.Column("created_at", Ts, nullable=False),
        sa.ForeignKeyConstraint(["reason"], ["review_reasons.reason"], name="fk_review_tasks_reason_review_reasons"),
        sa.PrimaryKeyConstraint("sku", "attribute", name="pk_review_tasks"),
    )
    op.create_index("ix_review_tasks_attribute_confidence", "review_tasks", ["attribute", "confidence", "sku"])
    op.create_table(
        "review_items",
        sa.Column("sku", sa.Text, nullable=False),
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("run_id", BigId, nullable=False),
        sa.Column("category", sa.Text),
        sa.Column("image_sha256", sa.Text, nullable=False),
        sa.Column("min_confidence", sa.Float, nullable=False),
        sa.Column("open_tasks", sa.Integer, nullable=False),
        sa.Column("claimed_by", sa.Text),
        sa.Column("claimed_until", Ts),
        sa.Column("created_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("sku", name="pk_review_items"),
    )
    op.create_index("ix_review_items_min_confidence", "review_items", ["min_confidence", "sku"])
    op.create_index("ix_review_items_run_id", "review_items", ["run_id", "min_confidence", "sku"])


# --- triggers --------------------------------------------------------------------------------
# What a decision does, in both databases: the newest row per (sku, attribute) becomes the current
# decision (an undo with no value hands the attribute back to the model), its open task closes,
# and the sku's queue item shrinks or goes.
_PG_TRIGGERS = (
    """
CREATE FUNCTION skutag_reviews_validate() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE bad record;
BEGIN
    SELECT n.sku, n.attribute, n.value, n.taxonomy_version INTO bad FROM inserted n
    WHERE n.value IS NOT NULL
      AND NOT (n.value = 'not_visible' AND n.action IN ('not_visible', 'undo'))
      AND NOT EXISTS (SELECT 1 FROM taxonomy_values tv WHERE tv.taxonomy_version = n.taxonomy_version
                        AND tv.attribute = n.attribute AND tv.value = n.value)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'review of sku %: % is not a value of attribute % in taxonomy %',
            quote_literal(bad.sku), quote_literal(bad.value), quote_literal(bad.attribute), bad.taxonomy_version
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$
""",
    """
CREATE FUNCTION skutag_reviews_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM review_decisions d
        USING (SELECT DISTINCT ON (sku, attribute) * FROM inserted ORDER BY sku, attribute, id DESC) n
        WHERE d.sku = n.sku AND d.attribute = n.attribute AND n.value IS NULL;
    INSERT INTO review_decisions (sku, attribute, value, image_sha256, review_id, reviewer, reviewed_at)
        SELECT sku, attribute, value, image_sha256, id, reviewer, reviewed_at
        FROM (SELECT DISTINCT ON (sku, attribute) * FROM inserted ORDER BY sku, attribute, id DESC) n
        WHERE value IS NOT NULL ORDER BY sku, attribute
        ON CONFLICT (sku, attribute) DO UPDATE SET value = excluded.value,
            image_sha256 = excluded.image_sha256, review_id = excluded.review_id,
            reviewer = excluded.reviewer, reviewed_at = excluded.reviewed_at;
    DELETE FROM review_tasks t USING inserted n
        WHERE t.sku = n.sku AND t.attribute = n.attribute AND t.image_sha256 = n.image_sha256
          AND n.value IS NOT NULL;
    DELETE FROM review_items i
        WHERE i.sku IN (SELECT sku FROM inserted)
          AND NOT EXISTS (SELECT 1 FROM review_tasks t WHERE t.sku = i.sku);
    UPDATE review_items i SET min_confidence = agg.low, open_tasks = agg.open
        FROM (SELECT t.sku, MIN(t.confidence) AS low, COUNT(*) AS open FROM review_tasks t
              WHERE t.sku IN (SELECT sku FROM inserted) GROUP BY t.sku) agg
        WHERE i.sku = agg.sku AND (i.min_confidence <> agg.low OR i.open_tasks <> agg.open);
    RETURN NULL;
END $$
""",
    """
CREATE FUNCTION skutag_reviews_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'reviews is an append-only log: record a new review (or an undo) instead of %', TG_OP
        USING ERRCODE = 'restrict_violation';
END $$
""",
    """CREATE TRIGGER tr_reviews_1_validate AFTER INSERT ON reviews REFERENCING NEW TABLE AS inserted
       FOR EACH STATEMENT EXECUTE FUNCTION skutag_reviews_validate()""",
    """CREATE TRIGGER tr_reviews_2_apply AFTER INSERT ON reviews REFERENCING NEW TABLE AS inserted
       FOR EACH STATEMENT EXECUTE FUNCTION skutag_reviews_apply()""",
    """CREATE TRIGGER tr_reviews_append_only BEFORE UPDATE OR DELETE ON reviews
       FOR EACH ROW EXECUTE FUNCTION skutag_reviews_append_only()""",
)

# SQLite's RAISE takes a fixed message; the application validates first and names the value.
_SQLITE_TRIGGERS = (
    """
CREATE TRIGGER tr_reviews_validate BEFORE INSERT ON reviews
WHEN NEW.value IS NOT NULL
 AND NOT (NEW.value = 'not_visible' AND NEW.action IN ('not_visible', 'undo'))
 AND NOT EXISTS (SELECT 1 FROM taxonomy_values tv WHERE tv.taxonomy_version = NEW.taxonomy_version
                   AND tv.attribute = NEW.attribute AND tv.value = NEW.value)
BEGIN
    SELECT RAISE(ABORT, 'review value is not a value of its attribute in the taxonomy');
END
""",
    """
CREATE TRIGGER tr_reviews_apply AFTER INSERT ON reviews
BEGIN
    DELETE FROM review_decisions WHERE NEW.value IS NULL AND sku = NEW.sku AND attribute = NEW.attribute;
    INSERT OR REPLACE INTO review_decisions (sku, attribute, value, image_sha256, review_id, reviewer, reviewed_at)
        SELECT NEW.sku, NEW.attribute, NEW.value, NEW.image_sha256, NEW.id, NEW.reviewer, NEW.reviewed_at
        WHERE NEW.value IS NOT NULL;
    DELETE FROM review_tasks WHERE NEW.value IS NOT NULL AND sku = NEW.sku AND attribute = NEW.attribute
        AND image_sha256 = NEW.image_sha256;
    DELETE FROM review_items WHERE sku = NEW.sku AND NOT EXISTS (SELECT 1 FROM review_tasks t WHERE t.sku = NEW.sku);
    UPDATE review_items SET
        min_confidence = (SELECT MIN(confidence) FROM review_tasks t WHERE t.sku = NEW.sku),
        open_tasks = (SELECT COUNT(*) FROM review_tasks t WHERE t.sku = NEW.sku)
    WHERE sku = NEW.sku;
END
""",
    """
CREATE TRIGGER tr_reviews_no_update BEFORE UPDATE ON reviews
BEGIN
    SELECT RAISE(ABORT, 'reviews is an append-only log: record a new review (or an undo) instead');
END
""",
    """
CREATE TRIGGER tr_reviews_no_delete BEFORE DELETE ON reviews
BEGIN
    SELECT RAISE(ABORT, 'reviews is an append-only log: record a new review (or an undo) instead');
END
""",
)


def _copy_legacy_reviews() -> None:
    # Only what the new rules accept: an image hash and a value of the taxonomy the tags use.
    op.execute("""
INSERT INTO reviews (sku, attribute, action, value, value_before, image_sha256, job_id, taxonomy_version,
                     reason, reviewer, note, reviewed_at)
SELECT r.sku, r.attribute, 'correct', r.value, t.value, r.image_sha256, t.job_id, t.taxonomy_version,
       'legacy', r.reviewer, r.note, r.reviewed_at
FROM reviews_0001 r JOIN tags t ON t.sku = r.sku AND t.attribute = r.attribute
WHERE r.image_sha256 IS NOT NULL AND length(r.reviewer) > 0
  AND EXISTS (SELECT 1 FROM taxonomy_values tv WHERE tv.taxonomy_version = t.taxonomy_version
                AND tv.attribute = r.attribute AND tv.value = r.value)
ORDER BY r.reviewed_at
""")


def _open_tasks_for_existing_results(postgres: bool) -> None:
    expand = (
        "jsonb_array_elements_text(r.review_attributes) AS a(value)"
        if postgres
        else "json_each(r.review_attributes) AS a"
    )
    op.execute(f"""
INSERT INTO review_tasks (sku, attribute, reason, confidence, job_id, image_sha256, created_at)
SELECT s.sku, t.attribute, 'low_confidence', t.confidence, s.job_id, s.image_sha256, s.updated_at
FROM tag_sets s
JOIN results r ON r.job_id = s.job_id
CROSS JOIN {expand}
JOIN tags t ON t.sku = s.sku AND t.attribute = a.value
WHERE s.status = 'needs_review' AND s.image_sha256 IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM review_decisions d WHERE d.sku = s.sku AND d.attribute = t.attribute
                    AND d.image_sha256 = s.image_sha256)
""")
    op.execute("""
INSERT INTO review_items (sku, job_id, run_id, category, image_sha256, min_confidence, open_tasks, created_at)
SELECT s.sku, s.job_id, r.run_id, s.category, s.image_sha256, MIN(t.confidence), COUNT(*), MIN(t.created_at)
FROM review_tasks t JOIN tag_sets s ON s.sku = t.sku JOIN results r ON r.job_id = s.job_id
GROUP BY s.sku, s.job_id, r.run_id, s.category, s.image_sha256
""")


# --- the consumer views ----------------------------------------------------------------------
# A decision counts only for the image the reviewer saw: a re-tag of the same image keeps it, a
# new image hands the attribute back to the model (and the writer reopens its task).
_CURRENT_VIEW = """
CREATE VIEW sku_tags_current AS
SELECT t.sku,
       t.attribute,
       COALESCE(d.value, t.value) AS value,
       CASE WHEN d.value IS NULL THEN t.confidence ELSE 1.0 END AS confidence,
       CASE WHEN d.value IS NULL THEN 'model' ELSE 'review' END AS source,
       tv.label_en,
       tv.label_zh,
       t.value AS model_value,
       t.confidence AS model_confidence,
       t.runner_up,
       t.model_id,
       t.taxonomy_version,
       {latest} AS updated_at,
       d.reviewer
FROM tags t
LEFT JOIN review_decisions d
       ON d.sku = t.sku AND d.attribute = t.attribute AND d.image_sha256 = t.image_sha256
LEFT JOIN taxonomy_values tv
       ON tv.taxonomy_version = t.taxonomy_version
      AND tv.attribute = t.attribute
      AND tv.value = COALESCE(d.value, t.value)
"""

# needs_review turns into tagged once every attribute routed to review has a decision for the
# current image.
_STATUS = """
CASE WHEN s.status = 'needs_review' AND NOT EXISTS (
        SELECT 1 FROM results r CROSS JOIN {expand}
        WHERE r.job_id = s.job_id
          AND NOT EXISTS (SELECT 1 FROM review_decisions d WHERE d.sku = s.sku AND d.attribute = a.value
                            AND d.image_sha256 = s.image_sha256))
     THEN 'tagged' ELSE s.status END"""

_JSON_VIEW_POSTGRES = """
CREATE VIEW sku_tags_json AS
SELECT s.sku,
       s.status,
       s.updated_at,
       jsonb_build_object(
           'sku', s.sku,
           'status', s.status,
           'summary', s.summary,
           'model_id', s.model_id,
           'prompt_version', s.prompt_version,
           'taxonomy_version', s.taxonomy_version,
           'updated_at', s.updated_at,
           'attributes', COALESCE(
               (SELECT jsonb_object_agg(c.attribute, jsonb_build_object(
                           'value', c.value, 'confidence', c.confidence, 'source', c.source))
                FROM sku_tags_current c WHERE c.sku = s.sku),
               '{{}}'::jsonb)
       ) AS tags
FROM (SELECT s.sku, {status} AS status, s.summary, s.model_id, s.prompt_version, s.taxonomy_version,
             s.updated_at
      FROM tag_sets s) s
"""

_JSON_VIEW_SQLITE = """
CREATE VIEW sku_tags_json AS
SELECT s.sku,
       s.status,
       s.updated_at,
       json_object(
           'sku', s.sku,
           'status', s.status,
           'summary', s.summary,
           'model_id', s.model_id,
           'prompt_version', s.prompt_version,
           'taxonomy_version', s.taxonomy_version,
           'updated_at', s.updated_at,
           'attributes', json(COALESCE(
               (SELECT json_group_object(c.attribute, json_object(
                           'value', c.value, 'confidence', c.confidence, 'source', c.source))
                FROM sku_tags_current c WHERE c.sku = s.sku),
               '{{}}'))
       ) AS tags
FROM (SELECT s.sku, {status} AS status, s.summary, s.model_id, s.prompt_version, s.taxonomy_version,
             s.updated_at
      FROM tag_sets s) s
"""


def _create_views(postgres: bool) -> None:
    if postgres:
        status = _STATUS.format(expand="jsonb_array_elements_text(r.review_attributes) AS a(value)")
        op.execute(_CURRENT_VIEW.format(latest="GREATEST(t.updated_at, d.reviewed_at)"))
        op.execute(_JSON_VIEW_POSTGRES.format(status=status))
    else:
        status = _STATUS.format(expand="json_each(r.review_attributes) AS a")
        op.execute(_CURRENT_VIEW.format(latest="MAX(t.updated_at, COALESCE(d.reviewed_at, ''))"))
        op.execute(_JSON_VIEW_SQLITE.format(status=status))


def downgrade() -> None:
    # Back to one row per (sku, attribute): each attribute's current decision survives, the log does not.
    postgres = op.get_bind().dialect.name == "postgresql"
    op.execute("DROP VIEW IF EXISTS sku_tags_json")
    op.execute("DROP VIEW IF EXISTS sku_tags_current")
    op.create_table(
        "reviews_0001",
        sa.Column("sku", sa.Text, nullable=False),
        sa.Column("attribute", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("image_sha256", sa.Text),
        sa.Column("reviewer", sa.Text, nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("reviewed_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("sku", "attribute", name="pk_reviews_0001"),
    )
    op.execute("""
INSERT INTO reviews_0001 (sku, attribute, value, image_sha256, reviewer, reviewed_at)
SELECT sku, attribute, value, image_sha256, reviewer, reviewed_at FROM review_decisions
""")
    op.drop_table("reviews")  # its triggers go with it
    if postgres:
        for function in ("skutag_reviews_validate", "skutag_reviews_apply", "skutag_reviews_append_only"):
            op.execute(f"DROP FUNCTION IF EXISTS {function}()")
    for table in ("review_items", "review_tasks", "review_decisions", "review_reasons"):
        op.drop_table(table)
    op.rename_table("reviews_0001", "reviews")
    if postgres:
        op.execute("ALTER TABLE reviews RENAME CONSTRAINT pk_reviews_0001 TO pk_reviews")
    from importlib import import_module

    previous = import_module("migrations.versions.0001_initial")
    previous._create_views()
