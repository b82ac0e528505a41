"""Identifiers match whole: a tenant id, an API key or a setting name with a trailing newline is refused
(``$`` would let it through), and a ClickHouse DSN shown in an error never carries its password."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from keel.errors import QueryError, ValidationError
from keel.projector.clickhouse import shown_dsn
from keel.query.scope import tenant_scope
from keel.security.keys import AuthError
from tests.platform import sqlite_outbox


def test_a_tenant_id_with_a_trailing_newline_is_refused_by_the_key_store_and_the_query_scope(tmp_path: Path) -> None:
    keys = sqlite_outbox(tmp_path).keys
    with pytest.raises(ValidationError):
        keys.create_tenant("acme\n")
    assert keys.create_tenant("acme") and keys.tenants() == ["acme"]
    with pytest.raises(QueryError) as refused:
        tenant_scope(cast(Any, None), "keel", "acme\n")  # refused before any engine is asked
    assert refused.value.code == "invalid_tenant"


def test_an_api_key_with_a_trailing_newline_is_malformed(tmp_path: Path) -> None:
    keys = sqlite_outbox(tmp_path).keys
    token = "keel_0123456789abcdef_" + "x" * 40
    for sent in (token + "\n", token):
        with pytest.raises(AuthError) as refused:
            keys.authenticate(sent)
        assert ("malformed" in refused.value.message) is sent.endswith("\n")


@pytest.mark.parametrize(("dsn", "shown"), [
    ("http://keel:s3cret@127.0.0.1:8123/db?secure=0", "http://keel:***@127.0.0.1:8123/db?secure=0"),
    ("clickhouse://analyst:p%40ss@ch.internal", "clickhouse://analyst:***@ch.internal"),
    ("https://keel@ch.internal:8443", "https://keel@ch.internal:8443"),
    ("chdb:/var/lib/keel/chdb", "chdb:/var/lib/keel/chdb"),
])
def test_a_dsn_in_a_message_masks_its_password(dsn: str, shown: str) -> None:
    assert shown_dsn(dsn) == shown
