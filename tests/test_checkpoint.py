import json

import pytest
import torch
from safetensors.torch import load_file

from accel_gpt.checkpoint import find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from accel_gpt.errors import UserError
from accel_gpt.model import GPTModel
from accel_gpt.train import build_optimizer
from accel_gpt.config import TrainConfig

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
    path = save_checkpoint(tmp_path, 2, model, opt, {"global_step": 2}, {"seed": 1})
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
        save_checkpoint(tmp_path, step, model, opt, {"global_step": step}, {})
    (tmp_path / ".checkpoint_000015.tmp-123").mkdir()  # what a crash mid-save leaves
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 10]
    assert find_checkpoint(tmp_path, "latest").name == "checkpoint_000010"
    with pytest.raises(UserError, match=r"checkpoint 7 not found .*available: 5, 10"):
        find_checkpoint(tmp_path, "7")
    with pytest.raises(UserError, match="no checkpoints"):
        find_checkpoint(tmp_path / "empty", "latest")


def test_resaving_a_step_replaces_it_whole(tmp_path):
    model, opt = trained(False)
    save_checkpoint(tmp_path, 3, model, opt, {"global_step": 3, "v": 1}, {})
    save_checkpoint(tmp_path, 3, model, opt, {"global_step": 3, "v": 2}, {})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_000003"]
    assert json.loads((tmp_path / "checkpoint_000003" / "trainer_state.json").read_text())["v"] == 2


def test_model_config_mismatch_is_refused(tmp_path):
    model, opt = trained(False)
    path = save_checkpoint(tmp_path, 1, model, opt, {}, {})
    other = GPTModel(**(SIZES | {"embedding_dim": 64}))
    with pytest.raises(UserError, match="different model config"):
        load_checkpoint(path, other)
