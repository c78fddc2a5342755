"""The OpenKBP protocol's splits and summary (scripts/experiments/fewlabel_openkbp.py), on a datalist
fixture and hand-made results: no training runs here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "scripts" / "experiments"
LABELS = {"0": "background", "1": "Brainstem", "2": "SpinalCord"}


@pytest.fixture(scope="module")
def kbp():
    sys.path.insert(0, str(EXPERIMENTS))  # the script imports its siblings
    try:
        modules = {}
        for name in ("fewlabel_transfer", "fewlabel_openkbp"):
            spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
            modules[name] = importlib.util.module_from_spec(spec)
            sys.modules[name] = modules[name]
            spec.loader.exec_module(modules[name])
        yield modules["fewlabel_openkbp"]
    finally:
        sys.path.remove(str(EXPERIMENTS))


def _datalist(tmp_path: Path, n_train=20, n_val=5, n_test=10) -> Path:
    def entries(prefix, n, start):
        return [{"image": f"images{prefix}/pt_{i}.nii.gz", "label": f"labels{prefix}/pt_{i}.nii.gz",
                 "contoured": [1, 2] if i % 2 else [1]} for i in range(start, start + n)]

    doc = {"name": "OpenKBP", "labels": LABELS, "training": entries("Tr", n_train, 1),
           "validation": entries("Tr", n_val, 100), "test": entries("Ts", n_test, 200)}
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(doc))
    return path


def test_splits_follow_the_pool_rule_nest_the_pools_and_keep_test_apart(kbp, tmp_path):
    data = _datalist(tmp_path)
    sp = kbp.write_splits(data, tmp_path / "splits", seeds=[0, 1], pools=[2, 6, 12], val_cases=3, test_cases=4)
    order = np.random.default_rng(0).permutation(20)
    assert sp["pool"] == [f"pt_{i + 1}.nii.gz" for i in order[:12]]
    unl = json.loads(sp["paths"]["unlabelled"].read_text())["training"]
    assert len(unl) == sp["n_unlabelled"] == 8
    assert not {Path(e["image"]).name for e in unl} & set(sp["pool"])
    assert all(set(e) == {"image"} and Path(e["image"]).is_absolute() for e in unl)  # no labels reach pretraining
    for seed in (0, 1):
        pools = {n: json.loads(sp["paths"]["pools"][(n, seed)].read_text()) for n in (2, 6, 12)}
        names = {n: [Path(e["image"]).name for e in p["training"]] for n, p in pools.items()}
        assert set(names[2]) < set(names[6]) < set(names[12]) == set(sp["pool"])
        assert len(names[2]) == 2 and len(names[6]) == 6
        assert pools[2]["labels"] == LABELS and pools[2]["training"][0]["contoured"]
        val = [Path(e["image"]).name for e in pools[2]["validation"]]
        test = [Path(e["image"]).name for e in pools[2]["test"]]
        assert val == ["pt_100.nii.gz", "pt_101.nii.gz", "pt_102.nii.gz"]
        assert test == sp["test"] and len(test) == 4 and all(t.startswith("pt_2") for t in test)
    perm0 = np.random.default_rng(0).permutation(12)
    pool0 = json.loads(sp["paths"]["pools"][(2, 0)].read_text())["training"]
    assert [Path(e["image"]).name for e in pool0] == [sp["pool"][i] for i in perm0[:2]]


def test_splits_refuse_a_datalist_without_a_test_list(kbp, tmp_path):
    data = _datalist(tmp_path, n_test=0)
    with pytest.raises(Exception, match="'test'"):
        kbp.write_splits(data, tmp_path / "splits", [0], [2], 3, 4)


def _finetune_result(run: Path, per_case: dict[str, dict[str, float | None]]) -> None:
    run.mkdir(parents=True)
    cases = {f"{name}.nii.gz": {"dice": d, "nsd": d} for name, d in per_case.items()}
    organs = {o: {"dice": {"mean": float(np.mean([d[o] for d in per_case.values() if d[o] is not None]))}}
              for o in next(iter(per_case.values()))}
    (run / "test_results.json").write_text(json.dumps({
        "cases": cases, "checkpoint_step": 10,
        "metrics": {"mean_dice": float(np.mean([o["dice"]["mean"] for o in organs.values()])), "mean_nsd": 0.0,
                    "per_organ": organs}}))


def test_test_scores_average_each_case_over_the_organs_it_contours(kbp, tmp_path):
    _finetune_result(tmp_path / "run", {"pt_1": {"A": 0.5, "B": None}, "pt_2": {"A": 0.2, "B": 0.6}})
    res = kbp.test_scores(tmp_path / "run", ["pt_2.nii.gz", "pt_1.nii.gz", "pt_9.nii.gz"])
    assert res["dice_per_case"] == [pytest.approx(0.4), 0.5, None]  # in the order asked; a missing case is None
    assert kbp.test_scores(tmp_path / "missing", ["pt_1"]) is None


def test_summary_pairs_arms_by_seed_and_case(kbp, tmp_path):
    args = type("A", (), {"pools": [2], "arms": ["random", "alice"], "finetune_arms": ["random", "alice"],
                          "out": tmp_path})()
    run = tmp_path / "pretrain" / "alice_seed0"
    run.mkdir(parents=True)
    rows = [{"step": i, "loss": 1.0, "loss_rec": float(i), "loss_inter": 0.0, "loss_intra": -1.0, "intra_cos": 0.5,
             "online_erank": 2.0, "target_erank": 3.0} for i in range(1, 61)] + [{"step": 60, "val": 1}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    probes = {s: {"random": {"linear_per_patient": [0.5, 0.5], "knn_per_patient": [0.4, 0.4],
                             "retrieval_per_patient": [0.1, 0.2], "retrieval_error_per_patient": [20.0, 30.0]},
                  "alice": {"linear_per_patient": [0.7, 0.6], "knn_per_patient": [0.4, None],
                            "retrieval_per_patient": [0.3, 0.2], "retrieval_error_per_patient": [10.0, 30.0]}}
              for s in (0, 1)}
    finetunes = {("random", 2, 0): {"dice_per_case": [0.2, 0.4], "nsd_per_case": [0.1, 0.1], "mean_dice": 0.3,
                                    "per_organ_dice": {"A": 0.3}},
                 ("alice", 2, 0): {"dice_per_case": [0.3, 0.5], "nsd_per_case": [0.1, 0.2], "mean_dice": 0.4,
                                   "per_organ_dice": {"A": 0.4}},
                 ("alice", 2, 1): None}
    s = kbp.summarize(args, {}, probes, finetunes)
    lin = s["comparisons"]["linear"]["alice - random"]
    assert lin["diff"] == pytest.approx(0.15) and lin["seeds"] == [0, 1]
    assert s["comparisons"]["knn"]["alice - random"]["diff"] == pytest.approx(0.0)  # the None cell drops out
    assert s["comparisons"]["retrieval_error_mm"]["alice - random"]["diff"] == pytest.approx(-5.0)
    dice = s["comparisons"]["dice_n2"]["alice - random"]
    assert dice["diff"] == pytest.approx(0.1) and dice["seeds"] == [0] and dice["low"] == pytest.approx(0.1)
    assert s["table"]["dice_n2"]["alice"]["mean"] == pytest.approx(0.4)
    assert s["table"]["linear"]["alice"] == {"mean": pytest.approx(0.65), "std": 0.0, "seeds": [0, 1]}
    assert s["targets"] == {"alice beats scratch at 2 labels": True}
    # the last 50 logged steps (11..60) of the only seed with a run; lines without a loss are not steps
    assert s["pretraining"] == {"alice": {"loss_rec": pytest.approx(35.5), "loss_inter": 0.0, "loss_intra": -1.0,
                                          "intra_cos": 0.5, "online_erank": 2.0, "target_erank": 3.0}}


def test_dry_run_writes_the_splits_and_lists_every_run(kbp, tmp_path, capsys):
    data = _datalist(tmp_path)
    out = tmp_path / "out"
    rc = kbp.main(["--data", str(data), "--out", str(out), "--landmark", str(tmp_path / "lm.pt"), "--seeds", "0",
                   "--pools", "2", "--dry-run", "--arms", "random", "mae", "alice", "alice_random_pairs"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert (out / "splits" / "pool_n2_seed0.json").exists()
    assert printed.count("alice3d.cli.pretrain") + printed.count("alice3d-pretrain ") == 3
    assert "pairs.source=random" in printed and "method=mae" in printed
    # only the matcher arms get the landmark model, which trained on the unlabelled patients alone
    pretrain_lines = [ln for ln in printed.splitlines() if "alice3d.cli.pretrain" in ln or "alice3d-pretrain " in ln]
    assert [("--landmark" in ln) for ln in pretrain_lines] == [False, True, False]
    finetune_lines = [ln for ln in printed.splitlines() if "--task custom" in ln]
    assert len(finetune_lines) == 3 and all("pool_n2_seed0.json" in ln for ln in finetune_lines)
    assert sum("evaluate --run" in ln and "--split test" in ln for ln in printed.splitlines()) == 3
    assert all("aug.crop=classes" in ln for ln in finetune_lines)


def test_a_finished_run_made_with_other_settings_is_named_stale(kbp, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  max_steps: 800\n  device: cpu\n  cpu_amp: true\ntask:\n  spacing: [4.0, 4.0, 3.0]\n"
                      "aug:\n  crop: posneg\n")
    same = ["alice3d-finetune", "--out", "RUN", "train.max_steps=800", "task.spacing=[4,4,3]", "train.cpu_amp=true"]
    assert kbp.changed_settings(config, same) == []
    # where a run computes does not make it stale; what it learns from does
    assert kbp.changed_settings(config, [*same, "train.device=cuda", "train.num_threads=8"]) == []
    assert kbp.changed_settings(config, [*same, "aug.crop=classes", "train.max_steps=1000", "eval.sw_overlap=0.5"]) == [
        "aug.crop: posneg -> classes", "train.max_steps: 800 -> 1000", "eval.sw_overlap: (none) -> 0.5"]
    assert kbp.changed_settings(tmp_path / "absent.yaml", same) == []
