"""The repair (``backfill``) and its undo (``revert``), the chunk engine's two directions
(``batching``); the run record and lock, the dry run, and the proof after a run."""
