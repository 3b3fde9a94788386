"""Checks shared by the settings models."""


def check_ae_title(value: str) -> str:
    """PS3.5 AE title: 1-16 characters of the default repertoire, no backslash or control characters."""
    if not value or len(value) > 16 or "\\" in value or not value.isprintable():
        raise ValueError(f"AE title {value!r} must be 1-16 printable characters without backslash")
    return value
