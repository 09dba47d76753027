"""Where the evaluation data live, and how lm-eval reads them without touching the network."""

import os
from functools import lru_cache
from itertools import zip_longest
from pathlib import Path

from adaq.errors import AdaqError

DATA_DIR_ENV = "ADAQ_DATA_DIR"
MMLU_PRO_FILES = {"test": "test-00000-of-00001.parquet", "validation": "validation-00000-of-00001.parquet"}
MMLU_PRO_CATEGORIES = (
    "biology", "business", "chemistry", "computer science", "economics", "engineering", "health",
    "history", "law", "math", "other", "philosophy", "physics", "psychology",
)  # fmt: skip
PROJECT_ROOT = Path(__file__).resolve().parents[2]
REPO_DATA = PROJECT_ROOT / "data"  # ships with the repository, not with a wheel: a source checkout has it
WIKITEXT_TEST = "wikitext-2/test.txt"


def repo_data(relative: str) -> Path:
    """A file or folder under the repository's data/ (data/README.md); a one-line error where it is missing."""
    path = REPO_DATA / relative
    if not path.exists():
        raise AdaqError(f"{path}: not found; adaq's data/ ships with the repository (install it from a clone with "
                        f"scripts/install.sh) or give the file's path")
    return path


def go_offline() -> None:
    """Nothing in an evaluation may reach a hub: datasets and transformers must fail rather than download."""
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[variable] = "1"


def _candidates(flag: str | Path | None) -> list[Path]:
    if flag:
        return [Path(flag)]
    if os.environ.get(DATA_DIR_ENV):
        return [Path(os.environ[DATA_DIR_ENV])]
    return [REPO_DATA / "mmlu_pro"]


def _holds_mmlu_pro(folder: Path) -> bool:
    return all((folder / name).is_file() for name in MMLU_PRO_FILES.values())


def resolve_mmlu_pro_dir(flag: str | Path | None = None) -> Path:
    """The folder holding MMLU-Pro's two parquet files: --data-dir, else $ADAQ_DATA_DIR, else data/mmlu_pro.

    A data root that holds an `mmlu_pro/` folder is accepted too."""
    candidates = _candidates(flag)
    for folder in candidates:
        for option in (folder, folder / "mmlu_pro"):
            if _holds_mmlu_pro(option):
                return option.resolve()
    where = candidates[0]
    files = " and ".join(MMLU_PRO_FILES.values())
    raise AdaqError(
        f"MMLU-Pro data not found: put {files} (the parquet files of the Hugging Face dataset TIGER-Lab/MMLU-Pro, "
        f"folder data/) into {where}, or point --data-dir or ${DATA_DIR_ENV} at the folder that holds them"
    )


@lru_cache(maxsize=4)
def _read_split(path: str):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def read_mmlu_pro(data_dir: str | Path, split: str):
    """One split as a pyarrow table (cached: chunked runs read each file once)."""
    return _read_split(str(Path(data_dir) / MMLU_PRO_FILES[split]))


def select_questions(data_dir: Path, limit: int | None, categories: list[str] | None) -> list[int]:
    """question_ids of the test questions to evaluate, categories taking turns (round robin, each in test order).

    Any limit thus covers every selected category evenly (the test split is sorted by category), and a run that
    stops early has answered exactly the questions of a smaller limit."""
    table = read_mmlu_pro(data_dir, "test").select(["question_id", "category"]).to_pydict()
    wanted = set(check_categories(categories)) if categories else set(MMLU_PRO_CATEGORIES)
    by_category: dict[str, list[int]] = {}
    for question_id, category in zip(table["question_id"], table["category"]):
        if category in wanted:
            by_category.setdefault(category, []).append(question_id)
    interleaved = [qid for turn in zip_longest(*by_category.values()) for qid in turn if qid is not None]
    return interleaved[:limit] if limit else interleaved


def check_categories(categories: list[str]) -> list[str]:
    names = [name.strip().replace("_", " ").lower() for name in categories]
    unknown = [name for name in names if name not in MMLU_PRO_CATEGORIES]
    if unknown:
        raise AdaqError(f"unknown MMLU-Pro categories {unknown}; choose from {', '.join(MMLU_PRO_CATEGORIES)}")
    return names


def load_mmlu_pro(data_dir: str | None = None, question_ids: list[int] | None = None, **_ignored):
    """`custom_dataset` of adaq's MMLU-Pro task YAMLs: the local parquet files as a DatasetDict.

    lm-eval passes the task metadata here: `data_dir` (else $ADAQ_DATA_DIR, else the repository's data/mmlu_pro) and
    optionally `question_ids`, the test questions to keep (adaq eval uses it to resume and to share questions)."""
    import datasets

    go_offline()
    folder = resolve_mmlu_pro_dir(data_dir)
    splits = {split: datasets.Dataset(read_mmlu_pro(folder, split)) for split in MMLU_PRO_FILES}
    if question_ids is not None:
        keep = set(question_ids)
        splits["test"] = splits["test"].filter(lambda row: row["question_id"] in keep)
    return datasets.DatasetDict(splits)


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise AdaqError(f"{path}: no such text file (the repository ships wikitext-2's as {REPO_DATA / WIKITEXT_TEST})")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise AdaqError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); give a plain-text file") from None
