import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from accel_gpt.checkpoint import find_checkpoint, full_state_dicts, list_checkpoints, load_checkpoint, save_checkpoint
from accel_gpt.config import TrainConfig
from accel_gpt.errors import UserError
from accel_gpt.model import GPTModel
from accel_gpt.optim import build_optimizer

SIZES = dict(vocabulary_size=500, context_len=16, embedding_dim=32, num_heads=2, num_layers=2, dropout=0.0)


def trained(tie: bool):
    torch.manual_seed(0)
    model = GPTModel(**SIZES, tie_weights=tie)
    opt = build_optimizer(model, TrainConfig())
    for _ in range(2):
        model(torch.randint(0, 500, (2, 16))).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_restores_weights_and_optimizer(tmp_path, tie):
    model, opt = trained(tie)
    path = save_checkpoint(tmp_path, 2, model.config, full_state_dicts(model, opt), {"global_step": 2}, {"seed": 1})
    assert path.name == "checkpoint_000002"
    weights = load_file(str(path / "model.safetensors"))  # safetensors alone reads it
    assert ("out_head.weight" in weights) is not tie
    fresh = GPTModel(**SIZES, tie_weights=tie)
    fresh_opt = build_optimizer(fresh, TrainConfig())
    state = load_checkpoint(path, fresh, fresh_opt)
    assert state == {"global_step": 2}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    if tie:
        assert fresh.out_head.weight is fresh.tok_emb.weight
    saved, restored = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert saved.keys() == restored.keys()
    for pid in saved:
        assert all(torch.equal(saved[pid][k], restored[pid][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert fresh_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert json.loads((path / "config.json").read_text())["model"]["embedding_dim"] == 32


def test_latest_ignores_unfinished_temporaries_and_missing_index_is_clear(tmp_path):
    model, opt = trained(False)
    for step in (5, 10):
        save_checkpoint(tmp_path, step, model.config, full_state_dicts(model, opt), {"global_step": step}, {})
    (tmp_path / ".checkpoint_000015.tmp-123").mkdir()  # what a crash mid-save leaves
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 10]
    assert find_checkpoint(tmp_path, "latest").name == "checkpoint_000010"
    with pytest.raises(UserError, match=r"checkpoint 7 not found .*available: 5, 10"):
        find_checkpoint(tmp_path, "7")
    with pytest.raises(UserError, match="no checkpoints"):
        find_checkpoint(tmp_path / "empty", "latest")


def test_resaving_a_step_replaces_it_whole(tmp_path):
    model, opt = trained(False)
    save_checkpoint(tmp_path, 3, model.config, full_state_dicts(model, opt), {"global_step": 3, "v": 1}, {})
    save_checkpoint(tmp_path, 3, model.config, full_state_dicts(model, opt), {"global_step": 3, "v": 2}, {})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_000003"]
    assert json.loads((tmp_path / "checkpoint_000003" / "trainer_state.json").read_text())["v"] == 2


def test_a_resave_killed_between_its_renames_keeps_the_old_copy(tmp_path):
    model, opt = trained(False)
    save_checkpoint(tmp_path, 3, model.config, full_state_dicts(model, opt), {"global_step": 3}, {})
    save_checkpoint(tmp_path, 5, model.config, full_state_dicts(model, opt), {"global_step": 5}, {})
    # What a kill after `checkpoint_000005 -> .old` and before `.tmp -> checkpoint_000005` leaves behind:
    (tmp_path / "checkpoint_000005").rename(tmp_path / ".checkpoint_000005.old-999")
    (tmp_path / ".checkpoint_000005.tmp-999").mkdir()
    assert find_checkpoint(tmp_path, "latest").name == "checkpoint_000005"
    assert json.loads((tmp_path / "checkpoint_000005" / "trainer_state.json").read_text())["global_step"] == 5


def test_optimizer_files_that_do_not_match_the_model_are_one_clear_error(tmp_path):
    model, opt = trained(False)
    path = save_checkpoint(tmp_path, 1, model.config, full_state_dicts(model, opt), {}, {})
    meta = json.loads((path / "optimizer.json").read_text())
    moments = load_file(str(path / "optimizer.safetensors"))
    save_file(
        {k: v for k, v in moments.items() if not k.startswith("final_norm.bias.")}, str(path / "optimizer.safetensors")
    )
    fresh = GPTModel(**SIZES)
    with pytest.raises(
        UserError, match=r"optimizer.safetensors does not match the model: missing \['final_norm.bias'\]"
    ):
        load_checkpoint(path, fresh, build_optimizer(fresh, TrainConfig()))
    # Checkpoints from before optimizer state was keyed by parameter name: refused, with what still works.
    for group in meta["param_groups"]:
        group["params"] = list(range(len(group["params"])))
    (path / "optimizer.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="written by an earlier accel_gpt .* its weights still load"):
        load_checkpoint(path, fresh, build_optimizer(fresh, TrainConfig()))


def test_model_config_mismatch_is_refused(tmp_path):
    model, opt = trained(False)
    path = save_checkpoint(tmp_path, 1, model.config, full_state_dicts(model, opt), {}, {})
    other = GPTModel(**(SIZES | {"embedding_dim": 64}))
    with pytest.raises(UserError, match="different model config"):
        load_checkpoint(path, other)


def _rewrite_manifest_entry(ckpt, name):
    """What an attacker (or a buggy tool) could do: make the manifest vouch for a replaced file."""
    from accel_gpt.checkpoint import _sha256

    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": (ckpt / name).stat().st_size, "sha256": _sha256(ckpt / name)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_truncated_weights_fall_back_to_previous_checkpoint_for_latest(tmp_path, caplog):
    model, opt = trained(False)
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model.config, full_state_dicts(model, opt), {"global_step": step}, {})
    newest = tmp_path / "checkpoint_000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # torn write
    with caplog.at_level("WARNING"):
        assert find_checkpoint(tmp_path, "latest").name == "checkpoint_000001"
    assert "model.safetensors has 1000 bytes" in caplog.text and "falling back" in caplog.text
    with pytest.raises(UserError, match="checkpoint .*checkpoint_000002 is corrupt: model.safetensors has 1000 bytes"):
        find_checkpoint(tmp_path, "2")


def test_flipped_byte_is_caught_by_the_hash(tmp_path):
    model, opt = trained(False)
    ckpt = save_checkpoint(tmp_path, 1, model.config, full_state_dicts(model, opt), {}, {})
    data = bytearray((ckpt / "optimizer.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (ckpt / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="optimizer.safetensors does not match its recorded sha256"):
        find_checkpoint(tmp_path, "1")
    (ckpt / "manifest.json").unlink()  # what a kill before the rename would leave, had it been renamed
    with pytest.raises(UserError, match="no complete checkpoint"):
        find_checkpoint(tmp_path, "latest")


def test_truncated_file_is_refused_before_allocation_even_if_the_manifest_agrees(tmp_path):
    model, opt = trained(False)
    ckpt = save_checkpoint(tmp_path, 1, model.config, full_state_dicts(model, opt), {}, {})
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    _rewrite_manifest_entry(ckpt, "model.safetensors")
    with pytest.raises(UserError, match="truncated or corrupt: tensor .* lies outside the file"):
        load_checkpoint(find_checkpoint(tmp_path, "1"), GPTModel(**SIZES))
    weights.write_bytes((2).to_bytes(8, "little") + b"[]")  # a header that parses, but as a list
    _rewrite_manifest_entry(ckpt, "model.safetensors")
    with pytest.raises(UserError, match="is not a safetensors file \\(header is not a JSON object\\)"):
        load_checkpoint(find_checkpoint(tmp_path, "1"), GPTModel(**SIZES))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if ever unpickled


def test_a_pickle_in_place_of_weights_is_refused_not_executed(tmp_path):
    import pickle

    model, opt = trained(False)
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, model.config, full_state_dicts(model, opt), {}, {})
    marker = tmp_path / "pwned"
    (ckpt / "model.safetensors").write_bytes(pickle.dumps({"tok_emb.weight": _Payload(str(marker))}))
    _rewrite_manifest_entry(ckpt, "model.safetensors")
    with pytest.raises(UserError, match="is not a safetensors file"):
        load_checkpoint(find_checkpoint(tmp_path / "ckpts", "latest"), GPTModel(**SIZES))
    assert not marker.exists()


def test_unwritable_checkpoint_dir_is_a_clear_error(tmp_path):
    model, opt = trained(False)
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(UserError, match="could not write checkpoint .*a_file/ckpts/checkpoint_000001"):
        save_checkpoint(tmp_path / "a_file" / "ckpts", 1, model.config, full_state_dicts(model, opt), {}, {})


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    model, opt = trained(False)
    probe = save_checkpoint(tmp_path / "probe", 1, model.config, full_state_dicts(model, opt), {}, {})
    one_checkpoint = sum(f.stat().st_size for f in probe.iterdir())
    size_kib = one_checkpoint * 3 // 2 // 1024  # room for one checkpoint, not two
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("needs permission to mount a small tmpfs")
    try:
        save_checkpoint(disk, 1, model.config, full_state_dicts(model, opt), {"global_step": 1}, {})
        with pytest.raises(
            UserError, match="could not write checkpoint .*checkpoint_000002: .*No space left on device"
        ):
            save_checkpoint(disk, 2, model.config, full_state_dicts(model, opt), {"global_step": 2}, {})
        assert [p.name for p in disk.iterdir()] == ["checkpoint_000001"]  # no half-written leftovers
        assert find_checkpoint(disk, "latest").name == "checkpoint_000001"
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.parametrize("saved_multiple, loaded_multiple", [(1, 64), (64, 1)])
def test_a_checkpoint_loads_exactly_across_vocabulary_paddings(tmp_path, saved_multiple, loaded_multiple):
    """Checkpoints from before padding existed (or with another vocab_multiple) resume with the same weights and
    AdamW moments: padding rows and their moments are zero."""
    torch.manual_seed(0)
    model = GPTModel(**SIZES, vocab_multiple=saved_multiple)
    opt = build_optimizer(model, TrainConfig())
    model(torch.randint(0, 500, (2, 16)), torch.randint(0, 500, (2, 16))).backward()
    opt.step()
    path = save_checkpoint(tmp_path, 1, model.config, full_state_dicts(model, opt), {"global_step": 1}, {})
    other = GPTModel(**SIZES, vocab_multiple=loaded_multiple)
    other_opt = build_optimizer(other, TrainConfig())
    load_checkpoint(path, other, other_opt)
    assert other.tok_emb.weight.shape[0] == (512 if loaded_multiple == 64 else 500)
    torch.testing.assert_close(other.tok_emb.weight[:500], model.tok_emb.weight[:500], rtol=0, atol=0)
    assert not other.tok_emb.weight[500:].any()
    moments = other_opt.state[other.tok_emb.weight]["exp_avg"]
    torch.testing.assert_close(moments[:500], opt.state[model.tok_emb.weight]["exp_avg"][:500], rtol=0, atol=0)
    assert moments.shape == other.tok_emb.weight.shape
    x = torch.randint(0, 500, (1, 16))
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


def test_a_manifest_without_its_file_list_is_corrupt_and_latest_falls_back(tmp_path):
    model, opt = trained(False)
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model.config, full_state_dicts(model, opt), {"global_step": step}, {})
    (tmp_path / "checkpoint_000002" / "manifest.json").write_text('{"step": 2}')
    with pytest.raises(UserError, match="checkpoint_000002 is corrupt: manifest.json does not list its files"):
        find_checkpoint(tmp_path, "2")
    assert find_checkpoint(tmp_path, "latest").name == "checkpoint_000001"
