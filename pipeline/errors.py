"""Errors a user can cause and fix. The CLI prints each as one line and exits with code 2."""


class BilingualQAError(Exception):
    """Base class: the message is written for the user and fits on one line."""


class EmptyInputError(BilingualQAError):
    pass


class UnsupportedLanguageError(BilingualQAError):
    pass


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


class DocumentError(JobError):
    """A document (.md, .html, .srt, .vtt, .docx) that cannot be parsed: nothing is written."""
