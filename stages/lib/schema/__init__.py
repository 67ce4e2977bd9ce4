"""Schema: the one definition of every hand-off between stages: tables (file, columns, key) and JSON reports."""
