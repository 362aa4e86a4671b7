"""LWFState: exact save/load round trip, atomic writes, no pickle, and a clear error for every malformed file."""

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

import hf_lwf.state as state_module
from hf_lwf.state import CONFIG_NAME, STATE_JSON, STATE_TENSORS, LWFState, atomic_write_text, write_config


def _full_state():
    g = torch.Generator().manual_seed(0)
    return LWFState(
        config={"lwf_seed": 3, "lwf_forget_prompts": ["a", "b"], "lwf_forget_ratio": None, "nested": {"x": 1.5}},
        config_hash="0123456789abcdef",
        generation_hash="fedcba9876543210",
        self_data_path="/tmp/run/_lwf_self_data",
        self_data_sizes={"dental": 5, "psych": 3},
        fisher_updates=17,
        unlearn_points=2,
        unlearn_steps=4,
        skipped_steps=1,
        empty_selections=0,
        idle_points=1,
        scores=[0.125, -3.5e-7, 1e30, 0.0],
        forget_indices=[0, 3, 7],
        forget_sizes={"dental": 2, "psych": 1},
        sampler={"size": 3, "seed": 42, "epoch": 1, "position": 2},
        drawn={"0": 2, "3": 1, "7": 1},
        unlearned={"0": 2, "7": 1},
        history=[{"step": 2, "lwf/forget_loss": 3.25, "lwf/num_selected": 3}, {"step": 4, "lwf/forget_loss": None}],
        fisher={
            "model.layers.0.mlp.up_proj.weight": torch.rand(4, 3, generator=g),
            "lm_head.weight": torch.rand(5, generator=g) * 1e-30,
        },
        reference={
            "model.layers.0.mlp.up_proj.weight": torch.randn(4, 3, generator=g),
            "lm_head.weight": torch.randn(5, generator=g).to(torch.bfloat16),
            "scalar": torch.tensor(2.5),
        },
    )


def _saved(tmp_path, state=None):
    directory = str(tmp_path / "checkpoint-4")
    (state or _full_state()).save(directory)
    return directory


def _scalars(state):
    """The JSON part without the checksums, which save() fills in."""
    return {k: v for k, v in state.scalars().items() if k != "checksums"}


def _assert_equal_states(a, b):
    assert _scalars(a) == _scalars(b)
    for group in ("fisher", "reference"):
        left, right = getattr(a, group), getattr(b, group)
        assert set(left) == set(right)
        for name in left:
            assert left[name].dtype == right[name].dtype and left[name].shape == right[name].shape
            assert torch.equal(left[name], right[name])
            assert left[name].reshape(-1).view(torch.uint8).tolist() == right[name].reshape(-1).view(torch.uint8).tolist()  # bitwise


# ---------------------------------------------------------------- round trip


def test_round_trip_is_exact(tmp_path):
    state = _full_state()
    loaded = LWFState.load(_saved(tmp_path, state))
    _assert_equal_states(state, loaded)
    assert loaded.history[1]["lwf/forget_loss"] is None
    assert loaded.scores == [0.125, -3.5e-7, 1e30, 0.0]
    assert all(t.device.type == "cpu" for t in loaded.fisher.values())


def test_round_trip_of_the_default_state(tmp_path):
    _assert_equal_states(LWFState(), LWFState.load(_saved(tmp_path, LWFState())))


def test_save_overwrites_a_previous_state(tmp_path):
    directory = _saved(tmp_path)
    newer = _full_state()
    newer.fisher_updates, newer.fisher = 99, {"only": torch.ones(2)}
    newer.save(directory)
    loaded = LWFState.load(directory)
    assert loaded.fisher_updates == 99 and set(loaded.fisher) == {"only"}


def test_files_are_json_and_safetensors_only(tmp_path):
    directory = _saved(tmp_path)
    assert sorted(os.listdir(directory)) == sorted([STATE_JSON, STATE_TENSORS])  # no temporary files left
    with open(os.path.join(directory, STATE_JSON), encoding="utf-8") as handle:
        data = json.load(handle)
    assert data["format_version"] == 2 and data["fisher_updates"] == 17
    assert data["checksums"] == {STATE_TENSORS: state_module.file_sha256(os.path.join(directory, STATE_TENSORS)),
                                 "model_weights": ""}
    assert "fisher" not in data and "reference" not in data
    with open(os.path.join(directory, STATE_TENSORS), "rb") as handle:
        raw = handle.read()
    assert not raw.startswith(b"\x80") and not raw.startswith(b"PK")  # neither a pickle nor a torch zip
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    assert header["__metadata__"] == {"format": "hf_lwf"}
    assert {k for k in header if k != "__metadata__"} == {
        "fisher/model.layers.0.mlp.up_proj.weight", "fisher/lm_head.weight",
        "reference/model.layers.0.mlp.up_proj.weight", "reference/lm_head.weight", "reference/scalar",
    }


def test_no_pickle_is_used_to_save_or_load(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for module, name in [(pickle, "dump"), (pickle, "dumps"), (pickle, "load"), (pickle, "loads"),
                         (torch, "save"), (torch, "load")]:
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr(pickle, "Pickler", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    state = _full_state()
    _assert_equal_states(state, LWFState.load(_saved(tmp_path, state)))


def test_failed_write_leaves_no_temporary_file_and_keeps_the_old_state(tmp_path, monkeypatch):
    directory = _saved(tmp_path)

    def half_written(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"\x00\x01partial")
        raise OSError("disk full")

    monkeypatch.setattr(state_module, "save_file", half_written)
    newer = _full_state()
    newer.fisher_updates = 1000
    with pytest.raises(OSError, match="disk full"):
        newer.save(directory)
    assert sorted(os.listdir(directory)) == sorted([STATE_JSON, STATE_TENSORS])
    _assert_equal_states(_full_state(), LWFState.load(directory))


def test_write_config_and_atomic_write_text(tmp_path):
    directory = str(tmp_path / "out")
    config = {"lwf_seed": 1, "lwf_forget_prompts": {"a": ["x"]}}
    path = write_config(directory, config)
    assert path == os.path.join(directory, CONFIG_NAME)
    with open(path, encoding="utf-8") as handle:
        assert json.load(handle) == config
    atomic_write_text(directory, CONFIG_NAME, "{}")
    with open(path, encoding="utf-8") as handle:
        assert handle.read() == "{}"
    assert os.listdir(directory) == [CONFIG_NAME]


# ---------------------------------------------------------------- malformed files


def _json_path(directory):
    return os.path.join(directory, STATE_JSON)


def _tensor_path(directory):
    return os.path.join(directory, STATE_TENSORS)


def _edit_json(directory, edit):
    with open(_json_path(directory), encoding="utf-8") as handle:
        data = json.load(handle)
    edit(data)
    with open(_json_path(directory), "w", encoding="utf-8") as handle:
        json.dump(data, handle)


def _load_error(directory):
    with pytest.raises(ValueError) as info:
        LWFState.load(directory)
    return str(info.value)


def test_missing_files(tmp_path):
    directory = _saved(tmp_path)
    os.remove(_tensor_path(directory))
    with pytest.raises(FileNotFoundError, match=STATE_TENSORS):
        LWFState.load(directory)
    with pytest.raises(FileNotFoundError, match=STATE_JSON):
        LWFState.load(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe garbage"])
def test_corrupted_json(tmp_path, text):
    directory = _saved(tmp_path)
    with open(_json_path(directory), "w", encoding="latin-1") as handle:
        handle.write(text)
    assert _json_path(directory) in _load_error(directory)


@pytest.mark.parametrize("content", [[1, 2], {"fisher_updates": 1}, {"format_version": 3}, {"format_version": True}])
def test_json_without_the_format_version(tmp_path, content):
    directory = _saved(tmp_path)
    with open(_json_path(directory), "w", encoding="utf-8") as handle:
        json.dump(content, handle)
    message = _load_error(directory)
    assert _json_path(directory) in message and "format version" in message


def test_unknown_fields(tmp_path):
    directory = _saved(tmp_path)
    _edit_json(directory, lambda d: d.update(surprise=1))
    message = _load_error(directory)
    assert _json_path(directory) in message and "surprise" in message


@pytest.mark.parametrize("name,value", [
    ("fisher_updates", "17"),
    ("fisher_updates", 17.0),
    ("fisher_updates", True),
    ("unlearn_points", None),
    ("config_hash", 5),
    ("self_data_path", 3),
    ("scores", {"a": 1}),
    ("forget_indices", "0,3"),
    ("sampler", [1, 2]),
    ("history", "none"),
    ("config", []),
])
def test_wrong_top_level_types(tmp_path, name, value):
    directory = _saved(tmp_path)
    _edit_json(directory, lambda d: d.update({name: value}))
    message = _load_error(directory)
    assert _json_path(directory) in message and repr(name) in message


@pytest.mark.parametrize("name,value", [
    ("forget_indices", [0, "3"]),
    ("forget_indices", [0, 1.5]),
    ("scores", [0.1, "high"]),
    ("sampler", {"size": "3", "seed": 42, "epoch": 0, "position": 0}),
    ("self_data_sizes", {"dental": None}),
])
def test_wrong_element_types(tmp_path, name, value):
    directory = _saved(tmp_path)
    _edit_json(directory, lambda d: d.update({name: value}))
    message = _load_error(directory)
    assert _json_path(directory) in message and repr(name) in message


def test_null_self_data_path_is_valid(tmp_path):
    directory = _saved(tmp_path)
    _edit_json(directory, lambda d: d.update(self_data_path=None))
    assert LWFState.load(directory).self_data_path is None


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -10])
def test_truncated_safetensors(tmp_path, keep):
    directory = _saved(tmp_path)
    with open(_tensor_path(directory), "rb") as handle:
        raw = handle.read()
    with open(_tensor_path(directory), "wb") as handle:
        handle.write(raw[:keep])
    assert _tensor_path(directory) in _load_error(directory)


def _as_format_1(directory):
    """Rewrite the JSON as hf_lwf wrote it before it recorded checksums: the tensor file is checked by content only."""
    _edit_json(directory, lambda d: (d.pop("checksums"), d.update(format_version=1)))


def test_foreign_safetensors_without_the_marker(tmp_path):
    directory = _saved(tmp_path)
    _as_format_1(directory)
    save_file({"fisher/w": torch.ones(2)}, _tensor_path(directory))
    message = _load_error(directory)
    assert _tensor_path(directory) in message and "hf_lwf" in message
    save_file({"fisher/w": torch.ones(2)}, _tensor_path(directory), metadata={"format": "pt"})
    assert _tensor_path(directory) in _load_error(directory)


@pytest.mark.parametrize("key", ["optimizer/w", "fisher", "fisher/"])
def test_unexpected_tensor_names(tmp_path, key):
    directory = _saved(tmp_path)
    _as_format_1(directory)
    save_file({key: torch.ones(2)}, _tensor_path(directory), metadata={"format": "hf_lwf"})
    message = _load_error(directory)
    assert _tensor_path(directory) in message and repr(key) in message


def test_pickle_file_in_place_of_safetensors_is_rejected(tmp_path):
    directory = _saved(tmp_path)
    with open(_tensor_path(directory), "wb") as handle:
        pickle.dump({"fisher/w": [1.0]}, handle)
    assert _tensor_path(directory) in _load_error(directory)


def test_place_like_moves_every_state_tensor_to_its_parameters_device(tmp_path):
    loaded = LWFState.load(_saved(tmp_path))
    names = ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    parameters = {name: torch.empty(1, device="meta") for name in names}
    loaded.place_like(parameters)
    for group in ("fisher", "reference"):
        for name in names:
            assert getattr(loaded, group)[name].device.type == "meta"
    assert loaded.reference["scalar"].device.type == "cpu"  # no parameter of that name: left alone
    assert loaded.reference["lm_head.weight"].dtype == torch.bfloat16  # dtype as saved


def test_legacy_failed_points_field_is_accepted(tmp_path):
    directory = _saved(tmp_path)
    path = os.path.join(directory, STATE_JSON)
    data = json.loads(open(path).read())
    data["failed_points"] = 2
    with open(path, "w") as handle:
        json.dump(data, handle)
    assert _scalars(LWFState.load(directory)) == _scalars(_full_state())


def test_format_1_file_without_checksums_still_loads(tmp_path):
    state = _full_state()
    directory = _saved(tmp_path, state)
    _as_format_1(directory)
    loaded = LWFState.load(directory)
    assert loaded.checksums == {}
    _assert_equal_states(state, loaded)


def test_tensor_file_of_another_save_is_refused_by_its_checksum(tmp_path):
    """Both files valid on their own, from two saves: the JSON's checksum tells they do not belong together."""
    directory = _saved(tmp_path)
    other = _full_state()
    other.fisher = {name: t * 2 for name, t in other.fisher.items()}
    other.save(str(tmp_path / "other"))
    os.replace(_tensor_path(str(tmp_path / "other")), _tensor_path(directory))
    message = _load_error(directory)
    assert _tensor_path(directory) in message and _json_path(directory) in message and "belong together" in message


def test_format_2_json_without_checksums_is_refused(tmp_path):
    directory = _saved(tmp_path)
    _edit_json(directory, lambda d: d.pop("checksums"))
    message = _load_error(directory)
    assert _json_path(directory) in message and "checksums" in message


def test_saved_checksums_name_the_weights(tmp_path):
    state = _full_state()
    state.save(str(tmp_path / "c"), weights_sha256="ab" * 32)
    assert LWFState.load(str(tmp_path / "c")).checksums["model_weights"] == "ab" * 32


def test_run_summary_counts_what_ran():
    summary = _full_state().run_summary()
    assert summary == {"unlearn_points": 2, "idle_points": 1, "unlearn_steps": 4, "skipped_steps": 1,
                       "empty_selections": 0, "selected_samples": 3, "forgotten_samples": 2, "fisher_updates": 17}


def test_place_like_keeps_the_state_where_it_is_told(tmp_path):
    loaded = LWFState.load(_saved(tmp_path))
    loaded.place_like({"lm_head.weight": torch.empty(1, device="meta")}, device="cpu")
    assert loaded.fisher["lm_head.weight"].device.type == "cpu"


def test_a_bf16_fisher_resumes_bitwise(tmp_path):
    """Saved after 3 updates, loaded (safetensors lists the entries in name order, not the model's) and updated 3
    more times: the same bits as the run that never stopped."""
    from hf_lwf.method.fisher import online_fisher_update_

    g = torch.Generator().manual_seed(4)
    shapes = {"model.layers.0.mlp.up_proj.weight": (6, 4), "model.embed_tokens.weight": (9, 4), "lm_head.weight": (9, 4)}
    steps = [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(6)]
    fisher = {n: torch.zeros(s, dtype=torch.bfloat16) for n, s in shapes.items()}

    def update(f, start, stop):
        for step in range(start, stop):
            online_fisher_update_(f, steps[step], 0.99, dtype=torch.bfloat16, seed=20 + step)

    update(fisher, 0, 3)
    LWFState(fisher=fisher, fisher_updates=3).save(str(tmp_path))
    resumed = LWFState.load(str(tmp_path)).fisher
    assert list(resumed) != list(fisher)  # the order the fault came from
    update(fisher, 3, 6)
    update(resumed, 3, 6)
    for name in shapes:
        assert resumed[name].dtype == torch.bfloat16
        assert torch.equal(resumed[name].view(torch.int16), fisher[name].view(torch.int16)), name
