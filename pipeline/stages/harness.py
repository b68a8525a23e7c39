"""lm-evaluation-harness tasks on every evaluated policy (``eval.harness``; the optional ``[eval]`` extra).

Each policy is the model the eval stage already loaded (an adapter merged into its base, as every sampled policy
is), wrapped in lm_eval's ``HFLM(pretrained=<model>, tokenizer=<tokenizer>)`` and scored by ``simple_evaluate``
on task names as users write them (``hellaswag``, ``gsm8k``) and on local task YAMLs (``include_path``). Scores
land in the eval stage's metrics as ``harness/<task>/<metric>`` (``,<filter>`` appended unless lm_eval's filter is
``none``), so they reach eval/metrics.json, the report, the trackers and the frontier's axes like any metric.

The config is torch-free and imports no lm_eval (``find_spec`` only); the task checks (``validate``) import
lm_eval's task index, which imports no torch.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Strict
from pipeline.util.errors import PipelineError
from pipeline.util.text import suggest

PREFIX = "harness/"  # metric names: harness/<task>/<metric>[,<filter>]
INSTALL = "pip install '.[eval]' (or pip install 'lm_eval>=0.4.13')"


class HarnessConfig(Strict):
    """lm-evaluation-harness tasks run on every policy the eval stage evaluates."""

    tasks: list[str] = Field(
        ...,
        min_length=1,
        description="lm-eval task, group or tag names as lm_eval's --tasks takes them (hellaswag, gsm8k, mmlu), "
        "and names of tasks defined in include_path.",
    )
    include_path: str | None = Field(
        None,
        description="A folder of lm-eval task YAMLs (local task definitions); relative to the recipe file.",
    )
    limit: int | None = Field(None, gt=0, description="At most this many examples per task (None: all of them).")
    num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per prompt (None: each task's own default, else 0)."
    )
    batch_size: int = Field(8, gt=0, description="Requests per forward pass.")
    apply_chat_template: bool = Field(
        False, description="Render every request with the tokenizer's chat template (lm_eval's --apply_chat_template)."
    )

    @field_validator("tasks")
    @classmethod
    def _named(cls, tasks: list[str]) -> list[str]:
        blank = [i for i, task in enumerate(tasks) if not task.strip()]
        if blank:
            raise ValueError(f"tasks[{blank[0]}] is empty; give an lm-eval task name such as hellaswag")
        return tasks

    @model_validator(mode="after")
    def _installed(self) -> HarnessConfig:
        if not lm_eval_installed():
            raise ValueError(f"needs lm-evaluation-harness (lm_eval), which is not installed: {INSTALL}")
        return self


def lm_eval_installed() -> bool:
    try:
        return find_spec("lm_eval") is not None
    except ValueError:  # sys.modules["lm_eval"] is None: imports of it are blocked
        return False


def include_folder(recipe, cfg: HarnessConfig) -> Path | None:
    """``include_path`` as a folder: relative paths are relative to the recipe file (as data paths are)."""
    if cfg.include_path is None:
        return None
    path = Path(cfg.include_path).expanduser()
    if not path.is_absolute():
        base = Path(recipe.source_path).resolve().parent if recipe.source_path else Path.cwd()
        path = base / path
    return path.resolve()


def metric_name_problem(name: str, cfg: HarnessConfig) -> str | None:
    """What is wrong with a frontier axis naming a harness metric (harness/<task>/<metric>), or None."""
    _, _, rest = name.partition(PREFIX)
    task, _, metric = rest.partition("/")
    example = f"{PREFIX}{cfg.tasks[0]}/acc"
    if not task or not metric:
        return f"{name!r}: name a harness metric as harness/<task>/<metric>, e.g. {example}"
    if task not in cfg.tasks:
        return (
            f"{name!r}: task {task!r} is not in harness.tasks{suggest(task, cfg.tasks)}; tasks: {', '.join(cfg.tasks)}"
        )
    return None


# ------------------------------------------------------------------------------------------------
# validate: the folder exists, every task name is known to lm_eval
# ------------------------------------------------------------------------------------------------


def checks(recipe, name: str) -> list:
    """The eval kind's data checks for ``harness``: callables raising PipelineError (preflight names the stage)."""
    cfg = recipe.stages[name].harness
    if cfg is None:
        return []
    return [lambda: task_manager_for(recipe, cfg)]


def task_manager_for(recipe, cfg: HarnessConfig):
    """lm_eval's TaskManager that knows every task of ``cfg``; PipelineError naming the key of what is not there."""
    folder = include_folder(recipe, cfg)
    if folder is not None and not folder.is_dir():
        what = "is not a folder" if folder.exists() else "folder not found"
        raise PipelineError(
            f"harness.include_path: {what}: {folder} (a folder of lm-eval task YAMLs; relative paths are relative "
            "to the recipe file)"
        )
    local = _task_manager(str(folder), False) if folder else None
    if local is not None and all(task in local.all_subtasks for task in cfg.tasks):
        return local  # every task is a local leaf task: lm_eval's own ~15,000 need not be indexed (seconds)
    manager = _task_manager(str(folder) if folder else None, True)
    unknown = [(i, task) for i, task in enumerate(cfg.tasks) if task not in manager.all_tasks]
    if unknown:
        i, task = unknown[0]
        more = f" (and {len(unknown) - 1} more unknown)" if len(unknown) > 1 else ""
        where = f" or in {folder}" if folder else " (local task YAMLs: harness.include_path)"
        raise PipelineError(
            f"harness.tasks[{i}]: unknown lm-eval task {task!r}{suggest(task, manager.all_tasks)}{more}; not among "
            f"lm_eval's tasks, groups and tags{where}"
        )
    return manager


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool):
    """One index per folder and process: validate and the stage (same process under ``run``) share it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


# ------------------------------------------------------------------------------------------------
# run: one policy's scores
# ------------------------------------------------------------------------------------------------


class Harness:
    """The tasks of one eval stage, indexed once, run on each policy in turn."""

    def __init__(self, recipe, stage: str, cfg: HarnessConfig, tokenizer):
        self.stage, self.cfg, self.tokenizer = stage, cfg, tokenizer
        try:
            self.manager = task_manager_for(recipe, cfg)
        except PipelineError as exc:
            raise PipelineError(f"stages.{stage}.{exc}") from None
        self.info: dict[str, Any] = {"tasks": list(cfg.tasks)}

    def scores(self, policy: str, model) -> tuple[dict[str, float], dict[str, float]]:
        """(harness/<task>/<metric> -> score, <task>/<metric> -> standard error) of one policy."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        cfg = self.cfg
        with _quiet():
            lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=cfg.batch_size)
            try:
                out = simple_evaluate(
                    model=lm,
                    tasks=list(cfg.tasks),
                    task_manager=self.manager,
                    limit=cfg.limit,
                    num_fewshot=cfg.num_fewshot,
                    apply_chat_template=cfg.apply_chat_template,
                    log_samples=False,
                )
            except Exception as exc:  # a task that cannot be built or read (its YAML, its dataset) is the user's to fix
                raise PipelineError(
                    f"stages.{self.stage}.harness: lm-eval failed on policy {policy!r}: {type(exc).__name__}: {exc}"
                ) from exc
        self.info.update(
            samples={task: n.get("effective") for task, n in (out.get("n-samples") or {}).items()},
            num_fewshot=dict(out.get("n-shot") or {}),
            lm_eval=out.get("lm_eval_version"),
        )
        return flat_scores(out["results"])


def flat_scores(results: dict[str, dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """lm_eval's ``results`` ({task: {"acc,none": 0.5, "acc_stderr,none": 0.1, ...}}) as flat metric names."""
    scores: dict[str, float] = {}
    stderr: dict[str, float] = {}
    for task, entry in results.items():
        for key, value in entry.items():
            metric, _, kept = key.partition(",")
            if not kept or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # alias, name, sample_len; "N/A" standard errors
            base = metric.removesuffix("_stderr")
            name = f"{task}/{base}" + ("" if kept == "none" else f",{kept}")
            if base != metric:
                stderr[name] = round(float(value), 4)
            else:
                scores[PREFIX + name] = round(float(value), 4)
    return scores, stderr


@contextlib.contextmanager
def _quiet():
    """lm_eval logs a line per task and setting at WARNING, and draws its request bars with ``disable=False``
    (TQDM_DISABLE cannot turn those off): both silenced unless ``--verbose``. Errors still raise."""
    from pipeline.util.console import verbose

    if verbose():
        yield
        return
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the bars write to sys.stderr as it is when drawn
            yield
    finally:
        logger.setLevel(level)
