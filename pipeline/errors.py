"""Errors a user can cause and fix. The CLI prints each as one line and exits with code 2."""


class BilingualQAError(Exception):
    """Base class: the message is written for the user and fits on one line."""


class EmptyInputError(BilingualQAError):
    pass


class ControlCharacterError(EmptyInputError):
    """Text holding a control character (NUL, ESC...): refused with the character and its position.
    An EmptyInputError as before it had a class of its own, so callers that catch that still do."""


class UnsupportedLanguageError(BilingualQAError):
    def __init__(self, message: str, language: str | None = None):
        super().__init__(message)
        self.language = language  # the code detected ("zh", "ko"...), for callers that word it their way


class InputTooLongError(BilingualQAError):
    pass


class ModelLoadError(BilingualQAError):
    """A model that is missing, not cached while offline, or cannot serve the requested device."""


class DeviceError(BilingualQAError):
    pass


class JobError(BilingualQAError):
    """A batch job that cannot start or resume as asked (changed input, unreadable file...)."""


class MemoryFileError(BilingualQAError):
    """A translation memory file (`--memory`) that cannot be opened, read or written."""


class SettingsError(BilingualQAError, ValueError):
    """A generation setting out of range (a nan temperature, a negative seed...)."""


class ServerError(Exception):
    """A `--server` that cannot be reached, or that refused or failed a request as a whole (a wrong
    key, still loading, a full queue): one line, like a BilingualQAError, but no row's fault, so a
    batch job stops (and resumes later) instead of blaming a row. Exit code 2, or 1 for the
    server's own failures (a 500)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class DocumentError(JobError):
    """A document (.md, .html, .srt, .vtt, .docx) that cannot be parsed: nothing is written."""
