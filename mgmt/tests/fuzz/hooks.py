"""Keel's own schemathesis checks, loaded with SCHEMATHESIS_HOOKS=this file.

mgmt/tests/api_fuzz.rs runs schemathesis with `--checks all`, which takes
in every check registered here:

  keel_no_host_paths     no response names a host path: the daemon's data
                         directory, /var/tmp, /tmp/, /root, or a `.json:`
                         parse error of a file the daemon read
  keel_no_foreign_names  no response names an object of another tenant
                         (in the power user's run: the manager's objects)

and one `filter_failure` hook (at the end: a 404 about another object than
the one a POST just made is not that object going missing).

The test passes what the checks need in the environment:

  KEEL_FUZZ_DATA_DIR         the daemon's data directory
  KEEL_FUZZ_FORBIDDEN_NAMES  comma-separated names the caller must never
                             see (empty in the manager's run)

What the client itself sent is not held against a response: an error that
quotes the client's input ("volume name \"/tmp/x\" is not valid"), or a VM
that shows the kernel path a manager gave it, leaks nothing. So a marker
in a response is excused when the whole path-like word around it (letters,
digits and `._-/:`) is part of something the client sent earlier in the
run: in a URL or a JSON body. The data directory is never excused.
"""

import json
import os
import re
import threading
import urllib.parse

import schemathesis

DATA_DIR = os.environ.get("KEEL_FUZZ_DATA_DIR", "").rstrip("/")
FORBIDDEN_NAMES = [n for n in os.environ.get("KEEL_FUZZ_FORBIDDEN_NAMES", "").split(",") if n]
HOST_PATH_MARKERS = ["/var/tmp", "/tmp/", "/root", ".json:"]

# A path-like word: what a file path or a name is made of.
WORD = re.compile(r"[A-Za-z0-9._/:-]+")

_lock = threading.Lock()
# Words the client sent so far that hold a marker or a forbidden name:
# only those can excuse anything, so only those are kept.
_sent_words: set = set()
_seen_requests: set = set()


def _interesting(word: str) -> bool:
    return any(m in word for m in HOST_PATH_MARKERS) or any(n in word for n in FORBIDDEN_NAMES)


def _strings(value):
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _record_request(request) -> None:
    """Remember the interesting words of what the client sent."""
    url = request.url or ""
    body = request.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    key = (request.method, url, body)
    with _lock:
        if key in _seen_requests:
            return
        _seen_requests.add(key)
    texts = [url, urllib.parse.unquote(url), urllib.parse.unquote_plus(url)]
    if body:
        texts.append(body)
        try:
            texts.extend(_strings(json.loads(body)))
        except ValueError:
            pass
    words = {w for t in texts for w in WORD.findall(t) if _interesting(w)}
    with _lock:
        _sent_words.update(words)


def _excused(word: str) -> bool:
    with _lock:
        return any(word in sent for sent in _sent_words)


def _hits(text: str, needle: str):
    """The path-like words of `text` around each occurrence of `needle`."""
    out = []
    start = 0
    while True:
        i = text.find(needle, start)
        if i < 0:
            return out
        lo, hi = i, i + len(needle)
        while lo > 0 and WORD.fullmatch(text[lo - 1]):
            lo -= 1
        while hi < len(text) and WORD.fullmatch(text[hi]):
            hi += 1
        out.append((text[lo:hi], lo, hi))
        start = i + 1


def _excerpt(text: str, lo: int, hi: int) -> str:
    a, b = max(0, lo - 80), min(len(text), hi + 80)
    return ("..." if a else "") + text[a:b] + ("..." if b < len(text) else "")


def _body(response) -> str:
    return response.content.decode("utf-8", "replace")


@schemathesis.check
def keel_no_host_paths(ctx, response, case):
    """No response names a host path: the daemon's data directory, /var/tmp,
    /tmp/, /root, or a `.json:` parse error of a file the daemon read."""
    _record_request(response.request)
    text = _body(response)
    if DATA_DIR and DATA_DIR in text:
        i = text.find(DATA_DIR)
        raise AssertionError(
            f"the response names the daemon's data directory {DATA_DIR}: {_excerpt(text, i, i + len(DATA_DIR))}"
        )
    for marker in HOST_PATH_MARKERS:
        for word, lo, hi in _hits(text, marker):
            if not _excused(word):
                raise AssertionError(f"the response names a host path ({word!r}): {_excerpt(text, lo, hi)}")


@schemathesis.check
def keel_no_foreign_names(ctx, response, case):
    """No response names another tenant's object (in the power user's run:
    the manager's volume, snapshot and user)."""
    if not FORBIDDEN_NAMES:
        return
    _record_request(response.request)
    text = _body(response)
    for name in FORBIDDEN_NAMES:
        for word, lo, hi in _hits(text, name):
            if not _excused(word):
                raise AssertionError(
                    f"the response names {name!r}, an object of another tenant: {_excerpt(text, lo, hi)}"
                )


# ensure_resource_availability ("ST302 Created resource not found") fails a
# 404 from an operation on an object a POST just made. schemathesis.toml
# turns it off for the operations whose 404 may be about another object the
# request names (the move's target pool, the CD's ISO, ...), but the
# stateful phase runs it for every operation regardless. So here, for those
# operations only, such a failure is dropped when the 404 is not about the
# object in the path: its message does not begin "volume NAME" or "VM NAME"
# (every not-found of a volume or VM does). A 404 about the made object
# itself still fails.
ABOUT_ANOTHER_OBJECT = {
    "PUT /api/v1/vms/{name}/cdrom": "VM",
    "POST /api/v1/vms/{name}/disks": "VM",
    "POST /api/v1/vms/{name}/clones": "VM",
    "POST /api/v1/vms/{name}/restore": "VM",
    "POST /api/v1/vms/{name}/start": "VM",
    "DELETE /api/v1/vms/{name}/disks/{volume}": "VM",
    "DELETE /api/v1/vms/{name}/nics/{id}": "VM",
    "POST /api/v1/volumes/{name}/snapshots/{snap}/clones": "volume",
    "POST /api/v1/volumes/{name}/move": "volume",
}


@schemathesis.hook
def filter_failure(ctx, failure, case, response):
    kind = ABOUT_ANOTHER_OBJECT.get(case.operation.label)
    if kind is None or type(failure).__name__ != "EnsureResourceAvailability" or response.status_code != 404:
        return True
    name = (case.path_parameters or {}).get("name", "")
    try:
        message = response.json().get("error", "")
    except ValueError:
        return True
    return message.startswith(f"{kind} {name} ")
