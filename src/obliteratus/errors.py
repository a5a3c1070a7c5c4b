"""Error types. Each one is bad input or an unmet precondition that the CLI turns into one
clear line and a non-zero exit; anything else is a bug and keeps its traceback."""


class ObliteratusError(Exception):
    """Base class: the message says what was wrong and how to fix it."""

    exit_code = 2  # the CLI's exit status


class Interrupted(ObliteratusError):
    """Ctrl-C (or SIGTERM) stopped a command; the message says what was kept."""

    exit_code = 130  # 128 + SIGINT, as a shell reports it


class ConfigError(ObliteratusError):
    """A preset, environment variable or CLI override is invalid."""


class ModelNotFoundError(ObliteratusError):
    """The model path, alias or hub id cannot be found or loaded."""


class UnsupportedArchitectureError(ObliteratusError):
    """The model family has no architecture adapter."""


class IntegrityError(ObliteratusError):
    """A file does not have the checksum it must have."""


class PromptError(ObliteratusError):
    """A prompt set is empty, too small, or unreadable."""


class ActivationError(ObliteratusError):
    """Activations are not finite or have the wrong shape."""


class EditError(ObliteratusError):
    """A weight edit would produce non-finite weights or cannot be applied."""


class OutputExistsError(ObliteratusError):
    """The output directory exists and --overwrite was not given."""
