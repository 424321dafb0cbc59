"""Sparse autoencoders: planted-dictionary recovery, the unit-norm decoder, dead-feature handling, the activation
cache, checkpoints (atomic, weights_only, resumable bit for bit) and `cratevit sae train`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cratevit.analysis.sae import SAEConfig, SparseAutoencoder
from cratevit.analysis.sae_train import (
    ActivationCache,
    SAETrainConfig,
    load_sae,
    save_sae,
    tensor_batches,
    train_sae,
)
from cratevit.checkpoint import write as checkpoint_write
from cratevit.cli import main
from cratevit.errors import CheckpointError, UserError


def planted(n: int = 20000, d: int = 32, atoms: int = 64, k: int = 3, seed: int = 0):
    """``n`` tokens, each a sum of ``k`` of ``atoms`` random unit atoms in ``d`` dimensions with weights in
    [0.5, 1.5]; returns (tokens (n, d), atoms (d, atoms))."""
    g = torch.Generator().manual_seed(seed)
    atoms_ = F.normalize(torch.randn(d, atoms, generator=g), dim=0)
    idx = torch.rand(n, atoms, generator=g).argsort(1)[:, :k]
    codes = torch.zeros(n, atoms).scatter(1, idx, 0.5 + torch.rand(n, k, generator=g))
    return codes @ atoms_.t(), atoms_


def mean_max_cosine(learned: torch.Tensor, true: torch.Tensor) -> float:
    """For each true atom, the best cosine similarity with a learned dictionary column; their mean."""
    cos = F.normalize(learned, dim=0).t() @ F.normalize(true, dim=0)
    return float(cos.max(0).values.mean())


@pytest.mark.parametrize(("arch", "steps", "extra"), [("relu", 800, {"l1_coeff": 1.0}), ("topk", 600, {"k": 3})])
def test_sae_recovers_a_planted_sparse_dictionary(arch, steps, extra, torch_threads):
    torch_threads(1)  # tiny matrices: one thread is fastest, and steady on busy cores
    x, atoms = planted()
    torch.manual_seed(1)  # not planted()'s seed: its atoms would be the initial columns
    sae = SparseAutoencoder(SAEConfig(d_in=32, expansion=2, arch=arch, dead_after=2000, **extra))
    before = mean_max_cosine(sae.dictionary.detach().clone(), atoms)
    cfg = SAETrainConfig(steps=steps, lr=3e-3, warmup_steps=20, l1_warmup_steps=50, log_every=100, plot=False)
    records = train_sae(sae, tensor_batches(x, 256), cfg)
    after = mean_max_cosine(sae.dictionary.detach(), atoms)
    assert before < 0.6  # random columns are far from the atoms
    assert after > 0.9, f"{arch}: mean max cosine {after:.3f}"
    assert records[-1]["fve"] > 0.85
    if arch == "topk":
        assert records[-1]["l0"] == 3.0


def test_decoder_columns_stay_unit_norm_and_gradients_move_along_the_sphere(torch_threads):
    torch_threads(1)
    x, _ = planted(n=2000)
    torch.manual_seed(1)
    sae = SparseAutoencoder(SAEConfig(d_in=32, expansion=4, arch="relu"))
    torch.testing.assert_close(sae.dictionary.norm(dim=0), torch.ones(128))
    out = sae.loss(x[:256])
    out.loss.backward()
    sae.remove_parallel_gradient()
    parallel = (sae.dictionary.grad * sae.dictionary).sum(0)
    assert parallel.abs().max() < 1e-5
    train_sae(sae, tensor_batches(x, 128), SAETrainConfig(steps=30, lr=1e-2, warmup_steps=1, plot=False))
    torch.testing.assert_close(sae.dictionary.norm(dim=0), torch.ones(128), atol=1e-5, rtol=0)


def test_topk_keeps_exactly_k_features_and_decodes_to_the_input_shape():
    sae = SparseAutoencoder(SAEConfig(d_in=8, expansion=4, arch="topk", k=5))
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: exactly k survive
        x = torch.randn(3, 7, 8)
        f = sae.encode(x)
        assert f.shape == (3, 7, 32)
        assert ((f > 0).sum(-1) == 5).all()
        assert sae(x).shape == x.shape


def test_auxk_loss_reaches_only_dead_features():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=16, expansion=4, arch="topk", k=4, aux_k=8, dead_after=100))
    x = torch.randn(64, 16)
    assert float(sae.loss(x).aux.detach()) == 0.0  # no dead feature yet
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::2] = True
    sae.tokens_since_fired[dead] = 100
    sae.eval()  # keep the counters as set
    out = sae.loss(x)
    assert float(out.aux.detach()) > 0
    (out.aux).backward()
    rows = sae.encoder.grad.abs().sum(1)
    assert (rows[~dead] == 0).all() and (rows[dead] > 0).any()


def test_resampling_revives_dead_features_and_resets_their_adam_moments():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=16, expansion=2, arch="relu"))
    x = torch.randn(256, 16)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.loss(x).loss.backward()
    opt.step()
    sae.normalize_dictionary()
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:5] = True
    with torch.no_grad():
        sae.b_enc[dead] = -1e3  # these never fire
    assert (sae.encode(x)[:, dead] == 0).all()
    n = sae.resample(x, dead, opt, torch.Generator().manual_seed(0))
    assert n == 5
    assert (sae.encode(x)[:, dead] > 0).any(0).all()  # each fires again
    torch.testing.assert_close(sae.dictionary.norm(dim=0), torch.ones(32))
    assert (opt.state[sae.encoder]["exp_avg"][dead] == 0).all()
    assert (opt.state[sae.encoder]["exp_avg"][~dead] != 0).any()
    assert (sae.b_enc[dead] == 0).all()


def test_activation_cache_streams_chunks_and_visits_every_token_once_per_epoch(tmp_path):
    chunks = [torch.arange(7 * i, 7 * i + 7).float()[:, None].repeat(1, 3) for i in range(10)]
    cache = ActivationCache.write(tmp_path / "c", chunks, {"layer": 2}, chunk_tokens=14)
    assert (cache.dim, cache.num_tokens, cache.chunk_sizes, cache.meta) == (3, 70, [14] * 5, {"layer": 2})
    stream = cache.batches(5, seed=3)
    epoch = torch.cat([next(stream) for _ in range(14)])
    assert sorted(epoch[:, 0].tolist()) == list(range(70))
    again = cache.batches(5, seed=3)
    assert torch.equal(torch.cat([next(again) for _ in range(14)]), epoch)  # a pure function of the seed
    assert not torch.equal(epoch[:, 0], torch.arange(70).float())  # shuffled
    (tmp_path / "c" / "index.json").unlink()
    with pytest.raises(UserError, match="not a complete activation cache"):
        ActivationCache(tmp_path / "c")


def _run(folder, steps=40, stop_at=None):
    x, _ = planted(n=3000, d=16, atoms=24)
    cache = (
        ActivationCache(folder / "acts")
        if (folder / "acts" / "index.json").exists()
        else ActivationCache.write(folder / "acts", x.split(500), chunk_tokens=1000)
    )
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=16, expansion=2, arch="relu", dead_after=200))
    with torch.no_grad():
        sae.b_enc[:6] = -100.0  # six features that never fire, for resampling to revive
    cfg = SAETrainConfig(steps=steps, lr=3e-3, warmup_steps=5, resample_every=7, log_every=5, checkpoint_every=10)

    def progress(record):
        if stop_at is not None and record["step"] == stop_at:
            raise KeyboardInterrupt

    return sae, cache, cfg, progress


def test_resumed_training_equals_an_uninterrupted_run_bit_for_bit(tmp_path, torch_threads):
    torch_threads(1)
    sae, cache, cfg, _ = _run(tmp_path / "a")
    train_sae(sae, cache.batches(128, 0), cfg, tmp_path / "a")
    sae_b, cache_b, cfg_b, stop = _run(tmp_path / "b", stop_at=25)
    with pytest.raises(KeyboardInterrupt):
        train_sae(sae_b, cache_b.batches(128, 0), cfg_b, tmp_path / "b", progress=stop)
    assert load_sae(tmp_path / "b" / "sae.pt")[1]["step"] == 20
    fresh, cache_b, cfg_b, _ = _run(tmp_path / "b")
    train_sae(fresh, cache_b.batches(128, 0), cfg_b, tmp_path / "b", resume=True)
    for key, value in sae.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    drop = ("tokens_s",)
    rows = [
        [{k: v for k, v in json.loads(line).items() if k not in drop} for line in (d / "metrics.jsonl").open()]
        for d in (tmp_path / "a", tmp_path / "b")
    ]
    assert rows[0] == rows[1] and len(rows[0]) == 8
    assert sum(r["resampled"] for r in rows[0]) > 0  # the resampling generator's state was resumed too
    assert (tmp_path / "a" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_is_atomic_and_loads_weights_only(tmp_path, monkeypatch):
    sae = SparseAutoencoder(SAEConfig(d_in=8, expansion=2))
    path = save_sae(tmp_path / "sae.pt", sae, SAETrainConfig(), step=3)
    loaded, meta = load_sae(path)
    assert meta["step"] == 3 and loaded.config == sae.config
    assert torch.equal(loaded.dictionary, sae.dictionary)

    def broken_save(obj, f):
        f.write(b"half a file")
        raise OSError("disk failed while writing")

    monkeypatch.setattr(checkpoint_write.torch, "save", broken_save)
    other = SparseAutoencoder(SAEConfig(d_in=8, expansion=2))
    with pytest.raises(OSError, match="disk failed"):
        save_sae(path, other, step=9)
    monkeypatch.undo()
    assert load_sae(path)[1]["step"] == 3  # the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae.pt"]  # no temporary left behind
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an SAE checkpoint"):
        load_sae(tmp_path / "other.pt")


def test_bad_configurations_are_one_line_errors():
    with pytest.raises(UserError, match="unknown SAE architecture"):
        SAEConfig(d_in=8, arch="jumprelu")
    with pytest.raises(UserError, match="TopK needs"):
        SAEConfig(d_in=8, expansion=2, arch="topk", k=17)
    with pytest.raises(UserError, match="all zero"):
        SparseAutoencoder(SAEConfig(d_in=4)).initialize_from(torch.zeros(5, 4))


def test_command_choices_are_the_library_names():
    from cratevit.analysis.activations import SITES
    from cratevit.analysis.sae import ARCHS
    from cratevit.cli import sae as sae_cli

    assert tuple(SITES) == sae_cli.SITES and sae_cli.ARCHS == ARCHS


def test_sae_train_command_on_a_random_crate_layer(tmp_path, capsys, torch_threads):
    torch_threads(1)
    out = tmp_path / "run"
    argv = ["sae", "train", "crate_debug", "--layer", "0", "--images", "48", "--steps", "12", "-b", "64"]
    assert main([*argv, "--expansion", "2", "--threads", "1", "--probe", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layer 0 (0-based)" in text and "random weights" in text and "ISTA code" in text
    assert {"sae.pt", "metrics.jsonl", "curves.png", "eval.json"} <= {p.name for p in out.iterdir()}
    ev = json.loads((out / "eval.json").read_text())
    assert ev["layer"] == 0 and ev["site"] == "ista_in" and ev["random_weights"] is True
    assert ev["sae"]["features"] == 64 and ev["ista"]["features"] == 32
    assert ev["sae"]["tokens"] == 48 * 16  # patch tokens of the held-out images
    assert 0 <= ev["sae"]["l0"] <= 16  # TopK, k = 16
    assert 0 <= ev["sae"]["probe_top1"] <= 100 and 0 <= ev["ista"]["probe_top1"] <= 100
    assert ev["loss_zero"] != ev["loss_clean"] and "loss_recovered" in ev["sae"] and "loss_recovered" in ev["ista"]
    _, meta = load_sae(out / "sae.pt")
    assert meta["step"] == 12 and meta["meta"]["layer"] == 0
    assert len(meta["meta"]["model_fingerprint"]) == 64  # the weights' SHA-256, which the explorer checks
    assert main([*argv, "--steps", "16", "--expansion", "2", "-o", str(out), "--resume"]) == 0
    assert load_sae(out / "sae.pt")[1]["step"] == 16
    assert main(["sae", "train", "crate_debug", "--layer", "7", "-o", str(tmp_path / "x")]) == 2
    assert "outside this 2-layer model" in capsys.readouterr().err
