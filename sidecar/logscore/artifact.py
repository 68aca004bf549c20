"""The one-file model artifact: an ONNX model whose metadata describes itself.

``metadata_props`` holds two entries:
  logscore.metadata      JSON: format version, featurizer spec, detectors,
                         calibration and threshold, training summary
  logscore.content_hash  sha256 over the serialized graph and the metadata JSON

Loading reads these straight from the protobuf wire format (a few lines, no
``onnx`` package needed) so a file is checked before onnxruntime sees it, and
nothing in a model file is ever executed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import ModelLoadError

# NOTE: raise it only when a logscore reading up to the previous version would misread a new file;
# every older sidecar then refuses every new model. A key older readers may ignore needs none; one
# that changes how a part of the file is read carries a version of its own, which the reader checks
# (windows.levels_read: model.trained_levels_read), or an option older readers refuse.
FORMAT_VERSION = 1
METADATA_KEY = "logscore.metadata"
HASH_KEY = "logscore.content_hash"

# NOTE: a file is read whole into memory before it is checked; a 1.5 GB file took the sidecar from 99 MB to
# 1.6 GB (the shipped systemd unit and Kubernetes limits, 350 MB, kill it there, and again at each restart
# while the file stays). The biggest models logscore makes are a few MB (a 2^20 rarity table is 4 MB).
DEFAULT_MAX_MODEL_BYTES = 64 * 1024 * 1024
GROWTH_CHUNK = 1024 * 1024  # read at a time past the size a file had when it was opened

GRAPH_FIELD = 7  # ModelProto.graph
# NOTE: a model has a dozen top-level fields or so (a few opset imports and metadata entries), a metadata
# entry two. 60 MiB of tiny fields (bytes `08 00`) took 18.7 s of CPU to scan, at every change and SIGHUP,
# while calls slowed from 8 to 94 ms p50 (probe-registry): scanning stops past these counts.
MAX_TOP_LEVEL_FIELDS = 1000
MAX_ENTRY_FIELDS = 16
_METADATA_FIELD = 14  # ModelProto.metadata_props (StringStringEntryProto: key=1, value=2)


def content_hash(graph_bytes: bytes, metadata_json: str) -> str:
    digest = hashlib.sha256(graph_bytes)
    digest.update(metadata_json.encode("utf-8"))
    return digest.hexdigest()


@dataclass
class Artifact:
    path: str
    model_bytes: bytes
    metadata: dict
    content_hash: str

    @property
    def version(self) -> str:
        """Short content hash: two files with the same version score identically."""
        return self.content_hash[:12]


def read_at_most(path: str, max_bytes: Optional[int]) -> bytes:
    """The file's bytes; ModelLoadError when it holds more than max_bytes (None: no limit), its size
    checked before reading and its reading stopped past the limit (a file still growing: a `cp` of a
    big model straight into the models directory)."""
    limit = max_bytes if max_bytes is not None else float("inf")
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size > limit:
            raise too_big(path, size, max_bytes)
        data = file.read(size)  # (bytes: an accepted file is held once; onnxruntime copies it too)
        more = file.read(min(GROWTH_CHUNK, limit + 1 - len(data)))
        if not more:
            return data
        # NOTE: it grew since its stat: one buffer, extended in place (`bytes += chunk` copied the whole for
        # every chunk and held two copies, twice the limit before refusing).
        grown = bytearray(data)
        del data
        while more:
            grown += more
            if len(grown) > limit:
                raise too_big(path, max(len(grown), os.fstat(file.fileno()).st_size), max_bytes)
            more = file.read(min(GROWTH_CHUNK, limit + 1 - len(grown)))
    return bytes(grown)


def too_big(path: str, size: int, max_bytes: int) -> ModelLoadError:
    return ModelLoadError(f"{path}: {size:,} bytes, over max_model_bytes ({max_bytes:,}): not read, as it "
                          "would be held in memory whole; if it is a model, raise max_model_bytes and the "
                          "sidecar's memory limit by its size; else move it out of the models directory")


class UnreadableModelFile(ModelLoadError):
    """The file could not be opened or read; ``errno`` says why (the remedy depends on it: one remedy,
    "make it readable", was given for a mistyped path and a disk error alike)."""

    def __init__(self, path: str, error: OSError):
        self.errno = error.errno
        reason = error.strerror or str(error)
        if error.errno in (errno.EACCES, errno.EPERM):
            remedy = "; make it, and the directories above it, readable by this process's user"
        elif error.errno in (errno.ENOENT, errno.ENOTDIR):
            remedy = "; check the path (or the file was removed as it was opened)"
        else:
            remedy = ""  # (a disk or file system error: the error says what there is to know)
        super().__init__(f"{path}: cannot read model file: {reason}{remedy}")


class WireError(ValueError):
    pass


def wire_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError(f"truncated varint at byte {pos}")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def wire_field(data: bytes, pos: int) -> tuple[int, int, object, int]:
    """The field at ``pos`` of a protobuf message: (field number, wire type, value, where the next
    one starts); raises WireError."""
    tag, pos = wire_varint(data, pos)
    number, wire_type = tag >> 3, tag & 7
    if number == 0:
        raise WireError(f"field number 0 at byte {pos}")
    if wire_type == 0:
        value, pos = wire_varint(data, pos)
    elif wire_type == 1:
        value, pos = data[pos: pos + 8], pos + 8
    elif wire_type == 2:
        length, pos = wire_varint(data, pos)
        value, pos = data[pos: pos + length], pos + length
    elif wire_type == 5:
        value, pos = data[pos: pos + 4], pos + 4
    else:
        raise WireError(f"unsupported wire type {wire_type} at byte {pos}")
    if pos > len(data):
        raise WireError("message ends in the middle of a field")
    return number, wire_type, value, pos


def wire_fields(data: bytes, max_fields: Optional[int] = None, what: str = "message"):
    """Yield (field number, wire type, value) of one protobuf message; raises WireError, also past
    ``max_fields`` fields (None: no limit)."""
    pos = count = 0
    while pos < len(data):
        count += 1
        if max_fields is not None and count > max_fields:
            raise WireError(f"over {max_fields:,} fields in {what} (a model has a few), at byte {pos:,}")
        number, wire_type, value, pos = wire_field(data, pos)
        yield number, wire_type, value


def _scan_model(data: bytes) -> tuple[bytes, dict[str, str]]:
    graph = b""
    props: dict[str, str] = {}
    for number, wire_type, value in wire_fields(data, MAX_TOP_LEVEL_FIELDS, "the file's top level"):
        if number == GRAPH_FIELD and wire_type == 2:
            graph = value
        elif number == _METADATA_FIELD and wire_type == 2:
            entry = {n: v for n, w, v in wire_fields(value, MAX_ENTRY_FIELDS, "a metadata entry") if w == 2}
            props[entry.get(1, b"").decode("utf-8", "replace")] = entry.get(2, b"").decode("utf-8", "replace")
    return graph, props


def fields_but_metadata(data: bytes) -> list[tuple[int, object]]:
    """Every top-level field of a model file but its metadata, as (field number, value) in order: what a
    rewrite of the metadata alone must leave as it was, byte for byte (scripts/set_access_layout.py)."""
    return [(number, value) for number, _, value in wire_fields(data) if number != _METADATA_FIELD]


def read_artifact(path: str | Path, max_bytes: Optional[int] = None) -> Artifact:
    """Read and verify a model file; every failure is a ModelLoadError naming the file. A file over
    ``max_bytes`` is refused before it is read."""
    path = str(path)
    try:
        data = read_at_most(path, max_bytes)
    except OSError as error:
        raise UnreadableModelFile(path, error) from None
    try:
        graph, props = _scan_model(data)
    except WireError as error:
        raise ModelLoadError(f"{path}: not a valid ONNX file (truncated or corrupt: {error}); "
                             "re-copy or re-export it") from None
    if not graph:
        raise ModelLoadError(f"{path}: not a valid ONNX file (no graph); re-copy or re-export it")
    if METADATA_KEY not in props:
        raise ModelLoadError(f"{path}: an ONNX model, but not a logscore model (no {METADATA_KEY} "
                             "metadata); make one with `logscore train`")
    metadata_json = props[METADATA_KEY]
    try:
        metadata = json.loads(metadata_json)
    except ValueError as error:
        raise ModelLoadError(f"{path}: logscore metadata is not valid JSON ({error}); re-export it") from None
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if not isinstance(version, int):
        raise ModelLoadError(f"{path}: logscore metadata has no format_version; re-export it")
    if version > FORMAT_VERSION:
        raise ModelLoadError(f"{path}: made by a newer logscore (artifact format {version}; this "
                             f"logscore reads up to {FORMAT_VERSION}); upgrade logscore")
    expected = props.get(HASH_KEY, "")
    actual = content_hash(graph, metadata_json)
    if expected != actual:
        raise ModelLoadError(f"{path}: content hash mismatch (stored {expected[:12] or 'none'}, "
                             f"computed {actual[:12]}): the file was changed after export; re-export it")
    return Artifact(path, data, metadata, actual)
