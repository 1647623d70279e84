"""The few exceptions r1box raises on purpose.

Each is translated once, where it meets a person: the CLI prints its message as one line and exits non-zero; the
HTTP layer maps it to a status. Messages say what happened and what to do next.
"""


class R1boxError(Exception):
    """Base class: a failure that has a clear, user-facing explanation."""

    exit_code = 1


class ModelSourceError(R1boxError):
    """A model could not be found, downloaded or verified (unknown name, unreachable source, checksum mismatch)."""

    exit_code = 2


class UnsupportedModelError(R1boxError):
    """The model is readable but not something r1box can export (architecture, GGUF version, tokenizer kind)."""

    exit_code = 3


class ExportError(R1boxError):
    """The export stage failed: the output directory, the ONNX conversion, quantization or the parity check."""

    exit_code = 4


class ArtifactError(R1boxError):
    """An exported artifact is missing files, has a bad manifest, or fails its checksums: the runtime refuses it."""

    exit_code = 5


class RequestError(R1boxError):
    """A request the engine cannot take as given (a prompt longer than the context, bad sampling values): HTTP 400."""


class EngineBusy(R1boxError):
    """Every slot is running and the wait queue is full: HTTP 503 with Retry-After; the caller tries again."""

    retry_after_s = 2


class ConfigError(R1boxError):
    """The configuration file is missing, unreadable or has a wrong value; the message names the key."""

    exit_code = 6


class VaultError(R1boxError):
    """The encryption keys are missing, unreadable, readable by others or not this database's, or a backup fails
    its authentication; the message names the file and what to do. The service refuses to start on it."""

    exit_code = 8


class UnreadableValue(VaultError):
    """One sealed value fails its check (altered, moved to another row, or its key is gone): that row is reported
    and skipped, the rest is served."""


class BackendError(R1boxError):
    """One model backend failed to give a whole answer (refused, 5xx, timed out, a wrong key or model, garbage, or
    a stream cut before its end). The backends layer fails over to the next one; nobody outside it sees this."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out  # it said nothing for too long, rather than something wrong


class NoBackend(R1boxError):
    """No model backend could answer now. The question stays recorded and is asked again when one comes back."""


class HaError(R1boxError):
    """The hot-standby pair cannot do what it was asked: keepalived or litestream missing or failing, a replica that
    will not restore, a pair not yet paired. The message says which and what to do."""

    exit_code = 10
