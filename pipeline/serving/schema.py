"""The serving API's request and response bodies and every size limit, validated by pydantic.

Limits are module constants so that the OpenAPI schema at ``/docs`` states them. Checks that depend on
the loaded model (feature count, horizon, vocabulary) happen in :mod:`pipeline.serving.request_jobs` once the
model is known; they raise :class:`RequestError`, which the app reports in the same
``{"detail": [{"loc", "msg"}]}`` shape as pydantic's errors.

A sequence ``x``/``y`` is either a flat list of numbers (token ids, a forecast target ``[H]``, an MLP input)
or a list of steps of numbers (a forecast window ``[L, F]``). NaN, inf and non-numbers are rejected here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

MAX_BODY_BYTES = 4 << 20  # whole request body (checked from Content-Length / the stream before parsing)
MAX_SUPPORT = 256  # support examples per request
MAX_QUERY = 64  # query examples per request
MAX_LENGTH = 1024  # steps or tokens per sequence
MAX_FEATURES = 64  # numbers per step of a real-valued sequence
MAX_SUPPORT_CELLS = 16384  # support examples x longest support sequence (the padded work of one adaptation)
MAX_QUERY_CELLS = 16384  # likewise for the query
MAX_DECODE_CELLS = 16384  # decoded rows x steps: mt queries x beam x max_len, lm prompts x max_new_tokens
MAX_STEPS = 50  # inner adaptation steps
MAX_NEW_TOKENS = 512  # sampled continuation length
MAX_BEAM = 8  # beam width
MAX_TEXT_CHARS = 4096  # characters per text in the convenience forms
MAX_HISTORY = 8784  # steps of a forecasting history (a leap year of hourly values)

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Values = Annotated[list[Number], Field(max_length=MAX_LENGTH)]
Steps = Annotated[list[Annotated[list[Number], Field(min_length=1, max_length=MAX_FEATURES)]],
                  Field(max_length=MAX_LENGTH)]


def _sequence_kind(v: Any) -> str:
    return "steps" if isinstance(v, list) and v and isinstance(v[0], list) else "values"


Sequence_ = Annotated[Annotated[Values, Tag("values")] | Annotated[Steps, Tag("steps")], Discriminator(_sequence_kind)]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


class RequestError(ValueError):
    """A request that does not fit the loaded model; ``loc`` names the field (422 unless ``status`` says)."""

    def __init__(self, loc: tuple[str | int, ...], msg: str, status: int = 422) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {msg}")
        self.loc, self.msg, self.status = loc, msg, status


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SupportExample(_Strict):
    """One labelled example: a forecast window and its next values, a token sequence and its next tokens, ..."""

    x: Sequence_ = Field(description=f"input: token ids, or steps of up to {MAX_FEATURES} numbers "
                                     f"(at most {MAX_LENGTH} entries)")
    y: Sequence_ = Field(description="target: the next tokens, the next horizon values, the translation ids")


class QueryExample(_Strict):
    x: Sequence_ = Field(description="an input in the same layout as the support inputs")


class TextPair(_Strict):
    source: Text
    target: Text


class ForecastHistory(_Strict):
    """A raw history in original units; the server windows and scales it exactly as the task builder does."""

    values: Annotated[list[Number | None], Field(min_length=2, max_length=MAX_HISTORY)] = Field(
        description="values in original units, oldest first; null marks a missing step")
    timestamps: Annotated[list[Annotated[str, Field(max_length=40)]], Field(max_length=MAX_HISTORY)] | None = Field(
        None, description="ISO 8601 timestamps, one per value (needed when the model uses calendar covariates)")
    support_windows: int | None = Field(None, ge=1, le=MAX_SUPPORT,
                                        description="most recent windows to adapt on (default: the model's)")

    @model_validator(mode="after")
    def _same_length(self) -> ForecastHistory:
        if self.timestamps is not None and len(self.timestamps) != len(self.values):
            raise ValueError(f"timestamps: {len(self.timestamps)} timestamps for {len(self.values)} values")
        return self


class DecodeOptions(_Strict):
    """How to turn adapted weights into predictions for the token families (ignored by the others).

    The decoding work is bounded as a whole once the model is known: mt queries x ``beam`` x ``max_len``, lm
    sampled prompts x ``max_new_tokens``, at most ``MAX_DECODE_CELLS``.
    """

    mode: Literal["distribution", "sample"] = Field(
        "distribution", description="lm: the next-token distribution after each query, or a sampled continuation")
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS, description="lm sample: tokens to generate")
    temperature: float = Field(1.0, gt=0.0, le=100.0, allow_inf_nan=False, description="lm sample: softmax temperature")
    top_k: int | None = Field(None, ge=1, description="lm sample: sample among the k most likely tokens")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="lm sample: random seed (reproducible samples)")
    beam: int = Field(1, ge=1, le=MAX_BEAM, description="mt: beam width (1 = greedy)")
    max_len: int = Field(100, ge=1, le=MAX_LENGTH, description="mt: maximum translation length in tokens")
    top: int = Field(5, ge=0, le=50, description="lm distribution: most likely tokens listed with their text")

    def key(self) -> tuple:
        """Requests with equal keys can share one batched decoding pass."""
        return tuple(self.model_dump().values())


class _SupportFields(_Strict):
    support: Annotated[list[SupportExample], Field(min_length=1, max_length=MAX_SUPPORT)] | None = Field(
        None, description="labelled examples in the model's task layout")
    history: ForecastHistory | None = Field(None, description="forecast: a raw history instead of support/query")
    texts: Annotated[list[Text], Field(min_length=1, max_length=MAX_SUPPORT)] | None = Field(
        None, description="lm: texts to adapt on, instead of support")
    pairs: Annotated[list[TextPair], Field(min_length=1, max_length=MAX_SUPPORT)] | None = Field(
        None, description="mt: sentence pairs to adapt on, instead of support")
    steps: int | None = Field(None, ge=0, le=MAX_STEPS, description="inner steps (default: the model's)")

    def _check_one_support(self) -> None:
        given = [n for n in ("support", "history", "texts", "pairs") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of support, history, texts, pairs (got {given or 'none'})")


class _QueryFields(_Strict):
    query: Annotated[list[QueryExample], Field(min_length=1, max_length=MAX_QUERY)] | None = Field(
        None, description="inputs to predict for, in the model's task layout")
    prompts: Annotated[list[Text], Field(min_length=1, max_length=MAX_QUERY)] | None = Field(
        None, description="lm: texts to continue or score the next character of, instead of query")
    sources: Annotated[list[Text], Field(min_length=1, max_length=MAX_QUERY)] | None = Field(
        None, description="mt: sentences to translate, instead of query")
    decode: DecodeOptions = Field(default_factory=DecodeOptions)


class AdaptRequest(_SupportFields, _QueryFields):
    """``POST /v1/adapt``: adapt on the support set, predict the query, forget the weights."""

    @model_validator(mode="after")
    def _forms(self) -> AdaptRequest:
        self._check_one_support()
        queries = [n for n in ("query", "prompts", "sources") if getattr(self, n) is not None]
        if self.history is not None:
            if queries:
                raise ValueError(f"history: forecasts the steps after the history; drop {queries}")
        elif len(queries) != 1:
            raise ValueError(f"give exactly one of query, prompts, sources (got {queries or 'none'})")
        return self


class AdapterRequest(_SupportFields):
    """``POST /v1/adapters``: adapt once and keep the weights."""

    @model_validator(mode="after")
    def _forms(self) -> AdapterRequest:
        self._check_one_support()
        return self


class PredictRequest(_QueryFields):
    """``POST /v1/adapters/{id}/predict``."""

    history: ForecastHistory | None = Field(None, description="forecast: predict the steps after this history")

    @model_validator(mode="after")
    def _forms(self) -> PredictRequest:
        given = [n for n in ("query", "prompts", "sources", "history") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of query, prompts, sources, history (got {given or 'none'})")
        return self


class TokenProb(BaseModel):
    id: int
    token: str | None = None
    p: float


class Prediction(BaseModel):
    """One query's prediction; which fields are set depends on the model family."""

    model_config = ConfigDict(extra="forbid")
    values: list[float] | None = Field(None, description="forecast (original units with history) or regression")
    next_token_probs: list[float] | None = Field(None, description="lm distribution: probabilities over the vocab")
    top: list[TokenProb] | None = None
    tokens: list[int] | None = Field(None, description="lm sample continuation or mt translation ids")
    text: str | None = Field(None, description="the tokens as text when the model has a vocabulary")


class ModelRef(BaseModel):
    name: str
    version: str


class AdaptResponse(BaseModel):
    model: ModelRef
    steps: int
    support_loss_before: float
    support_loss_after: float
    predictions: list[Prediction]


class AdapterResponse(BaseModel):
    id: str
    model: ModelRef
    steps: int
    support_loss_before: float
    support_loss_after: float
    bytes: int
    ttl_s: float


class PredictResponse(BaseModel):
    id: str
    model: ModelRef
    predictions: list[Prediction]


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str | None
    config_digest: str | None
    model_uri: str
    run_id: str | None = None
    family: str
    kind: str
    adapt_steps: int
    loaded_at: float
    previous_version: str | None = None
    last_switch_error: str | None = None
    cache: dict[str, Any]
    batching: dict[str, dict[str, int]] = Field(description="batches run and requests in them, per batched loop")
    model_process: dict[str, Any] = Field(description="the child process that runs the inner loops: its pid, "
                                                      "how often it stopped and was started again (restarts), "
                                                      "how many of those were killed for not answering in time "
                                                      "(timeouts), its models")


LIMITS = {name: value for name, value in globals().items() if name.startswith("MAX_")}
