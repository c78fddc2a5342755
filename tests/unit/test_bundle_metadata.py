"""Bundle metadata and the vendored schema: every field MONAI requires, network_data_format from the
task, metrics from results.json, and a schema that rejects what it should."""

from __future__ import annotations

import copy
import json
from importlib.util import find_spec
from pathlib import Path

import pytest

from alice3d.bundle.inference_config import PreprocessingMismatchError, check_mirrors_finetune, inference_config
from alice3d.bundle.metadata import (
    SCHEMA_PATH,
    BundleInfo,
    MetadataError,
    bundle_metadata,
    eval_metrics,
    load_schema,
    validate_metadata,
)
from alice3d.bundle.network import network_def
from alice3d.finetune.config import EvalConfig
from alice3d.finetune.tasks import resolve_task

needs_jsonschema = pytest.mark.skipif(find_spec("jsonschema") is None,
                                      reason="jsonschema (a test dependency) is not installed")

# Required by MONAI's meta_schema_20240725 and the bundle specification.
MONAI_REQUIRED = ["schema", "version", "monai_version", "pytorch_version", "numpy_version",
                  "required_packages_version", "task", "description", "authors", "copyright", "network_data_format"]
SPEC = {"name": "unetr", "args": {"in_channels": 1, "out_channels": 3, "img_size": [32, 32, 16], "feature_size": 12,
                                  "hidden_size": 48, "mlp_dim": 96, "num_heads": 4, "norm_name": "instance",
                                  "qkv_bias": False, "spatial_dims": 3}}


@pytest.fixture()
def task():
    return resolve_task("custom", labels=["liver", "spleen"], spacing=(2.0, 2.0, 3.0), roi=(32, 32, 16))


@pytest.fixture()
def meta(task):
    per_organ = {"liver": {"dice": {"mean": 0.75}, "nsd": {"mean": 0.5}},
                 "spleen": {"dice": {"mean": 0.25}, "nsd": {"mean": None}}}
    results = {"n_cases": 2, "n_train_cases": 5,
               "metrics": {"mean_dice": 0.5, "mean_nsd": float("nan"), "per_organ": per_organ}}
    return bundle_metadata(task, SPEC, BundleInfo(version="1.2.3", authors="A. Author"), run=Path("/runs/r1"),
                           step=11, results=results, config={"data": {"data": "/data/btcv"}}, pretrained="",
                           torchscript="scripted")


@needs_jsonschema
def test_metadata_has_every_monai_field_and_validates(meta):
    assert all(k in meta for k in MONAI_REQUIRED)
    assert set(MONAI_REQUIRED) <= set(load_schema()["required"])
    assert validate_metadata(meta) is True
    json.dumps(meta, allow_nan=False)  # strict JSON: no NaN sneaks in


def test_network_data_format_follows_the_task(meta):
    fmt = meta["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    assert image["spatial_shape"] == [32, 32, 16] and image["num_channels"] == 1 and image["modality"] == "CT"
    assert image["value_range"] == [0, 1] and image["dtype"] == "float32" and image["is_patch_data"] is True
    assert pred["num_channels"] == 3 and pred["channel_def"] == {"0": "background", "1": "liver", "2": "spleen"}
    post = fmt["post_processed_outputs"]["pred"]
    assert post["num_channels"] == 1 and post["dtype"] == "uint8" and post["value_range"] == [0, 2]
    assert meta["version"] == "1.2.3" and "1.2.3" in meta["changelog"] and meta["authors"] == "A. Author"
    assert meta["data_source"].startswith("datalist/data root /data/btcv (5 training, 2 validation")


def test_eval_metrics_keep_numbers_and_turn_non_finite_into_null():
    m = eval_metrics({"n_cases": 2, "metrics": {"mean_dice": 0.5, "mean_nsd": float("nan"), "per_organ": {
        "liver": {"dice": {"mean": 0.75}, "nsd": {"mean": None}}}}})
    assert m["mean_dice"] == 0.5 and m["mean_nsd"] is None
    assert m["per_organ_dice"] == {"liver": 0.75} and m["per_organ_nsd"] == {"liver": None}
    assert eval_metrics(None) == {}


@needs_jsonschema
@pytest.mark.parametrize("breaks, where", [
    (lambda m: m.pop("authors"), "'authors' is a required property"),
    (lambda m: m.update(version="1.0"), "at version"),
    (lambda m: m.update(optional_packages_version={"nibabel": "5.0"}), "at optional_packages_version"),
    (lambda m: m["network_data_format"]["outputs"]["pred"].pop("channel_def"), "'channel_def' is a required property"),
    (lambda m: m["network_data_format"]["inputs"]["image"].update(num_channels=0), "num_channels"),
    (lambda m: m["network_data_format"].update(inputs={}), "network_data_format/inputs"),
])
def test_schema_rejects_broken_metadata(meta, breaks, where):
    bad = copy.deepcopy(meta)
    breaks(bad)
    with pytest.raises(MetadataError, match=where):
        validate_metadata(bad)


@needs_jsonschema
def test_schema_file_is_a_valid_json_schema():
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)


def test_inference_config_mirrors_the_task(task):
    cfg = inference_config(task, network_def(SPEC), EvalConfig(sw_batch_size=3, sw_overlap=0.5, sw_mode="constant"))
    assert cfg["inferer"] == {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 16], "sw_batch_size": 3,
                              "overlap": 0.5, "mode": "constant"}
    steps = {s["_target_"]: s for s in cfg["preprocessing"]["transforms"]}
    assert steps["Spacingd"]["pixdim"] == [2.0, 2.0, 3.0]
    assert (steps["ScaleIntensityRanged"]["a_min"], steps["ScaleIntensityRanged"]["a_max"]) == (-175.0, 250.0)
    post = [s["_target_"] for s in cfg["postprocessing"]["transforms"]]
    assert post == ["AsDiscreted", "Invertd", "SaveImaged"]
    assert cfg["network_def"]["_target_"] == "monai.networks.nets.UNETR"


def test_export_refuses_when_finetune_preprocessing_changed(task, monkeypatch):
    from monai import transforms as mt

    import alice3d.bundle.inference_config as ic

    original = ic.inference_transforms
    monkeypatch.setattr(ic, "inference_transforms",
                        lambda t: mt.Compose([*original(t).transforms, mt.NormalizeIntensityd(keys=["image"])]))
    with pytest.raises(PreprocessingMismatchError, match="NormalizeIntensityd"):
        check_mirrors_finetune(task)


@pytest.mark.parametrize("method, cites_alice", [("alice", True), ("mae", False), ("", False)])
def test_pretrained_runs_name_their_encoder_and_cite_alice_only_for_alice(task, method, cites_alice):
    meta = bundle_metadata(task, SPEC, BundleInfo(), run=Path("/runs/r1"), step=1, results=None, config=None,
                           pretrained="/runs/pre/encoder.pt", pretrained_method=method, torchscript="traced")
    assert "initialised from the pretrained encoder /runs/pre/encoder.pt" in meta["description"]
    assert any("Anatomical Invariance" in r for r in meta["references"]) == cites_alice
    assert meta["alice3d"]["pretrained"] == "/runs/pre/encoder.pt" and meta["eval_metrics"] == {}
    assert meta["data_source"].startswith("not recorded")
