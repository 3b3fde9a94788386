"""References matched by the configured model's vision encoder (references.descriptor), a tiny random
Gemma 3 built in the fixture; the thumbnail where the query and a reference have no common encoder."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.config import Settings
from dicom_node.references import Library, ReferenceQuery, query_for, select_references
from dicom_node.references.encoder import EncoderUnavailable, encoder_for
from inference.pixels import image_from_dataset
from inference.reference_phantoms import make_normal_library, make_query
from inference.vlm.engine import weights_fingerprint
from inference.vlm.spec import resolve_model
from inference.vlm.tiny import write_tiny_model
from inference.vlm.vision_descriptor import VisionEncoderDescriptor

SIZE = 160
KEYS = ("PatientSex", "PatientBirthDate", "StudyDate")


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder-models")
    write_tiny_model(root, "gemma3")
    return root


def settings(models_root: Path, **references) -> Settings:
    return Settings(vlm_model="tiny-gemma3", vlm_backend="torch", models_root=models_root,
                    references={"descriptor": "auto", **references})


def _write(ds, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _query(ds, encoder=None):
    return query_for(image_from_dataset(ds), {k: str(ds.get(k, "")) for k in KEYS}, encoder)


def test_the_embedding_is_the_models_own_and_names_it(models_root):
    spec = resolve_model("tiny-gemma3", models_root)
    encoder = VisionEncoderDescriptor(spec)
    image = image_from_dataset(make_normal_library(1, SIZE)[0])
    vector = encoder(image)
    assert vector.shape == (encoder.model.config.text_config.hidden_size,)  # the projector's output
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5) and abs(vector.mean()) < 1e-5
    assert np.array_equal(vector, encoder(image))
    # the kind names model, adapter and weights: other weights are never compared with these
    assert encoder.kind == f"vision:tiny-gemma3:gemma3-1:{weights_fingerprint(spec.weights_dir)[:12]}"
    assert not np.allclose(vector, encoder(image_from_dataset(make_normal_library(2, SIZE)[1])))
    assert encoder.model.model.language_model is None  # only the vision part is kept


def test_a_half_precision_checkpoint_loads_at_its_width_and_embeds_as_a_float32_load(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    from inference.vlm.adapters.base import Adapter
    from inference.vlm.vision_descriptor import stored_dtype

    write_tiny_model(tmp_path, "gemma3")
    spec = resolve_model("tiny-gemma3", tmp_path)
    [weights] = spec.require_weights().glob("*.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    assert stored_dtype(spec.require_weights()) == "bfloat16"

    widths = []
    real_load = Adapter.load_model
    monkeypatch.setattr(Adapter, "load_model", lambda self, device="cpu", dtype=None: widths.append(dtype) or real_load(self, device, dtype))
    encoder = VisionEncoderDescriptor(spec)
    assert widths == ["bfloat16"]  # the whole model is never held as float32
    assert {p.dtype for p in encoder.model.parameters()} == {torch.float32}
    monkeypatch.setattr(Adapter, "load_model", real_load)

    as_float32 = VisionEncoderDescriptor(spec)  # the old way: the whole model loaded as float32
    as_float32.model = as_float32.adapter.load_model("cpu", "float32")
    image = image_from_dataset(make_normal_library(1, SIZE)[0])
    assert np.array_equal(encoder(image), as_float32(image))  # widening bfloat16 is exact


def test_library_and_query_carry_the_encoder_and_selection_uses_it(models_root, tmp_path):
    encoder = encoder_for(settings(models_root))
    assert encoder is not None and encoder is encoder_for(settings(models_root))  # loaded once
    lib = Library(tmp_path / "lib")
    normals = [_write(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate(make_normal_library(4, SIZE))]
    lib.add(normals, attested_normal=True, encoder=encoder)
    records = lib.records()
    assert {r.encoder_kind for r in records} == {encoder.kind}
    assert all(len(r.encoder_descriptor) == 64 and len(r.descriptor) == 32 * 32 for r in records)
    q = make_query(0, 14.0, SIZE).dataset

    by_encoder = select_references(records, _query(q, encoder), 4).chosen
    assert all("vision-encoder (tiny-gemma3) similarity" in c.why for c in by_encoder)
    query = _query(q, encoder)
    for c in by_encoder:
        assert c.similarity == pytest.approx(float(np.dot(query.encoder_descriptor, c.record.encoder_descriptor)), abs=1e-3)
    by_thumbnail = select_references(records, _query(q), 4).chosen
    assert all("; thumbnail similarity" in c.why for c in by_thumbnail)

    # A library imported without the model (or with another): the thumbnail, and the why says so.
    plain = [replace(r, encoder_kind="", encoder_descriptor=[]) for r in records]
    fallback = select_references(plain, _query(q, encoder), 4).chosen
    assert all("thumbnail (no tiny-gemma3 embedding stored) similarity" in c.why for c in fallback)
    assert [c.record.sop_instance_uid for c in fallback] == [c.record.sop_instance_uid for c in by_thumbnail]


def test_the_encoder_decides_the_ranking_where_both_have_one():
    def record(uid: str, thumb: list[float], emb: list[float]):
        from dicom_node.references.library import ReferenceRecord

        return ReferenceRecord(uid, "1.2", "", "", f"{uid}.dcm", "DX", "CHEST", "PA", "", "M", "40-49",
                               "thumb32-v1", thumb, encoder_kind="vision:m:1:abc", encoder_descriptor=emb)

    looks_alike, embeds_alike = record("1.1", [1.0, 0.0], [0.0, 1.0]), record("1.2", [0.0, 1.0], [1.0, 0.0])
    query = ReferenceQuery("DX", "CHEST", "PA", "", "M", "40-49", "thumb32-v1", (1.0, 0.0),
                           "vision:m:1:abc", (1.0, 0.0))
    assert select_references([looks_alike, embeds_alike], query, 1).chosen[0].record is embeds_alike
    other_model = replace(query, encoder_kind="vision:n:1:def")
    assert select_references([looks_alike, embeds_alike], other_model, 1).chosen[0].record is looks_alike


def test_settings_and_fallbacks(models_root, caplog):
    with pytest.raises(ValidationError, match="vision_encoder needs a local model: vlm_model with vlm_backend"):
        Settings(vlm_model="", references={"descriptor": "vision_encoder"})
    with pytest.raises(ValidationError, match="vlm_backend 'openai'"):
        Settings(vlm_model="tiny-gemma3", vlm_backend="openai", references={"descriptor": "vision_encoder"})
    assert encoder_for(Settings(vlm_model="")) is None  # auto, no model: the thumbnail alone
    assert encoder_for(Settings(vlm_model="tiny-gemma3", vlm_backend="openai", models_root=models_root)) is None
    assert encoder_for(settings(models_root, descriptor="thumbnail")) is None
    missing = Settings(vlm_model="no-such-model", vlm_backend="torch", models_root=models_root,
                       references={"descriptor": "vision_encoder"})
    with pytest.raises(EncoderUnavailable, match="model 'no-such-model' cannot be loaded: .*not found under"):
        encoder_for(missing)
    with caplog.at_level(logging.WARNING):
        assert encoder_for(missing.model_copy(update={"references": missing.references.model_copy(
            update={"descriptor": "auto"})})) is None
    assert "references.encoder_unavailable" in caplog.text


def test_a_failed_auto_load_is_not_retried_for_every_job(models_root, tmp_path, monkeypatch):
    from dicom_node.references import encoder as module

    root = tmp_path / "models"
    root.mkdir()
    auto = Settings(vlm_model="tiny-gemma3", vlm_backend="torch", models_root=root, references={"descriptor": "auto"})
    tries = []
    real_load = module._load.__wrapped__
    monkeypatch.setattr(module, "_load", lambda *key: tries.append(key) or real_load(*key))
    monkeypatch.setattr(module, "_failed_loads", {})
    assert encoder_for(auto) is None and encoder_for(auto) is None
    assert len(tries) == 1  # the second job neither loads nor logs again
    write_tiny_model(root, "gemma3")  # the operator puts the model in place
    monkeypatch.setattr(module, "RETRY_FAILED_LOAD_SECONDS", 0.0)
    assert encoder_for(auto) is not None and len(tries) == 2  # tried again after the wait: loads
    strict = auto.model_copy(update={"references": auto.references.model_copy(update={"descriptor": "vision_encoder"})})
    monkeypatch.setattr(module, "RETRY_FAILED_LOAD_SECONDS", 600.0)
    monkeypatch.setitem(module._failed_loads, (strict.vlm_model, str(root)), time.monotonic())  # a moment ago
    assert encoder_for(strict) is not None  # vision_encoder never skips a load


def test_cli_add_stores_the_embedding_of_the_configured_model(models_root, tmp_path, monkeypatch):
    monkeypatch.setenv("DICOM_NODE_VLM_MODEL", "tiny-gemma3")
    monkeypatch.setenv("DICOM_NODE_VLM_BACKEND", "torch")
    monkeypatch.setenv("DICOM_NODE_MODELS_ROOT", str(models_root))
    path = _write(make_normal_library(1, SIZE)[0], tmp_path / "n.dcm")
    out = CliRunner().invoke(app, ["references", "add", "--normal", "--library", str(tmp_path / "lib"), str(path)])
    assert out.exit_code == 0, out.output
    entry = json.loads((tmp_path / "lib" / "index.json").read_text())["references"][0]
    assert entry["encoder_kind"].startswith("vision:tiny-gemma3:") and len(entry["encoder_descriptor"]) == 64
    listed = CliRunner().invoke(app, ["references", "list", "--library", str(tmp_path / "lib"), "--json"])
    assert "encoder_descriptor" not in listed.output and "vision:tiny-gemma3" in listed.output
