#!/usr/bin/python3
"""The tests' psycopg (3) and psycopg2 client (Debian's python3-psycopg and
python3-psycopg2, run with /usr/bin/python3).

Usage: pgclient.py psycopg|psycopg2 DSN QUERIES.json

Runs the queries on one connection, the way a Python application in a
sandbox would (no autocommit: both drivers open a transaction with an
implicit BEGIN), and prints one JSON line per query: its columns and rows
as text, or the SQLSTATE and message it failed with; after a failure it
rolls back, as an application does, and goes on. Queries are written with
$1, $2 placeholders; they become %s here (psycopg binds them on the server,
psycopg2 interpolates literals into the text on the client).
"""

import datetime
import json
import re
import sys


def convert(sql, params):
    """$n placeholders to %s, the parameters in the order they appear."""
    order = []

    def sub(m):
        order.append(params[int(m.group(1)) - 1])
        return "%s"

    sql = re.sub(r"\$(\d+)", sub, sql.replace("%", "%%"))
    return sql, order


def text(v):
    if v is None:
        return None
    if isinstance(v, datetime.date):
        return v.isoformat()
    return str(v)


def main():
    driver, dsn, path = sys.argv[1:4]
    if driver == "psycopg":
        import psycopg as db

        def sqlstate(e):
            return getattr(e, "sqlstate", None) or ""
    elif driver == "psycopg2":
        import psycopg2 as db

        def sqlstate(e):
            return getattr(e, "pgcode", None) or ""
    else:
        sys.exit("pgclient.py: driver must be psycopg or psycopg2")
    with open(path) as f:
        queries = json.load(f)
    conn = db.connect(dsn)
    for q in queries:
        res = {"name": q["name"], "columns": [], "rows": []}
        params = q.get("params") or []
        try:
            cur = conn.cursor()
            if params:
                sql, args = convert(q["sql"], params)
                cur.execute(sql, args)
            else:
                cur.execute(q["sql"])
            if cur.description is not None:
                res["columns"] = [d[0] for d in cur.description]
                res["rows"] = [[text(v) for v in row] for row in cur.fetchall()]
            cur.close()
        except db.Error as e:
            res["sqlstate"] = sqlstate(e)
            res["error"] = str(e).strip()
            try:
                conn.rollback()
            except db.Error as e2:
                res["error"] += " (rollback: %s)" % str(e2).strip()
        print(json.dumps(res), flush=True)
    try:
        conn.commit()
    except db.Error:
        pass
    conn.close()


if __name__ == "__main__":
    main()
