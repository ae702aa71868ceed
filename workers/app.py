"""Celery wiring: the app, its queues and delivery settings, and the broker-facing adapters
(publisher, result sink). The one place Celery/kombu/redis errors are translated.

Queues and tasks:
    skutag.new        task skutag.tag: jobs from `skutag submit` (and retries)
    skutag.backfill   task skutag.tag: jobs from `skutag backfill` (bounded by its backpressure)
    skutag.write      task skutag.write_results: result batches for the writer
A GPU worker consumes skutag.new and skutag.backfill; a writer consumes skutag.write.

`app` below is for Celery's own tools (`celery -A workers.app inspect ping`, `... events`,
Flower): it reads the SKUTAG_* settings the first time its configuration is used, not at import.
Workers are started with `skutag worker` / `skutag writer`, which build their own app.

Delivery: at least once. acks_late + reject_on_worker_lost put a message back when its worker
dies; the visibility timeout is above the job lease, so a slow batch is not redelivered while
it still runs; the ledger (Postgres) decides what is done, so a redelivery is skipped, never
redone, and results are keyed by job id, never written twice.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis
from amqp.exceptions import AMQPError, NotFound
from celery import Celery
from kombu import Connection
from kombu.exceptions import ChannelError, KombuError

from pipeline.errors import RetryableError
from pipeline.secrets import masked_url
from pipeline.settings import Settings, load_settings
from schemas.results import JobSpec, TagResult

# What kombu, redis-py and py-amqp raise when the broker is down or drops us: translated here.
BROKER_ERRORS = (KombuError, OSError, redis.RedisError, AMQPError)

QUEUE_NEW = "skutag.new"
QUEUE_BACKFILL = "skutag.backfill"
QUEUE_WRITE = "skutag.write"
QUEUES = {"new": QUEUE_NEW, "backfill": QUEUE_BACKFILL}
TAG_TASK = "skutag.tag"
WRITE_TASK = "skutag.write_results"


def create_app(settings: Settings) -> Celery:
    """A Celery app for these settings. Built where used (CLI, worker, tests), never at import."""
    app = Celery("skutag", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_default_queue": QUEUE_NEW,
        "task_routes": {TAG_TASK: {"queue": QUEUE_NEW}, WRITE_TASK: {"queue": QUEUE_WRITE}},
        # Monitoring (celery events, Flower): heartbeats always; task events when asked for.
        "worker_send_task_events": settings.worker_events,
        "task_send_sent_event": settings.worker_events,
    }


def is_redis(broker_url: str) -> bool:
    return broker_url.startswith(("redis://", "rediss://", "redis+socket://"))


def transport_options(settings: Settings) -> dict[str, Any]:
    """Redis: unacknowledged messages come back after the visibility timeout, set above the job
    lease so a slow batch is not redelivered while it runs. RabbitMQ: they come back when the
    consumer's connection drops; publisher confirms make a publish return only once the broker
    has the (persistent) message, so a broker crash right after cannot lose it."""
    if is_redis(settings.broker_url):
        return {"visibility_timeout": max(2 * settings.lease_s, 10)}
    return {"confirm_publish": True}


def environment_app() -> Celery:
    """An app that reads the SKUTAG_* settings when its configuration is first used, not before."""
    lazy = Celery("skutag", set_as_current=False)
    lazy.add_defaults(lambda: celery_config(load_settings()))
    return lazy


# What `celery -A workers.app ...` and Flower find. Importing it reads nothing and connects nowhere.
app = environment_app()


def job_message(job: JobSpec) -> dict[str, Any]:
    return {"job_id": job.job_id, "run_id": job.run_id, "sku": job.sku, "image_uri": job.image_uri}


def declare_queue(app: Celery, producer: Any, name: str) -> str:
    """Declare the queue before each publish, not once per connection as kombu would: its cache
    of declarations lives on the pooled connection (shared by every app in the process), and
    RabbitMQ silently drops a message sent to a queue deleted since (Redis recreates its lists).
    One round trip per publish call, which carries many messages."""
    app.amqp.queues[name].bind(producer.channel).declare()
    return name


class CeleryPublisher:
    """Publishes jobs as messages of up to chunk jobs each, over one connection."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.chunk = settings.batch_size
        self.broker_url = settings.broker_url
        self._epoch: tuple[float, str | None] | None = None

    def publish(self, jobs: Sequence[JobSpec], queue: str) -> None:
        if not jobs:
            return
        try:
            # One Redis pipeline for the lot: kombu's publish batch, not a round trip per message.
            with self.app.producer_or_acquire() as producer, producer.batch(max_size=1000):
                target = declare_queue(self.app, producer, QUEUES.get(queue, queue))
                for start in range(0, len(jobs), self.chunk):
                    payload = [job_message(job) for job in jobs[start : start + self.chunk]]
                    self.app.send_task(TAG_TASK, args=[payload], queue=target, producer=producer)
        except BROKER_ERRORS as exc:
            raise RetryableError(f"broker unreachable at {masked_url(self.broker_url)}: {exc}") from exc

    def epoch(self) -> str | None:
        """Redis's run_id: it changes when Redis restarts, and with it every queued message is gone.
        None for RabbitMQ: its durable queues keep confirmed persistent messages across restarts."""
        if not is_redis(self.broker_url):
            return None
        now = time.monotonic()
        if self._epoch is not None and now - self._epoch[0] < 5:
            return self._epoch[1]
        try:
            client = redis.Redis.from_url(self.broker_url, socket_timeout=5)
            try:
                run_id = str(client.info("server")["run_id"])
            finally:
                client.close()
        except redis.RedisError as exc:
            raise RetryableError(f"broker unreachable at {masked_url(self.broker_url)}: {exc}") from exc
        self._epoch = (now, run_id)
        return run_id


class CelerySink:
    """Sends a batch's results to the writer queue as one message."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.broker_url = settings.broker_url

    def send_results(self, results: Sequence[TagResult]) -> None:
        payload = [result.model_dump(mode="json") for result in results]
        try:
            with self.app.producer_or_acquire() as producer:
                target = declare_queue(self.app, producer, QUEUE_WRITE)
                self.app.send_task(WRITE_TASK, args=[payload], queue=target, producer=producer)
        except BROKER_ERRORS as exc:
            raise RetryableError(f"broker unreachable at {masked_url(self.broker_url)}: {exc}") from exc


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting in each queue (not those a worker holds unacked), on Redis or RabbitMQ:
    a passive queue declare, which both transports answer with the queue's message count."""
    depths: dict[str, int] = {}
    try:
        with Connection(settings.broker_url, connect_timeout=5) as connection:
            for name in (QUEUE_NEW, QUEUE_BACKFILL, QUEUE_WRITE):
                depths[name] = _depth(connection, name)
    except BROKER_ERRORS as exc:
        raise RetryableError(f"broker unreachable at {masked_url(settings.broker_url)}: {exc}") from exc
    return depths


def _depth(connection: Connection, queue: str) -> int:
    # A channel per queue: AMQP closes the channel when a passive declare finds no queue.
    with connection.channel() as channel:
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except (ChannelError, NotFound):  # not declared yet (no worker has started): nothing waits in it
            return 0
