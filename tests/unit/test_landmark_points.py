"""Query points: negative coordinates on the command line, points files, the inside check before embedding."""

import json

import numpy as np
import pytest

from alice3d.cli.landmark import _attach_points, build_parser
from alice3d.data.io import Volume
from landmark import preprocess
from landmark.config import ModelConfig
from landmark.match import Matcher, MatchError, check_points_inside, read_points_file
from landmark.model import build_model

WANT = [[-10.0, 150.0, 120.0], [-0.5, -2.0, 3e1]]


@pytest.mark.parametrize("text", [
    json.dumps(WANT),
    json.dumps({"points": WANT, "note": "RAS mm"}),
    "# query points\n-10,150,120\n\n-0.5, -2, 3e1  # second\n",
    "-10 150 120\n-0.5 -2 30\n",
])
def test_points_file_forms(tmp_path, text):
    path = tmp_path / "pts.txt"
    path.write_text(text)
    np.testing.assert_array_equal(read_points_file(path), WANT)


@pytest.mark.parametrize("text,message", [
    ("[[1, 2]]", r"point 0 is \[1, 2\]; expected a JSON list of \[x, y, z\] lists"),
    ('[[1, 2, "3"]]', "point 0 is"),
    ("[[1, 2, true]]", "point 0 is"),
    ('{"pts": [[1, 2, 3]]}', "no 'points' key"),
    ('{"points": 5}', "got a JSON int"),
    ("[[1, 2, 3],", "not valid JSON"),
    ("[]", "no points in it"),
    ("# nothing\n", "no points in it"),
    ("1,2,3\n4,5\n", r"line 2: expected 'x,y,z' in world mm, could not read '4,5'"),
    ("1,2,x\n", "line 1: expected 'x,y,z'"),
    ("[[1e999, 0, 0]]", "must be finite"),
])
def test_bad_points_file_names_file_and_expectation(tmp_path, text, message):
    path = tmp_path / "pts.json"
    path.write_text(text)
    with pytest.raises(MatchError, match=message) as e:
        read_points_file(path)
    assert str(path) in str(e.value)


def test_missing_points_file(tmp_path):
    with pytest.raises(MatchError, match="missing.json: cannot read it"):
        read_points_file(tmp_path / "missing.json")


def test_negative_first_coordinate_reaches_parser():
    argv = ["match", "--model", "m.pt", "--source", "a", "--target", "b", "--points", "-10,150,120;-1,2,3"]
    with pytest.raises(SystemExit):  # what argparse alone does with it
        build_parser().parse_args(argv)
    args = build_parser().parse_args(_attach_points(argv))
    assert args.points == "-10,150,120;-1,2,3" and args.points_file is None
    assert _attach_points(["match", "--points"]) == ["match", "--points"]  # left to argparse to report
    assert _attach_points(["--", "--points", "x"]) == ["--", "--points", "x"]


@pytest.mark.parametrize("extra", [[], ["--points", "1,2,3", "--points-file", "p.json"]])
def test_exactly_one_points_option(extra, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["match", "--model", "m", "--source", "a", "--target", "b", *extra])
    assert e.value.code == 2 and "--points" in capsys.readouterr().err


def test_inside_check_names_volume_point_and_extent():
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    affine[:3, 3] = [-10.0, 0.0, 0.0]  # voxels 0..9 -> x from -11 to 9 mm (voxel edges)
    check_points_inside(affine, (10, 10, 5), np.array([[-10.9, 0.0, 0.0], [8.9, 18.9, 17.9]]), "a.nii.gz")
    with pytest.raises(MatchError) as e:
        check_points_inside(affine, (10, 10, 5), np.array([[-11.5, 3.0, 4.0], [0.0, 0.0, 0.0]]), "a.nii.gz")
    assert str(e.value) == ("1 query point(s) outside volume a.nii.gz (world extent [-11.0, -1.0, -2.0] .. "
                            "[9.0, 19.0, 18.0] mm): -11.5,3.0,4.0")


def test_matcher_checks_points_before_embedding(tmp_path, monkeypatch):
    net = build_model(ModelConfig(stem_width=4, widths=(8, 8, 8, 8), fpn_dim=8, embed_dim=16, extra_windows=()))
    vol = Volume(np.zeros((16, 16, 16), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), "src.nii.gz")
    m = Matcher(net, cache_dir=tmp_path / "cache")

    def no_embedding(*a, **k):
        raise AssertionError("embedded a volume although a query point lies outside the source")

    monkeypatch.setattr(preprocess, "embed_volume", no_embedding)
    with pytest.raises(MatchError, match=r"outside volume src.nii.gz .*: 40.0,0.0,0.0"):
        m.match(vol, vol, np.array([[0.0, 0.0, 0.0], [40.0, 0.0, 0.0]]))
    assert m.stats["computed"] == 0 and not (tmp_path / "cache").exists()
    with pytest.raises(MatchError, match="finite"):
        m.match(vol, vol, np.array([[np.nan, 0.0, 0.0]]))
    with pytest.raises(AssertionError, match="embedded"):  # points inside: embedding starts
        m.match(vol, vol, np.array([[0.0, 0.0, 0.0]]))
