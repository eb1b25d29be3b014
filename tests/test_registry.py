"""Stage registries: user code registers and builds stages by name, exactly as built-ins."""

from typing import Any

import pytest

from fedloom.registry import AGGREGATORS, CLIENT_ALGORITHMS, Registry, UnknownStageError


def test_register_then_create_passes_the_arguments_through() -> None:
    reg: Registry[Any] = Registry("widget")

    @reg.register("pair")
    def make_pair(a: int, *, b: int) -> tuple[int, int]:
        return (a, b)

    assert make_pair(0, b=1) == (0, 1)  # the decorator returns the factory unchanged
    assert reg.create("pair", 2, b=3) == (2, 3)
    assert reg.get("pair") is make_pair
    reg.add("triple", lambda: 3)
    assert reg.create("triple") == 3
    assert "pair" in reg and "nothing" not in reg
    assert set(reg.names()) >= {"pair", "triple"}


def test_unknown_name_is_one_line_naming_the_kind_and_the_registered() -> None:
    reg: Registry[Any] = Registry("widget")
    reg.add("alpha", lambda: 1)
    reg.add("beta", lambda: 2)
    with pytest.raises(UnknownStageError) as err:
        reg.create("gamma")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == "unknown widget 'gamma'; registered: alpha, beta"
    assert isinstance(err.value, KeyError)  # callers catching KeyError still work


def test_a_taken_name_is_refused_unless_replace() -> None:
    reg: Registry[Any] = Registry("widget")
    reg.add("alpha", lambda: 1)
    with pytest.raises(ValueError, match="a widget named 'alpha' is already registered"):
        reg.add("alpha", lambda: 2)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha")(lambda: 3)
    assert reg.create("alpha") == 1  # the refused registration changed nothing
    reg.add("alpha", lambda: 4, replace=True)
    assert reg.create("alpha") == 4


def test_builtins_are_registered_on_first_lookup_and_cannot_be_shadowed() -> None:
    assert {"sgd", "dp-sgd"} <= set(CLIENT_ALGORITHMS.names())
    assert "mean" in AGGREGATORS
    with pytest.raises(ValueError, match="already registered"):
        AGGREGATORS.add("mean", lambda settings, context: None)
