"""Export a stage's model as a standalone directory that plain ``from_pretrained`` loads.

``python -m pipeline export RUN_DIR STAGE OUT_DIR``. A LoRA adapter is merged into its base, loaded in
full precision (a 4-bit or 8-bit recipe's base is loaded unquantized), and the merged weights are
saved with the tokenizer; a full-weight model is copied as it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import registry
from pipeline.modeling.chat import strip_saved_template_defaults
from pipeline.run.manifest import MANIFEST, Manifest, now
from pipeline.util.errors import PipelineError
from pipeline.util.files import write_json_atomic


def export(run_dir: str | Path, stage: str, out_dir: str | Path, say=print) -> dict[str, Any]:
    """Write the model of ``stage`` in ``run_dir`` to ``out_dir``; returns what was done (also in export.json)."""
    from pipeline import modeling
    from pipeline.config import ModelConfig

    run_dir, out_dir = Path(run_dir).resolve(), Path(out_dir).resolve()
    ref = stage_model(run_dir, stage)
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
    entry = Manifest(run_dir).stage(stage)
    kind = registry.kinds().get(entry.get("kind", ""))
    head = (kind.model_head if kind else None) or "causal_lm"
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if ref.form == "full":
        shutil.copytree(ref.path, tmp)
        merged = False
    else:
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
        tokenizer = modeling.load_tokenizer(cfg, path=source)
        tokenizer.save_pretrained(str(tmp))
        merged = True
    strip_saved_template_defaults(tmp)
    info = {
        "run_dir": str(run_dir),
        "stage": stage,
        "kind": entry.get("kind"),
        "model": ref.as_dict(),
        "merged_adapter": merged,
        "head": head,
        "exported_at": now(),
    }
    write_json_atomic(tmp / "export.json", info)
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    tmp.rename(out_dir)
    say(f"[export] {stage}: {'merged adapter' if merged else 'full model'} -> {out_dir}")
    return info


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
