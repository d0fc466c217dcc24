"""Named error types. Each message is one line that tells the user what to do.

They live in `db/` because it is the bottom layer: every package may import them.
The CLI turns any `WherefromError` into that line and exit code 2; the API into a 4xx.
"""


class WherefromError(Exception):
    """Base of every error a user can cause and fix."""

    http_status = 400


class InputError(WherefromError, ValueError):
    """Bad input: a file, a field, a question, an option."""


class NotFound(WherefromError, LookupError):
    """A named thing (corpus, model, build, trace) does not exist."""

    http_status = 404


class Conflict(WherefromError):
    """The request disagrees with what is stored (changed document, changed weights)."""

    http_status = 409


class StaleBuild(Conflict):
    """A build's model no longer matches the weights on disk."""


class Forbidden(WherefromError, PermissionError):
    """Allowed to nobody through this face (a path outside the data directory, for the API)."""

    http_status = 403

class JobFinished(Conflict):
    """Another run of the same job (a redelivered task) finished it first; this run has nothing to add."""


class Unavailable(WherefromError):
    """A service wherefrom needs (the job broker, the database) cannot be reached."""

    http_status = 503
