"""State in one SQLite file: the connection rules (`db`), the schema (`migrations`), and one
module per aggregate holding that aggregate's tables (`SCHEMA`) and its functions.

Every store function is a plain synchronous function whose first argument is an apsw
connection; the daemon runs them through `db.Database` (one writer, many readers, off the trio
thread) and the CLI calls them directly on its own connection.
"""
