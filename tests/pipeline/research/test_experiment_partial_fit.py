"""`recsys experiment --resume` continues an autoencoder fit that a stop interrupted, from its last finished epoch.

The stop is simulated by raising KeyboardInterrupt from the trainer's validation (as a timeout or a restart would
arrive mid-fit); everything else is the real harness on small synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import model.train as train_mod
from pipeline.research.experiment import PARTIAL, ExperimentJob

METRICS = ("ndcg@100", "recall@20", "best_epoch")


def _job(out: Path, **kw) -> ExperimentJob:
    base = dict(dataset="synthetic", models=("multivae",), seeds=1, out=out, device="cpu", synthetic_users=400,
                synthetic_items=150, epochs=4, patience=None, progress=False, partial_every_s=0)
    return ExperimentJob(**(base | kw))


def _count_epochs(monkeypatch: pytest.MonkeyPatch, stop_at: int | None = None) -> list[int]:
    """Records each validation (one per epoch); the `stop_at`-th one is interrupted, after the epochs before it
    were saved."""
    real, calls = train_mod.Trainer.validate, []

    def validate(self):
        calls.append(self.epoch)
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(train_mod.Trainer, "validate", validate)
    return calls


def _metrics(res: dict, name: str) -> dict:
    return {m: res["per_seed"][name][0][m] for m in METRICS}


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same runs, never stopped."""
    out = tmp_path_factory.mktemp("whole")
    return {"multivae": _job(out / "a").run().results,
            "multivae-pia": _job(out / "b", models=("multivae-pia",), pia_grid=(0.3, 1.0)).run().results}


def test_a_fit_stopped_mid_way_continues_from_its_last_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             whole: dict, capsys: pytest.CaptureFixture) -> None:
    calls = _count_epochs(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        _job(tmp_path, resume=True).run()
    [partial] = (tmp_path / PARTIAL).glob("*.pt")
    state = torch.load(partial, map_location="cpu", weights_only=False)["trainer"]
    assert state["epoch"] == 2 and len(state["history"]) == 2  # epochs 1 and 2 were saved, the third was lost
    assert not (tmp_path / "results.json").exists()

    calls = _count_epochs(monkeypatch)
    res = _job(tmp_path, resume=True).run().results
    assert calls == [3, 4]  # only the epochs the stopped run had not finished
    assert "continuing the stopped fit after epoch 2" in capsys.readouterr().out
    # the draws of an uninterrupted fit: the same model, so the same validation choice and test scores
    assert _metrics(res, "multivae") == pytest.approx(_metrics(whole["multivae"], "multivae"), abs=1e-6)
    assert not list((tmp_path / PARTIAL).glob("*"))  # a finished fit leaves no partial state behind
    assert state["seconds"] > 0.0  # the stopped run's fit time, carried by its state


def test_a_search_value_stopped_mid_way_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   whole: dict) -> None:
    kw = {"models": ("multivae-pia",), "pia_grid": (0.3, 1.0)}
    _count_epochs(monkeypatch, stop_at=6)  # the second grid value's second epoch
    with pytest.raises(KeyboardInterrupt):
        _job(tmp_path, resume=True, **kw).run()
    ckpt = json.loads((tmp_path / "checkpoint.json").read_text())
    assert [r["value"] for r in ckpt["searching"]["multivae-pia"]] == [0.3]
    [partial] = (tmp_path / PARTIAL).glob("*.pt")
    assert torch.load(partial, map_location="cpu", weights_only=False)["trainer"]["epoch"] == 1

    calls = _count_epochs(monkeypatch)
    res = _job(tmp_path, resume=True, **kw).run().results
    ref = whole["multivae-pia"]
    # value 0.3 restored from the checkpoint; value 1.0 continues after its epoch 1; a restored winner is refit whole
    assert calls == [2, 3, 4] + ([1, 2, 3, 4] if ref["chosen"]["multivae-pia"] == 0.3 else [])
    assert res["tuning"] == ref["tuning"] and res["chosen"] == ref["chosen"]
    assert _metrics(res, "multivae-pia") == pytest.approx(_metrics(ref, "multivae-pia"), abs=1e-6)


@pytest.mark.parametrize("damage", ["torn", "other trainer settings", "other run options"])
def test_an_unusable_partial_state_is_refit_from_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           whole: dict, damage: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    _count_epochs(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        _job(tmp_path, resume=True).run()
    [partial] = (tmp_path / PARTIAL).glob("*.pt")
    if damage == "torn":
        partial.write_bytes(partial.read_bytes()[:100])
    else:
        saved = torch.load(partial, map_location="cpu", weights_only=False)
        if damage == "other trainer settings":
            saved["trainer"]["config"]["lr"] *= 10
        else:  # e.g. a run with other split sizes that never wrote checkpoint.json, in the same --out
            saved["fingerprint"]["config"]["n_valid"] = 7
        torch.save(saved, partial)

    calls = _count_epochs(monkeypatch)
    res = _job(tmp_path, resume=True).run().results
    assert calls == [1, 2, 3, 4]  # the whole fit again, not a continuation of a state it cannot trust
    assert ("cannot be read" if damage == "torn" else "other trainer settings or run options") in caplog.text
    assert _metrics(res, "multivae") == pytest.approx(_metrics(whole["multivae"], "multivae"), abs=1e-6)


def test_without_resume_a_partial_state_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _count_epochs(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        _job(tmp_path).run()
    calls = _count_epochs(monkeypatch)
    _job(tmp_path).run()
    assert calls == [1, 2, 3, 4] and not list((tmp_path / PARTIAL).glob("*"))


def test_states_are_saved_at_most_every_partial_every_s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _count_epochs(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):  # a short fit under the default interval: nothing written yet
        _job(tmp_path, resume=True, partial_every_s=3600).run()
    assert not list((tmp_path / PARTIAL).glob("*.pt"))
    calls = _count_epochs(monkeypatch)
    _job(tmp_path, resume=True, partial_every_s=3600).run()  # the interval may change between a run and its resume
    assert calls == [1, 2, 3, 4]


def test_the_cli_takes_the_interval_and_refuses_a_negative_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli.main import main

    args = ["experiment", "--dataset", "synthetic", "--models", "multivae", "--seeds", "1", "--device", "cpu",
            "--epochs", "4", "--no-progress", "--synthetic-users", "400", "--synthetic-items", "150"]
    assert main([*args, "--out", str(tmp_path / "bad"), "--partial-every-s", "-1"]) == 2
    assert "partial_every_s" in capsys.readouterr().err and not (tmp_path / "bad").exists()

    _count_epochs(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(tmp_path / "o"), "--partial-every-s", "0"])
    assert len(list((tmp_path / "o" / PARTIAL).glob("*.pt"))) == 1
    calls = _count_epochs(monkeypatch)
    assert main([*args, "--out", str(tmp_path / "o"), "--partial-every-s", "0", "--resume"]) == 0
    assert calls[-1] == 4 and 1 not in calls  # continued, not refit (patience off: every epoch validates)


def test_the_report_counts_the_fit_time_of_the_stopped_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _count_epochs(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        _job(tmp_path, resume=True).run()
    [partial] = (tmp_path / PARTIAL).glob("*.pt")
    saved = torch.load(partial, map_location="cpu", weights_only=False)
    saved["trainer"]["seconds"] = 1000.0  # as if the stopped run had trained for 1000 s before its last save
    torch.save(saved, partial)

    _count_epochs(monkeypatch)
    res = _job(tmp_path, resume=True).run().results
    assert res["per_seed"]["multivae"][0]["fit_seconds"] > 1000.0
