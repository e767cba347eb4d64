"""Domain errors. They know nothing of gRPC or the CLI: the CLI prints them as one line, the service
maps them to status codes in one interceptor."""

SHOWN = 64  # characters of someone else's string (a caller's label, a manifest's value) a message repeats


def cut(text: str, limit: int = SHOWN) -> str:
    """`text` cut to `limit` characters, saying how long it was, so an error message stays short."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def quoted(text: str) -> str:
    """repr of someone else's string, cut so an error message stays short."""
    return repr(text) if len(text) <= SHOWN else repr(text[:SHOWN]) + f"... ({len(text)} characters)"


def listed(names, limit: int = 20) -> str:
    """Names for an error message, quoted, in brackets; past `limit` the first and the last few and how
    many there are: "['pixel_0_0', 'pixel_0_1', ..., 'pixel_7_7'] (64 in all)"."""
    names = [quoted(str(n)) for n in names]
    if len(names) <= limit:
        return f"[{', '.join(names)}]"
    head = max(limit - 2, 1)
    return f"[{', '.join(names[:head])}, ..., {', '.join(names[-2:])}] ({len(names)} in all)"


class VaeserveError(Exception):
    """A problem the user can act on; its message says what and where."""


class DataError(VaeserveError):
    """Training data that cannot be used: missing, unknown format, non-numeric, NaN/Inf, too small."""


class ConfigError(VaeserveError):
    """A setting or flag that is unknown or out of range."""


class ArtifactError(VaeserveError):
    """A checkpoint or model version that is incomplete, corrupt or altered."""


class ExportError(VaeserveError):
    """An export that failed validation; no complete version was written."""


class InvalidInput(VaeserveError):
    """A request whose payload is malformed: shape, byte length, NaN/Inf, unknown label, too many rows."""


class ModelNotFound(VaeserveError):
    """A request naming a model or version the server does not have."""


class ModelNotReady(VaeserveError):
    """The server is warming up or draining."""


class QueueFull(VaeserveError):
    """The batcher's bounded queue is full; the caller should back off and retry."""
