"""`llm-trm push`: share a trained part on the Hugging Face Hub with a generated model card.

    llm-trm push --checkpoint runs/phase1/stage1a/version_0 --repo user/smollm3-compressor-256
    llm-trm push --checkpoint runs/phase2/trm/version_3/checkpoints/last.ckpt --repo user/trm --private
    llm-trm push --checkpoint runs/demo/trm_model --run-dir runs/demo/trm/version_0 --repo user/trm --dry-run out/

`--checkpoint` takes an export folder, a run's log dir (its export folder is pushed) or a
Lightning `.ckpt`. The upload folder holds `model.safetensors`, `config.json` and
`README.md`; `--dry-run DIR` writes exactly that folder and uploads nothing. Everything
that can fail without the network (repo id, token, kind, non-finite weights, card fields)
fails before the first request. An export folder's `metrics.json` (the held-out metrics of
exactly its weights) makes the card's results; without one, the run's last logged values do.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn

from llm_trm.cards import (COMPRESSOR_CARD, TRM_CARD, CardTemplate, ExportMetrics, ModelCardError, RunRecord,
                           build_model_card, looks_like_run_dir)
from llm_trm.errors import LLMTRMError
from llm_trm.hub import ArtifactKind, is_lightning_checkpoint, load_artifact, load_torch_checkpoint
from llm_trm.models.pretrained import CONFIG_NAME, FALLBACK_WEIGHTS_NAME
from llm_trm.weights import check_finite

DESCRIPTION = "share a trained compressor or TRM on the Hugging Face Hub, with a generated model card"
CARD_NAME = "README.md"
UPLOAD_FILES = (FALLBACK_WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)  # from_pretrained falls back to model.safetensors
# what each kind's model card says and which metrics it tabulates (hub.ARTIFACT_KINDS names the kinds)
CARD_TEMPLATES: dict[str, CardTemplate] = {"compressor": COMPRESSOR_CARD, "trm": TRM_CARD}


class PushError(LLMTRMError):
    """The push cannot start (repo id, token, source) or the Hub refused it."""


@dataclass
class PushSource:
    """What is pushed: the model, its kind, and the run whose metrics and config make its card."""

    kind: ArtifactKind
    model: nn.Module
    origin: Path
    run: RunRecord
    metrics: ExportMetrics | None = None  # the export folder's metrics.json, when it has one

    @property
    def card(self) -> CardTemplate:
        return CARD_TEMPLATES[self.kind.name]


# ---------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-trm push", description=DESCRIPTION)
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="export folder, run log dir (runs/<name>/version_N) or Lightning .ckpt")
    parser.add_argument("--repo", required=True, metavar="USER/NAME", help="Hub model repo id (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", metavar="BRANCH", help="push to this branch (created if needed)")
    parser.add_argument("--commit-message", default=None, help="commit message (default: names the kind)")
    parser.add_argument("--dry-run", metavar="OUT_DIR", type=Path,
                        help="write the exact upload folder here and upload nothing")
    parser.add_argument("--run-dir", type=Path, metavar="DIR",
                        help="the run's log dir, when the export folder is not inside it "
                             "(e.g. an ExportBestModel path)")
    parser.add_argument("--base-model", metavar="HUB_ID",
                        help="the backbone's Hub id, when the recorded backbone is a local path")
    parser.add_argument("--compressor-repo", metavar="HUB_ID",
                        help="(TRM) the Hub id of its compressor, when it was trained with a local one; "
                             "recorded in the pushed config.json instead of the local path")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_repo_id(args.repo)
    token = None if args.dry_run else require_token()
    source = locate_source(Path(args.checkpoint).expanduser(), args.run_dir)
    set_hub_references(source, {"compressor": args.compressor_repo} if args.compressor_repo else {})
    if args.dry_run:
        folder = write_upload_folder(source, args.repo, args.dry_run, args.base_model)
        print(f"Wrote the {source.kind.name} upload folder for {args.repo} to {folder} (nothing uploaded): "
              + ", ".join(UPLOAD_FILES))
        return 0
    with tempfile.TemporaryDirectory(prefix="llm-trm-push-") as staging:
        folder = write_upload_folder(source, args.repo, Path(staging) / "upload", args.base_model)
        message = args.commit_message or f"Upload llm-trm {source.kind.name} from {source.origin.name}"
        url = upload(folder, args.repo, token, private=args.private, revision=args.revision, commit_message=message)
    print(f"Pushed the {source.kind.name} from {source.origin} to {url}")
    return 0


def check_repo_id(repo_id: str, option: str = "--repo") -> None:
    """user/name only: a bare name would land in whichever namespace the token belongs to."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PushError(f"{option} {repo_id!r} is not a valid Hub repo id: {str(err).splitlines()[0]}") from err
    if repo_id.count("/") != 1:
        raise PushError(f"{option} {repo_id!r} must be of the form user/name (or org/name).")


def require_token() -> str:
    token = get_token()  # HF_TOKEN, else the token saved by `hf auth login`
    if not token:
        raise PushError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again "
                        "(or use --dry-run OUT_DIR to only write the folder).")
    return token


# ---------------------------------------------------------------------------- what to push


def locate_source(path: Path, run_dir: Path | None = None) -> PushSource:
    """Resolve an export folder, a run log dir or a .ckpt into the model to push and its run."""
    if is_lightning_checkpoint(path):
        if not path.is_file():
            raise PushError(f"checkpoint {path} does not exist: check --checkpoint.")
        artifact, guessed_run = path, path.parent.parent if path.parent.name == "checkpoints" else path.parent
    elif (path / CONFIG_NAME).is_file():
        artifact, guessed_run = path, path.parent
    elif looks_like_run_dir(path):
        artifact, guessed_run = run_artifact(path), path
    else:
        raise PushError(f"{path} is not an export folder (no {CONFIG_NAME}), a run's log dir or a .ckpt file: "
                        "check --checkpoint.")
    kind, model = load_artifact(artifact)
    check_finite(model.state_dict(), str(artifact),
                 "these weights are broken and cannot be pushed: push an earlier export or retrain.")
    metrics = ExportMetrics.from_folder(artifact) if artifact.is_dir() else None
    if metrics is not None:
        metrics.check_describes(artifact)
    run_dir = run_dir or guessed_run
    if not looks_like_run_dir(run_dir):
        raise ModelCardError(
            f"cannot find the training run of {path} (its held-out metrics and config.yaml make the model card): "
            "pass --run-dir runs/<name>/version_N."
        )
    return PushSource(kind, model, artifact, RunRecord.from_dir(run_dir), metrics)


def set_hub_references(source: PushSource, references: dict[str, str]) -> None:
    """Record the Hub ids of the parts the model needs (its compressor) in place of local paths."""
    for key, repo_id in references.items():
        if key not in source.card.hub_references:
            raise PushError(f"--{key}-repo does not apply to a {source.kind.name}: drop it.")
        check_repo_id(repo_id, option=f"--{key}-repo")
        source.model.metadata[key] = repo_id


def run_artifact(run_dir: Path) -> Path:
    """The run's export folder (the best model), else its best checkpoint, else its last one."""
    # dot-folders are an export being written (ExportBestModel's staging), not an export
    exports = sorted(p.parent for p in run_dir.glob(f"*/{CONFIG_NAME}") if not p.parent.name.startswith("."))
    if len(exports) > 1:
        raise PushError(f"{run_dir} has several export folders ({', '.join(p.name for p in exports)}): "
                        "pass one of them as --checkpoint.")
    if exports:
        return exports[0]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        best = _best_model_path(last)
        return best if best is not None and best.is_file() else last
    raise PushError(f"{run_dir} holds no export folder and no checkpoints/last.ckpt: pass a .ckpt as --checkpoint.")


def _best_model_path(last_checkpoint: Path) -> Path | None:
    """The best checkpoint that ModelCheckpoint recorded in its state."""
    callbacks = load_torch_checkpoint(last_checkpoint).get("callbacks", {})
    for name, state in callbacks.items():
        if str(name).startswith("ModelCheckpoint") and state.get("best_model_path"):
            return Path(state["best_model_path"])
    return None


# ---------------------------------------------------------------------------- the upload folder


def write_upload_folder(source: PushSource, repo_id: str, out_dir: Path, base_model: str | None = None) -> Path:
    """Write model.safetensors, config.json and README.md into `out_dir` (new, empty, or a previous dry run)."""
    card = build_model_card(source.card, dict(source.model.metadata), source.run, repo_id, base_model,
                            source.metrics)
    _check_writable(out_dir)
    source.model.save_pretrained(out_dir)  # type: ignore[operator]
    weights_name: str = source.kind.model_class.weights_name  # type: ignore[assignment]
    (out_dir / weights_name).replace(out_dir / FALLBACK_WEIGHTS_NAME)
    card.save(out_dir / CARD_NAME)
    return out_dir


def _check_writable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise PushError(f"{out_dir} exists and is not a folder: pick another --dry-run folder.")
    other = sorted(p.name for p in out_dir.iterdir() if p.name not in UPLOAD_FILES) if out_dir.exists() else []
    if other:  # the folder must be exactly what would be uploaded
        raise PushError(f"{out_dir} already holds other files ({', '.join(other[:5])}): "
                        "pick an empty --dry-run folder.")


# ---------------------------------------------------------------------------- the Hub


def upload(folder: Path, repo_id: str, token: str, private: bool = False, revision: str | None = None,
           commit_message: str = "Upload llm-trm model") -> str:
    """Create the repo (and branch) if needed and upload `folder` in one commit; return the commit URL."""
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                   commit_message=commit_message)
    except Exception as err:  # HTTP, connection, offline mode, auth: the user needs one line, not a traceback
        reason = (str(err).strip().splitlines() or [""])[0]
        raise PushError(f"could not push to {repo_id} ({type(err).__name__}: {reason}): check your network, "
                        "that the token may write to that namespace, and the repo id.") from err
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")
