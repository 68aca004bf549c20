"""Masking the variable parts of a message, shared by the tokens converter and sessions."""

import re

# One pass masks the variable parts of a message: file paths (two segments or more),
# UUIDs, IPs, hex, numbers.
_VARIABLE = re.compile(
    r"(?P<path>(?<![\w/])(?:/[\w.\-]+){2,}/?)"
    r"|(?P<uuid>\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b)"
    r"|(?P<ip>\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b)"
    r"|(?P<hex>\b0x[0-9a-fA-F]+\b|\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{8,}\b)"
    r"|(?P<num>[-+]?\d+(?:[.:,]\d+)*)")


def mask_variables(text: str) -> str:
    """``conn from 10.1.2.3:22 id 0xdead took 1.5s`` → ``conn from <ip> id <hex> took <num>s``;
    ``open /var/log/x.log`` → ``open <path>``."""
    return _VARIABLE.sub(lambda m: f"<{m.lastgroup}>", text)
