"""The one base class of the errors a user can fix: bad params, a malformed or missing input file, an unusable split.

Their messages name the file (and line, column or key) and what was expected, in one line. A stage run from the
command line prints that line and exits with status 2, without a traceback (``stages.lib.io.files.run_stage``);
any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input the user can fix; the message alone says what and where."""
