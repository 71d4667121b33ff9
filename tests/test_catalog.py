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


# -- the publication rule (listener and operator) -------------------------------------------------------


def _wanted(name: str, *actions: str) -> catalog.WantedTable:
    schema, table = name.split(".")
    return catalog.WantedTable(PublishedTable(schema, table), frozenset(actions))


def test_filtered_tables_are_published_with_only_the_actions_asked() -> None:
    plan = catalog.plan_publications(
        "wal-listener", [_wanted("public.users", "insert", "update"), _wanted("shop.users", "insert")], {}
    )
    assert plan.main == PublicationDefinition(
        "wal-listener", (PublishedTable("public", "users"), PublishedTable("shop", "users")), ("insert", "update")
    )
    assert plan.inserts == PublicationDefinition("wal-listener_inserts", (), ("insert", "truncate"))
    assert plan.names == ["wal-listener", "wal-listener_inserts"]


def test_a_table_without_identity_asked_only_for_inserts_goes_to_the_inserts_publication() -> None:
    plan = catalog.plan_publications(
        "p",
        [_wanted("public.orders", "insert", "update", "delete"), _wanted("public.audit_log", "insert")],
        {"public.audit_log": "public.audit_log"},
        via_root=True,
    )
    assert plan.main.tables == (PublishedTable("public", "orders"),)
    assert plan.main.publish == ("insert", "update", "delete") and plan.main.via_root is True
    assert plan.inserts.tables == (PublishedTable("public", "audit_log"),)
    assert plan.inserts.publish == ("insert", "truncate")


def test_updates_of_a_table_without_identity_are_refused_in_one_line_naming_table_and_fixes() -> None:
    with pytest.raises(catalog.UnsafePublication) as caught:
        catalog.plan_publications(
            "wal-listener",
            [_wanted("public.users", "insert", "update"), _wanted("public.nopk", "insert", "update")],
            {"public.nopk": "public.nopk", "public.ev": "public.ev (partition public.ev_1)"},
        )
    text = str(caught.value)
    assert "\n" not in text and caught.value.tables == ("public.nopk",)
    assert "public.nopk" in text and "public.users" not in text and "ev_1" not in text
    for fix in ("primary key", "REPLICA IDENTITY FULL", "USING INDEX", "listener.filter.tables", "only insert"):
        assert fix in text, fix
    assert "UPDATE and DELETE on them would fail" in text


def test_all_tables_is_refused_while_the_database_has_a_table_without_identity() -> None:
    problems = catalog.identity_problems([("public.ev", "public.ev_2026a"), ("public.ev", "public.ev_2026b"),
                                          ("public.nopk", "public.nopk")])
    assert problems == {"public.ev": "public.ev (partitions public.ev_2026a, public.ev_2026b)",
                        "public.nopk": "public.nopk"}
    with pytest.raises(catalog.UnsafePublication, match=r"public\.ev \(partitions public\.ev_2026a, public\.ev_2026b"
                       r"\), public\.nopk.*list the tables to publish in listener\.filter\.tables"):
        catalog.plan_publications("p", None, problems)
    plan = catalog.plan_publications("p", None, {}, via_root=False)
    assert plan.main == PublicationDefinition("p", None, catalog.ALL_ACTIONS, False)
    assert plan.inserts.tables == ()


def test_the_actions_of_tables_that_do_not_exist_yet_are_published_too() -> None:
    plan = catalog.plan_publications("p", [_wanted("public.a", "insert")], {}, asked=frozenset({"insert", "delete"}))
    assert plan.main.publish == ("insert", "delete")


def test_publication_sql_for_no_tables_and_via_root() -> None:
    empty = catalog.create_publication(PublicationDefinition("p_inserts", (), ("insert", "truncate"), True))
    assert empty.as_string(None) == (
        "CREATE PUBLICATION \"p_inserts\" WITH (publish = 'insert, truncate', publish_via_partition_root = true)"
    )
    assert catalog.add_publication_table("p", PublishedTable("s", 'x"y')).as_string(None) == (
        'ALTER PUBLICATION "p" ADD TABLE "s"."x""y"'
    )
    assert catalog.drop_publication_table("p", "s", "t").as_string(None) == 'ALTER PUBLICATION "p" DROP TABLE "s"."t"'


def test_changes_that_keep_a_publication_to_its_definition() -> None:
    current = catalog.PublicationState("p", False, "", ("insert", "update"), False,
                                       frozenset({"public.a", "public.gone"}))
    target = PublicationDefinition("p", (PublishedTable("public", "a"), PublishedTable("public", "b")),
                                   ("insert",), True)
    assert [s.as_string(None) for s in catalog.publication_changes(current, target)] == [
        'ALTER PUBLICATION "p" ADD TABLE "public"."b"',
        'ALTER PUBLICATION "p" DROP TABLE "public"."gone"',
        "ALTER PUBLICATION \"p\" SET (publish = 'insert', publish_via_partition_root = true)",
    ]
    same = catalog.PublicationState("p", False, "", ("insert",), True, frozenset({"public.a", "public.b"}))
    assert catalog.publication_changes(same, target) == []
    all_tables = catalog.PublicationState("p", True, "", catalog.ALL_ACTIONS, True)
    assert catalog.publication_changes(all_tables, target)[0].as_string(None) == (
        'DROP PUBLICATION IF EXISTS "p"'
    )


def test_who_made_a_publication_is_read_from_its_comment() -> None:
    assert catalog.publication_owner(catalog.listener_mark("slot_a")) == catalog.PublicationOwner("listener", "slot_a")
    operator = catalog.publication_owner("wal-listener-operator uid=u-1 resource=ns/x spec=abc")
    assert (operator.kind, operator.ident, operator.resource, operator.spec) == ("operator", "u-1", "ns/x", "abc")
    for other in (None, "", "made by the DBA", "see wal-listener slot=x"):
        assert catalog.publication_owner(other).kind == ""


def test_the_inserts_publication_name_fits_postgres_identifiers() -> None:
    assert catalog.inserts_publication("wal-listener") == "wal-listener_inserts"
    long = catalog.inserts_publication("p" * 63)
    assert len(long.encode()) == 63 and long.endswith("_inserts")
    assert len(catalog.inserts_publication("é" * 31).encode()) <= 63


def test_state_tables_and_grants_for_a_role_whose_name_needs_quoting() -> None:
    """The state tables (backfills, and the shapes SCHEMA events announced) and what a DBA grants: every name
    an identifier, the role's too."""
    ddl = [s.as_string(None) for s in catalog.state_table_ddl()]
    assert ddl[0] == 'CREATE SCHEMA IF NOT EXISTS "wal_listener"'
    assert ddl[2].startswith('CREATE TABLE IF NOT EXISTS "wal_listener"."schemas" (slot text NOT NULL, ')
    assert "PRIMARY KEY (slot, schema_name, table_name, commit_lsn, ordinal)" in ddl[2]
    grants = [s.as_string(None) for s in catalog.state_table_grants('cdc"; DROP ROLE x; --')]
    assert grants[-1] == 'GRANT SELECT, INSERT, UPDATE, DELETE ON "wal_listener"."schemas" TO "cdc""; DROP ROLE x; --"'


def test_a_chunk_is_declared_as_a_cursor_over_its_page_and_fetched_in_pieces() -> None:
    page = catalog.chunk_query("s", 'do"cs', ["id", "body"], ["id"], after=True)
    assert catalog.declare_chunk_cursor(page).as_string(None) == (
        'DECLARE "wal_listener_chunk" NO SCROLL CURSOR FOR SELECT "id", "body" FROM "s"."do""cs"'
        ' WHERE ("id") > (%s) ORDER BY "id" LIMIT %s'
    )
    assert catalog.fetch_chunk_rows(7).as_string(None) == 'FETCH FORWARD 7 FROM "wal_listener_chunk"'
    for bad in (0, -1, True, "7; DROP TABLE docs", 1.5):
        with pytest.raises(ValueError, match="fetch count must be a positive integer"):
            catalog.fetch_chunk_rows(bad)  # type: ignore[arg-type]
