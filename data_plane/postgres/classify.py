"""What a PostgreSQL statement does, read with PostgreSQL's own parser (pglast's libpg_query):
its class (read, write, DDL, DCL, transaction, COPY, utility, procedural), the command, the
tables and functions it touches, UPDATE/DELETE without WHERE, COPY to a program or a server file.

The parser returns JSON from C; walking the dicts is what costs, so callers cache by shape
(`fingerprint`, also PostgreSQL's: literal values do not change it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import orjson
from pglast import parser as pg_parser

from data_plane.core.guardrails import StatementFacts

READ, WRITE, DDL, DCL, TRANSACTION, COPY, UTILITY, PROCEDURAL = (
    "read", "write", "ddl", "dcl", "transaction", "copy", "utility", "procedural")

_NODE_CLASSES = {
    "SelectStmt": READ, "DeclareCursorStmt": READ, "FetchStmt": READ, "VariableShowStmt": READ,
    "InsertStmt": WRITE, "UpdateStmt": WRITE, "DeleteStmt": WRITE, "MergeStmt": WRITE, "TruncateStmt": WRITE,
    "GrantStmt": DCL, "GrantRoleStmt": DCL, "CreateRoleStmt": DCL, "AlterRoleStmt": DCL, "AlterRoleSetStmt": DCL,
    "DropRoleStmt": DCL, "AlterDefaultPrivilegesStmt": DCL, "ReassignOwnedStmt": DCL, "DropOwnedStmt": DCL,
    "CreatePolicyStmt": DCL, "AlterPolicyStmt": DCL,
    "TransactionStmt": TRANSACTION,
    "CopyStmt": COPY,
    "DoStmt": PROCEDURAL, "CallStmt": PROCEDURAL,
    "VariableSetStmt": UTILITY, "VacuumStmt": UTILITY, "CheckPointStmt": UTILITY, "AlterSystemStmt": UTILITY,
    "LoadStmt": UTILITY, "LockStmt": UTILITY, "ListenStmt": UTILITY, "NotifyStmt": UTILITY,
    "UnlistenStmt": UTILITY, "DiscardStmt": UTILITY, "ClusterStmt": UTILITY, "ReindexStmt": UTILITY,
    "PrepareStmt": UTILITY, "ExecuteStmt": UTILITY, "DeallocateStmt": UTILITY, "ClosePortalStmt": UTILITY,
    "ConstraintsSetStmt": UTILITY, "ExplainStmt": UTILITY, "VariableShowStmtAll": UTILITY,
}
_DDL_PREFIXES = ("Create", "Alter", "Drop", "Rename", "Comment", "Define", "Index", "View", "RefreshMatView",
                 "SecLabel", "Import", "Composite", "RuleStmt")
_COMMAND_NAMES = {
    "SelectStmt": "SELECT", "InsertStmt": "INSERT", "UpdateStmt": "UPDATE", "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE", "TruncateStmt": "TRUNCATE", "CopyStmt": "COPY", "DoStmt": "DO", "CallStmt": "CALL",
    "VariableSetStmt": "SET", "VariableShowStmt": "SHOW", "IndexStmt": "CREATE INDEX", "ViewStmt": "CREATE VIEW",
    "CreateStmt": "CREATE TABLE", "CreateTableAsStmt": "CREATE TABLE AS", "ExplainStmt": "EXPLAIN",
    "DeclareCursorStmt": "DECLARE CURSOR", "FetchStmt": "FETCH", "VacuumStmt": "VACUUM", "LockStmt": "LOCK",
    "PrepareStmt": "PREPARE", "ExecuteStmt": "EXECUTE", "DeallocateStmt": "DEALLOCATE",
    "GrantRoleStmt": "GRANT ROLE", "RenameStmt": "RENAME", "CreateRoleStmt": "CREATE ROLE",
    "AlterRoleStmt": "ALTER ROLE", "DropRoleStmt": "DROP ROLE", "AlterSystemStmt": "ALTER SYSTEM",
}
_TRANSACTION_NAMES = {"TRANS_STMT_BEGIN": "BEGIN", "TRANS_STMT_START": "BEGIN", "TRANS_STMT_COMMIT": "COMMIT",
                      "TRANS_STMT_ROLLBACK": "ROLLBACK", "TRANS_STMT_SAVEPOINT": "SAVEPOINT",
                      "TRANS_STMT_RELEASE": "RELEASE", "TRANS_STMT_ROLLBACK_TO": "ROLLBACK TO",
                      "TRANS_STMT_PREPARE": "PREPARE TRANSACTION", "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
                      "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED"}
_DROPPED_RELATIONS = frozenset({"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE",
                                "OBJECT_SEQUENCE", "OBJECT_INDEX"})
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def _node_class(node: str) -> str | None:
    known = _NODE_CLASSES.get(node)
    if known:
        return known
    if node.endswith("Stmt") and node.startswith(_DDL_PREFIXES):
        return DDL
    return None


def _command(node: str, body: dict) -> str:
    if node == "TransactionStmt":
        return _TRANSACTION_NAMES.get(body.get("kind", ""), "TRANSACTION")
    if node == "DropStmt":
        return "DROP " + body.get("removeType", "OBJECT_UNKNOWN").removeprefix("OBJECT_").replace("_", " ")
    if node == "GrantStmt":
        return "GRANT" if body.get("is_grant") else "REVOKE"
    if node in _COMMAND_NAMES:
        return _COMMAND_NAMES[node]
    return _CAMEL.sub(" ", node.removesuffix("Stmt")).upper()


class Unparsable(Exception):
    pass


# Settings a client may change with set_config() without it being a side effect worth stopping:
# drivers do it (asyncpg turns JIT off for its catalog queries); SET of the same is a utility.
HARMLESS_SETTINGS = frozenset({
    "jit", "application_name", "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
    "work_mem", "datestyle", "timezone", "intervalstyle", "extra_float_digits", "bytea_output",
})


def _harmless_set_config(call: dict) -> bool:
    args = call.get("args") or []
    first = args[0].get("A_Const", {}).get("sval", {}).get("sval") if args and isinstance(args[0], dict) else None
    return isinstance(first, str) and first.lower() in HARMLESS_SETTINGS


@dataclass
class _Walk:
    classes: set[str] = field(default_factory=set)
    tables: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    harmless: int = 0  # set_config calls on harmless settings
    set_configs: int = 0
    no_where: bool = False
    copy_program: bool = False
    copy_file: bool = False


def _names(items: list) -> str:
    return ".".join(item["String"]["sval"] for item in items if "String" in item).lower()


def _walk(value: object, acc: _Walk) -> None:
    if isinstance(value, dict):
        if "relname" in value:  # a RangeVar, whatever key holds it (relation, rel, RangeVar…)
            name = str(value["relname"])
            acc.tables.add(f"{value['schemaname']}.{name}".lower() if value.get("schemaname") else name.lower())
        for key, body in value.items():
            if isinstance(body, dict):
                kind = _node_class(key)
                if key == "SelectStmt" and "valuesLists" in body and "fromClause" not in body:
                    kind = None  # a VALUES list (INSERT … VALUES) reads nothing
                if kind is not None:
                    acc.classes.add(kind)
                    if key in ("UpdateStmt", "DeleteStmt") and "whereClause" not in body:
                        acc.no_where = True
                    elif key == "DropStmt" and body.get("removeType") in _DROPPED_RELATIONS:
                        acc.tables.update(_names(o["List"]["items"]) for o in body.get("objects", []) if "List" in o)
                    elif key == "SelectStmt" and "intoClause" in body:
                        acc.classes.add(DDL)
                    elif key == "CopyStmt":
                        acc.copy_program = acc.copy_program or bool(body.get("is_program"))
                        acc.copy_file = acc.copy_file or (bool(body.get("filename")) and not body.get("is_program"))
                        acc.classes.add(WRITE if body.get("is_from") else READ)
                    elif key == "ExplainStmt" and not any(
                            o.get("DefElem", {}).get("defname") == "analyze" for o in body.get("options", [])):
                        # Plain EXPLAIN does not run its statement.
                        acc.classes.add(READ)
                        continue
                elif key == "FuncCall":
                    name = _names(body.get("funcname", []))
                    acc.functions.add(name)
                    if name.rsplit(".", 1)[-1] == "set_config":
                        acc.set_configs += 1
                        acc.harmless += _harmless_set_config(body)
                _walk(body, acc)
            elif isinstance(body, list):
                _walk(body, acc)
    elif isinstance(value, list):
        for item in value:
            _walk(item, acc)


def classify(sql: str) -> list[StatementFacts]:
    """Facts about each statement in `sql`; raises Unparsable when PostgreSQL's parser refuses it."""
    try:
        tree = orjson.loads(pg_parser.parse_sql_json(sql))
    except Exception as exc:  # pglast raises ParseError; anything else is equally unparsable
        raise Unparsable(str(exc).split("\n")[0]) from exc
    facts = []
    for wrapper in tree.get("stmts", []):
        stmt = wrapper.get("stmt", {})
        if not stmt:
            continue
        (node, body), = stmt.items()
        acc = _Walk()
        _walk(stmt, acc)
        if not acc.classes:
            acc.classes.add(_node_class(node) or UTILITY)
        facts.append(StatementFacts(
            command=_command(node, body if isinstance(body, dict) else {}),
            classes=frozenset(acc.classes), tables=frozenset(acc.tables), functions=frozenset(acc.functions),
            no_where=acc.no_where, copy_program=acc.copy_program, copy_file=acc.copy_file,
            exempt=frozenset({"set_config"}) if acc.set_configs and acc.harmless == acc.set_configs else frozenset(),
        ))
    return facts


def fingerprint(sql: str) -> str | None:
    """PostgreSQL's statement fingerprint (literal values ignored), or None when unparsable."""
    try:
        return pg_parser.fingerprint(sql)
    except Exception:
        return None
