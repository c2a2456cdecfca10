"""morphnet.integrations.transformers.MorphNetCallback on the real Hugging Face Trainer (CPU, models
built from a config: nothing downloaded): zero-config fine-tuning, the term reaches the gradients,
logging, structure files that rebuild, resume from a checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import (  # noqa: E402
    BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments,
)

import morphnet  # noqa: E402
from morphnet.integrations.transformers import MorphNetCallback  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


class Tokens(Dataset):
    """Sequences of 16 token ids; the label is the most frequent of three token ranges."""

    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 96, (n, 16), generator=g)
        self.labels = torch.stack([(self.ids // 32 == k).sum(1) for k in range(3)], 1).argmax(1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config)


def arguments(out, max_steps, **kw):
    base = dict(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-3,
                logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def test_zero_config_fine_tuning_lands_a_structure_file_that_rebuilds(tmp_path):
    model = bert()
    callback = MorphNetCallback(target_cost=0.5)
    trainer = Trainer(model=model, args=arguments(tmp_path, 12), train_dataset=Tokens(), callbacks=[callback])
    trainer.train()
    assert callback.regularizer.name == "GroupLassoFlops"  # no BatchNorm in BERT
    assert callback.target_cost.steps == 12 and callback.target_cost.log_every == 1  # < 100 steps: every step
    files = sorted((tmp_path / "learned_structure").glob("alive_*.json"))
    best = callback.target_cost.best()
    assert callback.structure_file == tmp_path / "learned_structure" / f"alive_{best.step}.json"
    assert callback.structure_file in files
    assert json.loads(callback.structure_file.read_text()) == best.counts
    assert "bert.encoder.layer.0.intermediate.dense" in best.counts
    example = torch.randint(0, 96, (1, 16))
    slim = morphnet.apply_structure(model, callback.structure_file, example)
    assert slim(example).logits.shape == (1, 3)
    assert morphnet.compute_cost(slim, example) == pytest.approx(best.cost)
    logged = [entry for entry in trainer.state.log_history if "morphnet/cost" in entry]
    assert [entry["step"] for entry in logged] == [4, 8, 12]
    assert all("loss" in entry and "morphnet/strength" in entry and "morphnet/alive_channels" in entry
               for entry in logged)


def test_the_term_reaches_the_gradients_of_a_fixed_strength_step(tmp_path):
    """One SGD step with strength s moves the weights by -lr * s * d(term)/dw beyond the step
    without MorphNet (clipping acts before the hook, on the task gradient of both runs alike)."""
    strength, lr, after = 1e-5, 0.1, {}
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    for s in (0.0, strength):
        model = bert()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        args = arguments(tmp_path / str(s), 1, optim="sgd", learning_rate=lr, lr_scheduler_type="constant",
                         weight_decay=0.0)
        Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[MorphNetCallback(strength=s)]).train()
        after[s] = model.state_dict()[name]
    reference = bert()
    reference.load_state_dict(start)
    reg = morphnet.GroupLassoFlopsRegularizer(reference, torch.randint(0, 96, (1, 16)), threshold=1e-2)
    weight = reference.get_parameter(name)
    (term_grad,) = torch.autograd.grad(reg.get_regularization_term(), [weight])
    assert term_grad.abs().max() > 0
    torch.testing.assert_close(after[strength] - after[0.0], -lr * strength * term_grad, rtol=1e-3, atol=1e-10)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_restores_the_controller(tmp_path):
    def train(out, stop=None, resume=None):
        model = bert()
        callback = MorphNetCallback(target_cost=0.5, strength=1e-4, log_every=2)
        callbacks = [callback] + ([StopAt(stop)] if stop else [])
        args = arguments(out, 12, save_strategy="steps", save_steps=6)
        Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks).train(
            resume_from_checkpoint=resume)
        return callback.target_cost

    whole = train(tmp_path / "whole")
    half = train(tmp_path / "half", stop=6)
    checkpoint = tmp_path / "half" / "checkpoint-6"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["MorphNetCallback"]
    assert saved["attributes"]["saved_state"]["target_cost"]["last_read_step"] == 6
    resumed = train(tmp_path / "half", resume=str(checkpoint))
    assert half.last_read_step == 6 and resumed.last_read_step == 12
    assert resumed.seed_cost == whole.seed_cost
    assert resumed.controller.state_dict() == pytest.approx(whole.controller.state_dict(), rel=1e-5)
    assert resumed.best().step == whole.best().step


def test_example_input_can_be_given_and_an_unknown_batch_asks_for_it(tmp_path):
    from morphnet.integrations.core import example_from_batch

    with pytest.raises(ValueError, match="example_input"):
        example_from_batch({"tokens": torch.zeros(2, 16, dtype=torch.long)})
    callback = MorphNetCallback(strength=1e-5, example_input=torch.randint(0, 96, (2, 16)))
    Trainer(model=bert(), args=arguments(tmp_path, 1), train_dataset=Tokens(), callbacks=[callback]).train()
    assert callback.regularizer.get_cost() > 0
