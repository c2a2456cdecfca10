"""morphnet.integrations.lightning.MorphNet on real PyTorch Lightning (CPU): the term reaches the
gradients, target-cost mode, logging, structure files that rebuild, checkpoints, DDP with 2 processes."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

import morphnet  # noqa: E402
from morphnet.integrations.lightning import MorphNet  # noqa: E402

SRC = str(Path(morphnet.__file__).resolve().parents[1])


pytestmark = pytest.mark.usefixtures("one_thread")


class Classifier(L.LightningModule):
    """A small conv net on 8x8 images; ``batchnorm=False`` leaves group lasso as the only choice."""

    def __init__(self, batchnorm=True, lr=0.1):
        super().__init__()
        norm = nn.BatchNorm2d if batchnorm else (lambda c: nn.Identity())
        self.model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), norm(16), nn.ReLU(),
            nn.Conv2d(16, 24, 3, padding=1), norm(24), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 4),
        )
        self.lr = lr

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(n=64, batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return DataLoader(TensorDataset(x, (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0].mean((1, 2)) > 0).long()),
                      batch_size=batch)


def trainer(tmp_path, callbacks, max_steps, **kw):
    kw.setdefault("logger", CSVLogger(tmp_path, name="logs"))
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, callbacks=callbacks, default_root_dir=tmp_path,
                     enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5, **kw)


def test_zero_config_lands_a_structure_file_that_rebuilds(tmp_path):
    L.seed_everything(0)
    module = Classifier()
    callback = MorphNet(target_cost=0.5)
    t = trainer(tmp_path, [callback], max_steps=40, enable_checkpointing=False)
    t.fit(module, loader())
    assert callback.regularizer.name == "GammaFlops"  # the model has BatchNorms
    assert callback.target_cost.steps == 40 and callback.target_cost.log_every == 1  # < 100 steps: every step
    log_dir = Path(t.log_dir)
    files = sorted((log_dir / "learned_structure").glob("alive_*.json"))
    assert callback.structure_file in files and log_dir / "learned_structure" / "alive_40.json" in files
    step, counts = callback.target_cost.best().step, callback.target_cost.best_structure()
    assert callback.structure_file.name == f"alive_{step}.json"
    assert json.loads(callback.structure_file.read_text()) == counts
    example = torch.randn(1, 3, 8, 8)
    slim = morphnet.apply_structure(module, callback.structure_file, example)
    assert slim(example).shape == (1, 4)
    assert morphnet.compute_cost(slim, example) == pytest.approx(callback.target_cost.best().cost)
    metrics = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("morphnet/cost", "morphnet/strength", "morphnet/term", "morphnet/alive_channels",
                 "morphnet/alive/model.0"):
        assert name in metrics


def test_without_batchnorm_the_default_is_group_lasso(tmp_path):
    callback = MorphNet(target_cost=0.5, module="model")
    with pytest.warns(morphnet.TargetMissedWarning, match="the seed's .no channel died. after 2 steps"):
        trainer(tmp_path, [callback], max_steps=2, enable_checkpointing=False, logger=False).fit(
            Classifier(batchnorm=False), loader())  # 2 steps kill nothing: the target is missed, and said so
    assert callback.regularizer.name == "GroupLassoFlops"
    assert set(callback.regularizer.alive_counts()) == {"0", "3"}  # names inside module="model"


def test_the_term_reaches_the_gradients_of_a_fixed_strength_step(tmp_path):
    """One SGD step with strength s moves the parameters by -lr * s * d(term)/dp beyond the step
    without MorphNet."""
    strength, lr, params = 1e-6, 0.1, {}
    for s in (0.0, strength):
        L.seed_everything(0)
        module = Classifier(lr=lr)
        start = {k: v.clone() for k, v in module.state_dict().items()}
        callback = MorphNet(strength=s)
        trainer(tmp_path, [callback], max_steps=1, enable_checkpointing=False, logger=False).fit(module, loader())
        params[s] = module.state_dict()
    reference = Classifier()
    reference.load_state_dict(start)
    reg = morphnet.GammaFlopsRegularizer(reference, torch.randn(1, 3, 8, 8), gamma_threshold=1e-2)
    gamma = reference.model[1].weight
    (term_grad,) = torch.autograd.grad(reg.get_regularization_term(), [gamma])
    moved = params[strength]["model.1.weight"] - params[0.0]["model.1.weight"]
    assert term_grad.abs().min() > 0
    torch.testing.assert_close(moved, -lr * strength * term_grad, rtol=1e-4, atol=1e-9)


class StopAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_checkpoint_resume_continues_the_controller_exactly(tmp_path):
    def fit(stop=None, ckpt_path=None):
        L.seed_everything(0)
        module = Classifier()
        with torch.no_grad():  # small scales, so that channels die within the 16 steps
            module.model[1].weight.copy_(torch.linspace(0.015, 0.15, 16))
            module.model[4].weight.copy_(torch.linspace(0.015, 0.15, 24))
        callback = MorphNet(target_cost=0.6, log_every=2)
        callbacks = [callback]
        if stop:
            callbacks += [StopAt(stop), L.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=stop)]
        t = trainer(tmp_path, callbacks, max_steps=16, logger=False, enable_checkpointing=bool(stop))
        t.fit(module, loader(), ckpt_path=ckpt_path)
        return callback.target_cost, module

    whole, whole_module = fit()
    fit(stop=8)
    (checkpoint,) = (tmp_path / "ckpt").glob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("MorphNet")]
    assert state["target_cost"]["last_read_step"] == 8
    resumed, resumed_module = fit(ckpt_path=checkpoint)
    assert whole.cost < whole.seed_cost  # the controller had something to do
    assert resumed.last_read_step == 16 and resumed.seed_cost == whole.seed_cost
    assert resumed.controller.state_dict() == pytest.approx(whole.controller.state_dict(), rel=1e-6)
    assert resumed.best() == whole.best()


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    sys.path.insert(0, {tests!r})
    import lightning.pytorch as L
    import morphnet
    from morphnet.integrations.lightning import MorphNet
    from test_integration_lightning import Classifier, loader

    if __name__ == "__main__":
        torch.set_num_threads(1)
        L.seed_everything(0)
        module = Classifier()
        callback = MorphNet(target_cost=0.5)
        trainer = L.Trainer(max_steps=12, accelerator="cpu", devices=2, strategy="ddp", callbacks=[callback],
                            default_root_dir={root!r}, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=3)
        trainer.fit(module, loader(n=96, batch=8))
        tc = callback.target_cost
        out = dict(rank=trainer.global_rank, world=trainer.world_size, strength=tc.strength, seed=tc.seed_cost,
                   best=tc.best().step, counts=tc.best_structure(), file=str(callback.structure_file),
                   gamma=module.model[1].weight.tolist())
        with open(os.path.join({root!r}, f"rank{{trainer.global_rank}}.json"), "w") as f:
            json.dump(out, f)
""")


def test_ddp_with_two_cpu_processes_agrees_and_writes_once(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    for key in ("strength", "seed", "best", "counts", "file", "gamma"):
        assert ranks[0][key] == ranks[1][key], key
    files = sorted((tmp_path / "learned_structure").glob("alive_*.json"))
    assert Path(ranks[0]["file"]) in files
    assert json.loads(Path(ranks[0]["file"]).read_text()) == ranks[0]["counts"]


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="resource"):
        MorphNet(resource="watts")
    with pytest.raises(ValueError, match="hardware"):
        MorphNet(resource="latency")
    with pytest.raises(ValueError, match="regularizer"):
        MorphNet(regularizer="l2")
    with pytest.raises(ValueError, match="target_cost"):
        MorphNet(target_cost=-0.5)
