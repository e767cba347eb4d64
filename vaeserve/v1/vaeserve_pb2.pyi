from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("model", "version", "x", "labels", "posterior_samples", "seed")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    POSTERIOR_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    x: Tensor
    labels: _containers.RepeatedScalarFieldContainer[str]
    posterior_samples: int
    seed: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[str]] = ..., posterior_samples: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("model", "version", "mu", "logvar", "samples")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    LOGVAR_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    mu: Tensor
    logvar: Tensor
    samples: Tensor
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., mu: _Optional[_Union[Tensor, _Mapping]] = ..., logvar: _Optional[_Union[Tensor, _Mapping]] = ..., samples: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ReconstructRequest(_message.Message):
    __slots__ = ("model", "version", "x", "labels")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    x: Tensor
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class ReconstructResponse(_message.Message):
    __slots__ = ("model", "version", "x", "neg_log_likelihood", "mean_squared_error")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    NEG_LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    MEAN_SQUARED_ERROR_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    x: Tensor
    neg_log_likelihood: _containers.RepeatedScalarFieldContainer[float]
    mean_squared_error: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., neg_log_likelihood: _Optional[_Iterable[float]] = ..., mean_squared_error: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model", "version", "x", "labels", "threshold", "per_feature", "iw_samples", "alpha")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PER_FEATURE_FIELD_NUMBER: _ClassVar[int]
    IW_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    x: Tensor
    labels: _containers.RepeatedScalarFieldContainer[str]
    threshold: float
    per_feature: bool
    iw_samples: int
    alpha: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[str]] = ..., threshold: _Optional[float] = ..., per_feature: _Optional[bool] = ..., iw_samples: _Optional[int] = ..., alpha: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("model", "version", "neg_elbo", "reconstruction", "kl", "is_anomaly", "threshold", "per_feature", "neg_iw", "out_of_support", "support_distance", "anomaly_score", "p_value", "knn_distance")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NEG_ELBO_FIELD_NUMBER: _ClassVar[int]
    RECONSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    IS_ANOMALY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PER_FEATURE_FIELD_NUMBER: _ClassVar[int]
    NEG_IW_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_SUPPORT_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    ANOMALY_SCORE_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    KNN_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    neg_elbo: _containers.RepeatedScalarFieldContainer[float]
    reconstruction: _containers.RepeatedScalarFieldContainer[float]
    kl: _containers.RepeatedScalarFieldContainer[float]
    is_anomaly: _containers.RepeatedScalarFieldContainer[bool]
    threshold: float
    per_feature: Tensor
    neg_iw: _containers.RepeatedScalarFieldContainer[float]
    out_of_support: _containers.RepeatedScalarFieldContainer[bool]
    support_distance: Tensor
    anomaly_score: _containers.RepeatedScalarFieldContainer[float]
    p_value: _containers.RepeatedScalarFieldContainer[float]
    knn_distance: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., neg_elbo: _Optional[_Iterable[float]] = ..., reconstruction: _Optional[_Iterable[float]] = ..., kl: _Optional[_Iterable[float]] = ..., is_anomaly: _Optional[_Iterable[bool]] = ..., threshold: _Optional[float] = ..., per_feature: _Optional[_Union[Tensor, _Mapping]] = ..., neg_iw: _Optional[_Iterable[float]] = ..., out_of_support: _Optional[_Iterable[bool]] = ..., support_distance: _Optional[_Union[Tensor, _Mapping]] = ..., anomaly_score: _Optional[_Iterable[float]] = ..., p_value: _Optional[_Iterable[float]] = ..., knn_distance: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreStreamResponse(_message.Message):
    __slots__ = ("score", "error")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    score: ScoreResponse
    error: Error
    def __init__(self, score: _Optional[_Union[ScoreResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "version", "count", "labels", "temperature", "seed")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    count: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    temperature: float
    seed: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., count: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("model", "version", "x", "z")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    x: Tensor
    z: Tensor
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., z: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("model", "version", "z", "labels")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    z: Tensor
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., z: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("model", "version", "x")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    x: Tensor
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelVersions]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelVersions, _Mapping]]] = ...) -> None: ...

class ModelVersions(_message.Message):
    __slots__ = ("name", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GraphInfo(_message.Message):
    __slots__ = ("file", "sha256", "inputs", "outputs", "providers")
    FILE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    file: str
    sha256: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    providers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, file: _Optional[str] = ..., sha256: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., outputs: _Optional[_Iterable[str]] = ..., providers: _Optional[_Iterable[str]] = ...) -> None: ...

class Thresholds(_message.Message):
    __slots__ = ("score", "default", "quantiles", "elbo_samples", "iw_samples", "seed", "target_false_positive_rate", "promised_false_positive_rate", "smallest_false_positive_rate", "calibration_rows", "calibrated_on")
    class QuantilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Quantiles
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Quantiles, _Mapping]] = ...) -> None: ...
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    ELBO_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    IW_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TARGET_FALSE_POSITIVE_RATE_FIELD_NUMBER: _ClassVar[int]
    PROMISED_FALSE_POSITIVE_RATE_FIELD_NUMBER: _ClassVar[int]
    SMALLEST_FALSE_POSITIVE_RATE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_ROWS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_ON_FIELD_NUMBER: _ClassVar[int]
    score: str
    default: float
    quantiles: _containers.MessageMap[str, Quantiles]
    elbo_samples: int
    iw_samples: int
    seed: int
    target_false_positive_rate: float
    promised_false_positive_rate: float
    smallest_false_positive_rate: float
    calibration_rows: int
    calibrated_on: str
    def __init__(self, score: _Optional[str] = ..., default: _Optional[float] = ..., quantiles: _Optional[_Mapping[str, Quantiles]] = ..., elbo_samples: _Optional[int] = ..., iw_samples: _Optional[int] = ..., seed: _Optional[int] = ..., target_false_positive_rate: _Optional[float] = ..., promised_false_positive_rate: _Optional[float] = ..., smallest_false_positive_rate: _Optional[float] = ..., calibration_rows: _Optional[int] = ..., calibrated_on: _Optional[str] = ...) -> None: ...

class Quantiles(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, float]
    def __init__(self, values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Support(_message.Message):
    __slots__ = ("low", "high")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    low: _containers.RepeatedScalarFieldContainer[float]
    high: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, low: _Optional[_Iterable[float]] = ..., high: _Optional[_Iterable[float]] = ...) -> None: ...

class ModelMetadata(_message.Message):
    __slots__ = ("name", "version", "kind", "arch", "latent_dim", "likelihood", "features", "feature_names", "image_shape", "labels", "class_prior", "normalization", "thresholds", "encoder", "decoder", "opset", "manifest_json", "support", "score", "limits")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CLASS_PRIOR_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    DECODER_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    kind: str
    arch: str
    latent_dim: int
    likelihood: str
    features: int
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    image_shape: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    class_prior: _containers.RepeatedScalarFieldContainer[float]
    normalization: str
    thresholds: Thresholds
    encoder: GraphInfo
    decoder: GraphInfo
    opset: int
    manifest_json: str
    support: Support
    score: GraphInfo
    limits: Limits
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., kind: _Optional[str] = ..., arch: _Optional[str] = ..., latent_dim: _Optional[int] = ..., likelihood: _Optional[str] = ..., features: _Optional[int] = ..., feature_names: _Optional[_Iterable[str]] = ..., image_shape: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[str]] = ..., class_prior: _Optional[_Iterable[float]] = ..., normalization: _Optional[str] = ..., thresholds: _Optional[_Union[Thresholds, _Mapping]] = ..., encoder: _Optional[_Union[GraphInfo, _Mapping]] = ..., decoder: _Optional[_Union[GraphInfo, _Mapping]] = ..., opset: _Optional[int] = ..., manifest_json: _Optional[str] = ..., support: _Optional[_Union[Support, _Mapping]] = ..., score: _Optional[_Union[GraphInfo, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_rows", "max_request_values", "max_iw_samples", "max_posterior_samples")
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_VALUES_FIELD_NUMBER: _ClassVar[int]
    MAX_IW_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_POSTERIOR_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    max_rows: int
    max_request_values: int
    max_iw_samples: int
    max_posterior_samples: int
    def __init__(self, max_rows: _Optional[int] = ..., max_request_values: _Optional[int] = ..., max_iw_samples: _Optional[int] = ..., max_posterior_samples: _Optional[int] = ...) -> None: ...
