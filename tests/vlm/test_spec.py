from pathlib import Path

import pytest
import yaml

from inference.vlm import ModelConfigError, ModelNotFoundError, list_models, load_model, resolve_model
from inference.vlm.engine import Platform


def test_missing_model_dir_names_path(tmp_path):
    with pytest.raises(ModelNotFoundError) as e:
        load_model("no-such-model", tmp_path)
    assert str(tmp_path / "no-such-model" / "model.yaml") in str(e.value)


def test_missing_weights_names_dir_and_expected_files(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.yaml").write_text(yaml.safe_dump({"family": "gemma3", "weights": "w"}))
    with pytest.raises(ModelNotFoundError) as e:
        load_model("m", tmp_path)
    msg = str(e.value)
    assert str(folder / "w") in msg and "config.json" in msg and "safetensors" in msg


def test_incomplete_weights_lists_missing_files(tmp_path):
    folder = tmp_path / "m"
    (folder / "w").mkdir(parents=True)
    (folder / "w" / "config.json").write_text("{}")
    (folder / "model.yaml").write_text(yaml.safe_dump({"family": "gemma3", "weights": "w"}))
    with pytest.raises(ModelNotFoundError, match=r"missing tokenizer\.json, \*\.safetensors"):
        resolve_model("m", tmp_path).require_weights()


@pytest.mark.parametrize(
    "doc, match",
    [({"weights": "w"}, "missing required field 'family'"),
     ({"family": "llama", "weights": "w"}, "family 'llama' unknown"),
     ({"family": "gemma3", "weights": "w", "dtype": "int4"}, "dtype 'int4' unknown"),
     ({"family": "gemma3", "weights": "w", "engine": {"profiles": {"v": {"min_batch": 4, "opt_batch": 2, "max_batch": 8}}}},
      "min_batch <= opt_batch")],
)
def test_bad_model_yaml(tmp_path, doc, match):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ModelConfigError, match=match):
        resolve_model("m", tmp_path)


def test_repository_models_parse():
    # The committed model.yaml files must stay loadable.
    root = Path(__file__).resolve().parents[2] / "models"
    names = {s.name: s for s in list_models(root, platform=Platform())}
    assert {"medgemma-4b-it", "qwen2.5-vl-3b-instruct", "qwen3-vl-4b-instruct"} <= set(names)
    assert names["qwen3-vl-4b-instruct"].family == "qwen3_vl"
    assert names["medgemma-4b-it"].family == "gemma3"


def test_list_models_readiness(models_root, tmp_path):
    broken = tmp_path / "root"
    broken.mkdir()
    for src in models_root.iterdir():
        (broken / src.name).symlink_to(src)
    (broken / "bad").mkdir()
    (broken / "bad" / "model.yaml").write_text("family: [")
    (broken / "absent").mkdir()
    (broken / "absent" / "model.yaml").write_text(yaml.safe_dump({"family": "gemma3", "weights": "/nonexistent/w"}))
    st = {s.name: s for s in list_models(broken, platform=Platform())}
    assert st["tiny-gemma3"].weights_present and not st["tiny-gemma3"].engine_ready
    assert "no CUDA GPU" in st["tiny-gemma3"].detail
    assert not st["absent"].weights_present and "/nonexistent/w" in st["absent"].detail
    assert "not valid YAML" in st["bad"].detail
