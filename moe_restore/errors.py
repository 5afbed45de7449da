"""The exception the pipeline raises for a user's mistake (a missing or corrupt file, a data
folder without images, a run folder in use, ...): the command line reports it as one line and a
non-zero exit status, while any other exception is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user asked for; the message names the problem and how to fix it."""
