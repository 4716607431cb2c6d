"""Each Tülu 3 recipe's data path on the shipped fixtures (tests/fixtures/tulu3, the published formats): the recipe's
own data settings, its hub dataset swapped for the fixture of the same format; rows load, tokenise, and every RLVR
row gets a verifier and a ground truth its verifier accepts."""

from pathlib import Path

import pytest
from helpers import REPO, compose_config

from posttrain.data.loading import load_rows
from posttrain.data.preference import build_preference_examples, preference_texts
from posttrain.data.prompts import build_prompt_rows, drop_long_prompts
from posttrain.data.sft import build_sft_examples
from posttrain.models.tokenizer import train_tokenizer
from posttrain.rewards import VERIFIERS
from posttrain.rewards.reward import run_verifier

FIXTURES = REPO / "tests" / "fixtures" / "tulu3"
# every Tülu 3 recipe but the pipeline, which only chains the stage recipes tested here
RECIPES = sorted(path.stem for path in (REPO / "conf" / "recipe").glob("tulu3_*.yaml") if "pipeline" not in path.stem)
HUB_DATASETS = {  # what each recipe reads, and the fixture in that format
    "allenai/tulu-3-sft-mixture": "sft.jsonl",
    "allenai/llama-3.1-tulu-3-8b-preference-mixture": "preference.jsonl",
    "allenai/llama-3.1-tulu-3-70b-preference-mixture": "preference.jsonl",
    "allenai/RLVR-GSM-MATH-IF-Mixed-Constraints": "rlvr.jsonl",
}


def recipe_on_fixture(name: str, tmp_path: Path):
    cfg = compose_config([f"recipe={name}", f"run_dir={tmp_path}"])
    files = list(cfg.data.train_files)
    assert files and all(file in HUB_DATASETS for file in files), f"{name} reads {files}: add its format's fixture"
    cfg.data.train_files = [str(FIXTURES / HUB_DATASETS[file]) for file in files]
    return cfg


def texts_of(rows) -> list[str]:
    contents = preference_texts(rows)
    for row in rows:
        contents += [message["content"] for message in row.row.get("messages", [])]
    return contents


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_data_path_on_the_tulu3_fixtures(name, tmp_path):
    cfg = recipe_on_fixture(name, tmp_path)
    rows = load_rows(cfg.data, "train")
    tokenizer = train_tokenizer(texts_of(rows), vocab_size=512)
    if cfg.algo.name == "sft":
        examples, skipped = build_sft_examples(rows, tokenizer, cfg.data, "train")
        assert len(examples) == len(rows) and skipped.total() == 0
        assert all(example.num_target_tokens > 0 for example in examples)
    elif cfg.algo.name == "rlvr":
        prompts = build_prompt_rows(rows, True, VERIFIERS.names(), dict(cfg.data.verifier_map))
        kept = drop_long_prompts(prompts, tokenizer, cfg.data.max_length, "train")
        assert len(kept) == len(prompts) == len(rows)
        verifiers = {row.row["dataset"]: prompt.verifier for row, prompt in zip(rows, prompts)}
        assert verifiers == {"gsm8k": "gsm8k", "MATH": "math", "ifeval": "ifeval"}
        for prompt in prompts:  # each ground truth is one its verifier reads (a malformed one is an "error")
            assert run_verifier(VERIFIERS.get(prompt.verifier), "no answer", prompt.ground_truth)[1] == "ok"
    else:  # the preference recipes (DPO, reward model)
        pairs, skipped = build_preference_examples(rows, tokenizer, cfg.data, "train")
        assert len(pairs) == len(rows) and skipped.total() == 0
        assert all(pair.chosen.input_ids[: pair.prompt_length] == pair.rejected.input_ids[: pair.prompt_length]
                   for pair in pairs)  # fmt: skip
