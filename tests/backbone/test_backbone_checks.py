"""Steps and blocks are checked by one definition (spec.check_steps / check_blocks), wherever
they come from: a config, a reference ddpm.json, extract, the ADM and diffusers backbones."""

from __future__ import annotations

import numpy as np
import pytest

from ddpmseg.config import Config
from ddpmseg.core.errors import ConfigError
from ddpmseg.spec import check_blocks, check_steps


def test_check_steps_and_blocks():
    assert check_steps([50, 150], 1000) == (50, 150)
    assert check_steps(np.array([[3], [4]])) == (3, 4) and check_steps(7) == (7,)
    assert check_blocks(["up1", "5", np.int64(2)]) == ("up1", 5, 2)
    for bad, match in (([], "no steps given"), ([1, 1], "repeat a value"),
                       ([1000], "step 1000 is out of range: this model's steps are 0..999"),
                       ([-1], "step -1 is out of range"), (["5"], "must be integers"),
                       ([True], "must be integers"), ([1.5], "must be integers")):
        with pytest.raises(ConfigError, match=match):
            check_steps(bad, 1000)
    with pytest.raises(ConfigError, match="must be integers"):
        check_blocks(["up1"], 12, names=False)
    with pytest.raises(ConfigError) as info:
        check_blocks([12], 12, names=False, hint="use 0..11", where="[features]")
    assert str(info.value) == ("[features].blocks: block 12 is out of range: this model's "
                               "blocks are 0..11; use 0..11")


@pytest.mark.parametrize("features, match", [
    ({"blocks": (5, 5)}, r"\[features\].blocks: blocks repeat a value"),
    ({"blocks": ()}, r"\[features\].blocks: no blocks given"),
    ({"steps": (10, 10)}, r"\[features\].steps: steps repeat a value"),
    ({"blocks": (-1,)}, r"\[features\].blocks: block -1 is out of range"),
])
def test_a_config_refuses_what_no_backbone_takes(features, match):
    # Before, a config kept repeated or negative blocks until extract (or a backbone) refused.
    with pytest.raises(ConfigError, match=match):
        Config().replace(features=features)
