"""What the backfill command shows: its result document, and that document as text.

``document`` builds the result (one dict: the dry run's summary, the run, the plan check,
the verification) once, and renders it as JSON or CSV; ``table`` renders it as the readable
table, laid out by rich to the terminal's width.
"""
