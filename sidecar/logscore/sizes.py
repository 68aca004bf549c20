"""What a text takes in memory, as the bounds of caches and windows count it."""


def text_bytes(text: str) -> int:
    """The bytes a str's characters take, counted at their widest: one a character for ASCII text,
    else four (Python holds a str in 1, 2 or 4 bytes a character and cannot say which cheaply; the
    compiled caches count the same: features/_native.c)."""
    return len(text) if text.isascii() else 4 * len(text)
