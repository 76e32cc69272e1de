"""The optimizers and the modern recipe: Muon orthogonalises what it should and leaves AdamW's parameters to AdamW,
trains, resumes bit for bit, skips non-finite steps; FSDP and optimizer switches are refused in one line; the
bundled `fast` recipe. Muon on 2 gloo processes is test_mixture.py's two-process run."""

import shutil

import torch
from conftest import RECIPE, assert_one_line_error, common_args, one_thread, read_metrics

from accel_gpt.config import TrainConfig, parse_config
from accel_gpt.inference import generate, load_model, perplexity
from accel_gpt.model import GPTConfig, GPTModel
from accel_gpt.optim import MUON_PARAMETERS, MuonWithAdamW, apply_learning_rates, build_optimizer, orthogonalize
from accel_gpt.train import train

MODEL = GPTConfig(vocabulary_size=97, context_len=16, embedding_dim=32, num_heads=2, num_layers=2, dropout=0.0)
MUON = TrainConfig(optimizer="muon", learning_rate=1e-3, muon_learning_rate=2e-3, weight_decay=0.1)


def with_gradients(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(MODEL)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def test_orthogonalize_gives_singular_values_near_one():
    # Singular values over a factor of 10 (five steps of the quintic lift the smallest by about 3.4 each), wide.
    g = torch.randn(3, 32, 96) * torch.logspace(-1, 0, 32)[None, :, None]
    for matrix in (g, g.mT):  # wide and tall alike
        singular = torch.linalg.svdvals(orthogonalize(matrix))
        assert singular.min() > 0.5 and singular.max() < 1.25, singular


def test_muon_takes_the_hidden_matrices_and_each_qkv_block_alone():
    model = with_gradients()
    optimizer = build_optimizer(model, MUON)
    assert isinstance(optimizer, MuonWithAdamW)
    in_muon = {id(p) for g in optimizer.param_groups if g["kind"] == "muon" for p in g["params"]}
    muon = {n for n, p in model.named_parameters() if id(p) in in_muon}
    assert muon == {n for n, _ in model.named_parameters() if MUON_PARAMETERS.search(n)}
    hidden = {"att.qkv.weight", "att.out_proj.weight", "ff.fc.weight", "ff.proj.weight"}
    assert {n.split(".", 2)[2] for n in muon} == hidden
    for group in optimizer.param_groups:
        group["lr"] = 1e-2 * group["lr_scale"]
    qkv = model.trf_blocks[0].att.qkv.weight
    before, grad = qkv.detach().clone(), qkv.grad.clone()
    optimizer.step()
    # The first step's Nesterov momentum is 0.0975 x the gradient; each 32 x 32 block is orthogonalised alone.
    expected = torch.cat([orthogonalize(b[None])[0] for b in (0.0975 * grad).split(32)])
    scale = 2e-2 * 0.2 * 32**0.5  # Muon's lr (2x AdamW's) x its RMS match for a 32 x 32 matrix
    torch.testing.assert_close(qkv.detach(), before * (1 - 2e-2 * 0.1) - scale * expected, rtol=1e-4, atol=1e-6)


def test_adamw_parameters_get_exactly_torch_adamw_updates():
    ours, theirs = with_gradients(), with_gradients()
    optimizer = build_optimizer(ours, MUON)
    adamw = build_optimizer(theirs, TrainConfig(weight_decay=0.1))
    for _ in range(3):
        for opt in (optimizer, adamw):
            for group in opt.param_groups:
                group["lr"] = 1e-3 * group.get("lr_scale", 1.0)
            opt.step()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        if not MUON_PARAMETERS.search(name):
            assert torch.equal(p, q), name


def test_a_non_finite_step_changes_nothing_under_muon():
    model = with_gradients()
    optimizer = build_optimizer(model, MUON)
    optimizer.step()
    before = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]
    model.trf_blocks[0].ff.fc.weight.grad[0, 0] = float("nan")
    optimizer.found_inf = torch.ones(())  # what the step sets from a non-finite gradient norm
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(now[k], then[k]) for now, then in zip(optimizer.state.values(), state) for k in then)


def test_a_resume_takes_the_new_muon_learning_rate_not_the_saved_one():
    model = with_gradients()
    saved = build_optimizer(model, MUON).state_dict()
    changed = TrainConfig(**{**vars(MUON), "muon_learning_rate": 4e-3})
    resumed = build_optimizer(model, changed)
    resumed.load_state_dict(saved)  # the saved groups, with the saved ratio
    apply_learning_rates(resumed, changed)
    assert {g["lr_scale"] for g in resumed.param_groups if g["kind"] == "muon"} == {4.0}


def test_muon_and_every_model_option_train_and_resume_bit_for_bit(tmp_path, train_here):
    args = [*common_args(tmp_path / "full", tmp_path / "cache"), *RECIPE, "--dropout", "0.1", "--save_freq", "5"]
    train(parse_config(one_thread(args)))
    full = read_metrics(tmp_path / "full")
    assert full[10]["loss"] < full[1]["loss"] - 1.0 and full[10]["val_loss"] < full[5]["val_loss"]
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint_000010")
    train(parse_config(one_thread([*args, "--output_dir", resumed, "--checkpoint", "5"])))
    again = read_metrics(resumed)
    assert all(again[step]["loss"] == full[step]["loss"] for step in range(6, 11))
    switched = train_here(*args, "--output_dir", resumed, "--checkpoint", "5", "--optimizer", "adamw")
    assert_one_line_error(switched, "with optimizer adamw: it was trained with muon")
    model = load_model(resumed)  # the notebook API (and sample, evaluate) read the network from the checkpoint
    assert (model.config.position, model.config.logit_softcap) == ("rotary", 15.0)
    assert generate(model, "Every effort moves you", max_new_tokens=8).startswith("Every effort moves you")
    assert 1.0 < perplexity(model, "It had always been his fate to have women say such things of him.") < 60_000


def test_muon_under_fsdp_is_refused_in_one_line(tmp_path, train_here, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    result = train_here("--optimizer", "muon", "--output_dir", tmp_path / "run", "--data_cache_dir", tmp_path / "c")
    assert_one_line_error(result, "optimizer muon orthogonalises whole matrices and FSDP gives each process a slice")
    assert not (tmp_path / "run").exists()


def test_the_fast_recipe_is_bundled():
    cfg = parse_config(["--config", "fast"])
    assert (cfg.optimizer, cfg.lr_schedule, cfg.position, cfg.norm) == ("muon", "wsd", "rotary", "rmsnorm")
    assert parse_config(["--config", "fast", "--model", "tiny"]).model == "tiny"
