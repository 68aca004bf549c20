"""One error base for the project; surfaces map these classes to status codes."""


class LogscoreError(Exception):
    """Base of every error logscore raises on purpose. The message says what to do."""


class ModelLoadError(LogscoreError):
    """A model file is missing, corrupt, foreign, or from a newer logscore."""


class ConfigError(LogscoreError):
    """A featurizer/converter configuration or a CLI option is invalid."""


class InputError(LogscoreError):
    """Training or scoring input cannot be read."""
