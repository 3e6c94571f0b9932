from sftmix_trl.data.ids import derive_example_id


def test_derived_id_is_stable_and_ignores_scores():
    example = {"prompt": "Add 1 and 2.", "completion": "3"}
    assert derive_example_id(example) == derive_example_id({"completion": "3", "prompt": "Add 1 and 2."})
    assert derive_example_id(example) == derive_example_id({**example, "confidence": -3.5})
    assert derive_example_id(example) != derive_example_id({**example, "completion": "4"})
