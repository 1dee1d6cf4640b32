"""Model cards for pushed parts: Hub metadata, held-out results with baselines, and how to reproduce them.

A card is built from what a run leaves behind:
- the model's metadata (backbone id, layer, D, D', what selected the weights, ...), recorded with its weights;
- the export folder's `metrics.json` when there is one (ExportBestModel writes it for the TRM): the
  validation (selection) and test (report) metrics of exactly the exported weights, with the
  baselines on the same splits; otherwise the run's TensorBoard events: the last logged value
  of each `val/...` and `baseline/...` tag;
- the run's `config.yaml` (LightningCLI's full configuration): `llm-trm fit --config config.yaml`
  reproduces the run.

A field that cannot be filled (no metrics, no config, no Hub id for the backbone) is a
`ModelCardError` naming what is missing and how to supply it, raised before anything
is uploaded. What a card says per kind lives in a `CardTemplate` (push.CARD_TEMPLATES picks one per kind).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from llm_trm.errors import LLMTRMError
from llm_trm.files import sha256_file

LIBRARY_NAME = "llm-trm"
LICENSE = "apache-2.0"
COMMON_TAGS = ("llm-trm", "latent-reasoning", "hidden-states", "pytorch", "safetensors")
RUN_CONFIG_NAME = "config.yaml"  # written by LightningCLI into each run's log dir
EMBEDDED_BACKBONE = "embedded"
EMBEDDED_BACKBONE_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the GGUF the `embedded` backbone ships
# problem-source names (llm_trm.data.problems) -> the Hub datasets they read
PROBLEM_DATASET_IDS = {
    "gsm8k": "openai/gsm8k",
    "aime": "AI-MO/aimo-validation-aime",
    "humaneval": "openai/openai_humaneval",
    "mbpp": "google-research-datasets/mbpp",
    "apps": "codeparrot/apps",
}
MISSING_CELL = "–"
METRICS_NAME = "metrics.json"  # written into an export folder by ExportBestModel
# held-out splits of metrics.json, in the order a card shows them, with how the card labels them
SPLIT_LABELS = {"val": "Validation split (selection)", "test": "Test split (report)"}


class ModelCardError(LLMTRMError, ValueError):
    """A model card field cannot be filled from the run."""


# ---------------------------------------------------------------------------- what a card shows


@dataclass(frozen=True)
class ResultsTable:
    """A markdown table of held-out metrics: one column per model or baseline (a tag prefix), one row per metric."""

    title: str
    columns: tuple[tuple[str, str], ...]  # (header, tag prefix), this model first
    rows: tuple[tuple[str, str], ...]  # (label, metric name appended to the prefix)

    def cells_logged(self, scalars: dict[str, float], prefix: str) -> bool:
        return any(prefix + metric in scalars for _, metric in self.rows)

    def render(self, scalars: dict[str, float], heading: str = "") -> str:
        columns = [(header, prefix) for header, prefix in self.columns if self.cells_logged(scalars, prefix)]
        title = f"{heading}: {self.title}" if heading else self.title
        lines = [f"### {title}", "", "| metric | " + " | ".join(h for h, _ in columns) + " |",
                 "|---|" + "---:|" * len(columns)]
        for label, metric in self.rows:
            cells = [_format(scalars.get(prefix + metric)) for _, prefix in columns]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


@dataclass(frozen=True)
class CardTemplate:
    """What the card of one artifact kind says.

    `required_tags` must be in the run's events: without the model's headline metric
    and its baseline the card would not be honest, so pushing stops instead.
    """

    title: str
    summary: str
    tags: tuple[str, ...]
    tables: tuple[ResultsTable, ...]
    notes: tuple[tuple[str, str], ...]  # (label, tag): single values listed under the tables
    required_tags: tuple[str, ...]
    usage: str  # Python snippet; `{repo}` is replaced by the repo id
    metric_glossary: str = ""
    # metadata keys naming another part the model needs (e.g. its compressor): must be Hub ids once pushed
    hub_references: tuple[str, ...] = ()


def _format(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return MISSING_CELL
    return f"{value:.4f}"


QUALITY_ROWS = (
    ("explained variance (R²)", "explained_variance"),
    ("centred cosine", "centred_cosine"),
    ("cosine", "cosine"),
    ("relative error", "relative_error"),
    ("MSE", "mse"),
)

COMPRESSOR_CARD = CardTemplate(
    title="DimensionCompressor",
    summary=(
        "A weight-tied linear compressor of a frozen LLM's hidden states, D -> D' -> D, trained with "
        "llm-trm (Phase 1): the tiny recursive model reasons in its "
        "D'-dimensional space. It is compared with the uncentred PCA of the same rank, the optimum a tied "
        "linear map without bias can reach."
    ),
    tags=("dimension-compressor", "phase-1"),
    tables=(ResultsTable(
        "Reconstruction of held-out hidden states",
        (("this compressor", "val/"), ("PCA, same rank (optimum)", "baseline/pca_")),
        tuple(row for row in QUALITY_ROWS if row[1] != "centred_cosine"),
    ),),
    notes=(("cosine / PCA cosine", "val/cosine_ratio_to_pca"),
           ("explained variance / PCA explained variance", "val/explained_variance_ratio_to_pca"),
           ("energy captured by the PCA subspace", "baseline/pca_energy_captured")),
    required_tags=("val/cosine", "baseline/pca_cosine"),
    usage=(
        "from llm_trm.models.compressor import DimensionCompressor\n\n"
        "compressor = DimensionCompressor.from_pretrained(\"{repo}\")\n"
        "compressed = compressor.compress(hidden_states)  # [..., D] -> [..., D']\n"
        "restored = compressor.decompress(compressed)     # [..., D'] -> [..., D]"
    ),
    metric_glossary=(
        "Explained variance is R² of the reconstruction; relative error is ‖x̂ − x‖ / ‖x‖ per token."
    ),
)

TRM_CARD = CardTemplate(
    title="SequenceTRM",
    summary=(
        "A tiny recursive model that replaces a frozen LLM's thinking, trained with "
        "llm-trm (Phase 2): from the compressed hidden states of the "
        "prompt (up to the opening think tag) it predicts the compressed state at the closing think tag, "
        "from which the LLM writes its answer. It is compared with the training mean, a ridge regression "
        "on the mean-pooled prompt and the last prompt token's state."
    ),
    tags=("tiny-recursive-model", "sequence-trm", "phase-2"),
    tables=tuple(ResultsTable(
        title,
        (("TRM", f"val/{space}"), ("training mean", f"baseline/mean_{space}"),
         ("ridge on pooled prompt", f"baseline/ridge_{space}"), ("last prompt token", f"baseline/last_token_{space}")),
        QUALITY_ROWS,
    ) for title, space in (("Compressed space (D')", ""), ("Full space (D), after decompression", "full_"))),
    notes=(("halt probability", "val/halt_prob"), ("supervision steps used", "val/steps_used"),
           ("halting accuracy", "val/halt_accuracy"), ("first answer token agreement", "val/first_token_agreement")),
    required_tags=("val/cosine", "baseline/mean_cosine"),
    usage=(
        "from llm_trm.hub import load_compressor\n"
        "from llm_trm.models.trm import SequenceTRM\n\n"
        "trm = SequenceTRM.from_pretrained(\"{repo}\")\n"
        "compressor = load_compressor(trm.metadata[\"compressor\"])  # the Phase 1 compressor it was trained with"
    ),
    metric_glossary=(
        "The headline figures are explained variance (R² against the training mean) and the centred cosine "
        "(cosine after subtracting the training mean from prediction and target): raw cosine flatters, "
        "because states at the closing think tag share one dominant direction."
    ),
    hub_references=("compressor",),
)


# ---------------------------------------------------------------------------- what a run left behind


@dataclass
class RunRecord:
    """A training run's log dir: its last logged scalars and its full configuration."""

    run_dir: Path
    scalars: dict[str, float]
    config_text: str
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, run_dir: str | Path) -> RunRecord:
        run_dir = Path(run_dir)
        config_path = run_dir / RUN_CONFIG_NAME
        if not config_path.is_file():
            raise ModelCardError(
                f"{run_dir} has no {RUN_CONFIG_NAME}, so the card cannot say how to reproduce the run: "
                "pass --run-dir with the run's log dir (runs/<name>/version_N)."
            )
        text = config_path.read_text()
        return cls(run_dir, read_scalars(run_dir), text, yaml.safe_load(text) or {})


@dataclass
class ExportMetrics:
    """An export folder's metrics.json: held-out metrics of exactly the weights in that folder.

    `splits` maps a split (`val`, `test`) to its `role`, `num_samples`, `model` metrics and
    `baselines`; `selection` says how the weights were chosen; `weights_sha256` names the
    weights files (relative path -> sha256) the metrics were computed from.
    """

    path: Path
    splits: dict[str, dict[str, Any]]
    selection: dict[str, Any]
    weights_sha256: dict[str, str]

    @classmethod
    def from_folder(cls, folder: str | Path) -> ExportMetrics | None:
        path = Path(folder) / METRICS_NAME
        if not path.is_file():
            return None
        try:
            payload = json.loads(path.read_text())
            return cls(path, dict(payload["splits"]), dict(payload.get("selection") or {}),
                       dict(payload["weights_sha256"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ModelCardError(f"{path} cannot be read ({type(err).__name__}: {err}): re-export the run "
                                 "(or move the file aside to card the logged values instead).") from err

    def check_describes(self, folder: str | Path) -> None:
        """The weights files in `folder` are the ones the metrics were computed from."""
        for name, digest in self.weights_sha256.items():
            weights = Path(folder) / name
            if not weights.is_file() or sha256_file(weights) != digest:
                raise ModelCardError(
                    f"{self.path} was computed from other weights than {weights}: the card would describe "
                    "other weights; re-export the run, or move metrics.json aside to card the logged values."
                )

    def scalars(self, split: str) -> dict[str, float]:
        """A split's numbers under the tags the card templates read (`val/...`, `baseline/...`)."""
        values = self.splits.get(split) or {}
        scalars = {f"val/{name}": float(value) for name, value in (values.get("model") or {}).items()}
        scalars.update({f"baseline/{name}": float(value) for name, value in (values.get("baselines") or {}).items()})
        return scalars


def read_scalars(run_dir: str | Path) -> dict[str, float]:
    """The last logged value of every scalar tag in the TensorBoard event files of `run_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep all, so "last" is exact
    accumulator.Reload()
    return {tag: float(accumulator.Scalars(tag)[-1].value) for tag in accumulator.Tags()["scalars"]}


def looks_like_run_dir(directory: Path) -> bool:
    return directory.is_dir() and (
        (directory / RUN_CONFIG_NAME).is_file() or any(directory.glob("events.out.tfevents.*"))
    )


# ---------------------------------------------------------------------------- Hub metadata


def is_hub_id(spec: str) -> bool:
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1 or Path(spec).exists():
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def _hub_id_from_cache_path(path: str) -> str | None:
    """`.../models--Org--Name/snapshots/<sha>` (a Hugging Face cache folder) -> `Org/Name`."""
    for part in Path(path).parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1)
    return None


def base_model_id(backbone: str | None, override: str | None = None) -> str:
    """The Hub id of the backbone a part was trained against (`embedded` is SmolLM2-135M-Instruct)."""
    if override:
        if not is_hub_id(override):
            raise ModelCardError(f"--base-model {override!r} is not a Hub model id (user/name).")
        return override
    if backbone == EMBEDDED_BACKBONE:
        return EMBEDDED_BACKBONE_HUB_ID
    if backbone and is_hub_id(backbone):
        return backbone
    from_cache = _hub_id_from_cache_path(backbone) if backbone else None
    if from_cache:
        return from_cache
    raise ModelCardError(
        f"the backbone recorded with the weights ({backbone!r}) is not a Hub model id, so the card's base_model "
        "cannot be filled: pass --base-model with the Hub id it was downloaded from (e.g. HuggingFaceTB/SmolLM3-3B)."
    )


def dataset_ids(run_config: dict[str, Any]) -> list[str]:
    """Hub dataset ids the run trained on: its text/CoT source, or the problems of its datagen shards."""
    data = (run_config.get("data") or {}).get("init_args") or {}
    names: list[str] = []
    if isinstance(data.get("source"), str):
        names.append(data["source"])
    if isinstance(data.get("data_path"), str):
        names += _datagen_datasets(data["data_path"])
    ids = [PROBLEM_DATASET_IDS.get(name, name) for name in names]
    return list(dict.fromkeys(i for i in ids if is_hub_id(i)))  # local files and offline sources are no Hub ids


def _datagen_datasets(data_path: str) -> list[str]:
    from llm_trm.data.shards import read_datagen_config

    try:
        config = read_datagen_config(data_path) or {}
    except (OSError, ValueError):  # shards moved or deleted since training: the card just names no dataset
        return []
    return [str(name) for name in config.get("datasets") or []]


# ---------------------------------------------------------------------------- the card


def check_required_metrics(template: CardTemplate, run: RunRecord, metrics: ExportMetrics | None = None) -> None:
    if metrics is not None:
        missing = [tag for tag in template.required_tags if tag not in metrics.scalars("val")]
        if missing:
            raise ModelCardError(
                f"{metrics.path} has no validation {', '.join(missing)}, so the card's results table cannot be "
                "filled: re-export from a run whose datamodule has a validation split and baselines."
            )
        return
    missing = [tag for tag in template.required_tags if tag not in run.scalars]
    if missing:
        raise ModelCardError(
            f"the run's TensorBoard events in {run.run_dir} have no {', '.join(missing)}, so the card's results "
            "table cannot be filled: push from a run that validated (or pass --run-dir with its log dir)."
        )


def check_hub_references(template: CardTemplate, metadata: dict[str, Any]) -> None:
    for key in template.hub_references:
        value = metadata.get(key)
        if not (isinstance(value, str) and is_hub_id(value)):
            raise ModelCardError(
                f"the {key} recorded with the weights ({value!r}) is not a Hub id, so users of the pushed model "
                f"could not load it: push it first (llm-trm push --checkpoint {value} --repo user/{key}) and pass "
                f"--{key}-repo user/{key}."
            )


def build_model_card(template: CardTemplate, metadata: dict[str, Any], run: RunRecord, repo_id: str,
                     base_model: str | None = None, metrics: ExportMetrics | None = None) -> ModelCard:
    """The README.md of a pushed part: Hub metadata, results with baselines, usage, reproduction.

    With `metrics` (the export's metrics.json) the results are those of exactly the uploaded
    weights, per split; without, the last values the run logged.
    """
    check_required_metrics(template, run, metrics)
    check_hub_references(template, metadata)
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        license=LICENSE,
        base_model=base_model_id(metadata.get("backbone"), base_model),
        datasets=dataset_ids(run.config) or None,
        tags=list(dict.fromkeys((*COMMON_TAGS, *template.tags))),
        model_name=repo_id.split("/")[-1],
    )
    sections = [
        f"# {repo_id.split('/')[-1]}: {template.title}",
        template.summary,
        _recorded_section(metadata),
        "## Use\n\n```python\n" + template.usage.replace("{repo}", repo_id) + "\n```",
        _export_results_section(template, metadata, metrics) if metrics else _results_section(template, run),
        _reproduce_section(run),
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def _recorded_section(metadata: dict[str, Any]) -> str:
    lines = ["## Recorded with the weights", "", "| key | value |", "|---|---|"]
    lines += [f"| {key} | `{_cell(value)}` |" for key, value in sorted(metadata.items())]
    return "\n".join(lines)


def _results_section(template: CardTemplate, run: RunRecord) -> str:
    parts = ["## Results on the held-out split",
             "Last values logged by the training run (TensorBoard tags `val/...` and `baseline/...`); "
             "the baselines are fitted on the training split and scored on the same held-out split. "
             + template.metric_glossary]
    parts += [table.render(run.scalars) for table in template.tables]
    notes = [f"- {label}: {_format(run.scalars[tag])}" for label, tag in template.notes if tag in run.scalars]
    if notes:
        parts.append("\n".join(notes))
    return "\n\n".join(parts)


def _cell(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def _weights_sentence(metadata: dict[str, Any], metrics: ExportMetrics) -> str:
    """Which weights are uploaded and how they were chosen."""
    selection = metrics.selection or metadata.get("selection") or {}
    kind = {"ema": "the exponential moving average of the weights", "final": "the trained weights"}.get(
        metadata.get("weights"), "the weights")
    files = ", ".join(f"`{name}` sha256 `{digest[:16]}…`" for name, digest in metrics.weights_sha256.items())
    sentence = f"These are {kind} ({files})"
    if selection.get("source") == "best checkpoint":
        sentence += (f" of the checkpoint of epoch {selection.get('epoch')} (step {selection.get('global_step')}), "
                     f"selected as the best {selection.get('monitor')} ({selection.get('mode')} = "
                     f"{_format(selection.get('score'))}) on the {selection.get('split')} split")
    elif selection:
        sentence += f", the final weights of training (epoch {selection.get('epoch')}, no checkpoint selection)"
    return sentence + "."


def _export_results_section(template: CardTemplate, metadata: dict[str, Any], metrics: ExportMetrics) -> str:
    parts = ["## Results of these weights",
             _weights_sentence(metadata, metrics) + " The numbers below were computed after training by running "
             "exactly these weights over each held-out split (`metrics.json` of the export). The validation "
             "split selected the weights; the test split was used for this report only. The baselines are "
             "fitted on the training split and scored on the same splits. " + template.metric_glossary]
    for split, label in SPLIT_LABELS.items():
        if split not in metrics.splits:
            parts.append(f"### {label}\n\nThe run had no {split} split.")
            continue
        scalars = metrics.scalars(split)
        heading = f"{label}, {metrics.splits[split].get('num_samples', '?')} samples"
        parts += [table.render(scalars, heading) for table in template.tables]
        notes = [f"- {label}: {_format(scalars[tag])}" for label, tag in template.notes if tag in scalars]
        if notes:
            parts.append("\n".join(notes))
    return "\n\n".join(parts)


def _reproduce_section(run: RunRecord) -> str:
    return (
        "## Reproduce\n\n"
        "```bash\nllm-trm fit --config config.yaml\n```\n\n"
        f"with llm-trm installed and the run's full configuration (`{RUN_CONFIG_NAME}` as LightningCLI saved it; "
        "local paths are those of the machine it ran on):\n\n"
        f"<details><summary>{RUN_CONFIG_NAME}</summary>\n\n```yaml\n{run.config_text.rstrip()}\n```\n\n</details>"
    )
