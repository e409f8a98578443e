"""Checkpoints: pickle-free round trip, corruption detected, fallback to the previous good one."""
import warnings

import pytest
import torch

from bench.checkpoint import CorruptCheckpoint, load_latest, load_state, save_state


def _state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(4, 3)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "opt": opt.state_dict(), "metrics": [{"epoch": 1, "loss": 0.5}],
            "tuple": (1, "a", torch.arange(3)), "rng": torch.get_rng_state(), "none": None,
            "bf16": torch.ones(2, dtype=torch.bfloat16), "bools": torch.tensor([True, False])}


def test_round_trip_preserves_structure_types_and_int_keys(tmp_path):
    s = _state()
    save_state(tmp_path / "c.safetensors", s)
    r = load_state(tmp_path / "c.safetensors")
    assert set(r["opt"]["state"]) == set(s["opt"]["state"]) and all(isinstance(k, int) for k in r["opt"]["state"])
    assert torch.equal(r["opt"]["state"][0]["momentum_buffer"], s["opt"]["state"][0]["momentum_buffer"])
    assert r["opt"]["param_groups"] == s["opt"]["param_groups"]
    assert isinstance(r["tuple"], tuple) and torch.equal(r["tuple"][2], torch.arange(3))
    assert r["metrics"] == s["metrics"] and r["none"] is None
    assert r["bf16"].dtype == torch.bfloat16 and torch.equal(r["rng"], s["rng"])
    opt = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=1.0, momentum=0.9)
    opt.load_state_dict(r["opt"])  # the optimiser accepts it


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoints_are_detected_and_the_previous_one_is_used(tmp_path, damage):
    prev, last = tmp_path / "prev.safetensors", tmp_path / "last.safetensors"
    save_state(prev, {"epoch": 1, "w": torch.zeros(1000)})
    save_state(last, {"epoch": 2, "w": torch.ones(1000)})
    data = bytearray(last.read_bytes())
    if damage == "truncate":
        last.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-10] ^= 0xFF
        last.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint):
        load_state(last)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        state, path = load_latest([last, prev])
    assert path == prev and state["epoch"] == 1 and any("falling back" in str(x.message) for x in w)


def test_a_foreign_safetensors_file_is_not_taken_for_a_state(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(CorruptCheckpoint, match="not an aft-bench state"):
        load_state(tmp_path / "x.safetensors")


def _edit_header(path, edit):
    """Rewrite a safetensors file's JSON header (its metadata) with ``edit(meta)``, keeping every tensor byte."""
    import json
    import struct

    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header["__metadata__"])
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])


@pytest.mark.parametrize("field,value", [("epochs_done", 5), ("loss", 0.01)])
def test_an_edited_header_is_detected_and_the_previous_checkpoint_used(tmp_path, field, value):
    """The skeleton (epochs done, losses: every number that is not a tensor) is covered by the digest too."""
    import json

    prev, last = tmp_path / "prev.safetensors", tmp_path / "last.safetensors"
    save_state(prev, {"epochs_done": 1, "loss": 0.9, "w": torch.zeros(10)})
    save_state(last, {"epochs_done": 2, "loss": 0.5, "w": torch.ones(10)})

    def edit(meta):
        skel = json.loads(meta["skeleton"])
        for pair in skel["__dict__"]:
            if pair[0] == field:
                pair[1] = value
        meta["skeleton"] = json.dumps(skel)

    _edit_header(last, edit)
    with pytest.raises(CorruptCheckpoint, match="fails its SHA-256 check"):
        load_state(last)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        state, path = load_latest([last, prev])
    assert path == prev and state["epochs_done"] == 1
    # a forged format name does not get the file checked the old (tensors-only) way
    _edit_header(last, lambda m: m.update(format="aft-bench-state/1"))
    with pytest.raises(CorruptCheckpoint, match="fails its SHA-256 check"):
        load_state(last)


def test_an_unreadable_file_is_named_in_one_whole_line(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all, and long enough to be cut " + b"y" * 300)
    with pytest.raises(CorruptCheckpoint) as e:
        load_state(bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {bad} is unreadable (") and msg.endswith(")")
