"""The embedded default LM: a tiny Qwen3 that solves arithmetic chains step by step, trained from scratch.

Run with ``python -m stages.toy_model`` (or ``dvc repro toy_model``). Reads ``seed``, ``toy.*`` and ``paths``
from params.yaml; writes ``paths.toy_model`` (a Hugging Face model directory: config, safetensors weights,
generation config, tokenizer with its chat template) and ``<paths.metrics>/cost/toy_model.json``.

The result loads offline like any real checkpoint::

    tokenizer = AutoTokenizer.from_pretrained("artifacts/toy_model")
    model = AutoModelForCausalLM.from_pretrained("artifacts/toy_model")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "12+7-5"}],
                                           add_generation_prompt=True, tokenize=False)
    # prompt == "<|user|>12+7-5<|assistant|>"; the model continues "<think>12+7=19\\n19-5=14</think>\\boxed{14}"

The tokenizer is character level: every printable ASCII character and the newline is one token, and, as in
Qwen3, ``<think>`` and ``</think>`` are single tokens. Characters outside that set map to ``<|unk|>``, so any
question (GSM8K, MATH) can be tokenized, even if the toy model cannot answer it.

When ``model.name`` is not ``toy`` the stage trains nothing: it writes ``save_skipped``'s placeholder directory (one
note, the same for every real model) in a second, so a real run does not pay for the toy's training.

The model is trained just enough that sampling at temperature 0.7 gives a real mix of right and wrong answers,
with fewer right on the rarely seen tail chains used as the out-of-distribution set
(stages/lib/questions/arithmetic.py).
"""

from __future__ import annotations

import json
import logging
import math
import string
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from stages.lib.questions import arithmetic
from stages.lib.questions.answers import last_boxed_content
from stages.lib.io.files import progress_bar
from stages.lib.params import ToyParams

log = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
# Like Qwen3, the think markers are added tokens that are *not* special: decode(skip_special_tokens=True)
# keeps them, so the reasoning span stays visible in decoded text.
THINK_TOKENS = (arithmetic.THINK_START, arithmetic.THINK_END)
CHARACTERS = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")  # printable ASCII, space, newline

# One user turn, then the assistant's turn; an assistant message (a full transcript) ends with EOS.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}" + USER_TOKEN + "{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT_TOKEN + "{{ message['content'] }}" + EOS_TOKEN +
    "{%- else -%}{{ raise_exception('the toy model knows only the user and assistant roles, got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT_TOKEN + "{%- endif -%}"
)

WARMUP_FRACTION = 0.05  # of the steps: a short linear warm-up keeps the early large updates from diverging
FINAL_LR_FRACTION = 0.1  # the cosine schedule ends at this fraction of the peak learning rate
VALIDATION_QUESTIONS = 64  # greedy-decoded after training, as a smoke check logged in the cost record


# ---- tokenizer ----------------------------------------------------------------------------------------------
def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: special tokens first (pad = 0, eos = 1), then the think markers, then chars."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + THINK_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char, \n included
    backend.decoder = decoders.Fuse()  # concatenate characters back without separators
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                        unk_token=UNK_TOKEN, padding_side="left", model_max_length=2048)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def prompt_texts(tokenizer: PreTrainedTokenizerFast, questions: list[str]) -> list[str]:
    """The chat-templated prompts, exactly as the generation stage renders them."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=False) for q in questions]


def training_batch(tokenizer: PreTrainedTokenizerFast, chains: list[str],
                   recheck: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels for prompt + solution + EOS, right padded; labels are -100 on prompt and padding.

    Returns ``(input_ids, labels)``, both (batch, longest sequence). Right padding needs no attention mask:
    under the causal mask, padding after a sequence cannot influence it.
    """
    prompts = tokenizer(prompt_texts(tokenizer, chains), add_special_tokens=False).input_ids
    recheck = recheck if recheck is not None else [False] * len(chains)
    completions = tokenizer([arithmetic.solution_text(c, again) + EOS_TOKEN for c, again in zip(chains, recheck)],
                            add_special_tokens=False).input_ids
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(chains), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(chains), length), -100, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        end = len(prompt) + len(completion)
        input_ids[row, :end] = torch.tensor(prompt + completion)
        labels[row, len(prompt):end] = torch.tensor(completion)  # the loss is on the completion only
    return input_ids, labels


# ---- model --------------------------------------------------------------------------------------------------
def build_model(toy: ToyParams, tokenizer: PreTrainedTokenizerFast) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 sized by ``toy``; initialise the torch RNG (``torch.manual_seed``) first."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=toy.hidden_size,
        intermediate_size=toy.intermediate_size,
        num_hidden_layers=toy.layers,
        num_attention_heads=toy.heads,
        num_key_value_heads=toy.heads,
        head_dim=toy.hidden_size // toy.heads,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,  # the vocabulary is tiny; one matrix serves input and output
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return model


def learning_rate_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up, then cosine decay from ``peak`` to ``FINAL_LR_FRACTION * peak``."""
    warmup = max(1, int(WARMUP_FRACTION * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


TRAINING_THREADS = 2
"""CPU threads of the training loop, fixed: a float sum split over a different number of threads rounds
differently, so the weights would depend on the machine's core count."""


def train(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, toy: ToyParams,
          rng: np.random.Generator, progress: bool = True) -> dict:
    """Train ``model`` in place on fresh chains drawn from ``rng`` each step; return the training counters.

    Deterministic: ``TRAINING_THREADS`` threads and ``torch.use_deterministic_algorithms(True)`` for the loop (both
    restored after it), so the same seed, params and locked environment give the same weights bit for bit.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(TRAINING_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(model, tokenizer, toy, rng, progress)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, toy: ToyParams,
           rng: np.random.Generator, progress: bool) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=toy.learning_rate, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    tokens = completion_tokens = 0
    recent_losses: list[float] = []
    bar = progress_bar(range(toy.steps), desc="toy_model", enabled=progress, mininterval=2.0)
    for step in bar:
        chains = arithmetic.training_chains(toy.batch_size, rng, toy.min_terms, toy.max_terms, toy.max_operand,
                                            toy.ood_max_terms, toy.ood_max_operand, toy.ood_train_fraction)
        # over-thinking chains (toy.recheck_fraction); no draw at 0, so the default's random stream is unchanged
        recheck = list(rng.random(len(chains)) < toy.recheck_fraction) if toy.recheck_fraction > 0 else None
        input_ids, labels = training_batch(tokenizer, chains, recheck)  # (batch, length)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, toy.steps, toy.learning_rate)
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens += int((input_ids != tokenizer.pad_token_id).sum())
        completion_tokens += int((labels != -100).sum())
        recent_losses = (recent_losses + [loss.item()])[-50:]
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(recent_losses):.3f}")
    model.eval()
    final_loss = float(np.mean(recent_losses))
    log.info("trained %d steps on %d tokens (%d completion tokens); final loss %.4f",
             toy.steps, tokens, completion_tokens, final_loss)
    return {"steps": toy.steps, "train_tokens": tokens, "train_completion_tokens": completion_tokens,
            "final_loss": round(final_loss, 5)}


# ---- validation ---------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_accuracy(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast,
                    questions: list[tuple[str, str]], max_new_tokens: int = 128) -> float:
    """Fraction of ``(question, gold)`` pairs whose greedy completion boxes the gold answer."""
    batch = tokenizer(prompt_texts(tokenizer, [q for q, _ in questions]), add_special_tokens=False,
                      padding=True, return_tensors="pt")
    output = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
    texts = tokenizer.batch_decode(output[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    return float(np.mean([last_boxed_content(text) == gold for text, (_, gold) in zip(texts, questions)]))


def check_round_trip(directory: Path, model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """Reload the saved directory through the Auto classes and require identical tokens and logits."""
    reloaded_tokenizer = AutoTokenizer.from_pretrained(directory)
    reloaded_model = AutoModelForCausalLM.from_pretrained(directory)
    prompt = prompt_texts(tokenizer, ["12+7-5"])[0] + arithmetic.solution_text("12+7-5")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    if reloaded_tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.tolist() != ids.tolist():
        raise RuntimeError(f"{directory}: the reloaded tokenizer encodes differently")
    with torch.no_grad():
        if not torch.allclose(model(ids).logits, reloaded_model(ids).logits, atol=1e-5):
            raise RuntimeError(f"{directory}: the reloaded model gives different logits")


SKIPPED_FILE = "NOT_TRAINED.json"
"""The one file of the toy_model stage's output when ``model.name`` is not ``toy``."""


def save_skipped(directory: Path, local_model_sha256: str | None = None) -> None:
    """The toy_model stage's output for a real model: a directory with one note and no weights.

    DVC needs the declared output to exist; for a Hub model its content does not depend on which one runs, so
    switching between them leaves it unchanged, and switching back to ``toy`` retrains the real thing. For a local
    model (under data/models/, a dep of the stage) the note holds ``local_model_sha256``, the content hash of the
    named file or directory: generate and trace depend on this directory, so editing that model reruns them, and
    editing another file of data/models/ does not. Loading it as the toy model fails, saying to run the stage
    (stages/lib/models/loading.py).
    """
    directory.mkdir(parents=True)
    note = {"trained": False,
            "why": "model.name is not `toy`, so the toy_model stage trained nothing; set model.name to `toy` and run "
                   "`dvc repro` to train the embedded default model"}
    if local_model_sha256 is not None:
        note["local_model_sha256"] = local_model_sha256
    (directory / SKIPPED_FILE).write_text(json.dumps(note, indent=2) + "\n")


def save(directory: Path, model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, toy: ToyParams,
         seed: int) -> None:
    directory.mkdir(parents=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # The run's own config beside its outputs, for a reader who finds the directory without params.yaml.
    (directory / "toy_params.json").write_text(json.dumps({"seed": seed, **toy.model_dump()}, indent=2) + "\n")
