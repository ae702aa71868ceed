"""A private rabbitmq-server for the tests: its own node name, ports, data and cookie under a
temporary directory, so tests may purge its queues and restart it without touching the machine's
shared RabbitMQ or another engineer's test run."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from kombu import Connection

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the script itself, not the su wrapper
SKUTAG_QUEUES = ("skutag.new", "skutag.backfill", "skutag.write")


def rabbitmq_installed() -> bool:
    return Path(RABBITMQ_SERVER).exists() and shutil.which("erl") is not None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RabbitMQServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.node = f"skutag-test-{os.getpid()}-{self.port}@localhost"
        self.process: subprocess.Popen[bytes] | None = None
        (directory / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\nlog.console = false\n")
        (directory / "enabled_plugins").write_text("[].\n")
        (directory / "rabbitmq-env.conf").write_text("")  # not the machine's /etc/rabbitmq one

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self, timeout: float = 120) -> None:
        env = {
            **os.environ,
            "HOME": str(self.directory),  # its own Erlang cookie
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_PID_FILE": str(self.directory / "pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        with (self.directory / "server.log").open("ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [RABBITMQ_SERVER], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited:\n{(self.directory / 'server.log').read_text()[-2000:]}")
            if self._answers():
                return
            time.sleep(0.5)
        raise RuntimeError(f"rabbitmq-server not up within {timeout:.0f} s")

    def stop(self) -> None:
        """A clean shutdown (SIGTERM): durable queues and persistent messages are kept on disk."""
        if self.process is None:
            return
        pid_file = self.directory / "pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        else:
            self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def delete_queues(self) -> None:
        with Connection(self.url, connect_timeout=5) as connection:
            for queue in SKUTAG_QUEUES:
                with connection.channel() as channel:
                    channel.queue_delete(queue)

    def _answers(self) -> bool:
        try:
            with Connection(self.url, connect_timeout=2) as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
            return True
        except Exception:
            return False
