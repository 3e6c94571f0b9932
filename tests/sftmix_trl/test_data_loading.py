import json

import pytest
from datasets import Dataset

from sftmix_trl.data.loading import drop_duplicate_examples


def test_duplicates_are_dropped_keeping_the_first():
    dataset = Dataset.from_list([{"prompt": p, "completion": "x"} for p in ("a", "b", "a", "c", "b")])
    assert drop_duplicate_examples(dataset)["prompt"] == ["a", "b", "c"]


def test_an_empty_or_malformed_data_file_is_named(tmp_path):
    from sftmix_trl.data.loading import load_raw_dataset

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"The data file .*empty.jsonl is empty: it holds no example"):
        load_raw_dataset(str(tmp_path / "empty.jsonl"))
    (tmp_path / "cut.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "compl\n')
    with pytest.raises(
        ValueError, match=r"Cannot read .*cut.jsonl as a .jsonl data file \(.*\). Check that every line"
    ):
        load_raw_dataset(str(tmp_path / "cut.jsonl"))


def test_the_recipe_and_the_commands_load_the_same_examples_with_the_same_ids(tmp_path):
    from sftmix_trl.cli import DatasetArguments
    from sftmix_trl.cli import load_examples as command_examples
    from sftmix_trl.recipe import RecipeArguments, load_train_dataset

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"Say {w}.", "input": "", "output": w} for w in "abc"]))
    chats = tmp_path / "chats.jsonl"
    turns = [[{"role": "user", "content": f"q{t}"}, {"role": "assistant", "content": f"a{t}"}] for t in range(3)]
    chats.write_text("\n".join(json.dumps({"messages": sum(turns[: k + 1], [])}) for k in range(3)) + "\n")
    loaded = {}
    for path, data_format in ((alpaca, "auto"), (alpaca, "alpaca"), (chats, "auto"), (chats, "multiturn")):
        recipe = load_train_dataset(RecipeArguments(dataset_name=str(path), dataset_format=data_format))
        command = command_examples(DatasetArguments(dataset_name=str(path), dataset_format=data_format))
        assert recipe.to_list() == command.to_list(), (path.name, data_format)
        loaded[path.name, data_format] = recipe
    # "auto" converts rows with Alpaca's columns as "alpaca" does, and keeps conversations as they are
    assert loaded["alpaca.json", "auto"].to_list() == loaded["alpaca.json", "alpaca"].to_list()
    assert loaded["chats.jsonl", "auto"].column_names == ["messages", "id"]
    # "multiturn": a conversation of k assistant turns is k examples, each id the conversation's with its turn
    expanded = loaded["chats.jsonl", "multiturn"]
    assert len(expanded) == 1 + 2 + 3 and len(set(expanded["id"])) == 6
    assert [example_id.rsplit("-", 1)[1] for example_id in expanded["id"]] == ["1", "1", "2", "1", "2", "3"]


def test_an_unknown_dataset_format_is_refused():
    from sftmix_trl.data import load_examples

    with pytest.raises(ValueError, match=r"The dataset format must be one of \('auto', 'alpaca', 'multiturn'\)"):
        load_examples("data.jsonl", data_format="sharegpt")
