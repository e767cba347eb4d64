"""The Inference servicer: validate, convert, delegate to the served model. Error mapping and
request metrics come from status.Calls (the @rpc decorator for unary RPCs; ScoreStream runs each of its
messages as a call of its own); batching, ONNX Runtime and scoring live elsewhere."""

import contextlib
import json

import grpc

from vaeserve.errors import ModelNotReady
from vaeserve.service import status, streams
from vaeserve.service.convert import to_array, to_tensor
from vaeserve.service.models import ModelRegistry, ServedModel
from vaeserve.service.settings import Settings
from vaeserve.service.status import rpc
from vaeserve.v1 import vaeserve_pb2 as pb
from vaeserve.v1 import vaeserve_pb2_grpc as pb_grpc

LOADING_MESSAGE = "the server is still loading its models; retry shortly"


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry: ModelRegistry | None = None
        self._score_stream = status.Calls("ScoreStream")  # each message of a stream is counted and timed as a call

    def serve(self, registry: ModelRegistry) -> None:
        self.registry = registry

    @property
    def model_names(self) -> frozenset[str]:
        """The models served now (the registry's, which reloads replace)."""
        return frozenset() if self.registry is None else self.registry.names

    def model_label(self, request) -> str:
        """The model a request names, for the metrics: "" unless the server serves it."""
        model = getattr(request, "model", "")
        return model if model in self.model_names else ""

    @staticmethod
    def _rows(tensor, model: ServedModel):
        return to_array(tensor, "x", model.features, model.settings.max_rows)

    def _serving(self) -> ModelRegistry:
        if self.registry is None:
            raise ModelNotReady(LOADING_MESSAGE)
        return self.registry

    def _model(self, request) -> contextlib.AbstractContextManager[ServedModel]:
        """The requested version, held for the whole call: a version leaving service waits for its calls."""
        return self._serving().get(request.model, request.version).in_use()

    @rpc
    async def Embed(self, request, context):
        with self._model(request) as model:
            seed = request.seed if request.HasField("seed") else None
            mu, logvar, samples = await model.embed(
                self._rows(request.x, model), request.labels, request.posterior_samples, seed, status.deadline(context)
            )
            response = pb.EmbedResponse(model=model.name, version=model.version, mu=to_tensor(mu), logvar=to_tensor(logvar))
            if samples is not None:
                response.samples.CopyFrom(to_tensor(samples))
            return response

    @rpc
    async def Reconstruct(self, request, context):
        with self._model(request) as model:
            x, nll, mse = await model.reconstruct(self._rows(request.x, model), request.labels, status.deadline(context))
            return pb.ReconstructResponse(
                model=model.name, version=model.version, x=to_tensor(x),
                neg_log_likelihood=nll.tolist(), mean_squared_error=mse.tolist(),
            )  # fmt: skip

    @rpc
    async def Score(self, request, context):
        return await self._score(request, status.deadline(context))

    async def ScoreStream(self, requests, context):
        """One ScoreStreamResponse per request, in order: its scores, or the error of that message alone."""

        def reply(request, outcome: status.Outcome) -> pb.ScoreStreamResponse:
            if outcome.code != grpc.StatusCode.OK:
                return pb.ScoreStreamResponse(error=pb.Error(code=outcome.code.value[0], message=outcome.message))
            return pb.ScoreStreamResponse(score=outcome.value)

        async for response in streams.serve(requests, context, self._score_stream, self.model_label,
                                            lambda request: self._score(request, status.deadline(context)), reply,
                                            self.settings):  # fmt: skip
            yield response

    async def _score(self, request: pb.ScoreRequest, deadline: float | None) -> pb.ScoreResponse:
        """Score's answer to one request (a unary call, or a message of ScoreStream), batched with all traffic."""
        with self._model(request) as model:
            threshold = request.threshold if request.HasField("threshold") else None
            alpha = request.alpha if request.HasField("alpha") else None
            result = await model.score(self._rows(request.x, model), request.labels, threshold, request.iw_samples, deadline,
                                       alpha=alpha)  # fmt: skip
            s = result.scores
            response = pb.ScoreResponse(
                model=model.name, version=model.version, threshold=result.threshold,
                neg_elbo=s.neg_elbo.tolist(), reconstruction=s.reconstruction.tolist(), kl=s.kl.tolist(),
                is_anomaly=result.is_anomaly.tolist(),
                out_of_support=s.out_of_support.tolist(), anomaly_score=s.anomaly_score.tolist(),
            )  # fmt: skip
            if request.per_feature:
                response.per_feature.CopyFrom(to_tensor(s.per_feature))
                response.support_distance.CopyFrom(to_tensor(s.distances()))
            for name, values in (("neg_iw", s.neg_iw), ("p_value", s.p_value), ("knn_distance", s.knn)):
                if values is not None:
                    getattr(response, name).extend(values.tolist())
            return response

    @rpc
    async def Generate(self, request, context):
        with self._model(request) as model:
            temperature = request.temperature if request.HasField("temperature") else 1.0
            seed = request.seed if request.HasField("seed") else None
            x, z = await model.generate(request.count, request.labels, temperature, seed, status.deadline(context))
            return pb.GenerateResponse(model=model.name, version=model.version, x=to_tensor(x), z=to_tensor(z))

    @rpc
    async def Decode(self, request, context):
        with self._model(request) as model:
            z = to_array(request.z, "z", model.latent_dim, model.settings.max_rows)
            x = await model.decode_latent(z, request.labels, status.deadline(context))
            return pb.DecodeResponse(model=model.name, version=model.version, x=to_tensor(x))

    @rpc
    async def ListModels(self, request, context):
        return pb.ListModelsResponse(
            models=[pb.ModelVersions(name=n, versions=sorted(v)) for n, v in sorted(self._serving().models.items())]
        )

    @rpc
    async def GetModel(self, request, context):
        with self._model(request) as model:
            return metadata(model)


def metadata(model: ServedModel) -> pb.ModelMetadata:
    m = model.manifest
    t, scoring = m.thresholds, m.scoring
    graphs = {}
    for name, graph in model.graphs().items():
        entry = m.graphs[name]
        graphs[name] = pb.GraphInfo(
            file=entry.file, sha256=entry.sha256, inputs=graph.inputs, outputs=graph.outputs, providers=graph.providers,
        )  # fmt: skip
    return pb.ModelMetadata(
        name=model.name,
        version=model.version,
        kind=model.kind,
        arch=m.model.arch,
        latent_dim=model.latent_dim,
        likelihood=model.likelihood,
        features=model.features,
        feature_names=m.input.feature_names,
        image_shape=m.input.image_shape or [],
        labels=model.label_names,
        class_prior=scoring.class_prior or [],
        normalization=m.normalization.kind,
        thresholds=pb.Thresholds(
            score=t.score, default=t.default,
            quantiles={score: pb.Quantiles(values=values) for score, values in t.quantiles.items()},
            elbo_samples=scoring.elbo_samples, iw_samples=scoring.iw_samples, seed=scoring.seed,
            target_false_positive_rate=t.target_false_positive_rate,
            promised_false_positive_rate=t.promised_false_positive_rate,
            smallest_false_positive_rate=t.smallest_false_positive_rate or 0.0,
            calibration_rows=t.calibration_rows, calibrated_on=t.calibrated_on,
        ),  # fmt: skip
        encoder=graphs["encoder"],
        score=graphs.get("score"),
        decoder=graphs["decoder"],
        opset=m.opset,
        manifest_json=json.dumps(m.to_dict()),
        support=pb.Support(low=m.support.low.tolist(), high=m.support.high.tolist()),
        limits=pb.Limits(max_rows=model.settings.max_rows, max_request_values=model.settings.max_request_values,
                         max_iw_samples=model.settings.max_iw_samples,
                         max_posterior_samples=model.settings.max_posterior_samples),  # fmt: skip
    )
