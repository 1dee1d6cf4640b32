"""Errors a user can fix. The CLI prints them as one line (set LLM_TRM_DEBUG=1 for a traceback)."""


class LLMTRMError(Exception):
    """Base class: the message says what is wrong and what to do."""


class BackboneError(LLMTRMError):
    """The backbone spec cannot be resolved or loaded."""


class ConfigMismatchError(LLMTRMError, ValueError):
    """An artifact or checkpoint does not fit the configured run (D, D', backbone, layer)."""


class DataError(LLMTRMError, ValueError):
    """Training data is missing, empty, too small or malformed."""


class NonFiniteLossError(LLMTRMError, RuntimeError):
    """Too many NaN/inf losses in a row."""


class ArtifactNotFoundError(LLMTRMError, FileNotFoundError):
    """A checkpoint / export folder / Hub repo that was asked for cannot be found or fetched."""


class UnreadableCheckpointError(LLMTRMError, ValueError):
    """A checkpoint is not a file of tensors and plain values: corrupt, another format, or pickled code."""


class UncheckedArtifactError(ConfigMismatchError):
    """An artifact does not record what it was trained against (backbone, layer, D, D'), so nothing can be checked."""


class ConfigError(LLMTRMError, ValueError):
    """The command line or config file does not parse (unknown key, bad number, wrong type)."""
