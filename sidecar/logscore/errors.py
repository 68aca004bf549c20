"""One error base for the project; surfaces map these classes to status codes."""


class LogscoreError(Exception):
    """Base of every error logscore raises on purpose. The message says what to do."""


class ModelLoadError(LogscoreError):
    """A model file is missing, corrupt, foreign, or from a newer logscore."""


class ConfigError(LogscoreError):
    """A featurizer/converter configuration or a CLI option is invalid."""


class InputError(LogscoreError):
    """Training or scoring input cannot be read."""


class InvalidRequest(LogscoreError):
    """A request is malformed (bad msgpack, missing records, too many records)."""


class TagTooLong(InvalidRequest):
    """A call's tag is longer than scoring.MAX_TAG_CHARACTERS."""


class ModelNotFound(LogscoreError):
    """The request names (or routes to) a model that is not loaded."""


class FeedbackNotFound(LogscoreError):
    """The request names a feedback entry or a review group that does not exist."""


class FeedbackFull(LogscoreError):
    """A new feedback entry would pass the cap on entries in force (feedback_max_entries)."""


class GroupOutOfDate(LogscoreError):
    """The request names a review group of another sidecar process (before a restart, or another
    sidecar of the fleet)."""


class Overloaded(LogscoreError):
    """The sidecar's queue is full; the caller should retry later."""


class DeadlineExceeded(LogscoreError):
    """The caller's deadline passed before its records were scored."""


class Unauthenticated(LogscoreError):
    """A bearer token is required and the call did not present the right one."""


class ShuttingDown(LogscoreError):
    """The sidecar is draining for shutdown and takes no new work."""


class StoreUnavailable(LogscoreError):
    """The feedback store cannot be reached; the rules last loaded stay in force."""


class ScorerUnavailable(LogscoreError):
    """A scoring process failed while scoring; its records are unscored and it is being replaced."""
