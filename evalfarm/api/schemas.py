"""The bodies the API accepts and returns. A wrong or unknown field is a 422 that names it (strict types:
`"10"` is not a number), and defaults are `EvalConfig`'s, the one table the CLI flags mirror too."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from evalfarm.config import METRICS, EvalConfig, default_metrics
from evalfarm.keys import EXTRACTOR_NAMES

_DEFAULTS = EvalConfig()
MAX_TAGS = 64
MAX_STEP = 2**31 - 1  #: jobs.step is a 32-bit integer column
MAX_SEED = 2**32 - 1  #: numpy's RandomState takes no larger seed
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Metric = Literal["is", "fid", "kid", "prc"]
Extractor = Literal[EXTRACTOR_NAMES]  # type: ignore[valid-type]


class JobRequest(BaseModel):
    """A job to run: the sample set, its reference, how to compute the metrics, and how to report them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    samples: str = Field(min_length=1, max_length=4096,
                         description="An absolute path or URL inside the farm's EVALFARM_SAMPLE_ROOTS.")
    ref: str | None = Field(None, min_length=1, max_length=4096,
                            description="A named reference, or a path or URL inside EVALFARM_SAMPLE_ROOTS.")
    metrics: list[Metric] | None = Field(None, min_length=1,
                                         description=f"A subset of {', '.join(METRICS)}; a comma-separated string "
                                                     "also works. Default: is, fid and kid (fid and kid when the "
                                                     "extractors leave out inception-v3-compat).")
    splits: int = Field(_DEFAULTS.splits, ge=1, le=10_000)
    kid_subsets: int = Field(_DEFAULTS.kid_subsets, ge=1, le=100_000)
    kid_subset_size: int = Field(_DEFAULTS.kid_subset_size, ge=1)
    kid_shrink: bool = _DEFAULTS.kid_shrink
    seed: int = Field(_DEFAULTS.seed, ge=0, le=MAX_SEED)
    resize: Literal["tf", "clean"] = _DEFAULTS.resize
    batch_size: int = Field(_DEFAULTS.batch_size, ge=1, le=4096)
    shard_size: int = Field(_DEFAULTS.shard_size, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = _DEFAULTS.precision
    cache: bool = _DEFAULTS.cache
    extractors: list[Extractor] = Field(default_factory=list, max_length=len(EXTRACTOR_NAMES),
                                        description="Extractors for FID, KID and PRC; empty: torch-fidelity's "
                                                    "defaults (Inception, and VGG16 for PRC).")
    prc_neighborhood: int = Field(_DEFAULTS.prc_neighborhood, ge=1, le=1000)
    prc_block: int = Field(_DEFAULTS.prc_block, ge=1, le=100_000)
    prc_tile: int = Field(_DEFAULTS.prc_tile, ge=1, le=1_000_000,
                          description="Rows and columns of one precision/recall task; a multiple of prc_block.")
    run: str | None = Field(None, min_length=1, max_length=200)
    step: int | None = Field(None, ge=0, le=MAX_STEP)
    tags: dict[str, str] = Field(default_factory=dict, max_length=MAX_TAGS)
    weights_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                                       description="Require these Inception weights: 409 if no worker holds them.")
    idempotency_key: str | None = Field(None, min_length=1, max_length=200,
                                        description="The same key from the same token returns the same job.")
    callback_url: str | None = Field(None, min_length=1, max_length=2048,
                                     description="POSTed a signed JSON body when the job ends; its host must be "
                                                 "in EVALFARM_CALLBACK_HOSTS.")

    @field_validator("metrics", "extractors", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return list(dict.fromkeys(m.strip().lower() for m in value.split(",") if m.strip()))
        return value

    @field_validator("samples", "ref", "run", "idempotency_key", "callback_url")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and _CONTROL.search(value):
            raise ValueError("must not contain control characters (NUL, newlines, ...)")
        return value

    @field_validator("tags")
    @classmethod
    def _printable_tags(cls, value: dict[str, str]) -> dict[str, str]:
        if any(_CONTROL.search(k) or _CONTROL.search(v) for k, v in value.items()):
            raise ValueError("keys and values must not contain control characters (NUL, newlines, ...)")
        return value

    def config(self) -> EvalConfig:
        fields = self.model_dump(include=set(EvalConfig.__dataclass_fields__) - {"metrics", "extra", "extractors"})
        extractors = tuple(self.extractors)
        metrics = tuple(dict.fromkeys(self.metrics)) if self.metrics is not None else default_metrics(extractors)
        return EvalConfig(metrics=metrics, extractors=extractors, **fields)


class JobCreated(BaseModel):
    job_id: str
    created: bool = Field(description="False when the idempotency key returned an earlier job.")
    state: str


class CancelOutcome(BaseModel):
    job_id: str
    cancelled: bool = Field(description="False when the job had ended before.")
    state: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
