"""The naive pipeline (benchmarks/baselines.py) as an MLServer custom runtime, for
bench_sidecar.py's ``--mlserver`` runs: the issue's comparison, "the naive pipeline served by
MLServer 1.7". Runs inside MLServer's own virtualenv (never the project's): bench_sidecar.py writes
the model settings and starts ``mlserver start`` with this folder's parent on PYTHONPATH.

The pipeline is fitted when MLServer loads the model, from the lines in the file named by
LOGSCORE_BENCH_TRAINING (no pickle, no joblib: models are never serialized that way here).
Input: one BYTES tensor of access lines; output: one FP32 tensor of scores (higher: more anomalous).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.baselines import fit_naive_url_isolation_forest  # noqa: E402


class NaivePipeline(MLModel):
    async def load(self) -> bool:
        lines = Path(os.environ["LOGSCORE_BENCH_TRAINING"]).read_text(encoding="utf-8").splitlines()
        self._pipeline = fit_naive_url_isolation_forest(lines)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        lines = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in payload.inputs[0].data]
        scores = self._pipeline.score(lines)
        return InferenceResponse(model_name=self.name, outputs=[
            ResponseOutput(name="scores", shape=[len(lines)], datatype="FP32", data=scores.tolist())])
