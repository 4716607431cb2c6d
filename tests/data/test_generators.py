"""The task-generator registry lives in posttrain; generator packages are found through entry points."""

import subprocess
import sys

import pytest

from posttrain.data.generators import TASK_GENERATORS, generate_task
from posttrain.errors import ConfigError


def test_the_data_room_imports_no_generator_package():
    code = "import sys, posttrain.data.loading, posttrain.data.mixer; print('data_recipes' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_built_in_generators_are_found_through_the_entry_point():
    rows = generate_task("arithmetic", "train", 3, seed=0)
    assert len(rows) == 3 and {"arithmetic", "arithmetic_preference", "cyclic_preference", "game_moves"} <= set(
        TASK_GENERATORS.names()
    )


def test_an_unknown_generator_names_the_key_and_the_known_ones():
    with pytest.raises(ConfigError, match=r"data.generator='arithmetc': unknown task generator .*arithmetic"):
        generate_task("arithmetc", "train", 3, seed=0)
