from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    NORMAL: _ClassVar[Verdict]
    KEEP: _ClassVar[Verdict]
VERDICT_UNSPECIFIED: Verdict
NORMAL: Verdict
KEEP: Verdict

class ScoreRequest(_message.Message):
    __slots__ = ("model", "tag", "structured", "lines", "event_stream", "explain", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    EVENT_STREAM_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    tag: str
    structured: StructuredRecords
    lines: RawLines
    event_stream: bytes
    explain: int
    request_id: str
    def __init__(self, model: _Optional[str] = ..., tag: _Optional[str] = ..., structured: _Optional[_Union[StructuredRecords, _Mapping]] = ..., lines: _Optional[_Union[RawLines, _Mapping]] = ..., event_stream: _Optional[bytes] = ..., explain: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class StructuredRecords(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[Record]
    def __init__(self, records: _Optional[_Iterable[_Union[Record, _Mapping]]] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("fields",)
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.ScalarMap[str, str]
    def __init__(self, fields: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RawLines(_message.Message):
    __slots__ = ("lines",)
    LINES_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, lines: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "is_anomaly", "model_index", "models", "explanations", "notes", "request_id", "entity_scores")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    IS_ANOMALY_FIELD_NUMBER: _ClassVar[int]
    MODEL_INDEX_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENTITY_SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    is_anomaly: _containers.RepeatedScalarFieldContainer[bool]
    model_index: _containers.RepeatedScalarFieldContainer[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelRef]
    explanations: _containers.RepeatedCompositeFieldContainer[Explanation]
    notes: _containers.RepeatedCompositeFieldContainer[RecordNote]
    request_id: str
    entity_scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., is_anomaly: _Optional[_Iterable[bool]] = ..., model_index: _Optional[_Iterable[int]] = ..., models: _Optional[_Iterable[_Union[ModelRef, _Mapping]]] = ..., explanations: _Optional[_Iterable[_Union[Explanation, _Mapping]]] = ..., notes: _Optional[_Iterable[_Union[RecordNote, _Mapping]]] = ..., request_id: _Optional[str] = ..., entity_scores: _Optional[_Iterable[float]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("features",)
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, features: _Optional[_Iterable[str]] = ...) -> None: ...

class RecordNote(_message.Message):
    __slots__ = ("index", "field", "description")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    index: int
    field: str
    description: str
    def __init__(self, index: _Optional[int] = ..., field: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "log_format", "threshold", "detectors", "path", "target_fpr")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOG_FORMAT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TARGET_FPR_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    log_format: str
    threshold: float
    detectors: _containers.RepeatedScalarFieldContainer[str]
    path: str
    target_fpr: float
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., log_format: _Optional[str] = ..., threshold: _Optional[float] = ..., detectors: _Optional[_Iterable[str]] = ..., path: _Optional[str] = ..., target_fpr: _Optional[float] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("verdict", "author", "reason", "model", "route", "entity", "expires_at", "lines", "structured", "group", "field")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    author: str
    reason: str
    model: str
    route: str
    entity: str
    expires_at: float
    lines: RawLines
    structured: StructuredRecords
    group: str
    field: FieldValue
    def __init__(self, verdict: _Optional[_Union[Verdict, str]] = ..., author: _Optional[str] = ..., reason: _Optional[str] = ..., model: _Optional[str] = ..., route: _Optional[str] = ..., entity: _Optional[str] = ..., expires_at: _Optional[float] = ..., lines: _Optional[_Union[RawLines, _Mapping]] = ..., structured: _Optional[_Union[StructuredRecords, _Mapping]] = ..., group: _Optional[str] = ..., field: _Optional[_Union[FieldValue, _Mapping]] = ...) -> None: ...

class FieldValue(_message.Message):
    __slots__ = ("field", "value")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    field: str
    value: str
    def __init__(self, field: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class FeedbackEntry(_message.Message):
    __slots__ = ("id", "verdict", "author", "reason", "model", "route", "entity", "created_at", "expires_at", "removed_at", "removed_by", "features", "feature_count", "field", "example", "existing", "cut")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REMOVED_AT_FIELD_NUMBER: _ClassVar[int]
    REMOVED_BY_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_COUNT_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    EXISTING_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    id: int
    verdict: Verdict
    author: str
    reason: str
    model: str
    route: str
    entity: str
    created_at: float
    expires_at: float
    removed_at: float
    removed_by: str
    features: _containers.RepeatedScalarFieldContainer[str]
    feature_count: int
    field: FieldValue
    example: str
    existing: bool
    cut: bool
    def __init__(self, id: _Optional[int] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., author: _Optional[str] = ..., reason: _Optional[str] = ..., model: _Optional[str] = ..., route: _Optional[str] = ..., entity: _Optional[str] = ..., created_at: _Optional[float] = ..., expires_at: _Optional[float] = ..., removed_at: _Optional[float] = ..., removed_by: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ..., feature_count: _Optional[int] = ..., field: _Optional[_Union[FieldValue, _Mapping]] = ..., example: _Optional[str] = ..., existing: _Optional[bool] = ..., cut: _Optional[bool] = ...) -> None: ...

class ListFeedbackRequest(_message.Message):
    __slots__ = ("include_removed", "after_id", "limit")
    INCLUDE_REMOVED_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    include_removed: bool
    after_id: int
    limit: int
    def __init__(self, include_removed: _Optional[bool] = ..., after_id: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListFeedbackResponse(_message.Message):
    __slots__ = ("entries", "store", "store_reachable", "store_error", "next_after_id")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    STORE_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    STORE_ERROR_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[FeedbackEntry]
    store: str
    store_reachable: bool
    store_error: str
    next_after_id: int
    def __init__(self, entries: _Optional[_Iterable[_Union[FeedbackEntry, _Mapping]]] = ..., store: _Optional[str] = ..., store_reachable: _Optional[bool] = ..., store_error: _Optional[str] = ..., next_after_id: _Optional[int] = ...) -> None: ...

class DeleteFeedbackRequest(_message.Message):
    __slots__ = ("id", "author")
    ID_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    id: int
    author: str
    def __init__(self, id: _Optional[int] = ..., author: _Optional[str] = ...) -> None: ...

class WatchAnomaliesRequest(_message.Message):
    __slots__ = ("kinds", "replay")
    KINDS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    replay: int
    def __init__(self, kinds: _Optional[_Iterable[str]] = ..., replay: _Optional[int] = ...) -> None: ...

class AnomalyEvent(_message.Message):
    __slots__ = ("id", "kind", "model", "key", "score", "observed", "expected_low", "expected_high", "explanation", "start", "end", "dropped_before", "features")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LOW_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_HIGH_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    DROPPED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    id: int
    kind: str
    model: str
    key: str
    score: float
    observed: float
    expected_low: float
    expected_high: float
    explanation: str
    start: float
    end: float
    dropped_before: int
    features: _containers.ScalarMap[str, float]
    def __init__(self, id: _Optional[int] = ..., kind: _Optional[str] = ..., model: _Optional[str] = ..., key: _Optional[str] = ..., score: _Optional[float] = ..., observed: _Optional[float] = ..., expected_low: _Optional[float] = ..., expected_high: _Optional[float] = ..., explanation: _Optional[str] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., dropped_before: _Optional[int] = ..., features: _Optional[_Mapping[str, float]] = ...) -> None: ...
