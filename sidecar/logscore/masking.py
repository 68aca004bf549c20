"""Masking the variable parts of a message, shared by the tokens converter and sessions.

Two lines that differ only in an id, an address, a time or a number must mask to the
same text: otherwise every line is a never-seen event. One left-to-right pass tries
the rules in order at each position; a rule may start a match only where an id can
start (not inside a word), so a number rule never eats the start of a uuid
(``req-74d58b45-…`` is ``req-<uuid>``, not ``req<num>d<num>b…``).
"""

import functools
import re

from .sizes import text_bytes

# Where a token starts and ends: not next to a letter or digit. ("_" and "-" are
# separators here: ``blk_-123``, ``instance_7f3a…``, ``req-74d5…``.)
_START = r"(?<![0-9A-Za-z])"
_END = r"(?![0-9A-Za-z])"
_HEX4 = r"[0-9a-fA-F]{1,4}"
_GROUPS = rf"(?:{_HEX4}(?::{_HEX4})*)"
_MONTH = "(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"

# MAC addresses: 00:1a:2b:3c:4d:5e (and iptables' MAC= of 14 bytes: destination, source, type),
# 00-1A-2B-3C-4D-5E (Windows), 001a.2b3c.4d5e (Cisco). Unmasked, each was a template of its own and
# its pieces never-seen words ("<num>a:<num>b:..."): a DHCP server's log, new at every new device.
# Cisco's form holds a hex letter: of digits alone it is a version (2024.0101.1200) as often.
_MAC = (r"(?P<mac>(?<![0-9A-Za-z:.-])(?:(?:[0-9a-fA-F]{2}:){5,}[0-9a-fA-F]{2}(?![0-9A-Za-z:])"
        r"|(?:[0-9a-fA-F]{2}-){5}[0-9a-fA-F]{2}(?![0-9A-Za-z-])"
        r"|(?=[0-9.]{0,13}[a-fA-F])[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}(?![0-9A-Za-z.])))|")
_VARIABLE = re.compile(
    # File paths of two segments or more.
    r"(?P<path>(?<![\w/])(?:/[\w.\-]+){2,}/?)"
    rf"|(?P<uuid>{_START}[0-9a-fA-F]{{8}}-[0-9a-fA-F]{{4}}-[0-9a-fA-F]{{4}}-[0-9a-fA-F]{{4}}-[0-9a-fA-F]{{12}}{_END})"
    # Dates and times: ISO (2017-05-16, 2017-05-16 00:00:00.008, 2017-05-16T00:00:00+02:00),
    # Apache's 16/May/2015:06:50:30 +0000, syslog's May 16 06:50:30.
    rf"|(?P<time>{_START}(?:\d{{4}}-\d{{2}}-\d{{2}}(?:[T ]\d{{2}}:\d{{2}}(?::\d{{2}}(?:[.,]\d+)?)?"
    rf"(?:Z|[+-]\d{{2}}:?\d{{2}})?)?|\d{{1,2}}/{_MONTH}/\d{{4}}(?::\d{{2}}:\d{{2}}:\d{{2}})?(?: [+-]\d{{4}})?"
    rf"|{_MONTH} +\d{{1,2}} \d{{2}}:\d{{2}}:\d{{2}}){_END})"
    r"|(?P<ip>\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b)"
    # IPv6: eight groups, or fewer around one "::" (times like 12:30:45 have neither).
    rf"|(?P<ip6>(?<![\w:])(?=:*[0-9a-fA-F])(?:(?:{_HEX4}:){{7}}{_HEX4}|{_GROUPS}?::{_GROUPS}?)(?![\w:]|\.\d))"
    # Hex ids: 0x..., or 8+ hex digits holding both a digit and a letter (digits alone are a number).
    rf"|(?P<hex>{_START}(?:0x[0-9a-fA-F]+|(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{{8,}}){_END})"
    # Numbers (1e-05 too), durations' numbers (1.5s -> <num>s), times of day; a sign only where no word precedes it.
    r"|(?P<num>(?:(?<![0-9A-Za-z])[-+])?\d+(?:[.:,]\d+)*(?:[eE][-+]?\d+)?)")

# Host names: lowercase labels ending in a common top-level domain, not inside a longer dotted
# name and not called (Java's org.apache.hadoop.net.NetUtils and Logger.info(...) are no hosts).
# A list, not any last label: file names (run.sh, notes.md, build.pl) would otherwise be hosts.
_TLD = ("com|net|org|edu|gov|mil|int|info|biz|io|co|us|uk|de|fr|jp|cn|ru|br|nl|au|ca|es|se|ch|it|be|at|dk|"
        "fi|no|kr|tw|hk|sg|nz|za|mx|ar|cz|eu|local|localdomain|lan|internal|intranet|corp|home|arpa")
_HOST = rf"(?P<host>(?<![\w.\-])(?:[a-z0-9](?:[a-z0-9\-]{{0,61}}[a-z0-9])?\.)+(?:{_TLD})(?![\w\-(]|\.[\w\-]))|"
# Every rule's match starts with one of these (a digit, Unicode's too, as \d reads them; a letter;
# "/", ":", a sign). NOTE: tried first at each position, it skips the rest where no rule can start: the rules
# were all tried at every character, 0.5-0.6 µs a character of CJK or emoji text (a 250-character
# message 0.2 ms), now 0.04; ASCII words 0.48 -> 0.28 (tests/test_masking.py holds the masks equal).
_RULE_STARTS = r"(?=[\dA-Za-z/:+\-])"


def rules(hosts: bool, macs: bool) -> str:
    """The alternatives of one reading: MACs and hosts first where masked."""
    return (_MAC if macs else "") + (_HOST if hosts else "") + _VARIABLE.pattern


# One pattern per reading: (hosts, macs) -> its rules.
_PATTERNS = {(hosts, macs): re.compile(f"{_RULE_STARTS}(?:{rules(hosts, macs)})")
             for hosts in (False, True) for macs in (False, True)}

_TOKEN_OF = {"ip6": "ip"}


# Longer texts are masked each time: the remembered ones stay a few MB. Bytes, as Python holds a text
# (a character of a text not all ASCII counted as 4): 4,096 texts of 1,024 emoji and their masks
# took 33 MiB when characters were counted.
MASK_CACHE_BYTES = 1024


def mask_variables(text: str, hosts: bool = False, macs: bool = False) -> str:
    """``conn from 10.1.2.3:22 id 0xdead took 1.5s`` → ``conn from <ip> id <hex> took <num>s``;
    ``open /var/log/x.log`` → ``open <path>``; ``[req-74d58b45-…]`` → ``[req-<uuid>]``; with
    ``hosts``, ``from host8.topspot.net`` → ``from <host>`` too (a reverse-DNS name is a value);
    with ``macs``, ``to 00:1a:2b:3c:4d:5e`` → ``to <mac>``."""
    return _masked(text, hosts, macs) if text_bytes(text) > MASK_CACHE_BYTES else _remembered(text, hosts, macs)


# NOTE: a message's tokens and alarms converters both mask it, one right after the other for a
# batch's distinct messages: remembered, the second costs a lookup (a fifth of training time on
# sshd's logs, whose messages are full of alarm words). Bounded: 4,096 texts of at most
# MASK_CACHE_BYTES (4,096 of 64 KiB records would have held half a gigabyte in the sidecar).
@functools.lru_cache(maxsize=4096)
def _remembered(text: str, hosts: bool, macs: bool) -> str:
    return _masked(text, hosts, macs)


def _masked(text: str, hosts: bool, macs: bool) -> str:
    return _PATTERNS[hosts, macs].sub(lambda m: f"<{_TOKEN_OF.get(m.lastgroup, m.lastgroup)}>", text)
