"""Configured URLs made safe to print: in logs, error messages and alert payloads.

A URL setting can carry a secret in any of its parts: a password
(`postgresql://user:pw@host/db`), a token as the user name (`https://TOKEN@host`), a query
parameter (`?token=...`, libpq's `?password=...`) or the path itself (a Slack or Teams
webhook's token *is* its path). So what is printed keeps only what locates the server.
"""

from __future__ import annotations

import re

#: Schemes whose path names a database and whose user name is a role: both help an
#: operator ("role does not exist") and neither is a secret.
_DATABASE_SCHEMES = frozenset({"postgresql", "postgres"})
MASK = "***"
#: A URL inside free text (an exception message, a run's failure).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")
#: `user:password@host` without a scheme.
_CREDENTIALS_IN_TEXT = re.compile(r"[^\s'\"/@:]+:[^\s'\"/@]+@(?=[\w\[])")


def redacted(url: str) -> str:
    """`url` without anything secret.

    - database URLs keep user, host, port and database; the password goes, and of the
      query only the parameter names stay (`?sslmode=***`);
    - any other URL keeps scheme, host and port: user info becomes `***@`, a path or
      query `/***`;
    - a value that is not a URL at all (a mistyped setting) keeps its first segment,
      with anything before an `@` masked.
    """
    text = url.strip()
    if "://" not in text:
        head = text.rsplit("@", 1)[-1]
        cut = min((i for i in (head.find(c) for c in "/?#") if i >= 0), default=len(head))
        shown = head[:cut] + (f"/{MASK}" if head[cut:] else "")
        return (f"{MASK}@" if "@" in text else "") + shown
    scheme, rest = text.split("://", 1)
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    userinfo, at, hostport = netloc.rpartition("@")
    if scheme.lower() in _DATABASE_SCHEMES:
        user = userinfo.split(":", 1)[0]
        path, _, query = tail.split("#", 1)[0].partition("?")
        names = [p.split("=", 1)[0] for p in query.split("&") if p]
        shown_query = ("?" + "&".join(f"{n}={MASK}" for n in names)) if names else ""
        return f"{scheme}://{user + '@' if at and user else ''}{hostport}{path}{shown_query}"
    shown_tail = f"/{MASK}" if tail.strip("/") else ""
    return f"{scheme}://{MASK + '@' if at else ''}{hostport}{shown_tail}"


def redact_text(text: str) -> str:
    """Free text (an exception's message, a run's failure) with every URL in it redacted,
    and any `user:password@` without a scheme masked."""

    def replace(match: re.Match) -> str:
        url = match.group(0)
        kept = url.rstrip(".,;:!?")  # sentence punctuation after a URL is not part of it
        return redacted(kept) + url[len(kept) :]

    return _CREDENTIALS_IN_TEXT.sub(f"{MASK}@", _URL_IN_TEXT.sub(replace, text))
