"""TRL-style arguments of the recipe and the `sftmix` commands: parsed from a YAML config and the command line, an
unknown field or a value of the wrong type refused by name, and the errors both entry points show as one message."""

import dataclasses
import difflib
import types
import typing

# Errors that say what is wrong with the input: shown as one message, without a traceback.
INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError)


def parse_arguments(parser, argv: list[str] | None) -> tuple:
    """`parser`'s dataclasses from a YAML config (`--config`) and the command line. An unknown field, in either, is a
    `ValueError` that names it and suggests the closest known fields; a value of the wrong type (a YAML list where a
    number goes, ...) is one that names the field."""
    *parsed, from_config, from_command_line = parser.parse_args_and_config(
        args=argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    # the config's leftovers come as ["--key", "value", ...]; the command line's as argparse left them
    config = argv[argv.index("--config") + 1] if argv and "--config" in argv[:-1] else "the config file"
    unknown = [(config, key) for key in from_config[::2]]
    unknown += [("the command line", item) for item in from_command_line if item.startswith("-")]
    if from_command_line and not unknown:
        unknown = [("the command line", from_command_line[0])]
    if unknown:
        known = sorted({action.dest for action in parser._actions if action.dest != "help"})
        problems = []
        for where, item in unknown:
            name = item.lstrip("-").split("=")[0]
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            problems.append(f"{name!r} in {where}{hint}")
        raise ValueError(
            f"Unknown argument(s): {'; '.join(problems)}. `--help` lists the fields {parser.prog or 'it'} takes."
        )
    for instance in parsed:
        check_field_types(instance)
    return tuple(parsed)


def check_field_types(instance) -> None:
    """Every field of a parsed dataclass holds a value of its declared type (a YAML config's values are set as they
    are, not converted, so `learning_rate: [1]` or `per_device_train_batch_size: 2.5` would otherwise fail deep in
    the library that reads them). Fields of other types than str, int, float, bool, their optionals and `list[str]`
    are left to their dataclass."""
    try:
        hints = typing.get_type_hints(type(instance))
    except Exception:  # an annotation that cannot be resolved: nothing to check against
        return
    for field_ in dataclasses.fields(instance):
        expected = _expected_type(hints.get(field_.name), getattr(instance, field_.name))
        if expected is not None:
            raise TypeError(
                f"`{field_.name}` must be {expected}, got {getattr(instance, field_.name)!r} "
                f"({type(getattr(instance, field_.name)).__name__}): fix its value in the config file or on the "
                "command line."
            )


# declared type -> (the types its values may have, how to name it)
SIMPLE_TYPES = {str: ((str,), "a string"), int: ((int,), "an integer"), float: ((int, float), "a number"),
                bool: ((bool,), "true or false")}  # fmt: skip


def _expected_type(hint, value) -> str | None:
    """What `value` should be, when it is not of the declared type `hint` (None when it is, or cannot be told)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if value is None or len(rest) != 1:
            return None
        hint = rest[0]
    if hint in SIMPLE_TYPES:
        accepted, name = SIMPLE_TYPES[hint]
        is_bool_as_number = hint is not bool and isinstance(value, bool)
        return name if is_bool_as_number or not isinstance(value, accepted) else None
    # one string stands for a list of one (TRL turns a one-element `lora_target_modules` into its string)
    is_strings = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    if typing.get_origin(hint) is list and typing.get_args(hint) == (str,) and not is_strings:
        return "a list of strings"
    return None
