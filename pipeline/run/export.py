"""Export a stage's model as a standalone directory that plain ``from_pretrained`` loads, with its model card.

``python -m pipeline export RUN_DIR STAGE OUT_DIR [--license ID] [--push-to-hub REPO_ID [--private]]``. A LoRA
adapter is merged into its base, loaded in full precision (a 4-bit or 8-bit recipe's base is loaded unquantized),
and the merged weights are saved with the tokenizer; a full-weight model is copied as it is. ``README.md`` is the
model card (``pipeline.run.card``); ``--push-to-hub`` then uploads the folder with ``huggingface_hub``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import registry
from pipeline.modeling.chat import strip_saved_template_defaults
from pipeline.run.card import CARD, write_card
from pipeline.run.manifest import MANIFEST, Manifest, now
from pipeline.util.errors import PipelineError
from pipeline.util.files import write_json_atomic
from pipeline.util.network import HUB_URL, hub_offline, unreachable

EXPORT_RECORD = "export.json"


def export(
    run_dir: str | Path,
    stage: str,
    out_dir: str | Path,
    say=print,
    license: str | None = None,
    push_to: str | None = None,
    private: bool = False,
) -> dict[str, Any]:
    """Write the model of ``stage`` in ``run_dir`` to ``out_dir`` with its model card; returns what was done (also
    in export.json). ``push_to``: then upload the folder to that Hub model repo (``private`` when it creates it).
    A push that fails leaves the export in place; the same command again pushes it without exporting again."""
    run_dir, out_dir = Path(run_dir).resolve(), Path(out_dir).resolve()
    ref = stage_model(run_dir, stage)
    if push_to:
        check_repo_id(push_to)
    previous = finished_export(out_dir, run_dir, stage) if push_to else None
    if previous is not None:
        say(f"[export] {out_dir} already holds the export of {stage!r} from this run; pushing it as it is")
        info = previous
    else:
        check_out_dir(run_dir, stage, out_dir)
        info = _export_to(run_dir, stage, ref, out_dir, say, license=license, repo_id=push_to)
    if push_to:
        info = {**info, "hub": push_folder(out_dir, push_to, private=private, say=say)}
    return info


def check_out_dir(run_dir: Path, stage: str, out_dir: Path) -> None:
    """OUT_DIR must be a new or empty directory outside the run directory (a rerun prunes what is inside)."""
    suggestion = run_dir.parent / f"{run_dir.name}-{stage}"
    if out_dir == run_dir or run_dir in out_dir.parents:
        raise PipelineError(
            f"export: OUT_DIR {out_dir} is inside the run directory {run_dir}, whose contents a rerun replaces and "
            f"prunes; export next to it, e.g. {suggestion}"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise PipelineError(f"export: OUT_DIR {out_dir} is a file; give a new directory, e.g. {suggestion}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PipelineError(f"export: {out_dir} exists and is not an empty directory; choose a new OUT_DIR")
    blocker = next((p for p in out_dir.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise PipelineError(f"export: OUT_DIR {out_dir}: {blocker} is a file, so no directory can be created under it")


def finished_export(out_dir: Path, run_dir: Path, stage: str) -> dict[str, Any] | None:
    """What a finished export of ``stage`` from ``run_dir`` in ``out_dir`` recorded; None when there is none."""
    try:
        info = json.loads((out_dir / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        return None
    same = isinstance(info, dict) and info.get("stage") == stage and info.get("run_dir") == str(run_dir)
    return info if same and (out_dir / CARD).is_file() else None


def _export_to(run_dir: Path, stage: str, ref, out_dir: Path, say, license: str | None, repo_id: str | None):
    """Model, tokenizer, export.json and model card into a temporary folder, then renamed to ``out_dir``."""
    entry = Manifest(run_dir).stage(stage)
    kind = registry.kinds().get(entry.get("kind", ""))
    head = (kind.model_head if kind else None) or "causal_lm"
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged = _write_model(run_dir, stage, ref, head, tmp, say)
    strip_saved_template_defaults(tmp)
    info = {
        "run_dir": str(run_dir),
        "stage": stage,
        "kind": entry.get("kind"),
        "model": ref.as_dict(),
        "merged_adapter": merged,
        "head": head,
        "card": CARD,
        "license": license,
        "exported_at": now(),
    }
    write_json_atomic(tmp / EXPORT_RECORD, info)
    write_card(run_dir, stage, tmp, info, license=license, repo_id=repo_id)
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked before
    tmp.rename(out_dir)
    say(f"[export] {stage}: {'merged adapter' if merged else 'full model'} and model card -> {out_dir}")
    return info


def _write_model(run_dir: Path, stage: str, ref, head: str, tmp: Path, say) -> bool:
    """The stage's model as a plain model directory in ``tmp``; True when an adapter was merged into its base."""
    from pipeline import modeling
    from pipeline.config import ModelConfig

    if ref.form == "full":
        shutil.copytree(ref.path, tmp)
        return False
    cfg = ModelConfig.model_validate(_stage_recipe(run_dir, stage).get("model") or {})
    say(f"[export] merging the adapter {ref.path} into its base {ref.base} (full precision)")
    model = modeling.load_merged(cfg, ref, head=head)
    model.save_pretrained(str(tmp))
    # fit() saves the tokenizer beside every model; else the adapter's base has it
    source = next(
        (
            p
            for p in (ref.path, modeling.resolve_name(ref.base or cfg.name_or_path))
            if (Path(p) / "tokenizer_config.json").is_file()
        ),
        None,
    )
    modeling.load_tokenizer(cfg, path=source).save_pretrained(str(tmp))
    return True


def stage_model(run_dir: Path, stage: str):
    """The ``model`` output of a finished stage, or a clear error."""
    from pipeline.modeling import ModelRef

    if not (run_dir / MANIFEST).is_file():
        raise PipelineError(f"export: {run_dir} is not a run directory (no {MANIFEST}); pass the --output-dir of a run")
    stages = Manifest(run_dir).read().get("stages", {})
    if stage not in stages:
        raise PipelineError(f"export: run {run_dir} has no stage {stage!r}; it has: {', '.join(stages) or '(none)'}")
    entry = stages[stage]
    if entry.get("status") != "done":
        raise PipelineError(f"export: stage {stage!r} is {entry.get('status', 'not run')}, not done; run it first")
    model = (entry.get("outputs") or {}).get("model")
    if not model:
        with_model = [name for name, e in stages.items() if (e.get("outputs") or {}).get("model")]
        raise PipelineError(
            f"export: stage {stage!r} ({entry.get('kind', '?')}) has no model output (it wrote: "
            f"{', '.join(entry.get('outputs') or {}) or 'nothing'}); stages with a model: {', '.join(with_model) or 'none'}"
        )
    ref = ModelRef.from_dict(model)
    if not Path(ref.path).is_dir():
        raise PipelineError(f"export: the model of stage {stage!r} is missing on disk: {ref.path}")
    return ref


def _stage_recipe(run_dir: Path, stage: str) -> dict[str, Any]:
    """The resolved recipe the stage ran with (saved beside its outputs), for the model settings."""
    for path in (run_dir / stage / "recipe.yaml", run_dir / "recipe.yaml"):
        if path.is_file():
            return yaml.safe_load(path.read_text()) or {}
    raise PipelineError(
        f"export: no recipe.yaml in {run_dir / stage} or {run_dir}; cannot tell how to load the base model"
    )


# ---------------------------------------------------------------- --push-to-hub


def check_repo_id(repo_id: str) -> None:
    """A malformed repo id fails before anything is exported."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as exc:
        raise PipelineError(
            f"export: --push-to-hub {repo_id!r} is not a Hub repo id ({exc}); give NAME or NAMESPACE/NAME, "
            "e.g. my-org/demo-dpo"
        ) from None


def push_folder(out_dir: Path, repo_id: str, private: bool = False, say=print) -> dict[str, Any]:
    """Upload ``out_dir`` to the Hub model repo ``repo_id``, created when missing (``private`` then). One clear
    error when it cannot (no token, offline, Hub unreachable, token refused); the folder stays as it is. The token
    is huggingface_hub's own (HF_TOKEN or the saved login): it is never passed, printed or written here."""
    from huggingface_hub import HfApi

    endpoint = (os.environ.get("HF_ENDPOINT") or HUB_URL).rstrip("/")
    token = _hub_token()
    problem = _push_problem(endpoint, token)
    if problem:
        raise PipelineError(_not_pushed(out_dir, repo_id, problem))
    api = HfApi(endpoint=endpoint)
    visibility = "private" if private else "public"
    say(f"[export] pushing {out_dir} to {endpoint}/{repo_id} (created {visibility} if it does not exist)")
    try:
        created = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        full_id = getattr(created, "repo_id", None) or repo_id
        commit = api.upload_folder(
            repo_id=full_id,
            folder_path=str(out_dir),
            repo_type="model",
            commit_message=f"pipeline export of {out_dir.name}",
        )
    except Exception as exc:  # whatever the Hub or the network says: one message, the export kept
        raise PipelineError(_not_pushed(out_dir, repo_id, _push_failure(exc, endpoint, token))) from None
    url = f"{endpoint}/{full_id}"
    say(f"[export] pushed to {url}")
    return {"repo_id": full_id, "url": url, "private": private, "commit": getattr(commit, "oid", None)}


def _hub_token() -> str | None:
    """The token huggingface_hub would send (HF_TOKEN, else the saved login), only to tell whether there is one."""
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception:  # e.g. a failed CI token exchange: as good as no token
        return None


def _push_problem(endpoint: str, token: str | None) -> str | None:
    """What stops a push before any request: no token and offline mode (both said at once), or no network."""
    from huggingface_hub import constants

    problems = []
    if not token:
        problems.append(
            "no Hugging Face token: log in once with `hf auth login` (`huggingface-cli login` in older "
            "huggingface_hub), or set HF_TOKEN to a token with write access (https://huggingface.co/settings/tokens)"
        )
    if hub_offline() or getattr(constants, "HF_HUB_OFFLINE", False):
        problems.append("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, which forbids every Hub request: unset it")
    if problems:
        return "; and ".join(problems)
    reason = unreachable(endpoint)
    if reason:
        return f"the Hub ({endpoint}) cannot be reached ({reason}): no network here, or a proxy or firewall in the way"
    return None


def _push_failure(exc: Exception, endpoint: str, token: str | None) -> str:
    """One line for what went wrong during the upload: the token refused, no network, or what the Hub said."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    said = _scrub(" ".join(str(exc).split()), token)[:300]  # scrubbed before cut: no partial token survives
    if status == 401:
        return f"the Hub refused the token (401): log in again with `hf auth login` or set HF_TOKEN ({said})"
    if status == 403:
        return f"the token may not write there (403): use a token with write access to that namespace ({said})"
    if status is not None:
        return f"the Hub answered {status}: {said}"
    if _network_error(exc):
        return f"the connection to the Hub ({endpoint}) failed during the upload ({type(exc).__name__}: {said})"
    return f"{type(exc).__name__}: {said}"


def _network_error(exc: BaseException) -> bool:
    """A connection, timeout or transport error, whichever HTTP library this huggingface_hub uses."""
    names = {cls.__name__ for cls in type(exc).__mro__}  # httpx, httpx2 and requests name theirs alike
    return isinstance(exc, (ConnectionError, TimeoutError)) or bool(
        names & {"TransportError", "ConnectError", "ConnectionError", "Timeout", "TimeoutException", "NetworkError"}
    )


def _not_pushed(out_dir: Path, repo_id: str, problem: str) -> str:
    return (
        f"export: not pushed to {repo_id}: {problem}. The export is complete and kept in {out_dir}; to push it "
        f"later, run the same command again (it finds the finished export and only pushes it) or "
        f"`hf upload {repo_id} {out_dir}`"
    )


def _scrub(text: str, token: str | None) -> str:
    """A library message that quotes the token (a header, a URL) must not print it."""
    return text.replace(token, "***") if token else text
