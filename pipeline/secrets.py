"""Credentials never reach a terminal or a log: every URL with a password is printed masked.

mask_secrets() rewrites any `scheme://user:password@host` (database, broker, a catalog's image
URL, whatever an error message quotes) to `scheme://user:***@host`; the CLI passes every error
line through it and SecretMaskingFilter does the same for every log record, so a message built
anywhere, by skutag or by a library, is covered without each call site remembering to redact
(pipeline.logs puts the filter on the one handler of every long-running process).
"""

from __future__ import annotations

import logging
import re

MASK = "***"

# scheme://[user]:password@ — the password runs up to the last '@' before the host part.
_URL_CREDENTIALS = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@'\"]*:)(?P<secret>[^\s/'\"]+)@")


def mask_secrets(text: str) -> str:
    """text with the password of every URL in it replaced by ***."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m.group('head')}{MASK}@", text)


def masked_url(url: str) -> str:
    return mask_secrets(url)


class SecretMaskingFilter(logging.Filter):
    """Masks URL passwords in a record's message (and its formatted arguments) before any handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            formatter = logging.Formatter()
            record.exc_text = mask_secrets(formatter.formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        return True
