"""Evaluation results as data: :class:`EvaluationResult` with its :class:`DataSource` and :class:`ProtocolRecord`,
and their one JSON shape, the ``metrics.json`` of ``klvae-eval --output`` (docs/evaluation.md#protocols), which
``hub`` and the model card read field by field. No torch here: the publishing side imports this module alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

KLVAE_PREPROCESSING = "resize shorter side (PIL bicubic) + center crop"  # the default protocol's step 1 (eval_data)
EXPECTED_SHAPE = ('{"results": [{"model", "metrics": {"psnr": {"mean", "std", "count"}, ...}, "count", '
                  '"settings": {"protocol", "resolution", "preprocessing", "posterior", "data_source": {"kind", ...}}}]}')


@dataclass
class MetricSummary:
    """Mean ± std (population std over images) of one metric; set-level metrics (rFID) have ``std=None``."""

    mean: float
    std: float | None
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "MetricSummary":
        array = np.asarray(values, dtype=np.float64)
        array = array[~np.isnan(array)]  # NaN = metric undefined for that image (e.g. a mask without holes)
        if array.size == 0:
            return cls(float("nan"), None, 0)
        # identical images: PSNR +inf; the mean is inf, the spread undefined
        return cls(float(array.mean()), float(array.std()) if np.isfinite(array).all() else None, int(array.size))

    @classmethod
    def from_dict(cls, data: Mapping) -> "MetricSummary":
        std = data["std"]
        return cls(_float(data["mean"]), None if std is None else _float(std), int(data["count"]))

    def format(self, digits: int) -> str:
        if self.count == 0:
            return "–"
        text = f"{self.mean:.{digits}f}"
        return text if self.std is None else f"{text} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class DataSource:
    """Where the evaluated images came from: ``kind`` is ``"folder"``/``"file"`` (``path``), ``"hf-dataset"``
    (``name``, ``split``), ``"datasets-object"`` (``type``) or ``"images"`` (``type``, ``count``, or a ``name``)."""

    kind: str
    path: str | None = None
    name: str | None = None
    split: str | None = None
    type: str | None = None
    count: int | None = None

    def describe(self) -> str:
        """One line for tables and logs."""
        if self.kind == "hf-dataset":
            return f"hf-dataset {self.name} (split {self.split})"
        return self.path or self.name or f"{self.type} of images"

    def public_name(self) -> str | None:
        """A name safe to publish: a Hub dataset id, a folder's last component, a given name; else `None`."""
        if self.path:
            return Path(self.path.rstrip("/\\")).name or None
        return self.name

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping) -> "DataSource":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if data.get(f.name) is not None})


@dataclass(frozen=True)
class ProtocolRecord:
    """How the numbers were measured (what makes two results comparable). Written flat into ``settings``, with the
    protocol's name under the key ``"protocol"``; optional fields appear only for the metrics that were computed."""

    name: str  # "klvae" or "lightningdit" (eval_data.PROTOCOLS)
    resolution: int
    preprocessing: str
    posterior: str  # "mode" or "sample (seed N)"
    quantization: str | None = None
    psnr: str | None = None
    ssim: str | None = None
    lpips_net: str | None = None
    lpips_weights: str | None = None
    fid_network: str | None = None
    fid_features: int | None = None
    masked_psnr: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return {"protocol": data.pop("name"), **data}

    @classmethod
    def from_dict(cls, settings: Mapping) -> "ProtocolRecord":
        names = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
        return cls(name=settings["protocol"], **{k: settings[k] for k in names if settings.get(k) is not None})


@dataclass
class EvaluationResult:
    """What ``evaluation.evaluate`` measured on one model.

    Attributes:
        model: a name for the model (its spec).
        metrics: metric key -> :class:`MetricSummary` (``psnr``, ``ssim``, ``lpips``, ``rfid``,
            ``masked_psnr_kept``, ``masked_psnr_hole``; only those requested).
        count: images evaluated; ``skipped``: unreadable images left out (``skipped_names`` says which,
            ``skip_reasons`` counts them by reason: "undecodable", "decompression bomb", "dangling symlink"...).
        protocol: :class:`ProtocolRecord`; ``data_source``: :class:`DataSource`.
        settings: the run's other options (batch size, device, dtype, versions...).
        per_image: metric key -> one value per image, in ``image_names`` order.
        timings: seconds per stage (load, reconstruct, and each metric).
        samples: the first ``keep_images`` originals and reconstructions (float [-1, 1], CPU), for grids; not saved.
    """

    model: str
    metrics: dict[str, MetricSummary]
    count: int
    protocol: ProtocolRecord
    data_source: DataSource
    skipped: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    per_image: dict[str, list[float]] = field(default_factory=dict)
    image_names: list[str] = field(default_factory=list)
    skipped_names: list[str] = field(default_factory=list)
    skip_reasons: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    samples: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready entry (``+inf`` PSNR as the string ``"inf"``, undefined values as ``null``)."""
        settings = {**self.protocol.to_dict(), "data": self.data_source.describe(),
                    "data_source": self.data_source.to_dict(), **self.settings}
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "samples"}
        data.update(metrics={k: dataclasses.asdict(v) for k, v in self.metrics.items()}, settings=settings)
        del data["protocol"], data["data_source"]
        return _json_safe(data)

    @classmethod
    def from_dict(cls, data: Mapping) -> "EvaluationResult":
        """One entry of ``metrics.json`` (:meth:`to_dict`) -> a result; `ValueError` naming the shape otherwise."""
        try:
            settings = dict(data["settings"])
            protocol, source = ProtocolRecord.from_dict(settings), DataSource.from_dict(settings["data_source"])
            return cls(
                model=str(data["model"]), metrics={k: MetricSummary.from_dict(v) for k, v in data["metrics"].items()},
                count=int(data["count"]), protocol=protocol, data_source=source, skipped=int(data.get("skipped", 0)),
                settings={k: v for k, v in settings.items() if k not in _PROTOCOL_KEYS | {"data", "data_source"}},
                per_image={k: [_float(v) for v in values] for k, values in data.get("per_image", {}).items()},
                image_names=list(data.get("image_names", [])), skipped_names=list(data.get("skipped_names", [])),
                skip_reasons=dict(data.get("skip_reasons", {})), timings=dict(data.get("timings", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"not a klvae-eval result ({type(err).__name__}: {err}); expected {EXPECTED_SHAPE}") from None

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """This result as ``metrics.json`` text (``{"results": [entry]}``, what ``load_metrics`` and ``klvae-push
        --metrics`` read); also written to ``path``."""
        text = json.dumps(results_to_dict([self]), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text: str) -> "EvaluationResult":
        """:meth:`to_json`'s text (or one entry of it) -> the result."""
        data = json.loads(text)
        if isinstance(data, Mapping) and "results" in data:
            results = load_metrics(data)
            if len(results) != 1:
                raise ValueError(f"the JSON holds {len(results)} results; read them with load_metrics")
            return results[0]
        return cls.from_dict(data)

    def to_markdown(self) -> str:
        from .eval_report import results_table

        return results_table([self])


_PROTOCOL_KEYS = {"protocol"} | {f.name for f in dataclasses.fields(ProtocolRecord)} - {"name"}  # in settings


def results_to_dict(results: Sequence[EvaluationResult]) -> dict[str, Any]:
    """The content of ``metrics.json``."""
    return {"results": [r.to_dict() for r in results]}


def validation_result(values: Mapping[str, float], *, count: int, resolution: int, data: str = "held-out validation",
                      **settings: Any) -> EvaluationResult:
    """Training's validation numbers (means over ``count`` images, the default protocol, posterior mode) as a result,
    for the model card of a run; ``settings``: e.g. ``weights="ema"``, ``step=4000``."""
    return EvaluationResult(
        model="this model", metrics={k: MetricSummary(float(v), None, count) for k, v in values.items()}, count=count,
        protocol=ProtocolRecord("klvae", resolution, KLVAE_PREPROCESSING, "mode"),
        data_source=DataSource("images", name=data, count=count), settings=settings,
    )


def load_metrics(metrics: Any) -> list[EvaluationResult]:
    """``metrics.json`` (a path, or its content as a dict), a result or a list of results -> the results.

    Raises:
        `FileNotFoundError`: no such file. `ValueError`: anything else, in one line naming the expected shape.
    """
    if isinstance(metrics, EvaluationResult):
        return [metrics]
    if isinstance(metrics, (list, tuple)) and all(isinstance(m, EvaluationResult) for m in metrics):
        return list(metrics)
    where = "metrics"
    if isinstance(metrics, (str, os.PathLike)):
        where, path = f"metrics file {os.fspath(metrics)!r}", Path(metrics)
        if not path.is_file():
            raise FileNotFoundError(f"metrics file not found: {os.fspath(path)!r} (expected klvae-eval's metrics.json)")
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON ({err}); expected {EXPECTED_SHAPE}") from None
    if not isinstance(metrics, Mapping) or not isinstance(metrics.get("results"), list) or not metrics["results"]:
        got = sorted(metrics) if isinstance(metrics, Mapping) else type(metrics).__name__
        raise ValueError(f"{where} is not klvae-eval's metrics.json (got {got}); expected {EXPECTED_SHAPE}")
    try:
        return [EvaluationResult.from_dict(entry) for entry in metrics["results"]]
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _float(value: Any) -> float:
    """A JSON number back to a float: ``"inf"``/``"-inf"`` strings as infinities, ``null`` as NaN (undefined)."""
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
