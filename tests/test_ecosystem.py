"""fusedopt inside the trainers people use: Hugging Face Trainer and PyTorch Lightning (CPU)."""

import pytest
import torch

import fusedopt


def _hf_losses(tmp_path, **trainer_kwargs):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(32):
        ids = torch.randint(0, 64, (16,), generator=gen)
        data.append({"input_ids": ids, "labels": ids.clone()})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    make = trainer_kwargs.pop("make", None)
    if make is not None:
        trainer_kwargs["optimizers"] = make(model)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, **trainer_kwargs)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_hf_trainer_with_optimizer_and_scheduler(tmp_path):
    """Trainer(optimizers=(opt, scheduler)), with the Trainer's own grad clipping (max 1.0)."""

    def make(cls):
        def build(model):
            opt = cls(model.parameters(), lr=1e-3, weight_decay=0.01)
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + e))

        return build

    ref = _hf_losses(tmp_path / "torch", make=make(torch.optim.AdamW))
    ours = _hf_losses(tmp_path / "fusedopt", make=make(fusedopt.AdamW))
    assert len(ours) == 6 and ours == pytest.approx(ref, rel=1e-5)


def test_hf_trainer_optimizer_cls_and_kwargs(tmp_path):
    """Trainer(optimizer_cls_and_kwargs=...): the Trainer builds its decay / no-decay groups."""
    ref = _hf_losses(tmp_path / "torch", optimizer_cls_and_kwargs=(torch.optim.AdamW, {"lr": 1e-3}))
    ours = _hf_losses(
        tmp_path / "fusedopt", optimizer_cls_and_kwargs=(fusedopt.AdamW, {"lr": 1e-3})
    )
    assert len(ours) == 6 and ours == pytest.approx(ref, rel=1e-5)


def _lightning_losses(make_optimizer):
    L = pytest.importorskip("lightning")

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
            )
            self.losses = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return make_optimizer(self.parameters())

    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(64, 8, generator=gen), torch.randn(64, 1, generator=gen)
    )
    model = Model()
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    return model.losses


def test_lightning_configure_optimizers():
    """Lightning always calls step(closure=...): fusedopt runs the closure with grad enabled."""
    ref = _lightning_losses(lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    ours = _lightning_losses(lambda ps: fusedopt.AdamW(ps, lr=1e-2))
    assert len(ours) == 6 and ours == pytest.approx(ref, rel=1e-5)


def test_lightning_with_noam():
    noam = fusedopt.Noam(16, 3)

    def torch_noam(ps):
        opt = torch.optim.AdamW(ps, lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: noam.rate(e + 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    ref = _lightning_losses(torch_noam)
    ours = _lightning_losses(lambda ps: fusedopt.AdamW(ps, lr=noam))
    assert len(ours) == 6 and ours == pytest.approx(ref, rel=1e-5)
