"""What the commands show, and where: the result document (JSON, CSV), the readable table and
outcome, the progress bars, and the files written by ``--output`` and ``--plan-out``."""
