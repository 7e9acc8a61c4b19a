"""What the backfill command shows, and where: its result, its progress, its files.

``document`` builds the result (one dict: the dry run's summary, the run, the plan check,
the verification) once, and renders it as JSON or CSV; ``table`` renders it as the readable
table, laid out by rich to the terminal's width; ``progress`` shows a run's progress (a
bar on a terminal, a line every few seconds elsewhere); ``files`` checks and writes
``--output`` and ``--plan-out``.
"""
