"""The SQL layer: expressions that try to break out are refused, builders quote, one statement runs."""

from __future__ import annotations

import psycopg
import pytest

from listener import catalog
from listener.catalog import ExpressionError, PublicationDefinition, PublishedTable, check_expression
from tests.support.services import PostgresServer

# Each tries to end the expression and do something else: a second statement, another table in the
# publication, commenting out the rest, or quoting tricks that change meaning with server settings.
BREAKOUTS = [
    "status = 'paid'); CREATE TABLE pwned(x int); --",
    "status = 'paid'; DROP TABLE users",
    "true) , TABLE secrets WHERE (true",
    "true)) , TABLE secrets WHERE ((true",
    "status = 'paid') --",
    "status = 'paid' /* ) , TABLE secrets WHERE ( */",
    "status = $$paid$$",
    "status = $1",
    "status = E'\\' ) , TABLE secrets WHERE (true --'",
    "a = '\\' OR b = ') , TABLE t2 WHERE (true'",
    "status = 'unterminated",
    'status = "unterminated',
    "(status = 'paid'",
    "status = 'paid')",
    "tags[1 = 'x'",
    "(tags[1) = 'x']",
    "status = 'pa\x00id'",
    "status = 'paid'\x1b",
    "",
    "   ",
    "x" * (catalog.MAX_EXPRESSION_LENGTH + 1),
]


@pytest.mark.parametrize("text", BREAKOUTS, ids=range(len(BREAKOUTS)))
def test_breakout_attempts_are_refused(text: str) -> None:
    with pytest.raises(ExpressionError):
        check_expression(text)


@pytest.mark.parametrize(
    "text",
    [
        "status = 'paid'",
        "status = 'it''s; -- not a comment, inside a string'",
        'total > 100 AND "Mixed Case" IS NOT NULL',
        "(a = 1 OR b = 2) AND tags[1] = 'x'",
        "status IN ('a)', 'b(')",
        '"weird"")(" = 1',
    ],
)
def test_plain_expressions_pass(text: str) -> None:
    assert check_expression(text) == text


def test_names() -> None:
    assert catalog.is_table_name("users") and catalog.is_table_name("shop.users")
    assert catalog.is_table_name("_t$1")
    for bad in ['users"; DROP TABLE x; --', "a.b.c", "1users", "users;", "sh op.users", "", "a" * 64]:
        assert not catalog.is_table_name(bad), bad
    assert not catalog.is_identifier('col"')


def test_publication_sql_quotes_every_name() -> None:
    tables = (
        PublishedTable("shop", 'we"ird', ("id", 'na"me'), "status = 'paid'"),
        PublishedTable("public", "users"),
    )
    text = catalog.create_publication(PublicationDefinition('pub"x', tables, ("insert", "update"))).as_string(None)
    assert text == (
        'CREATE PUBLICATION "pub""x" FOR TABLE "shop"."we""ird" ("id", "na""me") WHERE (status = \'paid\'), '
        "TABLE \"public\".\"users\" WITH (publish = 'insert, update')"
    )
    all_tables = catalog.create_publication(PublicationDefinition("p", None)).as_string(None)
    assert all_tables == "CREATE PUBLICATION \"p\" FOR ALL TABLES WITH (publish = 'insert, update, delete, truncate')"
    comment = catalog.comment_on_publication("p", "it's mine").as_string(None)
    assert comment == "COMMENT ON PUBLICATION \"p\" IS 'it''s mine'"


def test_builders_refuse_a_bad_row_filter_even_without_the_spec() -> None:
    table = PublishedTable("public", "orders", (), "true) , TABLE secrets WHERE (true")
    with pytest.raises(ExpressionError):
        catalog.table_clause(table)


@pytest.mark.service
async def test_execute_one_runs_exactly_one_statement(pg: PostgresServer, fresh_db: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg.dsn(fresh_db), autocommit=True) as conn:
        await catalog.execute_one(conn, psycopg.sql.SQL("CREATE TABLE one (x int)"))
        with pytest.raises(psycopg.errors.SyntaxError, match="multiple commands"):
            await catalog.execute_one(conn, psycopg.sql.SQL("CREATE TABLE two (x int); CREATE TABLE three (x int)"))
        cur = await conn.execute("SELECT relname FROM pg_class WHERE relname IN ('one', 'two', 'three')")
        assert [r[0] for r in await cur.fetchall()] == ["one"]
