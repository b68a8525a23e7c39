"""How a stage is launched, read from an accelerate config file: how many processes, and what DeepSpeed ZeRO
or FSDP shards or offloads. ``plan`` sizes memory by it; ``run`` decides by it whether a stage needs
``accelerate launch``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.util.errors import PipelineError


@dataclass(frozen=True)
class Distribution:
    strategy: str = "single"  # single | ddp | zero1 | zero2 | zero3 | fsdp
    processes: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    source: str | None = None
    distributed_type: str = "NO"  # accelerate's distributed_type, upper case

    def describe(self) -> str:
        extra = " + optimizer offload" if self.offload_optimizer else ""
        extra += " + parameter offload" if self.offload_params else ""
        return f"{self.strategy} x{self.processes}{extra}" if self.strategy != "single" else "1 process"

    @property
    def multi_process(self) -> bool:
        """Whether ``accelerate launch`` does anything a plain process does not: several processes, or a
        distributed type (DeepSpeed, FSDP, multi-GPU) even for one."""
        return self.processes > 1 or self.distributed_type not in ("NO", "")


def launch_settings(path: str) -> dict[str, Any]:
    """The accelerate config file's settings."""
    import yaml

    if not Path(path).is_file():
        raise PipelineError(f"launch: accelerate config file not found: {path}")
    return yaml.safe_load(Path(path).read_text()) or {}


def read_launch(path: str | None, processes: int | None = None) -> Distribution:
    """How a stage is launched: the accelerate config (``launch:`` or --launch), --num-processes overriding it."""
    if not path:
        return Distribution(strategy="ddp" if (processes or 1) > 1 else "single", processes=processes or 1)
    settings = launch_settings(path)
    n = processes or int(settings.get("num_processes", 1) or 1)
    distributed_type = str(settings.get("distributed_type", "NO")).upper()
    ds = settings.get("deepspeed_config") or {}
    fsdp = settings.get("fsdp_config") or {}
    if distributed_type == "DEEPSPEED":
        return Distribution(
            f"zero{int(ds.get('zero_stage', 2))}",
            n,
            str(ds.get("offload_optimizer_device", "none")) != "none",
            str(ds.get("offload_param_device", "none")) != "none",
            path,
            distributed_type,
        )
    if distributed_type == "FSDP":
        offload = bool(fsdp.get("fsdp_offload_params"))
        return Distribution("fsdp", n, offload, offload, path, distributed_type)
    return Distribution("ddp" if n > 1 else "single", n, source=path, distributed_type=distributed_type)
