"""The `skutag` commands, one module per command group; each parses, calls one library function,
renders and exits (pipeline.commands.exits maps outcomes to exit codes). COMMANDS is the one list
pipeline.cli registers, in the order --help shows them."""

from __future__ import annotations

import click

from pipeline.commands import backfill, bench, db, distributed, doctor, failures, local, model, review, runs, taxonomy

COMMANDS: list[click.Command] = [
    db.db,
    taxonomy.taxonomy,
    model.model,
    model.tag_image,
    doctor.doctor,
    bench.bench,
    distributed.submit,
    distributed.worker_command,
    distributed.writer_command,
    distributed.reconcile,
    runs.status,
    runs.runs,
    runs.export,
    failures.failures,
    failures.retry,
    local.run_command,
    backfill.backfill,
    local.demo,
    review.review,
    review.eval_command,
]
