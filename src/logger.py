"""The original's log format (`LEVEL - date time - elapsed - message`) and PD_Stats."""
import logging
import os
import time
from datetime import timedelta

import pandas as pd

from .errors import UsageError


class LogFormatter:
    def __init__(self):
        self.start_time = time.time()

    def format(self, record):
        elapsed_seconds = round(record.created - self.start_time)
        prefix = "%s - %s - %s" % (record.levelname, time.strftime("%x %X"),
                                   timedelta(seconds=elapsed_seconds))
        message = record.getMessage()
        # indent continuation lines under the message
        message = message.replace("\n", "\n" + " " * (len(prefix) + 3))
        return "%s - %s" % (prefix, message) if message else ""


QUIET_LIBRARIES = ("PIL", "matplotlib", "numba", "h5py", "urllib3", "fsspec")


def create_logger(filepath, rank):
    """Log to `filepath` (rank 0) or `filepath-{rank}` at DEBUG, and to the console at INFO.

    Configures and returns the root logger so that `logging.getLogger()` anywhere writes here.
    """
    if rank > 0:
        filepath = "%s-%i" % (filepath, rank)
    log_formatter = LogFormatter()
    logger = logging.getLogger()
    for handler in list(logger.handlers):
        if getattr(handler, "_swav", False):
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    # libraries' debug chatter (PIL logs every PNG chunk it reads) stays out of train.log
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.INFO)
    handlers = []
    if filepath is not None:
        file_handler = logging.FileHandler(filepath, "a")
        file_handler.setLevel(logging.DEBUG)
        handlers.append(file_handler)
    console_handler = logging.StreamHandler()
    console_handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handlers.append(console_handler)
    for handler in handlers:
        handler.setFormatter(log_formatter)
        handler._swav = True
        logger.addHandler(handler)

    def reset_time():
        log_formatter.start_time = time.time()

    logger.reset_time = reset_time
    return logger


class PD_Stats:
    """One row per epoch in a pandas DataFrame, pickled (atomically) after every update."""

    def __init__(self, path, columns):
        self.path = path
        if os.path.isfile(self.path):
            self.stats = pd.read_pickle(self.path)
            if list(self.stats.columns) != list(columns):
                raise UsageError(f"{path} has columns {list(self.stats.columns)}, "
                                 f"expected {list(columns)}: is it from another run?")
        else:
            self.stats = pd.DataFrame(columns=list(columns))

    def update(self, row, save=True):
        self.stats.loc[len(self.stats.index)] = list(row)
        if save:
            tmp = self.path + ".tmp"
            self.stats.to_pickle(tmp)
            os.replace(tmp, self.path)

    def truncate(self, nrows):
        """Drop rows past `nrows` (rows written after the checkpoint a run resumes from)."""
        if len(self.stats.index) > nrows:
            self.stats = self.stats.iloc[:nrows]
