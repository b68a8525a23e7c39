"""Every stage on every model family (offline replicas), and the traps where real tokenizers break pipelines silently.

Fast tests load only tokenizers and randomly initialised replicas; the pipelines that train are ``slow``.
Traps: (a) EOS / end of turn learned and generation stops with pad == eos; (b) one BOS, never two, none
missing; (c) sampling stops at the family's end of turn and no special-token text leaks; (d) reward scores
independent of batching and padding side; (e) export of tied and untied families reloads to the same
logits; (f) template: chat without a chat template fails at validate; (g) strict templates never see a
partial conversation.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from families import FAMILIES, adapter_pipeline, full_pipeline, write_family_data

from pipeline.builtin import replicas

from conftest import run_cli

# the tokenizer adds BOS and the chat template writes it
BOS_FAMILIES = ("llama3", "mistral", "gemma2", "gemma3", "llama3.2", "r1-distill-qwen")
# bos_token == eos_token (<|endoftext|>): the id also ends turns, so only a doubled start is a BOS error
BOS_IS_EOS = ("phi4-mini", "olmo2")
CONVERSATION = [{"role": "user", "content": "What is 2 plus 3?"}]


def tokenizer_of(family: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(replicas.replica_path(replicas.PREFIX + family))


def special_texts(family: str) -> list[str]:
    """Special tokens' texts: decoding skips them, so one in a response leaked. Added tokens the release marks as
    not special (Qwen3's and R1's <think> / </think>, R1's turn markers) are text a model may write."""
    f = replicas.FAMILIES[family]
    return sorted({*f.specials_front, *f.specials_back} - {"<unk>"} - f.plain_tokens)


def assert_one_bos(ids: list[int], tokenizer, family: str, what: str) -> None:
    bos = tokenizer.bos_token_id
    if family in BOS_FAMILIES:
        assert ids[0] == bos, f"{family} {what}: no BOS at the start: {ids[:4]}"
        assert ids[1] != bos, f"{family} {what}: starts with two BOS tokens: {ids[:4]}"
    if bos is not None and family in BOS_IS_EOS:
        assert ids[:2] != [bos, bos], f"{family} {what}: starts with two BOS tokens: {ids[:4]}"
    elif bos is not None:
        assert bos not in ids[1:], f"{family} {what}: a BOS inside the sequence"


# ------------------------------------------------------------------------------------------------
# (c) stop ids; (b) our own encoders: fast, tokenizer + generation config only
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_stops_at_eos_generation_config_and_end_of_turn(family):
    from transformers import GenerationConfig

    from pipeline.modeling.chat import end_of_turn_ids, stop_ids

    tok = tokenizer_of(family)
    spec = replicas.FAMILIES[family]

    class Model:  # what stop_ids reads from a model
        generation_config = GenerationConfig.from_pretrained(replicas.replica_path(replicas.PREFIX + family))

    turn_end = tok.convert_tokens_to_ids(spec.end_of_turn)
    assert end_of_turn_ids(tok) == [turn_end]
    chat = stop_ids(Model, tok, chat=True)
    assert turn_end in chat and tok.eos_token_id in chat
    assert set(tok.convert_tokens_to_ids(list(spec.generation_eos))) <= set(chat)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_and_reward_inputs_have_one_bos(family):
    from pipeline.rollout.generation import encode_prompts
    from pipeline.rollout.scoring import RewardModelScorer

    tok = tokenizer_of(family)
    chat_prompt, text_prompt = encode_prompts(tok, [CONVERSATION, "### Instruction:\nAdd 2 and 3.\n\n### Response:"])
    scorer = RewardModelScorer(None, tok, "rm")
    for what, ids in (
        ("chat prompt", chat_prompt),
        ("text prompt", text_prompt),
        ("chat reward input", scorer.encode(CONVERSATION, "The answer is 5.")),
        ("text reward input", scorer.encode("Add 2 and 3.\n", "The answer is 5.")),
    ):
        assert_one_bos(ids, tok, family, what)


# ------------------------------------------------------------------------------------------------
# (d) reward scores: alone == in a batch with longer sequences == left padded
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_score_is_independent_of_batch_and_padding_side(family):
    import torch

    from pipeline import modeling
    from pipeline.config import ModelConfig
    from pipeline.rollout.scoring import RewardModelScorer

    cfg = ModelConfig(name_or_path=replicas.PREFIX + family, dtype="float32")
    tok = modeling.load_tokenizer(cfg)
    torch.manual_seed(0)
    model = modeling.load_base(cfg, head="reward").eval()
    pair = [{"prompt": CONVERSATION, "response": "The answer is 5."}, {"prompt": CONVERSATION, "response": "Five."}]
    longer = [
        {
            "prompt": CONVERSATION
            + [{"role": "assistant", "content": "Hm."}, {"role": "user", "content": "Say it again " * 6}],
            "response": "The answer is 5, as I said before, five.",
        }
    ]
    alone = [RewardModelScorer(model, tok, "rm", batch_size=1).score([item])[0] for item in pair]
    for side in ("right", "left"):
        batched = RewardModelScorer(model, tok, "rm", batch_size=8, padding_side=side).score(pair + longer)
        assert batched[:2] == pytest.approx(alone, abs=1e-4), f"{family}, {side} padding"
    assert model.config.pad_token_id == tok.pad_token_id


def test_reward_head_pads_with_the_tokenizer_pad_when_eos_is_a_list():
    from pipeline import modeling
    from pipeline.config import ModelConfig

    cfg = ModelConfig(name_or_path="builtin:replica-llama3", dtype="float32")
    model = modeling.load_base(cfg, head="reward")
    assert isinstance(model.config.eos_token_id, list)  # Llama-3.1: three stop ids
    assert model.config.pad_token_id == modeling.load_tokenizer(cfg).pad_token_id


# ------------------------------------------------------------------------------------------------
# (g) strict templates: nothing renders a partial conversation; bad conversations name their row
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_pair_linter_measures_a_reply_after_its_prompt_on_strict_templates(family):
    from functools import partial

    from pipeline.data.preference.formats import PreferencePair
    from pipeline.data.preference.lint import lint_pairs
    from pipeline.modeling import token_length

    tok = tokenizer_of(family)
    pairs = [
        PreferencePair(
            CONVERSATION,
            [{"role": "assistant", "content": "The answer is 5."}],
            [{"role": "assistant", "content": "It is five, I think, or maybe six."}],
            f"pairs.jsonl row {i}",
        )
        for i in range(1, 3)
    ]
    kept, report = lint_pairs(pairs, count_tokens=partial(token_length, tok), max_length=64)
    assert len(kept) == 2 and report["length_unit"] == "tokens"
    chosen = len(tok("The answer is 5.", add_special_tokens=False)["input_ids"])
    # the reply plus what the template writes around an assistant turn: a few tokens, not a whole conversation
    assert chosen <= report["lengths"]["chosen"]["max"] <= chosen + 4
    assert report["lengths"]["rejected"]["max"] > report["lengths"]["chosen"]["max"]


def test_a_conversation_the_template_refuses_is_a_data_error_naming_the_row():
    from functools import partial

    from pipeline.data.preference.formats import PreferencePair
    from pipeline.data.preference.lint import lint_pairs
    from pipeline.modeling import token_length
    from pipeline.util.errors import DataError

    system = [{"role": "system", "content": "Be brief."}] + CONVERSATION
    pair = PreferencePair(
        system, [{"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "6"}], "prefs.jsonl row 7"
    )
    with pytest.raises(
        DataError, match=r"prefs.jsonl row 7: .*refuses.*System role not supported.*merge a system message"
    ):
        lint_pairs([pair], count_tokens=partial(token_length, tokenizer_of("gemma2")), max_length=64)


@pytest.mark.parametrize(
    "family, expected",
    [
        ("mistral", r"row 1: the prompt renders differently alone .*drops or moves the system message"),
        ("gemma2", r"row 1: the model's chat template refuses this conversation \(System role not supported\)"),
    ],
)
def test_sft_data_with_a_system_turn_is_refused_where_the_template_loses_or_refuses_it(family, expected):
    from pipeline.data.chat_fit import check_chat_examples
    from pipeline.data.sft import Example
    from pipeline.util.errors import DataError

    tok = tokenizer_of(family)
    example = Example(
        [{"role": "system", "content": "Be brief."}] + CONVERSATION,
        [{"role": "assistant", "content": "5"}],
        "sft.jsonl row 1",
    )

    def render(messages, gen):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    with pytest.raises(DataError, match=expected):
        check_chat_examples([example], render, "sft.jsonl")
    plain = Example(CONVERSATION, [{"role": "assistant", "content": "5"}], "sft.jsonl row 2")
    check_chat_examples([plain], render, "sft.jsonl")  # user/assistant alternation renders fine


# ------------------------------------------------------------------------------------------------
# (f) and bad input: one clear error, exit 2, no traceback (through the CLI)
# ------------------------------------------------------------------------------------------------


def _model_without_chat_template(tmp_path):
    src = replicas.replica_path("builtin:replica-qwen2.5")
    model_dir = tmp_path / "qwen-no-template"
    shutil.copytree(src, model_dir)
    (model_dir / "chat_template.jinja").unlink()
    return model_dir


def _recipe(tmp_path, model: str, template: str = "chat") -> str:
    data = write_family_data(tmp_path)
    raw = {
        "name": "bad",
        "model": {"name_or_path": model},
        "stages": {
            "sft": {
                "kind": "sft",
                "data": {
                    "train": {"path": str(data["messages" if template == "chat" else "alpaca"])},
                    "template": template,
                },
            }
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_validate_refuses_template_chat_on_a_tokenizer_without_chat_template(tmp_path):
    model_dir = _model_without_chat_template(tmp_path)
    proc = run_cli("validate", _recipe(tmp_path, str(model_dir)))
    _assert_user_error(proc, str(model_dir), "has no chat template", "template: alpaca", "stages.sft")


def test_validate_refuses_a_model_directory_without_a_tokenizer(tmp_path):
    model_dir = tmp_path / "weights-only"
    model_dir.mkdir()
    src = replicas.replica_path("builtin:replica-llama3")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, model_dir / name)
    proc = run_cli("validate", _recipe(tmp_path, str(model_dir), template="alpaca"))
    _assert_user_error(proc, str(model_dir), "no tokenizer")


def test_unknown_family_and_unknown_offline_model_are_one_clear_error(tmp_path):
    proc = run_cli("validate", _recipe(tmp_path, "builtin:replica-falcon"))
    _assert_user_error(proc, "builtin:replica-falcon", "builtin:replica-llama3")
    proc = run_cli(
        "run",
        _recipe(tmp_path, "no-such-org/no-such-model", template="alpaca"),
        "--output-dir",
        str(tmp_path / "run"),
        env={"HF_HUB_OFFLINE": "1"},
    )
    _assert_user_error(proc, "no-such-org/no-such-model")


def test_a_chat_dataset_on_a_tokenizer_without_template_fails_at_stage_start_too(tmp_path):
    """Hub ids that are not cached cannot be checked at validate; the stage checks the loaded tokenizer."""
    from pipeline.config import load_recipe
    from pipeline.run import runner
    from pipeline.util.errors import PipelineError

    model_dir = _model_without_chat_template(tmp_path)
    recipe = load_recipe(_recipe(tmp_path, str(model_dir)))
    with pytest.raises(PipelineError, match="has no chat template"):
        runner.run_stage(recipe, "sft", tmp_path / "run")


# ------------------------------------------------------------------------------------------------
# Every stage on every family (slow): full fine-tuning, then LoRA on a 4-bit base
# ------------------------------------------------------------------------------------------------


# Thinking templates run twice: as released (thinking on) and with model.chat_template_kwargs turning it off.
THINKING_OFF = {"enable_thinking": False}
RUNS = [(f, {}) for f in FAMILIES] + [(f, THINKING_OFF) for f in ("qwen3", "smollm3")]


@pytest.fixture(scope="module", params=RUNS, ids=[f + ("-no-thinking" if kw else "") for f, kw in RUNS])
def full_run(request, tmp_path_factory):
    from pipeline.config import recipe_from_dict
    from pipeline.run import runner

    family, template_kwargs = request.param
    out = tmp_path_factory.mktemp(f"family-{family}")
    data = write_family_data(out)
    raw = full_pipeline(family, data)
    raw["model"]["chat_template_kwargs"] = template_kwargs
    recipe = recipe_from_dict(raw)
    manifest = runner.run_pipeline(recipe, out / "run", say=lambda *_: None)
    return family, recipe, out / "run", manifest


@pytest.mark.slow
def test_every_stage_runs_and_nothing_leaks_special_tokens(full_run):
    family, recipe, run_dir, manifest = full_run
    assert all(manifest["stages"][name]["status"] == "done" for name in recipe.stages)
    texts = []
    for path in (
        run_dir / "bon" / "candidates.jsonl",
        run_dir / "bon" / "pairs.jsonl",
        run_dir / "eval" / "responses.jsonl",
    ):
        texts += [json.dumps(json.loads(line)) for line in path.read_text().splitlines()]
    assert texts
    leaked = [(token, text[:200]) for text in texts for token in special_texts(family) if token in text]
    assert not leaked, leaked[:3]
    # (a)/(c): the chat SFT policy learned to end its turn, and sampling stopped there
    candidates = [json.loads(line) for line in (run_dir / "bon" / "candidates.jsonl").read_text().splitlines()]
    assert sum(c["finish_reason"] == "eos" for c in candidates) >= len(candidates) // 2


@pytest.mark.slow
def test_sft_labels_hold_the_end_of_turn_and_greedy_generation_stops(full_run):
    """(a) pad == eos (qwen2.5, phi3) must not mask the real end of the reply out of the labels."""
    from pipeline import modeling
    from pipeline.modeling.chat import end_of_turn_ids
    from pipeline.rollout import generation
    from pipeline.rollout.engine import hf_engine, sample_prompts

    family, recipe, run_dir, manifest = full_run
    ref = modeling.ModelRef.from_dict(manifest["stages"]["sft"]["outputs"]["model"])
    tok = modeling.load_tokenizer(recipe.model, path=ref.path, padding_side="left")
    model = modeling.load_frozen_policy(recipe.model, ref)
    prompts = [
        json.loads(line)["messages"][:1] for line in (run_dir.parent / "messages.jsonl").read_text().splitlines()
    ]
    samples = sample_prompts(hf_engine(model, tok), model, tok, prompts, n=1, max_new_tokens=24, temperature=0)
    stopped = [s for s in samples if s.finish_reason == "eos" and len(s.token_ids) < 24]
    assert len(stopped) >= len(samples) - 1, [generation.decode(tok, s) for s in samples]
    turn_end = end_of_turn_ids(tok)[0]
    assert sum(s.token_ids[-1] == turn_end for s in stopped) >= len(stopped) - 1


@pytest.mark.slow
def test_trainers_get_one_bos_and_the_end_of_turn_in_the_labels(full_run):
    """(b) for every trainer's tokenized data; (a) the end-of-turn token is a label in SFT."""
    from pipeline.modeling.chat import end_of_turn_ids
    from pipeline.run.context import StageContext
    from pipeline.stages import dpo, reward, sft

    family, recipe, run_dir, _ = full_run
    scratch = run_dir.parent / "trainers"

    def ctx(name):
        return StageContext(
            recipe=recipe, name=name, cfg=recipe.stages[name], run_dir=run_dir, stage_dir=scratch / name, seed=0
        )

    for name in ("sft_alpaca", "sft"):
        trainer, _ = sft.build_trainer(ctx(name))
        tok = trainer.processing_class
        ends = {tok.eos_token_id, *end_of_turn_ids(tok)}
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            assert_one_bos(ids, tok, family, f"{name} input")
            assert any(label in ends for label in labels), f"{family} {name}: no end of reply in the labels"
    trainer, *_ = reward.build_trainer(ctx("reward"))
    for row in trainer.train_dataset:
        assert_one_bos(row["chosen_ids"], trainer.processing_class, family, "reward chosen")
        assert_one_bos(row["rejected_ids"], trainer.processing_class, family, "reward rejected")
    trainer, *_ = dpo.build_trainer(ctx("dpo"))
    for row in trainer.train_dataset:
        assert_one_bos(row["prompt_ids"] + row["chosen_ids"], trainer.processing_class, family, "dpo prompt+chosen")


@pytest.mark.slow
def test_export_reloads_to_identical_logits(full_run, tmp_path):
    """(e) full models: tied (qwen2.5, gemma2) and untied (llama3, mistral, phi3) embeddings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.run.export import export

    family, _, run_dir, manifest = full_run
    export(run_dir, "dpo", tmp_path / "out", say=lambda *_: None)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(
        manifest["stages"]["dpo"]["outputs"]["model"]["path"], dtype=torch.float32
    )
    assert exported.config.tie_word_embeddings == replicas.FAMILIES[family].arch["tie_word_embeddings"]
    ids = torch.tensor([AutoTokenizer.from_pretrained(tmp_path / "out")("The answer is 5.")["input_ids"]])
    assert torch.equal(exported(ids).logits, original(ids).logits)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_a_4bit_base_then_export_merges_to_the_same_logits(family, tmp_path):
    """QLoRA sft -> dpo on every family; the exported (merged, full precision) DPO model equals base + adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.config import recipe_from_dict
    from pipeline.run import runner
    from pipeline.run.export import export

    recipe = recipe_from_dict(adapter_pipeline(family, write_family_data(tmp_path), quantization="4bit"))
    manifest = runner.run_pipeline(recipe, tmp_path / "run", say=lambda *_: None)
    ref = manifest["stages"]["dpo"]["outputs"]["model"]
    assert ref["kind"] == "adapter"
    export(tmp_path / "run", "dpo", tmp_path / "out", say=lambda *_: None)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(replicas.replica_path(ref["base"]), dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, ref["path"]).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert torch.allclose(exported(ids).logits, unmerged(ids).logits, atol=1e-4)
