"""The repair and its undo: ``backfill`` and ``revert``, two strategies of the chunk engine
(``batching``) reporting through one event stream (``progress``); ``rollup`` rebuilds the
hourly keys they touch, ``runs`` keeps the run record and lock, ``summary`` is the dry run and
``verify``/``verdict`` the proof after a run."""
