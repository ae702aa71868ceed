"""Who may review, and proof that a POST comes from the app's own page.

On 127.0.0.1 (the default) the app trusts the machine's user: the reviewer is the --reviewer name
(default: the OS user). On any other address it refuses to start unless reviewer credentials are
configured: a shared token (SKUTAG_REVIEW_TOKEN; each reviewer logs in with their name and the
token) or a users file (SKUTAG_REVIEW_USERS_FILE; one `name:scrypt$...` line per reviewer, made by
`skutag review hash-password`). Identity then comes from the login only.

CSRF: every session has a random token; every POST must carry it (form field or X-CSRF-Token
header) and, when the browser sends one, an Origin of the app itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
USER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        actual = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=len(digest) // 2
        )
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(actual.hex(), digest)


def read_users_file(path: Path) -> dict[str, str]:
    """name -> encoded hash. Raises ConfigError naming the line of a malformed entry."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"SKUTAG_REVIEW_USERS_FILE: cannot read {path}: {exc.strerror}") from exc
    users: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        name, _, encoded = text.partition(":")
        if not USER_NAME.fullmatch(name) or not encoded.startswith("scrypt$") or encoded.count("$") != 5:
            raise ConfigError(
                f"{path}: line {number}: expected name:scrypt$... (make one with `skutag review hash-password`)"
            )
        users[name] = encoded
    if not users:
        raise ConfigError(f"{path}: no reviewers in the users file")
    return users


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Credentials:
    """How reviewers prove who they are; none at all only on a loopback address."""

    token: str | None = None
    users: dict[str, str] = field(default_factory=dict)
    local_reviewer: str | None = None  # loopback without credentials: everyone is this reviewer

    @property
    def required(self) -> bool:
        return bool(self.token or self.users)

    def check(self, name: str, secret: str) -> bool:
        if not USER_NAME.fullmatch(name):
            return False
        if name in self.users:
            return verify_password(secret, self.users[name])
        if self.token:
            return hmac.compare_digest(secret.encode(), self.token.encode())
        return False


def credentials_for(host: str, token: str | None, users_file: Path | None, local_reviewer: str) -> Credentials:
    """The credentials to enforce when binding host; refuses a non-loopback host without any."""
    if token is not None and len(token) < 16:
        raise ConfigError("SKUTAG_REVIEW_TOKEN: use at least 16 characters (e.g. `openssl rand -hex 16`)")
    users = read_users_file(users_file) if users_file is not None else {}
    if token or users:
        return Credentials(token=token, users=users)
    if not is_loopback(host):
        raise ConfigError(
            f"refusing to serve the review app on {host} without reviewer credentials: set "
            "SKUTAG_REVIEW_TOKEN or SKUTAG_REVIEW_USERS_FILE, or bind 127.0.0.1"
        )
    if not USER_NAME.fullmatch(local_reviewer):
        raise ConfigError(f"--reviewer: {local_reviewer!r} is not a reviewer name (letters, digits, _.@-)")
    return Credentials(local_reviewer=local_reviewer)


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))
