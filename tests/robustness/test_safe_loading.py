"""Safe loading: a pickle that would run code is refused wherever a file is read, and a file of
the wrong kind is refused by its metadata. The payload creates a marker file when unpickled."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from faults import COMMANDS, FINETUNE, PRETRAIN, write_malicious

ALICE_TINY = ["method=alice", "alice.img_size=[32,32,16]", "alice.encoder=vit_tiny",
              "alice.encoder_kwargs={num_layers: 1, hidden_size: 48, mlp_dim: 96, num_heads: 4}",
              "alice.decoder_dim=48", "alice.decoder_depth=1", "alice.decoder_heads=4", "alice.head_out_dim=16",
              "alice.head_hidden_dim=16", "alice.head_bottleneck_dim=16"]
REFUSED = "refused to load"


def _call_landmark(argv) -> int:
    from alice3d.cli.landmark import main

    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def test_the_payload_is_live(tmp_path):
    """Guard for this suite: unpickled without weights_only, the file does create its marker."""
    marker = tmp_path / "marker"
    path = write_malicious(tmp_path / "evil.pt", marker, kind="alice3d-encoder")
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", list(COMMANDS))
def test_malicious_resume_checkpoint_is_refused(name, cohort, tmp_path, capsys):
    cmd = COMMANDS[name]
    run, marker = tmp_path / "run", tmp_path / "marker"
    write_malicious(run / "checkpoints" / "last.pt", marker, kind="alice3d-checkpoint")
    (run / "config.yaml").write_text("{}\n")
    code = cmd.call(run, cohort, "train.max_steps=2", "--resume")
    err = capsys.readouterr().err
    assert code == 2 and REFUSED in err and "last.pt" in err and "Traceback" not in err, err[-2000:]
    assert not marker.exists()


def test_malicious_encoder_is_refused(cohort, tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = write_malicious(tmp_path / "encoder.pt", marker, kind="alice3d-encoder")
    code = FINETUNE.call(tmp_path / "run", cohort, "--pretrained", str(evil), "train.max_steps=1")
    err = capsys.readouterr().err
    assert code == 2 and REFUSED in err and str(evil) in err, err[-2000:]
    assert not marker.exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_malicious_landmark_model_is_refused_by_pretrain_and_match(cohort, tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = write_malicious(tmp_path / "landmark.pt", marker, kind="alice3d-landmark")
    code = PRETRAIN.call(tmp_path / "run", cohort, *ALICE_TINY, f"landmark={evil}", "train.max_steps=1")
    err = capsys.readouterr().err
    assert code == 2 and REFUSED in err and str(evil) in err, err[-2000:]
    image = cohort / "imagesTr" / "img0001.nii.gz"
    code = _call_landmark(["match", "--model", evil, "--source", image, "--target", image, "--points", "0,0,0",
                           "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2 and REFUSED in err and str(evil) in err, err[-2000:]
    assert not marker.exists()


def test_malicious_embedding_cache_entry_is_refused_and_recomputed(cohort, tiny_landmark_model, tmp_path, capsys):
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    image = cohort / "imagesTr" / "img0001.nii.gz"
    args = ["embed", "--model", tiny_landmark_model, "--cache-dir", cache, image]
    assert _call_landmark(args) == 0
    (entry,) = cache.rglob("*.zarr")
    shutil.rmtree(entry)
    write_malicious(entry, marker)  # same name, a pickle file instead of the zarr group
    capsys.readouterr()
    assert _call_landmark(args) == 0
    captured = capsys.readouterr()
    assert "embedding cache entry unusable, recomputing" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["cache"] == str(entry)
    assert not marker.exists()
    from landmark.embed_cache import read_group

    arrays, _ = read_group(entry)  # replaced by a valid entry
    assert set(arrays) == {"body", "fine", "coarse"}


# ----------------------------------------------------------------------------- wrong kind


def test_landmark_model_given_as_encoder_is_refused(cohort, tiny_landmark_model, tmp_path, capsys):
    code = FINETUNE.call(tmp_path / "run", cohort, "--pretrained", str(tiny_landmark_model), "train.max_steps=1")
    err = capsys.readouterr().err
    assert code == 2 and "expected a file of kind 'alice3d-encoder', found kind 'alice3d-landmark'" in err, err[-2000:]


def test_encoder_given_as_landmark_model_is_refused(cohort, pretrain_run, tmp_path, capsys):
    encoder = pretrain_run / "encoder.pt"
    code = PRETRAIN.call(tmp_path / "run", cohort, *ALICE_TINY, f"landmark={encoder}", "train.max_steps=1")
    err = capsys.readouterr().err
    expected = "expected a file of kind 'alice3d-landmark', found kind 'alice3d-encoder'"
    assert code == 2 and expected in err and str(encoder) in err, err[-2000:]
    image = cohort / "imagesTr" / "img0001.nii.gz"
    code = _call_landmark(["match", "--model", encoder, "--source", image, "--target", image, "--points", "0,0,0",
                           "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err[-2000:]


@pytest.mark.parametrize("name", ["finetune", "landmark"])
def test_pretraining_checkpoint_does_not_resume_another_command(name, cohort, pretrain_run, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(pretrain_run / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
    (run / "config.yaml").write_text("{}\n")
    code = COMMANDS[name].call(run, cohort, "train.max_steps=2", "--resume")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert f"written by a PretrainConfig run, not a {COMMANDS[name].config_type} run" in err


def test_landmark_model_whose_weights_do_not_fit_is_refused(cohort, tiny_landmark_model, tmp_path, capsys):
    """Right kind, wrong contents: one clear line from pretraining, no traceback."""
    from alice3d.train.checkpoint import atomic_save, load_checkpoint

    obj = load_checkpoint(tiny_landmark_model)
    obj["state_dict"] = {k: v.flatten()[:1] for k, v in obj["state_dict"].items()}
    broken = atomic_save(obj, tmp_path / "landmark.pt")
    code = PRETRAIN.call(tmp_path / "run", cohort, *ALICE_TINY, f"landmark={broken}", "train.max_steps=1")
    err = capsys.readouterr().err
    assert code == 2 and "weights do not fit the model described in its metadata" in err, err[-2000:]
    assert "Traceback" not in err
