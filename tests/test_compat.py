"""Each workaround in pipeline/compat.py relies on a library behaviour; these tests check that behaviour
against the installed versions, so an upgrade that changes it fails here instead of silently changing
results. Behavioural end-to-end guards live beside the stages (named in each docstring)."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from pipeline import compat


def _args_read(fn) -> set[str]:
    return set(re.findall(r"\bargs\.(\w+)", inspect.getsource(fn)))


def test_dpo_data_args_cover_every_field_trl_prepare_dataset_reads():
    """compat.DPODataArgs stands in for DPOConfig inside DPOTrainer._prepare_dataset."""
    from trl import DPOTrainer

    params = list(inspect.signature(DPOTrainer._prepare_dataset).parameters)
    assert params == ["self", "dataset", "processing_class", "args", "dataset_name"]
    read = _args_read(DPOTrainer._prepare_dataset)
    assert read, "TRL's _prepare_dataset no longer reads args.<field>: re-check the narrowing"
    missing = read - set(compat.DPODataArgs.__dataclass_fields__)
    assert not missing, f"_prepare_dataset now reads {missing}: add them to compat.DPODataArgs"


def test_trl_keys_its_reference_logprob_cache_on_the_dataset_fingerprint():
    """compat.file_backed_dataset relies on this (behavioural guard: tests/test_dpo.py, precompute rerun reuses it)."""
    from trl import DPOTrainer

    source = inspect.getsource(DPOTrainer._precompute_ref_logps)
    assert "dataset._fingerprint" in source and "_get_cache_file_path" in source


def test_trl_names_its_frozen_reference_adapter_ref():
    from trl import DPOTrainer

    source = inspect.getsource(DPOTrainer)
    assert f'add_adapter("{compat.TRL_REF_ADAPTER}"' in source


def test_dpo_loss_names_are_read_from_trl():
    names = compat.dpo_loss_names()
    assert {"sigmoid", "ipo", "hinge", "sft"} <= set(names), names


def test_trainer_can_load_a_final_checkpoint_and_reads_eval_on_start_at_train_time():
    from transformers import Trainer

    params = list(inspect.signature(Trainer._load_from_checkpoint).parameters)
    assert params[:2] == ["self", "resume_from_checkpoint"]
    assert "eval_on_start" in inspect.getsource(Trainer._inner_training_loop)
    assert "eval_on_start" not in inspect.getsource(Trainer.__init__)


def test_trainer_state_is_a_plain_attribute():
    """compat.load_final_checkpoint assigns trainer.state; a property without a setter would break it."""
    from transformers import Trainer

    assert not isinstance(inspect.getattr_static(Trainer, "state", None), property)


def test_bitsandbytes_cpu_repack_flag_exists_and_gates_the_inference_kernel():
    """compat.fix_cpu_4bit turns this flag off (behavioural guard: tests/test_sft.py
    test_4bit_lora_gradients_survive_an_eval_forward)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32)
    assert hasattr(layer, "support_avx512bf16_for_cpu")
    assert "support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit.forward)
    model = torch.nn.Sequential(layer)
    layer.support_avx512bf16_for_cpu = True
    assert compat.fix_cpu_4bit(model) == 1 and layer.support_avx512bf16_for_cpu is False
    assert compat.fix_cpu_4bit(model) == 0


def test_kbit_reward_precision_matches_trl_score_head_cast():
    """TRL casts a k-bit reward model's score head to bf16, so such a model trains in bf16."""
    from trl import RewardTrainer

    source = inspect.getsource(RewardTrainer)
    assert "bfloat16" in source and compat.KBIT_REWARD_PRECISION == "bf16"


@pytest.mark.parametrize(
    "package, low, high", [("trl", "1.16", "1.17"), ("transformers", "5.23", "5.24"), ("bitsandbytes", "0.50", "0.51")]
)
def test_pins_cover_the_versions_these_tests_checked(package, low, high):
    from importlib.metadata import version

    from packaging.version import Version

    installed = Version(version(package))
    assert Version(low) <= installed < Version(high), (
        f"{package} {installed}: re-run tests/test_compat.py and move the pin"
    )
    pyproject = (__import__("pathlib").Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert f'"{package}>={low},<{high}"' in pyproject
