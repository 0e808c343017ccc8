"""Shared-prefix SFT computes each shared prompt prefix once and gives the hidden states, losses
and gradients of the ordinary padded forward (tiny Llama with LoRA, and a real SFTTrainer)."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from imm_trl.models import tiny_model
from imm_trl.shared_prefix import prefix_groups, share_prompt_prefixes

PAD = 0


def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, rows))
    ids = torch.tensor([row + [PAD] * (length - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    return ids, mask


def few_shot_batch(vocab: int, generator: torch.Generator):
    """Rows of two 'families' (a 40- and a 24-token prefix), suffixes of 3-9 tokens, and a row
    that shares nothing: interleaved as a mixed batch is."""
    def tokens(n):
        return torch.randint(1, vocab, (n,), generator=generator).tolist()

    family_a, family_b = tokens(40), tokens(24)
    rows = [family_a + tokens(3), family_b + tokens(9), family_a + tokens(7), tokens(30),
            family_b + tokens(5), family_a + tokens(4)]
    return right_padded(rows)


def test_rows_are_grouped_by_their_longest_shared_prefix():
    ids, mask = right_padded([[5, 6, 7, 8, 1], [9, 9, 9], [5, 6, 7, 2, 2, 2], [5, 6, 7, 8, 3]])
    assert prefix_groups(ids, mask, min_shared=2) == [([0, 2, 3], 3), ([1], 0)]
    # a prefix is capped so that every row keeps a token of its own
    ids, mask = right_padded([[5, 6, 7], [5, 6, 7, 8]])
    assert prefix_groups(ids, mask, min_shared=2) == [([0, 1], 2)]
    assert prefix_groups(ids, mask, min_shared=3) == [([0, 1], 0)]


def test_rows_sharing_a_long_few_shot_prefix_are_not_merged_by_a_short_system_prompt():
    system, shots_a, shots_b = [1, 2, 3, 4], [10] * 20, [20] * 20
    rows = [system + shots_a + [7], system + shots_b + [8], system + shots_a + [9, 9], system + shots_b + [6]]
    ids, mask = right_padded(rows)
    assert prefix_groups(ids, mask, min_shared=4) == [([0, 2], 24), ([1, 3], 24)]


def loss_and_grads(model, ids, mask, weights):
    model.zero_grad()
    hidden = model.get_base_model().model(input_ids=ids, attention_mask=mask).last_hidden_state
    loss = (hidden * weights * mask[..., None]).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return hidden * mask[..., None], loss.detach(), grads


def test_hidden_states_and_lora_gradients_equal_the_ordinary_forward():
    model, _ = tiny_model(seed=0)
    model = get_peft_model(model.double(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    generator = torch.Generator().manual_seed(0)
    ids, mask = few_shot_batch(model.config.vocab_size, generator)
    weights = torch.randn(*ids.shape, model.config.hidden_size, generator=generator, dtype=torch.float64)
    tokens_seen = []
    model.get_base_model().model.embed_tokens.register_forward_hook(
        lambda module, args, output: tokens_seen.append(args[0].numel())
    )

    plain = loss_and_grads(model, ids, mask, weights)
    plain_tokens = sum(tokens_seen)
    tokens_seen.clear()
    with share_prompt_prefixes(model):
        shared = loss_and_grads(model, ids, mask, weights)
    assert sum(tokens_seen) == 40 + 3 * 7 + 24 + 2 * 9 + 30 < plain_tokens == 6 * 47
    torch.testing.assert_close(shared[0], plain[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(shared[1], plain[1], rtol=1e-12, atol=1e-9)
    assert shared[2].keys() == plain[2].keys() and len(plain[2]) > 0
    # Llama's RMSNorm computes in float32 even in a float64 model: the prefix's gradient, summed
    # over its rows before the norm's backward (per row before it in the ordinary forward),
    # rounds differently at float32 precision.
    for name, grad in plain[2].items():
        torch.testing.assert_close(shared[2][name], grad, rtol=1e-6, atol=1e-6 * grad.abs().max().item())
    assert "forward" not in vars(model.get_base_model().model)  # restored


def grpo_layout(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's batch layout: prompts left-padded to the longest, completions right-padded."""
    prompt_length = max(len(prompt) for prompt, _ in rows)
    completion_length = max(len(completion) for _, completion in rows)
    ids, mask = [], []
    for prompt, completion in rows:
        left, right = prompt_length - len(prompt), completion_length - len(completion)
        ids.append([PAD] * left + prompt + completion + [PAD] * right)
        mask.append([0] * left + [1] * (len(prompt) + len(completion)) + [0] * right)
    return torch.tensor(ids), torch.tensor(mask)


def test_left_padded_prompts_share_their_prefix_exactly():
    model, _ = tiny_model(seed=0)
    model.double()
    backbone = model.model
    prompt_a, prompt_b = list(range(10, 30)), list(range(40, 64))
    ids, mask = grpo_layout(
        [(prompt_a, [1, 2, 3]), (prompt_b, [6]), (prompt_a, [4, 5]), (prompt_b, [8, 8, 8])]
    )
    tokens_seen = []
    backbone.embed_tokens.register_forward_hook(lambda module, args, output: tokens_seen.append(args[0].numel()))
    plain = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    tokens_seen.clear()
    with share_prompt_prefixes(model):
        shared = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    # each prompt (with its 4 pads for the shorter one) once, then every row's completion
    assert tokens_seen == [24, 2 * 3, 24, 2 * 3]
    torch.testing.assert_close(shared * mask[..., None], plain * mask[..., None], rtol=0, atol=1e-10)


def test_generation_and_checkpointed_batches_run_the_ordinary_forward():
    model, _ = tiny_model(seed=0)
    backbone = model.model
    ids, mask = grpo_layout([(list(range(10, 30)), []), (list(range(10, 30)), [])])
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    tokens_seen = []
    backbone.embed_tokens.register_forward_hook(lambda module, args, output: tokens_seen.append(args[0].numel()))
    with share_prompt_prefixes(model):
        shared = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        backbone(input_ids=ids, attention_mask=mask, use_cache=True)
    assert torch.equal(shared, plain)
    assert tokens_seen == [2 * 20, 2, 2, 2, 2 * 20]  # prefill, three cached steps, a cache-asking call
    model.gradient_checkpointing_enable()
    with share_prompt_prefixes(model):
        assert "forward" not in vars(backbone)


def train_counting_tokens(trainer, share: bool):
    """Train (sharing prefixes or not); the logged losses, the LoRA weights, and the tokens the
    backbone embedded (generation included)."""
    tokens_seen = []
    trainer.model.get_base_model().model.embed_tokens.register_forward_hook(
        lambda module, args, output: tokens_seen.append(args[0].numel())
    )
    with share_prompt_prefixes(trainer.model, enabled=share):
        trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora" in n}
    return losses, weights, sum(tokens_seen)


def sft_run(share: bool, tmp_path):
    # float64: the tiny random model's gradients lose about 1% to float32 rounding, by either path
    model, tokenizer = tiny_model(seed=0)
    model.double()
    shots = [{"role": "user", "content": "Calculate 12 + 30."}, {"role": "assistant", "content": "Answer: 42"},
             {"role": "user", "content": "Calculate 7 - 3."}, {"role": "assistant", "content": "Answer: 4"}]
    data = Dataset.from_list([
        {"prompt": shots + [{"role": "user", "content": f"Calculate {a} + {a * 3}."}],
         "completion": [{"role": "assistant", "content": f"Answer: {4 * a}"}]}
        for a in range(8)
    ])
    args = SFTConfig(
        output_dir=str(tmp_path / str(share)), use_cpu=True, max_steps=3, per_device_train_batch_size=4,
        learning_rate=0.05, logging_steps=1, report_to="none", save_strategy="no", seed=0, max_length=128,
        gradient_checkpointing=False,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    torch.manual_seed(0)  # SFTTrainer initialises the adapter before it seeds
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    return train_counting_tokens(trainer, share)


def test_sft_trainer_trains_the_same_adapter_on_fewer_tokens(tmp_path):
    plain_losses, plain_weights, plain_tokens = sft_run(False, tmp_path)
    losses, weights, tokens = sft_run(True, tmp_path)
    assert tokens < 0.6 * plain_tokens
    assert len(losses) == 3
    # transformers' causal-LM loss upcasts logits with .float(): in float64 that is a cast down, so
    # the losses (and gradients) agree to float32 precision, the last bits depending on the
    # CPU's float32 kernels for the two batch shapes
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    for name, weight in plain_weights.items():
        torch.testing.assert_close(weights[name], weight, rtol=1e-5, atol=1e-6)


def grpo_run(share: bool, tmp_path):
    model, tokenizer = tiny_model(seed=0)
    model.double()
    system = {"role": "system", "content": "Add the two numbers and answer with the sum only."}
    data = Dataset.from_list(
        [{"prompt": [system, {"role": "user", "content": f"What is {a} + {a + 1}?"}]} for a in range(8)]
    )

    def length_reward(completions, **columns):
        return [len(completion[0]["content"]) / 10 for completion in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path / f"grpo-{share}"), use_cpu=True, bf16=False, max_steps=3,
        per_device_train_batch_size=8, num_generations=4, max_completion_length=8, learning_rate=0.05,
        logging_steps=1, report_to="none", save_strategy="no", gradient_checkpointing=False, seed=0, beta=0.0,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    torch.manual_seed(0)
    trainer = GRPOTrainer(
        model=model, reward_funcs=length_reward, args=args, train_dataset=data, processing_class=tokenizer,
        peft_config=lora,
    )
    return train_counting_tokens(trainer, share)


def test_grpo_trainer_trains_the_same_adapter_on_fewer_tokens(tmp_path):
    """A real GRPOTrainer (HF generation; prompts left-padded, num_generations completions each)."""
    plain_losses, plain_weights, plain_tokens = grpo_run(False, tmp_path)
    losses, weights, tokens = grpo_run(True, tmp_path)
    assert tokens < 0.8 * plain_tokens  # generation's tokens are the same in both runs
    assert len(losses) == 3
    assert max(w.abs().max() for name, w in plain_weights.items() if "lora_B" in name) > 0.01  # it trained
    for shared_loss, plain_loss in zip(losses, plain_losses, strict=True):
        assert abs(shared_loss - plain_loss) < 1e-6
    for name, weight in plain_weights.items():
        torch.testing.assert_close(weights[name], weight, rtol=1e-5, atol=1e-6)
