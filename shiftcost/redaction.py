"""Secrets out of anything printed or logged: the one helper for every URL.

A URL may carry a secret in its user part (``postgresql://user:secret@host``) or in its
query string (``...?password=secret``, ``s3://bucket/x?X-Amz-Signature=...``,
``?token=``, ``?sslpassword=`` ...). :func:`redact_url` replaces each with ``***``;
:func:`scrub` removes the same secret values from any other text (a driver's error
message that echoes them).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["redact_url", "scrub", "secrets_of"]

MASK = "***"
# Query keys whose values are secrets (compared lower-case, '-' read as '_').
_SECRET_KEY = re.compile(
    r"(pass(word|wd)?|pwd|secret|token|key|sig(nature)?|credential|auth|session|private)", re.IGNORECASE
)
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:@/?#]*):(?P<password>[^@/?#]*)@")


def _secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key.replace("-", "_")))


def secrets_of(url: str) -> list[str]:
    """The secret values a URL holds (user-info password, secret query values), raw and decoded."""
    found: list[str] = []
    match = _USERINFO.match(url)
    if match and match.group("password"):
        found.append(match.group("password"))
    try:
        query = urlsplit(url).query
    except ValueError:
        query = url.partition("?")[2]
    for key, value in parse_qsl(query, keep_blank_values=False):
        if _secret_key(key) and value:
            found.append(value)
    return sorted({v for secret in found for v in (secret, unquote(secret))}, key=len, reverse=True)


def redact_url(url: object) -> str:
    """``url`` as text with every secret it carries replaced by ``***``."""
    text = str(url)
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:{MASK}@", text, count=1)
    head, mark, rest = text.partition("?")
    if not mark:
        return text
    query, hash_mark, fragment = rest.partition("#")
    parts = []
    for part in query.split("&"):
        key, equals, value = part.partition("=")
        parts.append(f"{key}={MASK}" if equals and value and _secret_key(unquote(key)) else part)
    return f"{head}?{'&'.join(parts)}{hash_mark}{fragment}"


def scrub(text: str, url: object) -> str:
    """``text`` with every secret of ``url`` replaced by ``***``, and ``url`` itself redacted."""
    raw = str(url)
    text = text.replace(raw, redact_url(raw))
    for secret in secrets_of(raw):
        if len(secret) >= 3:  # a one-letter "secret" would mask half the sentence
            text = text.replace(secret, MASK)
    return text
