"""The Hugging Face integration checks its inputs when built, naming what is missing and what is there: SFTGOTrainer
(its collator, the datasets' columns, the groups, the tokenizer), SFTGOCollator (its arguments; a sample without a
column) and load_shards (the tokenizer)."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoModelForCausalLM, DataCollatorWithPadding, TrainingArguments

from sftgo.core.errors import ConfigError
from sftgo.core.shards import ShardError
from sftgo.trainer.hf import SFTGOCollator, SFTGOTrainer, load_shards


@pytest.fixture(scope="module")
def parts(shared_shard_dir, tiny_model_dir, tokenizer, tmp_path_factory):
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("hf")), max_steps=1, report_to=[], use_cpu=True)
    return {
        "model": AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        "args": args,
        "grouped": load_shards(str(shared_shard_dir)),
        "plain": load_shards(str(shared_shard_dir), groups=None),
        "tokenizer": tokenizer,
    }


def build(parts, **kw):
    kw = {
        "model": parts["model"],
        "args": parts["args"],
        "train_dataset": parts["grouped"],
        "data_collator": SFTGOCollator(0, groups="tfidf"),
        **kw,
    }
    return SFTGOTrainer(**kw)


def test_a_dataset_without_the_group_column_is_refused_when_built(parts):
    with pytest.raises(
        ConfigError,
        match=r"train_dataset has no column group_tfidf \(it has: id, input_ids, "
        r"loss_mask\); load it with load_shards",
    ):
        build(parts, train_dataset=parts["plain"])
    with pytest.raises(ConfigError, match=r"extra has no column group_tfidf"):
        build(parts, eval_dataset={"extra": parts["plain"]})


def test_another_collator_or_none_for_an_objective_with_groups_is_refused(parts, tokenizer):
    with pytest.raises(ConfigError, match="needs data_collator=SFTGOCollator.*got DataCollatorWithPadding"):
        build(parts, data_collator=DataCollatorWithPadding(tokenizer))
    with pytest.raises(ConfigError, match="objective=sftgo needs groups: give SFTGOCollator"):
        build(parts, data_collator=SFTGOCollator(0, groups=None))
    build(parts, data_collator=SFTGOCollator(0, groups=None), train_dataset=parts["plain"], objective="sft")


def test_collator_groups_other_than_the_shards_are_refused(parts):
    with pytest.raises(ConfigError, match=r"train_dataset has no column group_reference"):
        build(parts, data_collator=SFTGOCollator(0, groups="reference"))


def test_a_tokenizer_of_another_vocabulary_is_refused(parts, shared_shard_dir):
    other = copy.deepcopy(parts["tokenizer"])
    other.add_tokens(["<an-extra-token>"])
    with pytest.raises(ConfigError, match="were tokenized with another vocabulary than processing_class"):
        build(parts, processing_class=other)
    with pytest.raises(ShardError, match="whose vocabulary differs from this model's tokenizer"):
        load_shards(str(shared_shard_dir), tokenizer=other)
    assert len(load_shards(str(shared_shard_dir), tokenizer=parts["tokenizer"])) == len(parts["grouped"])


@pytest.mark.parametrize(
    "kw",
    [
        {"pad_token_id": "0"},
        {"pad_token_id": True},
        {"pad_token_id": -1},
        {"groups": 3},
        {"groups": ""},
        {"pack": "yes"},
        {"max_length": 1.5},
    ],
)
def test_collator_arguments_are_checked(kw):
    with pytest.raises(ConfigError, match=f"SFTGOCollator: {next(iter(kw))}="):
        SFTGOCollator(**{"pad_token_id": 0, **kw})


def test_a_sample_without_a_column_names_what_is_there(parts):
    row = parts["plain"][0]
    with pytest.raises(ShardError, match=r"a sample has no group_tfidf \(it has: id, input_ids, loss_mask\)"):
        SFTGOCollator(0, groups="tfidf")([row])
