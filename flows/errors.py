"""The two kinds of failure a user can see, and the exit codes they map to.

`UserError` (exit 2) is a mistake the user can fix: a bad spec, a missing data set, a bad
URL. `JobFailure` (exit 1) is something that went wrong while doing correct work: a corrupt
shard, a simulation that blew up, a lost worker. Both carry a one-line message that names
what is wrong and where; the CLI prints it without a traceback.
"""

from __future__ import annotations


class PhysflowError(Exception):
    """Base of every error physflow reports to a person."""

    exit_code = 1


class UserError(PhysflowError):
    """A mistake in what the user asked for; exit code 2."""

    exit_code = 2


class JobFailure(PhysflowError):
    """Correct input, failed work; exit code 1."""

    exit_code = 1
