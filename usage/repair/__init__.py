"""The repair and its undo, and what both are made of.

``backfill`` repairs the eligible rows and ``revert`` undoes a run, both on the one batching
core of ``batching`` (short batches halved on a timeout, rows a writer held retried after
the pass, their shared options and error, one way to describe a failure) and reporting
through the one callback of ``progress``; ``rollup`` rebuilds the
hourly keys they touched in short slices under lock 4246; ``runs`` keeps the run record and
the run lock; ``summary`` is the dry run's aggregate and ``verify`` the proof after a run.
"""
