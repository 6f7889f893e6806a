"""API tokens: who may read, submit and administer the farm.

A token is shown once, at creation, and stored only as its SHA-256: a leaked database reveals no usable
secret. Scopes nest: `admin` may do everything, `submit` may also read, `read` only reads.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from evalfarm.db import Token
from evalfarm.db.models import as_utc, utcnow
from evalfarm.errors import EvalfarmError
from evalfarm.scheduler.records import Sessions

READ, SUBMIT, ADMIN = "read", "submit", "admin"
SCOPES = (READ, SUBMIT, ADMIN)
_IMPLIES = {ADMIN: {READ, SUBMIT, ADMIN}, SUBMIT: {READ, SUBMIT}, READ: {READ}}
TOKEN_PREFIX = "evf_"  #: makes a leaked token easy to recognise (secret scanners, logs)
TOKEN_BYTES = 32  #: 256 random bits, URL-safe
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
LOCAL_SUBMITTER = "local:"  #: `local:USER` submitted straight to the database; no token name has a ':'

LAST_USED_EVERY = timedelta(minutes=1)  #: `last_used_at` is refreshed at most this often: reads stay reads


@dataclass(frozen=True)
class Principal:
    """Who a request is: a token's name and what its scopes grant."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return any(scope in _IMPLIES[s] for s in self.scopes)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(s.strip().lower() for s in text.split(",") if s.strip())
    unknown = scopes - set(SCOPES)
    if not scopes or unknown:
        raise EvalfarmError(f"scopes must be a non-empty subset of {','.join(SCOPES)}; got {text!r}")
    return scopes


def create_token(sessions: Sessions, name: str, scopes: frozenset[str]) -> str:
    """A new token under `name` (replacing a revoked one of that name); returns the secret, shown only now."""
    if not NAME_RE.match(name):
        raise EvalfarmError(f"token name {name!r} must be 1-100 letters, digits, '.', '_' or '-'")
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    with sessions.begin() as s:
        row = s.get(Token, name, with_for_update=True)
        if row is not None and row.revoked_at is None:
            raise EvalfarmError(f"a token named {name!r} exists; revoke it first (`evalfarm token revoke {name}`)")
        if row is None:
            row = Token(name=name)
            s.add(row)
        row.token_sha256, row.scopes = hash_token(token), ",".join(sorted(scopes))
        row.created_at, row.last_used_at, row.revoked_at = utcnow(), None, None
    return token


def list_tokens(sessions: Sessions) -> list[dict[str, Any]]:
    with sessions() as s:
        return [
            {"name": t.name, "scopes": t.scopes, "created_at": t.created_at, "last_used_at": t.last_used_at,
             "revoked_at": t.revoked_at}
            for t in s.scalars(select(Token).order_by(Token.name))
        ]


def revoke_token(sessions: Sessions, name: str) -> bool:
    """True when an active token was revoked; its requests are refused from now on."""
    with sessions.begin() as s:
        return s.execute(
            update(Token).where(Token.name == name, Token.revoked_at.is_(None)).values(revoked_at=utcnow())
        ).rowcount == 1


def authenticate(sessions: Sessions, token: str) -> Principal | None:
    """The principal of an active token, or None. Looked up by hash, so the secret is never compared."""
    digest = hash_token(token)
    with sessions() as s:
        row = s.execute(
            select(Token.name, Token.scopes, Token.last_used_at)
            .where(Token.token_sha256 == digest, Token.revoked_at.is_(None))
        ).first()
    if row is None:
        return None
    now = utcnow()
    if row.last_used_at is None or now - as_utc(row.last_used_at) > LAST_USED_EVERY:
        with sessions.begin() as s:
            s.execute(update(Token).where(Token.name == row.name).values(last_used_at=now))
    return Principal(row.name, frozenset(row.scopes.split(",")))
