"""Record the access layout (combined | common) in a model trained before training recorded it.

    python scripts/set_access_layout.py MODEL.onnx (--from-log LOG | --layout combined|common) [--out PATH]

Fluentd's apache2 parser sends null for both of a combined line's "-" "-" and for a common line's
missing pair; only the model's `access_layout` tells which its log writes (featurizer.py). Models
trained before it was recorded read such records as the common format. This writes the layout into
the model's metadata, and nothing else: the graph, its weights and every other field of the file
stay byte for byte as they were (checked before the file is written), and the content hash is
renewed over the new metadata. With --from-log the layout is the one `logscore train` records for
that log (combined where 1 % or more of the parsed lines hold a user agent). Needs the onnx package (training's
dependencies).

models/apache-access.onnx was given its layout with
    python scripts/set_access_layout.py models/apache-access.onnx \\
        --from-log ../shared/data/elastic_apache_access_logs/apache_logs
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "sidecar"))

from logscore.artifact import fields_but_metadata, read_artifact  # noqa: E402
from logscore.errors import ConfigError, LogscoreError  # noqa: E402
from logscore.inputs import read_lines  # noqa: E402

LAYOUTS = ("combined", "common")


def layout_of_log(path: str, spec: dict) -> str:
    """The layout `logscore train` records for this log (training.train.count_unparsed)."""
    from logscore.training.train import TrainOptions, count_unparsed

    lines = list(read_lines([path]))
    _, _, learned = count_unparsed(lines, TrainOptions(spec=spec), warn=lambda message: None)
    if "access_layout" not in learned:
        raise ConfigError("the model reads no user agent, so no layout changes how it reads a record: "
                          "nothing to record")
    return learned["access_layout"]


def with_layout(data: bytes, metadata: dict, layout: str) -> bytes:
    """The model file with ``layout`` in its metadata; refuses if anything but the metadata changed."""
    import onnx

    from logscore.training.behaviour import sealed

    revised = copy.deepcopy(metadata)
    revised["featurizer"]["access_layout"] = layout
    model, _ = sealed(onnx.ModelProto.FromString(data), revised)
    written = model.SerializeToString()
    if fields_but_metadata(written) != fields_but_metadata(data):
        raise LogscoreError("rewriting the metadata changed another part of the model file (the onnx package "
                            "serializes it otherwise than it was written); nothing was written")
    return written


def set_layout(model_path: str, out_path: str, layout: str | None, log: str | None) -> int:
    artifact = read_artifact(model_path)
    spec = artifact.metadata["featurizer"]
    if spec.get("format") != "access":
        raise ConfigError(f"{model_path}: a {spec.get('format')} model; only access models have a layout")
    layout = layout or layout_of_log(log, spec)
    if spec.get("access_layout") not in (None, layout):
        raise ConfigError(f"{model_path} already records access_layout {spec['access_layout']!r}; "
                          f"retrain it to change its layout")
    written = with_layout(artifact.model_bytes, artifact.metadata, layout)
    temporary = Path(f"{out_path}.tmp")
    temporary.write_bytes(written)
    os.replace(temporary, out_path)
    revised = read_artifact(out_path)  # (checks the new content hash)
    print(json.dumps({"model": out_path, "access_layout": layout, "version": revised.version,
                      "previous_version": artifact.version, "bytes": len(written),
                      "sha256": hashlib.sha256(written).hexdigest()}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL.onnx")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-log", metavar="LOG", help="the log the model was trained on (or one like it)")
    source.add_argument("--layout", choices=LAYOUTS)
    parser.add_argument("--out", help="where to write the model (default: in place)")
    args = parser.parse_args()
    try:
        return set_layout(args.model, args.out or args.model, args.layout, args.from_log)
    except LogscoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
