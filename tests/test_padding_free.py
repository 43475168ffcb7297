"""Padding-free batches (kftune's default) give each sequence exactly the loss it has alone: no cross-talk."""

import torch

from kftune.data.reading import load_conversations, to_dataset
from kftune.models.loading import load_tokenizer, pick_runtime
from kftune.train.config import resolve
from kftune.train.training import build_model, data_collator, sft_config


def trainer_for(tiny_model, small_data, tmp_path, padding_free: bool):
    from trl import SFTTrainer

    cfg = resolve(
        {
            "base_model": str(tiny_model),
            "data_path": str(small_data),
            "output_dir": str(tmp_path / "out"),
            "use_lora": True,
            "lora_r": 4,
            "lora_dropout": 0.0,
            "max_seq_length": 512,
            "per_device_train_batch_size": 4,
            "padding_free": padding_free,
        },
        {},
    )
    runtime = pick_runtime("fp32")
    tokenizer = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    model, _ = build_model(cfg, runtime, str(tiny_model))
    return SFTTrainer(
        model=model,
        args=sft_config(cfg, runtime, tmp_path / "ckpt", False),
        train_dataset=to_dataset(load_conversations(small_data)),
        processing_class=tokenizer,
        data_collator=data_collator(cfg, tokenizer),
    )


def loss_of(trainer, examples) -> tuple[float, int]:
    """(mean loss over the batch's label tokens, how many there are) through trl's own compute_loss."""
    batch = trainer.data_collator(examples)
    trainer.model.eval()  # no dropout; the loss path is the training one
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    return float(loss), int((batch["labels"][:, 1:] != -100).sum())


def test_a_padding_free_batch_has_the_per_sequence_losses_and_matches_padding(tiny_model, small_data, tmp_path):
    free = trainer_for(tiny_model, small_data, tmp_path / "free", padding_free=True)
    examples = [free.train_dataset[i] for i in (0, 3, 5, 7)]
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) > 1 and max(lengths) <= 512  # different lengths

    batch = free.data_collator(examples)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(lengths))
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [sum(lengths[:i]) for i in range(len(lengths))]  # positions restart for every sequence

    together, n = loss_of(free, examples)
    alone = [loss_of(free, [e]) for e in examples]
    weighted = sum(loss * count for loss, count in alone) / sum(count for _, count in alone)
    assert n == sum(count for _, count in alone)
    assert abs(together - weighted) < 1e-5, (together, weighted)

    # each sequence's log-probs do not depend on its neighbours
    padded = trainer_for(tiny_model, small_data, tmp_path / "padded", padding_free=False)
    padded.model.load_state_dict(free.model.state_dict())
    padded_batch = padded.data_collator(examples)
    assert padded_batch["input_ids"].shape == (4, max(lengths)) and "attention_mask" in padded_batch
    assert abs(loss_of(padded, examples)[0] - together) < 1e-5


def test_padding_free_is_the_default_and_can_be_turned_off(tiny_model, small_data, tmp_path):
    cfg = resolve({"base_model": str(tiny_model), "data_path": str(small_data)}, {})
    tokenizer = load_tokenizer(str(tiny_model))
    assert cfg.padding_free and data_collator(cfg, tokenizer).padding_free
    assert data_collator(resolve({"padding_free": False}, {}), tokenizer) is None
