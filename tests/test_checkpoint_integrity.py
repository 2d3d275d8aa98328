"""Checkpoints verified before use, repaired by training, and torn scan tiles recomputed (issue 13, item 3)."""

import json
import shutil

import pytest
import torch
from conftest import make_params

from pipeline.data import DataError
from pipeline.landscape.tiles import TileStore, grid_coords, scan, scan_fingerprint
from pipeline.training.checkpoints import (
    MANIFEST,
    expected_fingerprint,
    file_sha256,
    load_checkpoint,
    load_verified,
    partner_config,
    require_checkpoints,
    verified_checkpoints,
)
from pipeline.training.trainer import Trainer, train

FILES = ["epoch_0000.pt", "epoch_0002.pt", "epoch_0004.pt", "epoch_0006.pt"]


def _params(**train_overrides):
    return make_params(train={"epochs": 6, "checkpoint_every": 2, **train_overrides})


@pytest.fixture(scope="module")
def trained(synthetic_data, tmp_path_factory):
    """A completed 6-epoch MLP run (checkpoints 0, 2, 4, 6) and one of another config (another lr)."""
    root = tmp_path_factory.mktemp("trained")
    train(_params().run("mlp"), synthetic_data, root / "good")
    train(_params(lr=0.01).run("mlp"), synthetic_data, root / "other")
    return root


@pytest.fixture
def folder(trained, tmp_path):
    """A fresh copy of the good run's checkpoint folder."""
    shutil.copytree(trained / "good", tmp_path / "mlp")
    return tmp_path / "mlp"


def _tear(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bytes(folder, names):
    return {name: (folder / name).read_bytes() for name in names}


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ the manifest


def test_the_manifest_lists_each_checkpoints_sha256_and_the_run_fingerprint(folder, synthetic_data):
    trainer = Trainer(_params().run("mlp"), synthetic_data, folder)
    rows = json.loads((folder / MANIFEST).read_text())["checkpoints"]
    assert [r["file"] for r in rows] == FILES
    assert [(r["epoch"], r["tag"], r["status"]) for r in rows] == [
        (0, "init", "running"),
        (2, "periodic", "running"),
        (4, "periodic", "running"),
        (6, "final", "completed"),
    ]
    assert all(r["sha256"] == file_sha256(folder / r["file"]) for r in rows)
    assert all(r["fingerprint"] == trainer.fingerprint for r in rows)
    assert expected_fingerprint(_params(), "mlp", synthetic_data.fingerprint()) == trainer.fingerprint


# ------------------------------------------------------------------ training repairs, never deletes good ones


def test_a_torn_and_a_foreign_checkpoint_are_repaired_from_the_newest_good_one_before_them(
    folder, trained, synthetic_data
):
    _tear(folder / "epoch_0004.pt")
    shutil.copy(trained / "other" / "epoch_0006.pt", folder / "epoch_0006.pt")  # another config's, copied in
    kept = _bytes(folder, FILES[:2])
    trainer = Trainer(_params().run("mlp"), synthetic_data, folder)
    message = trainer.start()
    assert message.startswith("resumed from epoch_0002.pt (epoch 2/6, status running); repaired: ")
    assert "deleted epoch_0004.pt (unreadable (torn write?))" in message
    assert "deleted epoch_0006.pt (made by another config, data or code)" in message
    assert "retraining from epoch 2" in message and "\n" not in message
    assert _bytes(folder, FILES[:2]) == kept  # the good ones untouched
    assert sorted(p.name for p in folder.glob("epoch_*.pt")) == FILES[:2]
    assert [r["file"] for r in json.loads((folder / MANIFEST).read_text())["checkpoints"]] == FILES[:2]

    while not trainer.done:
        trainer.train_epoch()
    entries = verified_checkpoints(folder, "mlp", trainer.fingerprint)
    assert [e["file"] for e in entries] == FILES
    reference = load_checkpoint(trained / "good" / "epoch_0006.pt")["model"]
    repaired = load_checkpoint(folder / "epoch_0006.pt")["model"]
    assert all(torch.equal(reference[k], repaired[k]) for k in reference)  # the same run, bitwise (CPU)


def test_a_foreign_newest_checkpoint_deletes_only_itself(folder, trained, synthetic_data):
    shutil.copy(trained / "other" / "epoch_0006.pt", folder / "epoch_0006.pt")
    kept = _bytes(folder, FILES[:3])
    trainer = Trainer(_params().run("mlp"), synthetic_data, folder)
    message = trainer.start()
    assert message.startswith("resumed from epoch_0004.pt (epoch 4/6")
    assert "deleted epoch_0006.pt (made by another config, data or code)" in message
    assert _bytes(folder, FILES[:3]) == kept
    assert trainer.state.epoch == 4


def test_good_checkpoints_after_a_torn_one_are_kept_and_training_goes_back_before_it(folder, synthetic_data):
    _tear(folder / "epoch_0002.pt")
    kept = _bytes(folder, ["epoch_0000.pt", "epoch_0004.pt", "epoch_0006.pt"])
    trainer = Trainer(_params().run("mlp"), synthetic_data, folder)
    message = trainer.start()
    assert message.startswith("resumed from epoch_0000.pt (epoch 0/6")
    assert "deleted epoch_0002.pt (unreadable (torn write?))" in message
    assert trainer.state.epoch == 0 and not trainer.done
    assert _bytes(folder, kept) == kept
    listed = [r["file"] for r in json.loads((folder / MANIFEST).read_text())["checkpoints"]]
    assert listed == ["epoch_0000.pt", "epoch_0004.pt", "epoch_0006.pt"]


def test_a_deleted_manifest_is_rewritten_on_start_without_retraining(folder, synthetic_data):
    original = (folder / MANIFEST).read_text()
    (folder / MANIFEST).unlink()
    trainer = Trainer(_params().run("mlp"), synthetic_data, folder)
    message = trainer.start()
    assert message == (
        "resumed from epoch_0006.pt (epoch 6/6, status completed); repaired: rewrote missing manifest.json"
    )
    assert trainer.done
    assert (folder / MANIFEST).read_text() == original


def test_a_listed_checkpoint_that_is_gone_is_retrained(folder, synthetic_data):
    (folder / "epoch_0004.pt").unlink()
    trainer = Trainer(_params().run("mlp"), synthetic_data, folder)
    message = trainer.start()
    assert message.startswith("resumed from epoch_0002.pt")
    assert "epoch_0004.pt listed in manifest.json but missing" in message


def test_an_intact_folder_resumes_without_a_repair_note(folder, synthetic_data):
    assert (
        Trainer(_params().run("mlp"), synthetic_data, folder).start()
        == "resumed from epoch_0006.pt (epoch 6/6, status completed)"
    )


def test_a_changed_config_replaces_only_the_files_of_the_other_fingerprint(folder, synthetic_data):
    trainer = Trainer(_params(lr=0.2).run("mlp"), synthetic_data, folder)
    message = trainer.start()
    assert message == "started afresh (discarded 4 checkpoint(s) made with another config, data or code)"
    assert [e["file"] for e in verified_checkpoints(folder, "mlp", trainer.fingerprint)] == ["epoch_0000.pt"]


# ------------------------------------------------------------------ analyses use verified checkpoints only


def test_analyses_accept_an_intact_folder(folder, synthetic_data):
    fingerprint = expected_fingerprint(_params(), "mlp", synthetic_data.fingerprint())
    entries = require_checkpoints(folder, "mlp", expected_fingerprint=fingerprint)
    assert [e["file"] for e in entries] == FILES
    assert load_verified(folder, entries[-1], "mlp")["status"] == "completed"


def test_a_torn_checkpoint_is_a_one_line_error_naming_it(folder):
    _tear(folder / "epoch_0004.pt")
    with pytest.raises(DataError) as error:
        require_checkpoints(folder, "mlp")
    assert _one_line(error) == (
        f"{folder}/epoch_0004.pt: sha256 does not match manifest.json (torn or replaced); rerun `dvc repro train@mlp`"
    )


def test_a_replaced_checkpoint_is_a_one_line_error_naming_it(folder, trained):
    shutil.copy(trained / "other" / "epoch_0004.pt", folder / "epoch_0004.pt")
    with pytest.raises(DataError, match=r"epoch_0004.pt: sha256 does not match manifest.json") as error:
        require_checkpoints(folder, "mlp")
    _one_line(error)


def test_an_unlisted_checkpoint_is_a_one_line_error_naming_it(folder, trained):
    shutil.copy(trained / "other" / "epoch_0006.pt", folder / "epoch_0008.pt")
    with pytest.raises(DataError) as error:
        require_checkpoints(folder, "mlp")
    assert _one_line(error) == (
        f"{folder}/epoch_0008.pt: not listed in manifest.json (copied in or left over); rerun `dvc repro train@mlp`"
    )


def test_checkpoints_of_another_config_are_a_one_line_error_for_analyses(trained, synthetic_data):
    fingerprint = expected_fingerprint(_params(), "mlp", synthetic_data.fingerprint())
    pattern = (
        r"/other/epoch_0000.pt: made by another config/data/code \(fingerprint [0-9a-f]{12}, "
        r"expected [0-9a-f]{12}\); rerun `dvc repro train@mlp`$"
    )
    with pytest.raises(DataError, match=pattern) as error:
        require_checkpoints(trained / "other", "mlp", expected_fingerprint=fingerprint)
    _one_line(error)


def test_a_missing_manifest_is_a_one_line_error_for_analyses(folder):
    (folder / MANIFEST).unlink()
    with pytest.raises(DataError, match=r"manifest.json: missing or unreadable") as error:
        require_checkpoints(folder, "mlp", stage="partner")
    assert _one_line(error).endswith("rerun `dvc repro partner@mlp`")


def test_a_listed_checkpoint_that_is_gone_is_a_one_line_error_for_analyses(folder):
    (folder / "epoch_0002.pt").unlink()
    with pytest.raises(DataError, match=r"epoch_0002.pt: listed in manifest.json but missing") as error:
        require_checkpoints(folder, "mlp")
    _one_line(error)


def test_a_checkpoint_torn_after_listing_is_caught_when_loaded(folder):
    entries = require_checkpoints(folder, "mlp")
    _tear(folder / "epoch_0006.pt")
    with pytest.raises(DataError, match=r"epoch_0006.pt: sha256 does not match manifest.json") as error:
        load_verified(folder, entries[-1], "mlp")
    _one_line(error)


def test_the_partner_config_is_the_one_the_partner_stage_trains():
    from pipeline.flows.train import partner_run

    params = make_params(train={"epochs": 3, "track_sharpness_every": 2})
    assert partner_config(params, "mlp") == partner_run(params, "mlp")
    assert partner_config(params, "mlp").train.seed != params.run("mlp").train.seed


def test_scan_flows_read_the_partner_with_its_own_fingerprint_and_refuse_a_foreign_one(
    trained, tmp_path, synthetic_data
):
    from pipeline.flows.landscape import _final_model

    params = _params()
    fingerprint = synthetic_data.fingerprint()
    train(partner_config(params, "mlp"), synthetic_data, tmp_path / "partner")
    entries, payload, _ = _final_model(
        tmp_path / "partner", params, "mlp", synthetic_data, fingerprint, stage="partner"
    )
    assert entries[-1]["file"] == "epoch_0006.pt" and payload["config"]["train"]["seed"] != 0
    with pytest.raises(DataError, match=r"made by another config/data/code .*; rerun `dvc repro partner@mlp`$"):
        _final_model(trained / "good", params, "mlp", synthetic_data, fingerprint, stage="partner")


# ------------------------------------------------------------------ torn scan tiles


def _surface():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    directions = [{n: torch.randn_like(p) for n, p in params.items()} for _ in range(2)]
    axis = torch.linspace(-1, 1, 4, dtype=torch.float64)
    coords = grid_coords([axis, axis])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(11, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (11,), generator=g)
    return model, params, directions, coords, x, y


def test_a_torn_tile_is_recomputed_with_one_warning_naming_it(tmp_path, capsys):
    model, params, directions, coords, x, y = _surface()
    key = scan_fingerprint(directions=["a", "b"], coords=coords, tile_size=4)
    reference = scan(model, params, {}, directions, coords, x, y, TileStore(tmp_path, key), tile_size=4)
    torn = tmp_path / "tile_000002.pt"
    _tear(torn)

    warnings = []
    store = TileStore(tmp_path, key, warn=warnings.append)
    assert warnings == [f"{torn}: unreadable (torn write?); recomputing"]
    assert store.done() == {0, 1, 3}
    again = scan(model, params, {}, directions, coords, x, y, store, tile_size=4)
    assert all(torch.equal(a, b) for a, b in zip(again, reference))

    torn.write_bytes(b"not a tile")  # the default: one line on stderr
    TileStore(tmp_path, key)
    assert capsys.readouterr().err == f"warning: {torn}: unreadable (torn write?); recomputing\n"


def test_a_tile_torn_after_the_store_opened_is_a_one_line_error_naming_it(tmp_path):
    model, params, directions, coords, x, y = _surface()
    key = scan_fingerprint(directions=["a", "b"], coords=coords, tile_size=4)
    store = TileStore(tmp_path, key)
    scan(model, params, {}, directions, coords, x, y, store, tile_size=4)
    _tear(tmp_path / "tile_000001.pt")
    with pytest.raises(ValueError, match=r"tile_000001.pt: unreadable \(torn write\?\); rerun the scan") as error:
        store.load_all(len(coords))
    _one_line(error)
