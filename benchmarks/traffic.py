"""The traffic the benchmarks send, and how much of it is new.

Two kinds, each made per client from its own seed (so clients never replay each other's data):

- **repetitive**: the real public Apache log in ../shared/data (10,000 lines, 17 % distinct
  requests), each client its own shuffle of it; after the first pass every value is cached.
  Without the data folder, `tests/generate.py`'s blog lines stand in (17 request paths).
- **novel**: the same lines with 99 % of their request lines replaced by ones never sent before:
  random ids and words in paths and queries, and CSIC 2010's parameter values recombined with
  random ones (../shared/data; generated values stand in without it).

``never_seen_share`` counts, over what was actually sent (by all clients), the share of
request lines (URLs) and of whole lines that were new: every benchmark prints it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import random
import string
import sys
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import quote

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.generate import WORDS, blog_lines  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
REAL_ACCESS_LOG = DATA / "elastic_apache_access_logs" / "apache_logs"
CSIC_REQUESTS = DATA / "csic2010_http" / "csic2010_requests.csv"
NOVEL_SHARE = 0.99


@lru_cache(maxsize=1)
def real_lines() -> tuple[str, ...]:
    """The real access log, or generated blog lines when ../shared/data is absent."""
    if REAL_ACCESS_LOG.exists():
        return tuple(line.rstrip("\n") for line in REAL_ACCESS_LOG.open(encoding="utf-8", errors="replace")
                     if line.strip())
    return tuple(blog_lines(10_000, seed=9))


@lru_cache(maxsize=1)
def csic_parameters() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(path, parameter names) of CSIC 2010's normal GET requests, and a pool of their values."""
    if not CSIC_REQUESTS.exists():
        return ()
    opener = gzip.open if CSIC_REQUESTS.suffix == ".gz" else open
    forms = {}
    with opener(CSIC_REQUESTS, "rt", encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["label"] != "normal" or "?" not in row["url"]:
                continue
            path, _, query = row["url"].partition("?")
            path = "/" + path.split("://", 1)[-1].partition("/")[2]
            pairs = tuple(pair.partition("=") for pair in query.split("&"))
            forms.setdefault(path, []).append(pairs)
    return tuple((path, tuple("&".join(f"{n}={v}" for n, _, v in pairs) for pairs in queries))
                 for path, queries in sorted(forms.items()))


def repetitive_lines(count: int, seed: int) -> list[str]:
    """``count`` lines of the real log, in this client's own order, cycled."""
    lines = list(real_lines())
    random.Random(seed).shuffle(lines)
    return [lines[i % len(lines)] for i in range(count)]


def _word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 10)))


def _csic_url(rng: random.Random, forms) -> str:
    path, queries = forms[rng.randrange(len(forms))]
    pairs = [pair.partition("=") for pair in queries[rng.randrange(len(queries))].split("&")]
    name, _, value = pairs[rng.randrange(len(pairs))]
    pairs = [(n, v) if n != name else (n, v + quote(str(rng.randrange(10 ** 6)))) for n, _, v in pairs]
    return path + "?" + "&".join(f"{n}={v}" for n, v in pairs)


def novel_url(rng: random.Random) -> str:
    """A request URL not sent before: random ids, words and (CSIC 2010) parameter values."""
    forms = csic_parameters()
    choice = rng.random()
    if choice < 0.3 and forms:
        return _csic_url(rng, forms)
    if choice < 0.45:
        return f"/products/{rng.randrange(10 ** 9)}/reviews?page={rng.randint(1, 999)}&sort={rng.choice(WORDS)}"
    if choice < 0.6:
        words = " ".join(_word(rng) for _ in range(rng.randint(1, 4)))
        return f"/search?q={quote(words)}&page={rng.randint(1, 99)}"
    if choice < 0.75:
        return f"/blog/{_word(rng)}-{_word(rng)}-{rng.randrange(10 ** 6)}.html"
    if choice < 0.9:
        return (f"/api/v2/sessions/{rng.getrandbits(128):032x}/events?since={rng.randrange(10 ** 10)}"
                f"&limit={rng.randint(1, 500)}")
    return f"/images/{_word(rng)}/{_word(rng)}_{rng.randrange(10 ** 5)}.{rng.choice(['png', 'jpg', 'gif'])}"


def replace_url(line: str, url: str) -> str:
    start = line.find('"')
    end = line.find(" HTTP/", start)
    if start < 0 or end < 0:
        return line
    method = line[start + 1: end].split(" ", 1)[0]
    return f"{line[:start + 1]}{method} {url}{line[end:]}"


def novel_lines(count: int, seed: int, share: float = NOVEL_SHARE) -> list[str]:
    """``count`` lines of the real log, ``share`` of them carrying a never-sent request URL."""
    rng = random.Random(seed * 7919 + 1)
    base = real_lines()
    lines = []
    for _ in range(count):
        line = base[rng.randrange(len(base))]
        lines.append(replace_url(line, novel_url(rng)) if rng.random() < share else line)
    return lines


TRAFFIC = {"repetitive": repetitive_lines, "novel": novel_lines}


def request_url(line: str) -> str:
    start = line.find('"')
    return line[start + 1: line.find('"', start + 1)] if start >= 0 else line


def sent_digests(lines: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit digests of each line's request line and of the whole line (comparable across
    processes, unlike hash()), so the share never seen can be counted over all clients."""
    urls, whole = [], []
    for line in lines:
        urls.append(_digest(request_url(line)))
        whole.append(_digest(line))
    return np.array(urls, dtype=np.uint64), np.array(whole, dtype=np.uint64)


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def never_seen_share(url_digests: np.ndarray, line_digests: np.ndarray, seen: Optional[set] = None) -> dict:
    """Of the records sent, the share whose request line, and whose whole line, were sent only
    once in the run (and not in earlier runs, when ``seen`` holds their request-line digests)."""
    total = len(url_digests)
    distinct_urls = np.unique(url_digests)
    new_urls = distinct_urls if seen is None else np.array([d for d in distinct_urls.tolist() if d not in seen])
    if seen is not None:
        seen.update(distinct_urls.tolist())
    return {"records": int(total), "never_seen_request_lines": round(len(new_urls) / max(total, 1), 4),
            "never_seen_lines": round(len(np.unique(line_digests)) / max(total, 1), 4)}
