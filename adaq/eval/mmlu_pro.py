"""MMLU-Pro through lm-eval, for several models on the same questions, resumable from a JSONL samples file.

The questions are chosen once (adaq.eval.data.select_questions) and every model answers exactly those. lm-eval
runs them in chunks; after each chunk the per-question records are appended to the samples file, so an interrupted
run loses at most one chunk and the next run skips whatever the file already holds for the same model and settings.
Accuracy and its standard error are computed from the records (lm-eval's formulas: mean, sample stderr).
"""

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from adaq.errors import AdaqError
from adaq.eval import data

TASKS_DIR = Path(__file__).parent / "tasks"
VARIANTS = ("cot", "loglikelihood")
LOGLIKELIHOOD_TASK = "adaq_mmlu_pro_llh"


@dataclass
class ModelUnderTest:
    label: str  # "baseline" or "nvfp4"
    source: str  # what it was loaded from
    make_lm: Callable[[Callable[[int], None]], object]  # progress callback -> an lm-eval LM (loaded lazily)


@dataclass
class MMLUProRun:
    variant: str = "loglikelihood"
    limit: int | None = None
    categories: list[str] | None = None
    num_fewshot: int = 5
    data_dir: str | None = None
    samples_path: Path | None = None
    chunk_size: int = 16

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise AdaqError(f"invalid --variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        if self.limit is not None and self.limit < 1:
            raise AdaqError(f"invalid --limit {self.limit}: must be at least 1")
        if not 0 <= self.num_fewshot <= 5:
            raise AdaqError(f"invalid --num-fewshot {self.num_fewshot}: MMLU-Pro has 5 validation examples per category")
        if self.chunk_size < 1:
            raise AdaqError(f"invalid --chunk-size {self.chunk_size}: must be at least 1")
        if self.categories:
            self.categories = data.check_categories(self.categories)

    def record_key(self, model: ModelUnderTest) -> tuple:
        return (model.label, model.source, self.variant, self.num_fewshot)


@dataclass
class ModelScores:
    label: str
    source: str
    records: list[dict] = field(repr=False)

    @property
    def accuracy(self) -> float:
        return mean([r["correct"] for r in self.records])

    @property
    def stderr(self) -> float:
        return sample_stderr([float(r["correct"]) for r in self.records])

    def by_category(self) -> dict[str, list[dict]]:
        groups: dict[str, list[dict]] = {}
        for record in self.records:
            groups.setdefault(record["category"], []).append(record)
        return dict(sorted(groups.items()))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def sample_stderr(values: list[float]) -> float:
    """lm-eval's mean_stderr: sample standard deviation / sqrt(n)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


# ---- samples file ---------------------------------------------------------------------------------------------
def read_samples(path: Path | None) -> list[dict]:
    if path is None or not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by an interruption: that question is simply asked again
    return records


def append_samples(path: Path | None, records: list[dict]) -> None:
    if path is None or not records:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())


def _key_of(record: dict) -> tuple:
    return (record["model"], record["source"], record["variant"], record["num_fewshot"])


# ---- running ----------------------------------------------------------------------------------------------------
def run_mmlu_pro(models: list[ModelUnderTest], run: MMLUProRun, progress=None) -> tuple[list[int], list[ModelScores]]:
    """Evaluate every model on the same questions; returns the question ids and each model's records.

    Chunks go round the models in turn, so a run stopped early leaves every model with the same questions done."""
    data.go_offline()
    folder = data.resolve_mmlu_pro_dir(run.data_dir)
    question_ids = data.select_questions(folder, run.limit, run.categories)
    categories = _categories_of(folder)
    done = _done_records(run.samples_path, set(question_ids))
    records = [done.setdefault(run.record_key(m), {}) for m in models]
    pending = [[q for q in question_ids if q not in answered] for answered in records]
    progress = progress or _NoProgress()
    progress.start(sum(_work_units(folder, todo, run.variant) for todo in pending))
    lms: dict[str, object] = {}
    for begin in range(0, len(question_ids), run.chunk_size):
        for model, answered in zip(models, records):
            chunk = [q for q in question_ids[begin:begin + run.chunk_size] if q not in answered]
            if not chunk:
                continue
            if model.label not in lms:
                lms[model.label] = model.make_lm(progress.advance)
            new = _evaluate_chunk(lms[model.label], model, run, folder, chunk, categories)
            append_samples(run.samples_path, new)
            answered.update((r["question_id"], r) for r in new)
    scores = [ModelScores(m.label, m.source, [answered[q] for q in question_ids])
              for m, answered in zip(models, records)]
    return question_ids, scores


def _done_records(path: Path | None, wanted: set[int]) -> dict[tuple, dict[int, dict]]:
    done: dict[tuple, dict[int, dict]] = {}
    for record in read_samples(path):
        if record.get("question_id") in wanted:
            done.setdefault(_key_of(record), {})[record["question_id"]] = record
    return done


def _categories_of(folder: Path) -> dict[int, str]:
    table = data.read_mmlu_pro(folder, "test").select(["question_id", "category"]).to_pydict()
    return dict(zip(table["question_id"], table["category"]))


def _work_units(folder: Path, question_ids: list[int], variant: str) -> int:
    """Requests lm-eval will make: one per answer option (log-likelihood) or one per question (cot)."""
    if variant == "cot":
        return len(question_ids)
    table = data.read_mmlu_pro(folder, "test").select(["question_id", "options"]).to_pydict()
    options = dict(zip(table["question_id"], table["options"]))
    return sum(len(options[q]) for q in question_ids)


def _task_names(run: MMLUProRun, chunk: list[int], categories: dict[int, str]) -> list[str]:
    if run.variant == "loglikelihood":
        return [LOGLIKELIHOOD_TASK]
    present = sorted({categories[q] for q in chunk})
    return [f"adaq_mmlu_pro_{category.replace(' ', '_')}" for category in present]


def _evaluate_chunk(lm, model: ModelUnderTest, run: MMLUProRun, folder: Path, chunk: list[int],
                    categories: dict[int, str]) -> list[dict]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"data_dir": str(folder), "question_ids": chunk})
    results = simple_evaluate(model=lm, tasks=_task_names(run, chunk, categories), num_fewshot=run.num_fewshot,
                              task_manager=manager, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    samples = [s for task_samples in results["samples"].values() for s in task_samples]
    return [_record(model, run, sample) for sample in samples]


def _record(model: ModelUnderTest, run: MMLUProRun, sample: dict) -> dict:
    doc = sample["doc"]
    record = {"model": model.label, "source": model.source, "variant": run.variant, "num_fewshot": run.num_fewshot,
              "question_id": doc["question_id"], "category": doc["category"], "target": doc["answer"]}
    if run.variant == "loglikelihood":
        lls = [float(ll) for ll, _ in sample["filtered_resps"]]
        prediction = "ABCDEFGHIJ"[max(range(len(lls)), key=lls.__getitem__)]
        record.update(prediction=prediction, correct=bool(sample["acc"]), loglikelihoods=lls)
    else:
        record.update(prediction=sample["filtered_resps"][0], correct=bool(sample["exact_match"]),
                      response=sample["resps"][0][0])
    return record


def _quiet_lm_eval() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


class _NoProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass
