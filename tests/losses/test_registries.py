"""Loss families: one registry per signature; a name from the wrong family fails naming its family."""

import pytest

from posttrain.errors import ConfigError
from posttrain.losses import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    PAIR_LOSSES,
    POLICY_LOSSES,
    REWARD_MODEL_LOSSES,
    SELF_PLAY_LOSSES,
    SELF_PLAY_TARGETS,
)


def test_each_family_holds_its_members():
    assert PAIR_LOSSES.names() == ["dpo", "dpo_norm", "hinge", "ipo", "simpo", "wpo"]
    assert REWARD_MODEL_LOSSES.names() == ["bt", "gpm"]
    assert SELF_PLAY_LOSSES.names() == SELF_PLAY_TARGETS.names() == ["gpo", "sppo"]
    assert "grpo" in POLICY_LOSSES
    assert ADVANTAGE_ESTIMATORS.names() == ["centered", "standard"]
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]


@pytest.mark.parametrize(
    "family, name, other",
    [
        (PAIR_LOSSES, "bt", "reward-model loss"),
        (REWARD_MODEL_LOSSES, "dpo", "preference-pair loss"),
        (SELF_PLAY_LOSSES, "grpo", "policy-gradient loss"),
        (POLICY_LOSSES, "sppo", "self-play loss"),
    ],
)
def test_a_member_of_another_family_is_named_as_such(family, name, other):
    with pytest.raises(ConfigError) as error:
        family.get(name, "algo.loss")
    message = str(error.value)
    assert message.startswith(f"algo.loss={name!r}: {name!r} is a {other}, not a {family.kind}")
    assert all(member in message for member in family.names())


def test_an_unknown_name_lists_the_family():
    with pytest.raises(ConfigError, match=r"unknown KL estimator 'k4'; known names: k1, k2, k3"):
        KL_ESTIMATORS.get("k4")
