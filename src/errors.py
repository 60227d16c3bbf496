"""The project's own error types: what src/cli.run_main ends with one line (`error: ...`).

Every check of the user's input (a flag, a file, the data) raises one of these, with a message
naming the flag or path and the problem. Any other exception, a plain ValueError from deep in
torch or in our own code among them, is a bug and keeps its traceback.
"""


class UsageError(ValueError):
    """Bad input: a flag, a combination of flags or an argument that cannot be used."""


class DataError(UsageError):
    """Unusable data: the message names the path and the problem."""

    def __str__(self):
        # raised in a DataLoader worker, it is re-raised in the main process with the message
        # "Caught DataError in DataLoader worker process N.\nOriginal Traceback ...": keep the
        # one-line message it ends with
        text = super().__str__()
        if "Original Traceback" in text:
            last = text.rstrip().splitlines()[-1]
            return last.split("DataError: ", 1)[-1]
        return text


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be used; the message names file and problem.
    (A RuntimeError as before: a sibling of UsageError, not a subclass.)"""


# what run_main reports in one line: bad input, unusable files
INPUT_ERRORS = (UsageError, CheckpointError)
