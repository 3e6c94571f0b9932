"""Scoring: the trainer's fused forward gives each example the mean NLL of its loss tokens, equal to an independent
computation from the model's full logits; the callback writes one file per checkpoint; the offline scorer keys a
weaker reference with another tokenizer by the same ids."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer

from sftmix_trl.confidence import (
    ConfidenceCallback,
    read_scores,
    score_checkpoints,
    score_trainer,
)
from sftmix_trl.data.ids import add_example_ids, derive_example_id

import tiny

REPO = Path(__file__).resolve().parents[2]
# With the tiny tokenizer, prompts are 25 to 37 tokens long: at max_length=30 some examples keep part of their
# completion and the others are left fully masked, which TRL drops.
SHORT = 30


def loss_tokens(tokenizer, example: dict, max_length: int | None) -> tuple[list[int], list[bool]]:
    """The token ids of an example and which of them are loss tokens, from the tokenizer alone (not from TRL)."""
    if "messages" in example:
        out = tokenizer.apply_chat_template(example["messages"], return_dict=True, return_assistant_tokens_mask=True)
        ids, is_loss = out["input_ids"], [bool(m) for m in out["assistant_masks"]]
    else:
        ids = tokenizer(example["prompt"] + example["completion"] + tokenizer.eos_token)["input_ids"]
        num_prompt = len(tokenizer(example["prompt"])["input_ids"])
        is_loss = [position >= num_prompt for position in range(len(ids))]
    return ids[:max_length], is_loss[:max_length]


def reference_nll(model, tokenizer, example: dict, max_length: int | None) -> tuple[float, int]:
    """Mean NLL over the loss tokens from the model's full logits: log_softmax, then gather the next token."""
    ids, is_loss = loss_tokens(tokenizer, example, max_length)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    terms = [-log_probs[t - 1, ids[t]].item() for t in range(1, len(ids)) if is_loss[t]]
    return (sum(terms) / len(terms) if terms else math.nan), len(terms)


def sft_config(tmp_path, **overrides) -> SFTConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=3,
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    return SFTConfig(**{**defaults, **overrides})


def assert_scores_match_reference(records, model, tokenizer, dataset, max_length):
    by_id = {record["id"]: record for record in records}
    kept = dropped = 0
    for example in dataset:
        nll, count = reference_nll(model, tokenizer, example, max_length)
        if count == 0:
            assert example["id"] not in by_id or by_id[example["id"]]["ppl"] is None
            dropped += 1
            continue
        record = by_id[example["id"]]
        assert record["num_tokens"] == count
        assert record["nll"] == pytest.approx(nll, rel=1e-5, abs=1e-6)
        assert record["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
        kept += 1
    return kept, dropped


@pytest.mark.parametrize(
    "make_dataset, max_length, extra",
    [
        (tiny.prompt_completion_dataset, None, {}),
        (tiny.prompt_completion_dataset, SHORT, {}),
        (tiny.messages_dataset, None, {"assistant_only_loss": True}),
        (tiny.prompt_completion_dataset, None, {"padding_free": True}),
    ],
    ids=["completion", "completion-truncated", "assistant-only", "padding-free"],
)
def test_scores_equal_full_logits_reference(tokenizer, llama, tmp_path, make_dataset, max_length, extra):
    dataset = make_dataset(13)
    trainer = SFTTrainer(
        model=llama,
        args=sft_config(tmp_path, max_length=max_length, **extra),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    llama.train()
    trainer_forward = llama.forward
    records = score_trainer(trainer, show_progress=False)
    assert llama.training and llama.forward == trainer_forward  # mode and the trainer's fused forward given back
    assert [r["id"] for r in records] == trainer.train_dataset["id"]  # the prepared dataset's order
    kept, dropped = assert_scores_match_reference(records, llama, tokenizer, dataset, max_length)
    if max_length == SHORT:
        # TRL dropped the fully masked examples, shifting positions: the scores still land on the right ids
        assert kept > 0 and dropped > 0 and len(records) == kept


def test_scoring_refuses_what_it_cannot_key_by_id(tokenizer, llama, tmp_path):
    no_ids = tiny.prompt_completion_dataset(8).remove_columns("id")
    trainer = SFTTrainer(model=llama, args=sft_config(tmp_path), train_dataset=no_ids, processing_class=tokenizer)
    with pytest.raises(ValueError, match="has no 'id' column.*add_example_ids"):
        ConfidenceCallback(trainer)
    packed = SFTTrainer(
        model=llama,
        args=sft_config(tmp_path, packing=True, max_length=64),
        train_dataset=tiny.prompt_completion_dataset(8),
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match="packing=True"):
        score_trainer(packed)
    same_id = tiny.prompt_completion_dataset(4).map(lambda _: {"id": "same"})
    trainer = SFTTrainer(model=llama, args=sft_config(tmp_path), train_dataset=same_id, processing_class=tokenizer)
    with pytest.raises(ValueError, match="share the id 'same' but differ in content"):
        score_trainer(trainer)


def test_identical_examples_are_scored_once_per_id(tokenizer, llama, tmp_path):
    raw = tiny.prompt_completion_dataset(3)
    repeated = raw.select([0, 1, 0, 2, 1])
    trainer = SFTTrainer(model=llama, args=sft_config(tmp_path), train_dataset=repeated, processing_class=tokenizer)
    records = score_trainer(trainer, show_progress=False)
    assert [record["id"] for record in records] == ["ex-0000", "ex-0001", "ex-0002"]
    alone = SFTTrainer(model=llama, args=sft_config(tmp_path), train_dataset=raw, processing_class=tokenizer)
    assert records == score_trainer(alone, show_progress=False)


def test_add_example_ids_derives_from_raw_content():
    raw = tiny.prompt_completion_dataset(5).remove_columns("id")
    with_ids = add_example_ids(raw)
    assert with_ids["id"] == [derive_example_id(example) for example in raw]
    assert add_example_ids(with_ids)["id"] == with_ids["id"]  # an existing column is kept
    repeated = add_example_ids(raw.select([0, 1, 0]))["id"]
    assert repeated[0] == repeated[2] != repeated[1], "identical examples share their derived id"
    with pytest.raises(ValueError, match="share the id 'x' but differ in content"):
        add_example_ids(raw.add_column("id", ["x", "x", "y", "z", "w"]))


def test_callback_scores_each_checkpoint_once_with_its_own_weights(tokenizer, llama, tmp_path):
    dataset = tiny.prompt_completion_dataset(16)
    args = sft_config(tmp_path, max_steps=6, save_steps=2, learning_rate=3e-3, logging_steps=100)
    trainer = SFTTrainer(model=llama, args=args, train_dataset=dataset, processing_class=tokenizer)
    callback = ConfidenceCallback(trainer, dataset_name="tiny")
    trainer.add_callback(callback)
    trainer.train()

    scores_dir = tmp_path / "confidence_scores"
    names = [f"{PREFIX_CHECKPOINT_DIR}-{step}" for step in (2, 4, 6)]
    assert sorted(p.name for p in scores_dir.glob("*.jsonl")) == sorted(f"{n}.jsonl" for n in names)
    assert callback.written == [scores_dir / f"{n}.jsonl" for n in names]
    previous = None
    for name in names:
        records, metadata = read_scores(scores_dir / f"{name}.jsonl")
        assert metadata["global_step"] == int(name.split("-")[1]) and metadata["dataset"] == "tiny"
        assert sorted(r["id"] for r in records) == sorted(dataset["id"])
        checkpoint = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert_scores_match_reference(records, checkpoint, tokenizer, dataset.select(range(4)), None)
        ppl = [r["ppl"] for r in records]
        assert ppl != previous  # the model changed between checkpoints
        previous = ppl

    # a resumed run that saves step 4 again skips it
    before = (scores_dir / f"{names[1]}.jsonl").stat().st_mtime_ns
    trainer.state.global_step = 4
    callback.on_save(trainer.args, trainer.state, trainer.control)
    assert (scores_dir / f"{names[1]}.jsonl").stat().st_mtime_ns == before
    assert len(callback.written) == 3


def test_weaker_reference_with_another_tokenizer_keys_by_the_same_ids(tokenizer, llama_dir, tmp_path):
    other_tokenizer = tiny.build_tokenizer(vocab_size=400)
    assert len(other_tokenizer) != len(tokenizer)
    reference_dir = tmp_path / "weak-qwen2"
    reference = tiny.build_qwen2(other_tokenizer, hidden_size=32, num_layers=1)
    reference.save_pretrained(reference_dir)
    other_tokenizer.save_pretrained(reference_dir)
    # no id column: ids are derived from the raw content (numbered, since the tiny data repeats examples)
    dataset = tiny.prompt_completion_dataset(12).remove_columns("id")
    dataset = dataset.map(lambda example, i: {"prompt": f"{i}. {example['prompt']}"}, with_indices=True)

    paths = score_checkpoints(
        [llama_dir, reference_dir], dataset, tmp_path / "scores", args=sft_config(tmp_path, max_length=SHORT)
    )
    expected_ids = add_example_ids(dataset)["id"]
    for path, model_dir in zip(paths, (llama_dir, reference_dir)):
        records, metadata = read_scores(path)
        # every raw example that TRL's preparation keeps for this model, in the raw order; the others are named
        assert [r["id"] for r in records] + metadata["left_out_ids"] == sorted(
            expected_ids, key=lambda i: (i in metadata["left_out_ids"], expected_ids.index(i))
        )
        assert all(r["num_tokens"] > 0 for r in records) and metadata["unscorable_ids"] == []
        # what the scorer used: the tokenizer saved with the model, as AutoTokenizer loads it
        model_tokenizer = AutoTokenizer.from_pretrained(model_dir)
        with_ids = add_example_ids(dataset)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        kept, dropped = assert_scores_match_reference(records, model, model_tokenizer, with_ids, SHORT)
        assert kept == len(records) > 0 and dropped == len(metadata["left_out_ids"])

    # scored again with the same settings: the files are kept (resume); other data in the same folder is refused
    mtimes = [p.stat().st_mtime_ns for p in paths]
    again = score_checkpoints(
        [llama_dir, reference_dir], dataset, tmp_path / "scores", args=sft_config(tmp_path, max_length=SHORT)
    )
    assert again == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    with pytest.raises(FileExistsError, match="other examples.*overwrite"):
        score_checkpoints([llama_dir], dataset.select(range(5)), tmp_path / "scores")


def test_offline_scorer_refuses_bad_checkpoints_before_scoring(llama_dir, tmp_path):
    dataset = tiny.prompt_completion_dataset(4)
    with pytest.raises(ValueError, match="No checkpoints to score"):
        score_checkpoints([], dataset, tmp_path / "scores")
    with pytest.raises(ValueError, match="cannot be loaded.*save_pretrained"):
        score_checkpoints([llama_dir, tmp_path / "missing-checkpoint"], dataset, tmp_path / "scores")
    assert not (tmp_path / "scores").exists()  # nothing scored before the bad path was found
    with pytest.raises(ValueError, match="same score file"):
        score_checkpoints([llama_dir, Path(str(llama_dir) + "/")], dataset, tmp_path / "scores")
    # a config without weights passes the first check and fails at loading: the scores already written stay
    broken = tmp_path / "checkpoint-broken"
    broken.mkdir()
    (broken / "config.json").write_text((Path(llama_dir) / "config.json").read_text())
    with pytest.raises(ValueError, match="checkpoint-broken.*cannot be loaded for scoring.*kept in"):
        score_checkpoints([llama_dir, broken], dataset, tmp_path / "scores")
    assert read_scores(tmp_path / "scores" / f"{Path(llama_dir).name}.jsonl")[1]["num_examples"] == 4


@pytest.mark.slow
def test_two_process_run_writes_one_file_with_every_example(tmp_path, llama_dir):
    """`accelerate launch` with two CPU processes: each scores a shard, the main process writes one file."""
    script = tmp_path / "score.py"
    script.write_text(
        "import sys\n"
        "from trl import SFTConfig, SFTTrainer\n"
        "import tiny\n"
        "from sftmix_trl.confidence import score_checkpoints\n"
        "args = SFTConfig(output_dir=sys.argv[2], per_device_eval_batch_size=2, report_to='none', use_cpu=True,"
        " bf16=False)\n"
        "score_checkpoints([sys.argv[1]], tiny.prompt_completion_dataset(11), sys.argv[2], args=args)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", str(script)]
        + [str(llama_dir), str(tmp_path / "ddp")],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    single = score_checkpoints(
        [llama_dir],
        tiny.prompt_completion_dataset(11),
        tmp_path / "single",
        args=sft_config(tmp_path, per_device_eval_batch_size=5),
    )
    (ddp_file,) = (tmp_path / "ddp").glob("*.jsonl")
    ddp_records, _ = read_scores(ddp_file)
    single_records, _ = read_scores(single[0])
    assert [r["id"] for r in ddp_records] == [r["id"] for r in single_records]
    for ddp, one in zip(ddp_records, single_records):
        assert ddp["num_tokens"] == one["num_tokens"]
        assert ddp["nll"] == pytest.approx(one["nll"], rel=1e-5)
    assert json.loads(ddp_file.with_suffix(".json").read_text())["num_examples"] == 11


def test_weaker_reference_scores_feed_sftmix_trainer(tokenizer, llama, tmp_path):
    """Step 1 with a weaker reference (another tokenizer), step 2 with the target: SFTMixTrainer takes the aggregated
    file and joins it by the ids both derive from the raw content."""
    # from the submodules: under pytest, `tests/sftmix_trl/` shadows the package's top level (a namespace package)
    from sftmix_trl.confidence import aggregate_scores
    from sftmix_trl.config import SFTMixConfig
    from sftmix_trl.trainer import SFTMixTrainer

    other_tokenizer = tiny.build_tokenizer(vocab_size=400)
    reference_dir = tmp_path / "weak-qwen2"
    tiny.build_qwen2(other_tokenizer, hidden_size=32, num_layers=1).save_pretrained(reference_dir)
    other_tokenizer.save_pretrained(reference_dir)
    dataset = tiny.prompt_completion_dataset(12).remove_columns("id")
    dataset = dataset.map(lambda example, i: {"prompt": f"{i}. {example['prompt']}"}, with_indices=True)

    score_checkpoints([reference_dir], dataset, tmp_path / "scores", args=sft_config(tmp_path))
    aggregate_scores([tmp_path / "scores"]).save(tmp_path / "confidence")
    args = SFTMixConfig(
        output_dir=str(tmp_path / "target"), per_device_train_batch_size=4, report_to="none", use_cpu=True, bf16=False
    )
    trainer = SFTMixTrainer(
        model=llama,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        confidence_scores=tmp_path / "confidence",  # the aggregate folder as it is
    )
    split = trainer.confidence_split
    assert len(split.confident) == len(split.unconfident) == 6


def test_callback_and_offline_scorer_write_the_same_records_when_preparation_drops_rows(tokenizer, llama, tmp_path):
    """One rule in both scorers: a row TRL's preparation drops (no loss token left after truncation) gets no record, so
    the training-time scorer and `score_checkpoints` write the same ids for the same data, and aggregate together."""
    from sftmix_trl.confidence import aggregate_scores

    dataset = tiny.prompt_completion_dataset(12)
    args = sft_config(tmp_path, max_length=SHORT, max_steps=2, save_steps=2, logging_steps=100)
    trainer = SFTTrainer(model=llama, args=args, train_dataset=dataset, processing_class=tokenizer)
    kept = trainer.train_dataset["id"]
    assert 0 < len(kept) < len(dataset)
    trainer.add_callback(ConfidenceCallback(trainer))
    trainer.train()
    during_training = tmp_path / "confidence_scores" / "checkpoint-2.jsonl"
    callback_records, _ = read_scores(during_training)

    (offline,) = score_checkpoints(
        [tmp_path / "checkpoint-2"], dataset, tmp_path / "offline", args=sft_config(tmp_path, max_length=SHORT)
    )
    offline_records, metadata = read_scores(offline)
    assert [r["id"] for r in offline_records] == [r["id"] for r in callback_records] == kept
    assert metadata["left_out_ids"] == [i for i in dataset["id"] if i not in set(kept)]
    for a, b in zip(offline_records, callback_records):
        assert a["num_tokens"] == b["num_tokens"] > 0 and a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)
    assert sorted(aggregate_scores([during_training, offline]).dataset["id"]) == sorted(kept)


def test_score_files_of_another_format_are_refused_with_what_to_do(tmp_path):
    from sftmix_trl.confidence.scoring import make_record, metadata_path, write_scores

    record = make_record("a", 1.0, 2, prob_sum=1.0, top1_sum=1)
    path = tmp_path / "checkpoint-1.jsonl"
    write_scores([record], path, {"format_version": 2})
    with pytest.raises(ValueError, match=r"score format 2, which this sftmix-trl does not read \(it reads format 3\)"):
        read_scores(path)
    # records without the fields of format 3 (no gold-token probability), and no sidecar to say which format
    metadata_path(path).unlink()
    path.write_text(json.dumps({key: record[key] for key in ("id", "num_tokens", "nll", "ppl")}) + "\n")
    with pytest.raises(
        ValueError, match=r"checkpoint-1.jsonl:1 is not a score record \(needs \['accuracy', 'id',.*rescore"
    ):
        read_scores(path)
