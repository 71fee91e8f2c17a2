"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class EmbedkitError(Exception):
    """An error caused by input or configuration that the user can fix; the message says how."""


class BadImageError(EmbedkitError):
    """An image that cannot be read or converted (corrupt, empty, unexpected channels)."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class WeightsNotFoundError(EmbedkitError):
    """Pretrained weights that are not present locally and cannot be fetched."""
