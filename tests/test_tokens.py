"""API tokens in the database: shown once, stored as hashes, scopes that nest, revocation that sticks."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from evalfarm.db import Token, session_factory
from evalfarm.errors import EvalfarmError
from evalfarm.scheduler.tokens import (
    ADMIN,
    READ,
    SUBMIT,
    TOKEN_PREFIX,
    authenticate,
    create_token,
    hash_token,
    parse_scopes,
    revoke_token,
)


@pytest.fixture
def sessions(tmp_path: Path):
    return session_factory(f"sqlite:///{tmp_path / 'tokens.db'}")


def test_a_token_is_stored_only_as_its_hash(sessions):
    token = create_token(sessions, "ci", frozenset({SUBMIT}))
    assert token.startswith(TOKEN_PREFIX) and len(token) > 40
    with sessions() as s:
        row = s.scalar(select(Token))
    assert row.token_sha256 == hash_token(token)
    assert token not in repr(row.__dict__)


def test_authenticate_names_the_principal_and_its_scopes(sessions):
    token = create_token(sessions, "ci", frozenset({SUBMIT}))
    who = authenticate(sessions, token)
    assert who.name == "ci"
    assert (who.allows(READ), who.allows(SUBMIT), who.allows(ADMIN)) == (True, True, False)


def test_a_read_token_only_reads_and_admin_does_everything(sessions):
    reader = authenticate(sessions, create_token(sessions, "dash", frozenset({READ})))
    admin = authenticate(sessions, create_token(sessions, "ops", frozenset({ADMIN})))
    assert (reader.allows(READ), reader.allows(SUBMIT)) == (True, False)
    assert all(admin.allows(s) for s in (READ, SUBMIT, ADMIN))


def test_an_unknown_token_is_nobody(sessions):
    create_token(sessions, "ci", frozenset({READ}))
    assert authenticate(sessions, TOKEN_PREFIX + "x" * 43) is None


def test_a_revoked_token_is_refused(sessions):
    token = create_token(sessions, "ci", frozenset({READ}))
    assert revoke_token(sessions, "ci")
    assert authenticate(sessions, token) is None
    assert not revoke_token(sessions, "ci")


def test_a_name_is_taken_until_its_token_is_revoked(sessions):
    first = create_token(sessions, "ci", frozenset({READ}))
    with pytest.raises(EvalfarmError, match="exists; revoke it first"):
        create_token(sessions, "ci", frozenset({READ}))
    revoke_token(sessions, "ci")
    second = create_token(sessions, "ci", frozenset({SUBMIT}))
    assert authenticate(sessions, first) is None and authenticate(sessions, second).name == "ci"


@pytest.mark.parametrize("name", ["", "a b", "local:root", "x" * 101, "-lead"])
def test_token_names_are_plain_identifiers(sessions, name):
    with pytest.raises(EvalfarmError, match="token name"):
        create_token(sessions, name, frozenset({READ}))


def test_scopes_must_be_known():
    assert parse_scopes("read, Submit") == {"read", "submit"}
    with pytest.raises(EvalfarmError, match="subset of read,submit,admin"):
        parse_scopes("read,root")
