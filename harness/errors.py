"""User-facing errors: the CLIs print these as one line and exit non-zero, without a traceback."""


class HarnessError(Exception):
    """A problem with the user's input (config, data root, results dir) rather than a bug."""


class ConfigError(HarnessError):
    """An invalid study file or override; the message names the field."""


class DataError(HarnessError):
    """A missing or corrupt data set; the message names the path and how to obtain the data."""


class TrainingError(HarnessError):
    """Training could not continue (for example a non-finite loss); the message names epoch and step."""
