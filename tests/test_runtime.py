import json

import numpy as np
import pytest
import torch

from lossbook import runtime


def test_seed_everything_repeats_all_generators():
    g1 = runtime.seed_everything(3)
    a = (torch.rand(3), np.random.rand(), torch.rand(2, generator=g1))
    g2 = runtime.seed_everything(3)
    b = (torch.rand(3), np.random.rand(), torch.rand(2, generator=g2))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2])


@pytest.mark.parametrize("bad", [-1, 1.5, "0"])
def test_seed_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="seed"):
        runtime.seed_everything(bad)


def test_get_device():
    assert runtime.get_device("cpu").type == "cpu"
    assert runtime.get_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        runtime.get_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            runtime.get_device("cuda")


def test_scale_switch():
    rt = runtime.setup("ci", seed=5, device="cpu")
    assert rt.pick(ci=1, full=2) == 1 and not rt.full
    assert rt.seeds(3, 10) == [5, 6, 7]
    assert runtime.setup("full", device="cpu").pick(ci=1, full=2) == 2
    with pytest.raises(ValueError, match="SCALE"):
        runtime.setup("medium")


def test_record_writes_json(tmp_path):
    rec = runtime.record("part/slug", scale="ci", claims={"a": True, "b": np.bool_(False)},
                         metrics={"acc": torch.tensor(0.5), "curve": np.arange(3)}, out_dir=tmp_path)
    on_disk = json.loads((tmp_path / "part" / "slug.json").read_text())
    assert on_disk == json.loads(json.dumps(rec))
    assert on_disk["claims"] == {"a": True, "b": False}
    assert on_disk["metrics"] == {"acc": 0.5, "curve": [0, 1, 2]}
    assert on_disk["scale"] == "ci" and on_disk["hardware"]


def test_record_without_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("LOSSBOOK_RECORD_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    runtime.record("p/s", scale="ci", claims={"x": True}, metrics={})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kw,match", [({"chapter": "noslash"}, "chapter"), ({"claims": {}}, "claims"),
                                      ({"scale": "big"}, "SCALE")])
def test_record_bad_input(kw, match):
    args = {"chapter": "p/s", "scale": "ci", "claims": {"x": True}, "metrics": {}} | kw
    with pytest.raises(ValueError, match=match):
        runtime.record(args.pop("chapter"), **args)


def test_recorded_finds_results_upwards(tmp_path):
    rec = runtime.record("p/s", scale="full", claims={"a": True, "b": False}, metrics={}, out_dir=tmp_path / "results")
    deep = tmp_path / "chapters" / "p"
    deep.mkdir(parents=True)
    assert runtime.recorded("p/s", start=deep) == json.loads(json.dumps(rec))
    assert runtime.recorded("p/other", start=deep) is None
    rows = runtime.compare_claims({"claims": {"a": True, "b": True, "c": True}}, rec)
    assert [r["full scale"] for r in rows] == ["held", "not held", "not run"]
    assert runtime.compare_claims({"claims": {"a": False}}, None)[0]["full scale"] == "not run"
