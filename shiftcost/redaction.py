"""Secrets out of anything printed or logged: the one helper for every URL.

A URL may carry a secret in its user part (``postgresql://user:secret@host``) or in its
query string (``...?password=secret``, ``s3://bucket/x?X-Amz-Signature=...``,
``?token=``, ``?sslpassword=`` ...). :func:`redact_url` replaces each with ``***``;
:func:`scrub` removes the same secret values from any other text (a driver's error
message that echoes them); :func:`redact_text` redacts every URL-borne secret found in a
sentence whose URLs are not known (an error message, a stored failure reason), and is
applied to every ``ShiftcostError`` message.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["redact_text", "redact_url", "scrub", "secrets_of"]

MASK = "***"
# Query keys whose values are secrets (compared lower-case, '-' read as '_').
_SECRET_KEY = re.compile(
    r"(pass(word|wd)?|pwd|secret|token|key|sig(nature)?|credential|auth|session|private)", re.IGNORECASE
)
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:@/?#]*):(?P<password>[^@/?#]*)@")


# In free text: a user-info password (up to the ``@``) and a secret query value (up to the
# next ``&``, ``#``, quote or blank). Masking a closing bracket with the value is harmless.
_USERINFO_IN_TEXT = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:@/?#\s'\"]*):(?P<password>[^@/?#\s'\"]+)@")
_QUERY_PAIR_IN_TEXT = re.compile(r"(?P<head>[?&;](?P<key>[^=&#?;\s'\"]+)=)(?P<value>[^&#\s'\"]+)")


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


def redact_text(text: object) -> str:
    """``text`` with the secrets of every URL in it replaced by ``***``.

    For a sentence whose URLs are not known one by one: user-info passwords, and the
    values of secret query keys wherever a ``?``/``&``/``;`` introduces them.
    """
    text = _USERINFO_IN_TEXT.sub(lambda m: f"{m.group('head')}:{MASK}@", str(text))
    return _QUERY_PAIR_IN_TEXT.sub(
        lambda m: f"{m.group('head')}{MASK}" if _secret_key(unquote(m.group("key"))) else m.group(0), text
    )


def scrub(text: str, url: object) -> str:
    """``text`` with every secret of ``url`` replaced by ``***``, and ``url`` itself redacted."""
    raw = str(url)
    text = text.replace(raw, redact_url(raw))
    for secret in secrets_of(raw):
        if len(secret) >= 3:  # a one-letter "secret" would mask half the sentence
            text = text.replace(secret, MASK)
    return text
