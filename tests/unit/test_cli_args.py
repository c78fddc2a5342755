"""Numeric options accept a leading minus (alice3d.cli.args) in alice3d-data, and predict's --help."""

import subprocess
import sys

import numpy as np
import pytest

from alice3d.cli import data as data_cli
from alice3d.cli.args import attach_negative_values
from alice3d.data.io import save_nifti

OPTS = {"--point", "--window"}


@pytest.mark.parametrize("argv,expected", [
    (["--point", "-97.8,-129.1,136.5"], ["--point=-97.8,-129.1,136.5"]),
    (["--window", "-1000,400", "--size", "64"], ["--window=-1000,400", "--size", "64"]),
    (["--window", "-.5,2"], ["--window=-.5,2"]),
    (["--point", "10,-2,3"], ["--point", "10,-2,3"]),  # no leading minus: nothing to do
    (["--window=-1000,400"], ["--window=-1000,400"]),  # already attached
    (["--window", "--size", "64"], ["--window", "--size", "64"]),  # a missing value stays argparse's error
    (["--size", "-3"], ["--size", "-3"]),  # not a listed option
    (["--", "--point", "-1,2,3"], ["--", "--point", "-1,2,3"]),  # after '--' nothing is an option
    (["--point"], ["--point"]),
])
def test_attach_negative_values(argv, expected):
    assert attach_negative_values(argv, OPTS) == expected


def test_argparse_itself_fails_without_the_helper():
    # the reason the helper exists: if argparse ever accepts this, the helper can go
    p = data_cli.build_parser()
    with pytest.raises(SystemExit):
        p.parse_args(["preview", "--image", "a", "--out", "b", "--window", "-1000,400"])


def test_every_numeric_option_of_alice3d_data_takes_a_leading_minus():
    p = data_cli.build_parser()
    argv = ["preview", "--image", "a.nii.gz", "--out", "b.png", "--point", "-97.8,-129.1,136.5",
            "--window", "-1000,400"]
    args = p.parse_args(attach_negative_values(argv, data_cli.NUMERIC_OPTIONS))
    assert args.point == (-97.8, -129.1, 136.5) and args.window == (-1000.0, 400.0)
    argv = ["preprocess", "--data", "d", "--out", "s", "--spacing", "-1.5,1.5,2", "--hu-window", "-1000,400"]
    args = p.parse_args(attach_negative_values(argv, data_cli.NUMERIC_OPTIONS))
    assert args.spacing == (-1.5, 1.5, 2.0) and args.hu_window == (-1000.0, 400.0)
    # every option whose value is real numbers (a float, or a list of them parsed by _floats) is in the set
    real_opts = set()
    for action in p._subparsers._group_actions[0].choices.values():
        for a in action._actions:
            if a.type is float or getattr(a.type, "__name__", "") == "<lambda>":
                real_opts.update(a.option_strings)
    assert {"--point", "--window", "--spacing", "--hu-window"} <= real_opts <= data_cli.NUMERIC_OPTIONS


def test_preview_with_negative_point_and_window(tmp_path, capsys):
    img = np.linspace(-1000, 400, 10 * 12 * 8, dtype=np.float32).reshape(10, 12, 8)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    aff[:3, 3] = (-20.0, -30.0, -10.0)  # every voxel has negative x and y
    save_nifti(img, aff, tmp_path / "ct.nii.gz")
    png = tmp_path / "p.png"
    assert data_cli.main(["preview", "--image", str(tmp_path / "ct.nii.gz"), "--out", str(png),
                          "--point", "-12,-20,5", "--window", "-1000,400", "--size", "48"]) == 0
    assert png.is_file() and f"wrote {png}" in capsys.readouterr().out
    # a malformed value still gets the option's own error, not a traceback
    with pytest.raises(SystemExit):
        data_cli.main(["preview", "--image", "x", "--out", str(png), "--window", "-1000"])
    assert "--window: expected 2 comma-separated numbers, got '-1000'" in capsys.readouterr().err
    # a panel size the viewer cannot draw is one error line, not a traceback
    assert data_cli.main(["preview", "--image", str(tmp_path / "ct.nii.gz"), "--out", str(png), "--size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot draw {tmp_path / 'ct.nii.gz'}: ") and "max_px=8" in err


def test_console_script_module_reads_sys_argv(tmp_path):
    # main() without argv reads sys.argv (what the alice3d-data entry point does)
    img = np.linspace(-1000, 400, 6 * 6 * 6, dtype=np.float32).reshape(6, 6, 6)
    save_nifti(img, np.eye(4), tmp_path / "ct.nii.gz")
    out = subprocess.run([sys.executable, "-m", "alice3d.cli.data", "preview", "--image", str(tmp_path / "ct.nii.gz"),
                          "--out", str(tmp_path / "p.png"), "--window", "-500,300", "--point", "-0,2,2",
                          "--size", "48"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "p.png").is_file()


def test_predict_help_mentions_dicom_folders(capsys):
    from alice3d.cli.finetune import _predict_parser

    with pytest.raises(SystemExit):
        _predict_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--image" in text and "DICOM series folder" in text and ".mha" in text and ".nrrd" in text
