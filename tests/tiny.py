"""Tiny, offline test assets: a BPE tokenizer with a ChatML template, Llama- and Qwen2-style causal LMs built from a
config, and small instruction datasets in every format SFTTrainer accepts.

Nothing here touches the network. Everything is deterministic for a seed, so tests that compare two runs can rebuild
the same assets.
"""

import contextlib
import random

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, with `{% generation %}` around assistant turns so TRL's `assistant_only_loss` can build its masks.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
_ANIMALS = ["cat", "dog", "bird", "fish", "horse", "mouse", "lion", "tiger"]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _make_example(rng: random.Random) -> tuple[str, str]:
    """One instruction and its response from a handful of tasks a tiny model can learn in a few steps."""
    task = rng.randrange(4)
    if task == 0:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"Add {a} and {b}.", f"The sum of {a} and {b} is {a + b}."
    if task == 1:
        words = rng.sample(_ANIMALS, k=rng.randint(2, 4))
        return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))
    if task == 2:
        n = rng.randrange(10)
        return f"Spell the number {n}.", f"{n} is spelled {_NUMBER_WORDS[n]}."
    color, animal = rng.choice(_COLORS), rng.choice(_ANIMALS)
    return f"Describe a {color} {animal}.", f"A {color} {animal} is a {animal} whose color is {color}."


def make_pairs(num_examples: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [_make_example(rng) for _ in range(num_examples)]


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the generated corpus, wrapped as a transformers tokenizer with a chat template."""
    corpus = [f"{prompt} {response}" for prompt, response in make_pairs(2000, seed=1234)]
    corpus += ["user assistant system You are a helpful assistant."]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _common_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int, num_layers: int) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def build_llama(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A tiny Llama-style causal LM with an untied LM head."""
    config = LlamaConfig(**_common_config(tokenizer, hidden_size, num_layers), tie_word_embeddings=False)
    with _seeded(seed):
        return LlamaForCausalLM(config)


def build_qwen2(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A tiny Qwen2-style causal LM with tied embeddings and attention biases."""
    config = Qwen2Config(**_common_config(tokenizer, hidden_size, num_layers), tie_word_embeddings=True)
    with _seeded(seed):
        return Qwen2ForCausalLM(config)


def build_gemma2(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A tiny Gemma-2-style causal LM: tied embeddings and soft-capped logits (`final_logit_softcapping`)."""
    config = Gemma2Config(
        **_common_config(tokenizer, hidden_size, num_layers), head_dim=hidden_size // 4, final_logit_softcapping=5.0
    )
    with _seeded(seed):
        return Gemma2ForCausalLM(config)


def build_qwen3_moe(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A tiny Qwen3-MoE causal LM: 4 experts, 2 per token, on every layer, and a router load-balancing loss
    coefficient large enough (0.5) for the auxiliary loss to show in the total."""
    config = Qwen3MoeConfig(
        **_common_config(tokenizer, hidden_size, num_layers),
        head_dim=hidden_size // 4,
        moe_intermediate_size=hidden_size,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        router_aux_loss_coef=0.5,
        tie_word_embeddings=False,
    )
    with _seeded(seed):
        return Qwen3MoeForCausalLM(config)


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's global generator inside the block only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def prompt_completion_dataset(num_examples: int = 32, seed: int = 0) -> Dataset:
    """Standard (plain text) prompt/completion rows with a stable `id`."""
    rows = [
        {"id": f"ex-{i:04d}", "prompt": f"Instruction: {p}\nResponse:", "completion": f" {r}"}
        for i, (p, r) in enumerate(make_pairs(num_examples, seed))
    ]
    return Dataset.from_list(rows)


def conversational_prompt_completion_dataset(num_examples: int = 32, seed: int = 0) -> Dataset:
    """Conversational prompt/completion rows: a user turn as the prompt, the assistant turn as the completion."""
    rows = [
        {
            "id": f"ex-{i:04d}",
            "prompt": [{"role": "user", "content": p}],
            "completion": [{"role": "assistant", "content": r}],
        }
        for i, (p, r) in enumerate(make_pairs(num_examples, seed))
    ]
    return Dataset.from_list(rows)


def messages_dataset(num_examples: int = 32, seed: int = 0) -> Dataset:
    """Conversational `messages` rows (system, user, assistant)."""
    rows = [
        {
            "id": f"ex-{i:04d}",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": p},
                {"role": "assistant", "content": r},
            ],
        }
        for i, (p, r) in enumerate(make_pairs(num_examples, seed))
    ]
    return Dataset.from_list(rows)


def text_dataset(num_examples: int = 32, seed: int = 0) -> Dataset:
    """Plain language-modeling rows in a `text` column."""
    rows = [
        {"id": f"ex-{i:04d}", "text": f"Instruction: {p}\nResponse: {r}"}
        for i, (p, r) in enumerate(make_pairs(num_examples, seed))
    ]
    return Dataset.from_list(rows)
