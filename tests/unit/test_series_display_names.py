"""Series that share a folder name (``patient1/PATIENT_DICOM``, ``patient2/PATIENT_DICOM``) are named
apart in validate's report, in the landmark training volumes and in the landmark embedding store."""

import json
import locale
import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from alice3d.cli.data import main
from alice3d.config import load_config
from alice3d.data.datalists import display_names
from alice3d.data.io import Volume, save_nifti
from landmark.config import LandmarkConfig
from landmark.store import Embedding, EmbeddingStore
from alice3d.data.sources import source_names
from landmark.train import load_train_volumes

UID = "1.2.826.0.1.3680043.2.1125.1.31"
NAMES = ["patient1_PATIENT_DICOM", "patient2_PATIENT_DICOM", "patient3_PATIENT_DICOM"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALICE3D_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def _keep_locale():
    # GDCM's writer sets the process locale to "C" (ASCII text I/O for every later test): restore it.
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


def _write_series(folder, n_slices=6, seed=0, uid=UID):
    """An axial CT series, 8 x 10 pixels of 0.7 x 0.8 mm, slices 2 mm apart, one file per slice."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(n_slices):
        sl = sitk.GetImageFromArray(rng.integers(-1000, 1500, (10, 8)).astype(np.int16))
        sl.SetSpacing((0.7, 0.8))
        tags = {"0008|0060": "CT", "0020|000e": uid, "0020|000d": uid + ".0", "0020|0013": str(k + 1),
                "0008|0018": f"{uid}.{k + 1}", "0020|0032": f"10\\-20\\{30 + 2 * k}", "0020|0037": "1\\0\\0\\0\\1\\0"}
        for tag, val in tags.items():
            sl.SetMetaData(tag, val)
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        w.Execute(sl)


def test_validate_names_every_patient_dicom_series_apart(tmp_path, capsys, _keep_locale):
    folders = [tmp_path / "d" / f"patient{i}" / "PATIENT_DICOM" for i in (1, 2, 3)]
    for i, f in enumerate(folders):
        _write_series(f, seed=i, uid=f"{UID}.{i}")
    datalist = tmp_path / "d" / "dataset_0.json"
    datalist.write_text(json.dumps({"training": [{"image": str(f)} for f in folders]}))
    assert main(["validate", str(datalist), "--key", "training"]) == 0
    out = capsys.readouterr().out
    ok = [line for line in out.splitlines() if line.startswith("ok ")]
    assert [line.split(": ")[1] for line in ok] == NAMES, out
    assert "ok   training: PATIENT_DICOM:" not in out and "3 good, 0 bad" in out
    # a bad series is named apart too (its slices cut short), and a name no other path shares stays as it is
    (folders[1] / "slice003.dcm").write_bytes((folders[1] / "slice003.dcm").read_bytes()[:-30])
    other = tmp_path / "e" / "ct.nii.gz"
    save_nifti(np.full((8, 8, 8), 40, np.int16), np.eye(4), other)
    datalist.write_text(json.dumps({"training": [{"image": str(f)} for f in folders],
                                    "validation": [{"image": str(other)}]}))
    assert main(["validate", str(datalist)]) == 1
    out = capsys.readouterr().out
    assert "BAD  training: patient2_PATIENT_DICOM: " in out
    assert "ok   training: patient1_PATIENT_DICOM: " in out and "ok   training: patient3_PATIENT_DICOM: " in out
    assert "ok   validation: ct.nii.gz: " in out


def test_validate_names_apart_across_splits(tmp_path, capsys):
    # the names are computed over every listed image, not split by split
    a, b = tmp_path / "site_a" / "ct.nii.gz", tmp_path / "site_b" / "ct.nii.gz"
    for i, p in enumerate((a, b)):
        save_nifti(np.full((8, 8, 8), 40 + i, np.int16), np.eye(4), p)
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [{"image": str(a)}], "validation": [{"image": str(b)}]}))
    main(["validate", str(datalist)])
    out = capsys.readouterr().out
    assert "ok   training: site_a_ct.nii.gz: " in out and "ok   validation: site_b_ct.nii.gz: " in out


def test_display_names_can_keep_the_image_suffix():
    paths = ["/d/p1/ct.nii.gz", "/d/p2/ct.nii.gz", "/d/p1/PATIENT_DICOM/", "/e/mr.mha"]
    assert display_names(paths, keep_suffix=True) == ["p1_ct.nii.gz", "p2_ct.nii.gz", "PATIENT_DICOM", "mr.mha"]
    assert display_names(paths) == ["p1_ct", "p2_ct", "PATIENT_DICOM", "mr"]


def test_landmark_training_volumes_are_named_by_their_distinguishing_folder(tmp_path):
    folders = [tmp_path / "d" / f"patient{i}" for i in (1, 2, 3)]
    rng = np.random.default_rng(0)
    for f in folders:
        hu = np.where(rng.random((24, 24, 24)) < 0.5, -1000, 60).astype(np.int16)
        hu[6:18, 6:18, 6:18] = 60
        save_nifti(hu, np.diag([4.0, 4.0, 4.0, 1.0]), f / "PATIENT_DICOM.nii.gz")
    datalist = tmp_path / "d" / "dataset_0.json"
    datalist.write_text(json.dumps({"training": [{"image": str(f / "PATIENT_DICOM.nii.gz")} for f in folders]}))
    cfg = load_config(LandmarkConfig, None, [f"data.data={datalist}", "data.store=never", "data.spacing=[4,4,4]",
                                              "crop.size=[16,16,16]"])
    vols = load_train_volumes(cfg)
    assert sorted(v.name for v in vols) == [n + ".nii.gz" for n in NAMES]
    # without a path a volume is #i; a lone name stays as it is
    assert source_names([Volume(np.zeros((2, 2, 2)), np.eye(4), path="/x/a/s.nii"), Volume(np.zeros((2, 2, 2)), np.eye(4)),
                         Volume(np.zeros((2, 2, 2)), np.eye(4), path="/x/b/s.nii"), Volume(np.zeros((2, 2, 2)), np.eye(4), path="/y/t.nii")]) \
        == ["a_s.nii", "#1", "b_s.nii", "t.nii"]


def _embedding(volume, key, name):
    z = torch.zeros(2, 2, 2, 4)
    return Embedding(fine=z.half(), coarse=z, fine_affine=np.eye(4), coarse_affine=np.eye(4) * 2,
                     source_shape=tuple(volume.shape), source_affine=np.asarray(volume.affine), key=key, name=name,
                     body=torch.ones(2, 2, 2, dtype=torch.bool))


def test_embedding_store_names_the_volumes_it_was_told_about_apart(caplog):
    vols = [Volume(np.full((4, 4, 4), float(i)), np.eye(4), path=f"/d/patient{i}/PATIENT_DICOM") for i in (1, 2, 3)]
    seen = []

    def compute(volume, key, name):
        seen.append(name)
        logging.getLogger("alice3d.landmark").info("embedding %s", name)
        return _embedding(volume, key, name)

    store = EmbeddingStore(compute)
    assert store.get(vols[0]).name == "PATIENT_DICOM"  # not told about the others: its folder name
    store = EmbeddingStore(compute)
    assert store.name_sources(vols) == {f"/d/patient{i}/PATIENT_DICOM": NAMES[i - 1] for i in (1, 2, 3)}
    with caplog.at_level(logging.INFO, logger="alice3d.landmark"):
        got = [store.get(v).name for v in vols]
    assert got == NAMES and seen[1:] == NAMES
    assert all(f"embedding {n}" in caplog.text for n in NAMES)
    assert store.get(Volume(np.zeros((4, 4, 4)), np.eye(4)), name="given").name == "given"
    unnamed = store.get(Volume(np.full((4, 4, 4), 9.0), np.eye(4)))
    assert unnamed.name == unnamed.key[:12]


# ----------------------------------------------------------------------------- embedding, fits, sources, quarantine

SERIES = ["p1_PATIENT_DICOM.nii.gz", "p2_PATIENT_DICOM.nii.gz"]
TINY_MODEL = ["data.spacing=[8,8,8]", "model.stem_width=4", "model.widths=[8,8,8,8]", "model.fpn_dim=8",
              "model.embed_dim=16", "model.extra_windows=[]"]


@pytest.fixture(scope="module")
def patient_dicom_volumes(tmp_path_factory):
    """Two tiny phantom CTs saved as ``p1/PATIENT_DICOM.nii.gz`` and ``p2/PATIENT_DICOM.nii.gz``
    and a tiny landmark model at 8 mm."""
    from alice3d.data.io import load_volume
    from alice3d.data.phantom import generate_cohort
    from landmark.model import build_model, recalibrate_norms
    from landmark.train import save_landmark_model

    root = tmp_path_factory.mktemp("patient_dicom")
    cohort = generate_cohort(root / "cohort", n=2, seed=3, size="tiny")
    paths = []
    for i, src in enumerate(sorted((cohort / "imagesTr").glob("*.nii.gz"))[:2], 1):
        vol = load_volume(src)
        paths.append(str(root / "d" / f"p{i}" / "PATIENT_DICOM.nii.gz"))
        save_nifti(vol.array.astype(np.int16), vol.affine, paths[-1])
    cfg = load_config(LandmarkConfig, None, TINY_MODEL)
    torch.manual_seed(0)
    net = recalibrate_norms(build_model(cfg.model), [torch.rand(1, 1, 32, 32, 32)]).eval()
    return paths, save_landmark_model(net, cfg, root / "landmark.pt")


@pytest.fixture
def computed_names(monkeypatch):
    """Every embedding computed logs the name it is computed under."""
    from landmark.match import Matcher

    original = Matcher._compute

    def compute(self, volume, key, name):
        logging.getLogger("alice3d.landmark").info("computing the embedding of %s", name)
        return original(self, volume, key, name)

    monkeypatch.setattr(Matcher, "_compute", compute)


def _computed(caplog) -> list[str]:
    return [r.args[0] for r in caplog.records if r.msg == "computing the embedding of %s"]


def test_landmark_embeddings_and_reference_fits_name_patient_dicom_volumes_apart(
        patient_dicom_volumes, computed_names, tmp_path, monkeypatch, caplog):
    from alice3d.data.volumes import prepare_volume
    from landmark.match import Matcher
    from landmark.prepare import prepare_in_memory

    paths, model = patient_dicom_volumes
    vols = [prepare_volume(p, (8.0, 8.0, 8.0), (-125, 255)) for p in paths]
    # none: every volume embedded, each under its own name
    with caplog.at_level(logging.INFO, logger="alice3d.landmark"):
        prep = prepare_in_memory(vols, str(model), "none")
    assert [e.name for e in prep.embeddings] == SERIES
    assert _computed(caplog) == SERIES, caplog.text
    # reference: the fits embed the reference first and then the other, both named apart (a fresh cache)
    monkeypatch.setenv("ALICE3D_CACHE", str(tmp_path / "other_cache"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alice3d.landmark"):
        prep = prepare_in_memory(vols, str(model), "reference")
    assert len(prep.transforms) == 2 and sorted(_computed(caplog)) == SERIES, caplog.text
    # a matcher told nothing names the pair it matches apart too
    m = Matcher(model, cache_dir=tmp_path / "match_cache")
    caplog.clear()
    centre = vols[0].affine[:3, :3] @ (np.asarray(vols[0].shape) / 2) + vols[0].affine[:3, 3]
    with caplog.at_level(logging.INFO, logger="alice3d.landmark"):
        m.match(paths[0], paths[1], centre[None])
    assert _computed(caplog) == SERIES, caplog.text
    assert m.embed(paths[1]).name == SERIES[1]
    # a later image of the same name renames the others apart; images already told apart stay as they are
    assert m.name_sources([paths[0]]) == {}
    third = str(tmp_path / "p3" / "PATIENT_DICOM.nii.gz")
    assert m.name_sources([third])[third] == "p3_PATIENT_DICOM.nii.gz"
    assert m.store.name_of(paths[0]) == SERIES[0]


def test_crop_sources_of_a_list_are_named_apart():
    from alice3d.data.sources import as_sources, source_names

    def vol(path=""):
        return Volume(np.full((4, 4, 4), 0.5, np.float32), np.eye(4), path=path)

    vols = [vol("/d/p1/PATIENT_DICOM.nii.gz"), vol(), vol("/d/p2/PATIENT_DICOM.nii.gz"), vol("/e/ct.nii.gz")]
    expected = [SERIES[0], "#1", SERIES[1], "ct.nii.gz"]
    assert source_names(vols) == expected
    assert [s.name for s in as_sources(vols)] == expected


def test_quarantined_volumes_are_named_by_their_distinguishing_folder(tmp_path):
    from alice3d.data.io import DataError
    from alice3d.data.volumes import load_volume_set

    paths = [str(tmp_path / f"p{i}" / "PATIENT_DICOM.nii.gz") for i in (1, 2, 3)]
    hu = np.full((12, 12, 12), -1000, np.int16)
    hu[3:9, 3:9, 3:9] = 60
    save_nifti(hu, np.diag([4.0, 4.0, 4.0, 1.0]), paths[0])  # p2's and p3's files are missing
    with pytest.raises(DataError) as e:
        load_volume_set(paths, (4.0, 4.0, 4.0), (-125, 255), min_volumes=2)
    msg = str(e.value)
    assert "2 quarantined: p2_PATIENT_DICOM.nii.gz: " in msg and "; p3_PATIENT_DICOM.nii.gz: " in msg, msg
    # one bad volume among good ones of the same name: named by its folder, not PATIENT_DICOM.nii.gz
    with pytest.raises(DataError) as e:
        load_volume_set(paths[:2], (4.0, 4.0, 4.0), (-125, 255), min_volumes=2)
    assert "(1 quarantined: p2_PATIENT_DICOM.nii.gz: " in str(e.value), str(e.value)


def test_landmark_embed_command_names_same_named_series_apart(patient_dicom_volumes, computed_names, tmp_path,
                                                              capsys):
    from alice3d.cli.landmark import main

    paths, model = patient_dicom_volumes
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # embedded one at a time, the first image alone would be named by its bare file name
    try:
        with pytest.raises(SystemExit) as stop:
            main(["embed", *paths, "--model", str(model), "--cache-dir", str(tmp_path / "cache")])
    finally:  # the command's handler writes to this test's captured stderr, closed after it
        root.handlers[:], root.level = handlers, level
    assert stop.value.code in (0, None)
    log = capsys.readouterr().err
    assert [line.rsplit(" ", 1)[1] for line in log.splitlines() if "computing the embedding of" in line] == SERIES, log
