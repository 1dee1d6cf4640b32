"""Every notebook in notebooks/ executes, with scripts/run_notebooks.py as `make notebooks` runs it,
on tiny artifacts laid out as the demo lays out its own (runs/demo/...)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from llm_trm.cli import main
from llm_trm.evaluate import RESULTS_JSON
from tests.test_compressor_module import export_tiny_1a
from tests.test_data_text import write_corpus
from tests.test_trm_module import TINY_CLI, write_shards

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TINY_HIDDEN = 64  # the hidden size of the tiny_backbone_dir fixture


EVAL_MODES = ["cot", "no_think", "trm", "trm_first_token"]
TOY_QUESTIONS = [f"Tom has {n} apples and eats one. How many are left?" for n in range(2, 6)]


def run_tiny_evaluation(output_dir: Path, backbone: Path, compressor: Path, trm: Path,
                        exclude_from: Path | None = None) -> dict:
    """A real `llm-trm evaluate` run on the tiny random backbone: every mode on a few toy problems with gold
    answers (one too long for the context, so the report has a failure), a few tokens each. Returns results.json."""
    output_dir.mkdir(parents=True, exist_ok=True)
    problems = output_dir / "toy.jsonl"
    questions = TOY_QUESTIONS[:2] + ["apples " * 600] + TOY_QUESTIONS[2:]
    problems.write_text("".join(json.dumps({"question": q, "answer": str(i)}) + "\n" for i, q in enumerate(questions)))
    config = {"backbone": str(backbone), "compressor": str(compressor), "trm": str(trm),
              "datasets": f"jsonl:{problems}", "split": "test", "num_samples": len(questions), "modes": EVAL_MODES, "batch_size": 2,
              "max_new_tokens": 3, "max_thinking_tokens": 2, "dtype": "float32", "device": "cpu",
              "output_dir": str(output_dir), "progress": False,
              **({"exclude_from": str(exclude_from)} if exclude_from else {})}
    (output_dir / "eval.yaml").write_text(yaml.safe_dump(config))
    assert main(["evaluate", "--config", str(output_dir / "eval.yaml")]) == 0
    return json.loads((output_dir / RESULTS_JSON).read_text())


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_backbone_dir) -> dict[str, str]:
    """runs/demo with two compressors, hidden-pair shards, a TRM trained by the demo config (with its
    TensorBoard logs) and an evaluation report; returns the notebooks' environment variables."""
    root = tmp_path_factory.mktemp("notebook_artifacts")
    demo = root / "runs" / "demo"
    for stage in ("1a", "1b"):
        export_tiny_1a(tiny_backbone_dir, demo / f"compressor_{stage}")
    write_shards(demo / "hidden_pairs", dim=TINY_HIDDEN)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the demo config reads and writes runs/demo/...
        main(["fit", "--config", str(REPO / "configs/demo/trm.yaml"), "--trainer.max_epochs=2",
              "--trainer.enable_progress_bar=false", *TINY_CLI])
    assert (demo / "trm_model" / "config.json").is_file()
    run_tiny_evaluation(demo / "eval", tiny_backbone_dir, demo / "compressor_1b", demo / "trm_model",
                        exclude_from=demo / "hidden_pairs")
    write_corpus(root / "corpus.txt", docs=400)  # enough held-out documents for the notebook's chunks
    return {"LLM_TRM_ARTIFACTS": str(demo), "LLM_TRM_BACKBONE": str(tiny_backbone_dir),
            "LLM_TRM_TEXT": str(root / "corpus.txt")}


def execute(notebook: Path, output_dir: Path, env: dict[str, str]) -> nbformat.NotebookNode:
    command = [sys.executable, str(REPO / "scripts" / "run_notebooks.py"), "--output-dir", str(output_dir),
               "--timeout", "300", str(notebook)]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return nbformat.read(output_dir / notebook.name, as_version=4)


def outputs(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def test_there_are_notebooks_for_every_phase():
    assert [path.name for path in NOTEBOOKS] == ["01_compressor.ipynb", "02_trm.ipynb", "03_evaluation.ipynb"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_executes_on_tiny_artifacts(notebook, artifacts, tmp_path):
    executed = execute(notebook, tmp_path, artifacts)
    assert [o for o in outputs(executed) if o.output_type == "error"] == []
    assert any("image/png" in o.get("data", {}) for o in outputs(executed)), "no figure was drawn"


def test_evaluation_notebook_shows_the_real_report(artifacts, tmp_path):
    """Notebook 03 on the report of a real tiny `llm-trm evaluate` run: its tables carry that run's numbers."""
    report = json.loads((Path(artifacts["LLM_TRM_ARTIFACTS"]) / "eval" / RESULTS_JSON).read_text())
    assert [s["mode"] for s in report["summary"]] == EVAL_MODES
    assert all((s["problems"], s["failed"]) == (5, 1) for s in report["summary"])  # one is over-long
    executed = execute(REPO / "notebooks" / "03_evaluation.ipynb", tmp_path, artifacts)
    shown = "".join(o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in outputs(executed))
    (table,) = [o.data["text/plain"] for o in outputs(executed) if "ci_low" in o.get("data", {}).get("text/plain", "")]
    for summary in report["summary"]:
        # the mode's row of the summary table (pandas wraps wide tables: the row may come in parts)
        shown_values = [float(cell) for line in table.splitlines() if line.split()[:1] == [summary["mode"]]
                        for cell in line.split()[1:]]
        for key in ("ci_high", "mean_answer_tokens", "mean_time_to_answer_s", "mean_total_time_s", "failed"):
            assert any(abs(value - summary[key]) < 6e-4 for value in shown_values), (summary["mode"], key)
    assert f"{len(EVAL_MODES)} failed problem(s)" in shown


def test_evaluation_notebook_says_how_to_make_a_missing_report(artifacts, tmp_path):
    executed = execute(REPO / "notebooks" / "03_evaluation.ipynb", tmp_path,
                       {**artifacts, "LLM_TRM_REPORT": str(tmp_path / "no_report")})
    printed = "".join(o.get("text", "") for o in outputs(executed) if o.output_type == "stream")
    assert "llm-trm evaluate --config configs/demo/evaluate.yaml" in printed
